"""Ready for a GPU: what this project does on one CUDA card, in one printed table, with no network and no weights
carried (teachers with real configs and random weights: the default teacher's shape and a 1.7B one).

    bash bench/gpu_check.sh                                   # on a CUDA machine: at most ~8 minutes on one H100
    python bench/gpu_check.py --device cpu --shapes tiny      # the same code on any machine, in seconds (tested)

Per teacher shape: distillation steps as `boomerang distill` runs them (`--precision auto`: bf16 autocast, float32
master weights; the teacher held in bf16), tokens/s, TFLOP/s and MFU against the card's dense bf16 peak (6 x student
+ 2 x teacher parameters per token; attention not counted), the peak memory (`torch.cuda.max_memory_allocated`)
against the estimate `boomerang distill --estimate` gives from the config alone; checks that every weight is on the
card and in the dtype expected and that the losses computed in chunks equal the whole ones; where bitsandbytes is
installed, the 8-bit AdamW's first losses against AdamW's; then greedy decoding of a middle size of the family, one
stream and eight batched (tokens/s). Rows that fail a check say so; the exit
status is 1 when any did. `--json FILE` keeps the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES: dict[str, dict] = {
    # a few layers of nothing in particular: the plumbing, on any machine
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM2-135M-Instruct, the default teacher (its config.json)
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=True),
    # SmolLM2-1.7B (its config.json)
    "1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=True),
}

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
"""Dense bf16 TFLOP/s by card name (vendor data sheets; SXM parts), for MFU; another card gets none."""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def char_tokenizer():
    """A character tokenizer (printable ASCII): the ids it gives are a corner of a big vocabulary, which costs the
    model the same as any others."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


def random_teacher(shape: str, folder: Path, seed: int = 0) -> int:
    """A Llama teacher of `shape` with random weights, saved (bf16 where the shape is big) with a tokenizer; its
    parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if shape == "tiny" else torch.bfloat16)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def random_text(path: Path, chars: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)]
    path.write_text(" ".join(rng.choices(words, k=chars // 6)))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the plumbing only)")
    p.add_argument("--shapes", default="135m,1.7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--steps", type=int, default=8, help="timed distillation steps a shape (after 2 warm-up steps)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded a stream")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        fail(f"unknown shape {', '.join(unknown) or '(none)'}: use {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        fail(f"bench/gpu_check.sh needs a CUDA GPU: torch {torch.__version__} ({build}) sees none. On this machine "
             "the same code runs with: python bench/gpu_check.py --device cpu --shapes tiny")
    if args.device not in ("cuda", "cpu"):
        fail(f"--device must be cuda or cpu, got {args.device!r}")
    device = torch.device(args.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}", flush=True)
    else:
        print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}: the plumbing only", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        random_text(tmp / "text.txt", 400_000 if device.type == "cuda" else 40_000)
        for shape in shapes:
            rows += check_shape(shape, tmp, device, args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any(r.get("ok") is False for r in rows) else 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_shape(shape: str, tmp: Path, device: torch.device, args) -> list[dict]:
    """The rows of one teacher shape: distillation speed and memory, the checks, decoding speed."""
    from boomerang.family import Family
    from boomerang.training.loop import optimizer_step, setup
    from boomerang.training.losses import kl_to_teacher
    from boomerang.training.memory import estimate_for
    from boomerang.training.recipe import DistillConfig

    folder = tmp / f"teacher-{shape}"
    start = time.perf_counter()
    n_teacher = random_teacher(shape, folder)
    print(f"{shape}: a random teacher of {n_teacher / 1e6:.0f}M parameters written in {time.perf_counter() - start:.0f} s",
          flush=True)
    cfg = DistillConfig(teacher=str(folder), data=str(tmp / "text.txt"), out=str(tmp / f"run-{shape}"), steps=1000,
                        batch_size=args.batch_size, seq_len=args.seq_len, device=device.type, heldout_fraction=0.01,
                        warmup=0.0, schedule="constant", precision="auto")
    estimate = estimate_for(cfg)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = setup(cfg)
    rows: list[dict] = []
    try:
        times, losses = [], []
        for step in range(args.steps + 2):  # two warm-up steps
            sync(device)
            t0 = time.perf_counter()
            losses.append(optimizer_step(run, step)[0])
            sync(device)
            if step >= 2:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        tokens = cfg.batch_size * cfg.seq_len
        n_student = sum(p.numel() for p in run.student.parameters() if p.requires_grad)
        flops = (6 * n_student + 2 * n_teacher) * tokens / step_s
        peak = peak_flops(device)
        measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append({"shape": shape, "what": f"distill step, batch {cfg.batch_size} x {cfg.seq_len}",
                     "value": f"{tokens / step_s:,.0f} tokens/s", "detail":
                     f"{step_s:.3f} s/step, {flops / 1e12:.1f} TFLOP/s"
                     + (f", MFU {flops / peak:.0%}" if peak else "")
                     + f", autocast {cfg.autocast_dtype(device) or 'off'}"})
        detail = f"estimate {estimate.total / 2**30:.2f} GiB"
        if measured:
            ratio = estimate.total / measured
            detail += f", measured {measured / 2**30:.2f} GiB ({ratio:.2f}x)"
            rows.append({"shape": shape, "what": "peak memory: estimate within 20 % of measured", "value":
                         f"{measured / 2**30:.2f} GiB", "detail": detail, "ok": 0.8 <= ratio <= 1.2})
        else:
            rows.append({"shape": shape, "what": "peak memory", "value": "-", "detail": detail + " (measured on CUDA)"})
        # placement and dtypes: everything on the run's device; the frozen teacher in bf16 on a card that has it
        on_device = all(p.device.type == device.type for p in [*run.student.parameters(), *run.teacher.model.parameters()])
        t_dtype = next(run.teacher.model.parameters()).dtype
        s_dtype = next(run.student.parameters()).dtype
        want_teacher = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else t_dtype
        rows.append({"shape": shape, "what": "weights on the device; teacher bf16, student fp32 master weights",
                     "value": f"teacher {str(t_dtype)[6:]}, student {str(s_dtype)[6:]}",
                     "ok": on_device and t_dtype == want_teacher and s_dtype == torch.float32})
        # the losses in chunks of positions equal the whole ones
        g = torch.Generator(device=device).manual_seed(0)
        shape_l = (2, min(cfg.seq_len, 256), run.teacher.model.config.vocab_size)
        s_logits = torch.randn(shape_l, generator=g, device=device)
        t_logits = torch.randn(shape_l, generator=g, device=device)
        mask = torch.ones(shape_l[:2], device=device)
        whole = kl_to_teacher(s_logits, t_logits, mask)
        chunked = kl_to_teacher(s_logits, t_logits, mask, chunk=shape_l[1] // 4)
        diff = float((whole - chunked).abs())
        rows.append({"shape": shape, "what": "KL in chunks of positions = whole", "value": f"|diff| {diff:.1e}",
                     "ok": diff <= 1e-5})
        # decoding a middle size of the family (the cut student's layers shared with the teacher)
        fam = Family(run.teacher.model, run.student, run.plan)
        n = fam.layer_counts[len(fam.layer_counts) // 2]
        size = fam.build(n)
        for streams in (1, 8):
            prompt = torch.randint(3, 90, (streams, 32), device=device)
            size.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = size.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False)
            sync(device)
            made = (out.shape[1] - prompt.shape[1]) * streams
            rows.append({"shape": shape, "what": f"greedy decoding, {n}-layer size, {streams} stream(s)",
                         "value": f"{made / (time.perf_counter() - t0):,.0f} tokens/s"})
    finally:
        for handle in run.hooks:
            handle.remove()
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda" and shape == args.shapes.split(",")[0] and bitsandbytes_installed():
        rows.append(eight_bit_row(shape, cfg, losses[:3], device))
    for r in rows:
        print(f"  {r['what']}: {r['value']}{'' if r.get('ok', True) else '  FAILED'}", flush=True)
    return rows


def bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def eight_bit_row(shape: str, cfg, adamw_losses: list[float], device: torch.device) -> dict:
    """The first three steps again with bitsandbytes' 8-bit AdamW from the same start and batches: the losses
    within 2 % of AdamW's."""
    import dataclasses

    from boomerang.training.loop import optimizer_step, setup

    run = setup(dataclasses.replace(cfg, optimizer="adamw8bit", out=cfg.out + "-8bit"))
    try:
        losses = [optimizer_step(run, step)[0] for step in range(len(adamw_losses))]
    finally:
        for handle in run.hooks:
            handle.remove()
        del run
        torch.cuda.empty_cache()
    worst = max(abs(a - b) / abs(a) for a, b in zip(adamw_losses, losses, strict=True))
    return {"shape": shape, "what": "8-bit AdamW: first losses within 2 % of AdamW's", "value": f"worst {worst:.2%}",
            "detail": f"AdamW {', '.join(f'{x:.4f}' for x in adamw_losses)}; 8-bit {', '.join(f'{x:.4f}' for x in losses)}",
            "ok": worst <= 0.02}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'shape':<6} {'check':<62} {'result':<28} detail")
    for r in rows:
        mark = {True: " ok", False: " FAILED"}.get(r.get("ok"), "")
        print(f"{r['shape']:<6} {r['what']:<62} {r['value']:<28} {r.get('detail', '')}{mark}")


if __name__ == "__main__":
    sys.exit(main())
