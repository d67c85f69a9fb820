"""`boomerang teacher | family | cut | export | generate`: the engine's commands (no training)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from boomerang import precision
from boomerang.arch import adapter_for
from boomerang.cli.flags import (
    RequestCommand,
    add_family_flags,
    add_plan,
    add_remote_code,
    add_teacher,
    load_family,
    load_teacher,
    plan_from_args,
)
from boomerang.errors import BoomerangError
from boomerang.export import ExportRequest, gguf_run_lines, run_export
from boomerang.family import BestSizes, compress_runs
from boomerang.generation import Sampling
from boomerang.outputs import check_output_dir
from boomerang.settings import add_flags, values_from_args
from boomerang.student import Manifest, cut_student, read_manifest, save_student


def register(sub) -> None:
    p = sub.add_parser("teacher", help="load (and cache) a teacher and describe it")
    add_teacher(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("family", help="the plan and every size of a family")
    add_family_flags(p)
    p.add_argument("--student", default=None, help="a student folder (default: a freshly cut student)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_family)

    p = sub.add_parser("cut", help="write the freshly cut (undistilled) student folder")
    add_teacher(p, dtype="float32")
    add_plan(p)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    p.set_defaults(func=cmd_cut)

    p = sub.add_parser("export", help="one size as a standalone Hugging Face model folder")
    add_export_flags(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="float32 (default on CPU) | bfloat16 | float16")
    p.add_argument("--calibration", default=None, help="text file for the greedy order (default: a built-in text)")
    add_remote_code(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="one prompt through any size, streamed")
    add_family_flags(p)
    p.add_argument("--student", default=None, help="a student folder (default: a freshly cut student, undistilled)")
    p.add_argument("--layers", type=int, default=None, help="size to use (default: the teacher)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    p.set_defaults(func=cmd_generate)


def add_export_flags(p: argparse.ArgumentParser) -> None:
    """ExportRequest's fields: --student, --layers, --out required; the rest with the request's defaults."""
    add_flags(p, ExportRequest, skip=("student", "layers", "out"))
    p.add_argument("--student", required=True, help="student folder")
    p.add_argument("--layers", type=int, required=True, help="the size, by its number of layers")
    p.add_argument("--out", required=True, help="folder to write (--format hf) or file.gguf (--format gguf)")


def export_request_from_args(args) -> ExportRequest:
    return ExportRequest(**{**values_from_args(args, ExportRequest), "student": args.student, "layers": args.layers,
                            "out": args.out})


REQUEST_COMMANDS = {"export": RequestCommand(add_export_flags, export_request_from_args)}


def cmd_teacher(args) -> int:
    start = time.perf_counter()
    teacher = load_teacher(args)
    cfg = teacher.model.config
    info = {"source": teacher.source, "family": adapter_for(cfg).family, "model_type": cfg.model_type,
            "layers": teacher.n_layers, "hidden_size": cfg.hidden_size,
            "parameters": sum(p.numel() for p in teacher.model.parameters()),
            "fingerprint": teacher.fingerprint, "revision": teacher.revision,
            "dtype": str(next(teacher.model.parameters()).dtype).removeprefix("torch."),
            "auto_dtype": precision.describe(args.device),
            "load_seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>12}  {v:,}" if isinstance(v, int) else f"{k:>12}  {v}")
    return 0


def cmd_family(args) -> int:
    teacher, family, label = load_family(args)
    sizes = family.sizes()
    stored = read_manifest(args.student).best if args.student and family.order is None else None
    best = BestSizes.from_dict(stored) if stored else None
    if args.json:
        print(json.dumps({
            "teacher": teacher.source, "teacher_fingerprint": teacher.fingerprint, "student": label,
            "plan": family.plan.to_dict(), "alignment": [list(a) for a in family.plan.alignment],
            "order": list(family.order) if family.order is not None else args.order,
            "best": best.to_dict() if best else None, "sizes": [s.to_dict() for s in sizes],
        }, indent=2))
        return 0
    plan = family.plan
    print(f"teacher  {teacher.source}  ({plan.n_teacher} layers, {family.arch.family})")
    print(f"student  {label}  ({plan.n_student} layers)")
    print(f"kept     {list(plan.kept)}")
    if family.order is not None:
        print(f"order    {list(family.order)}  (student layers, first patched first)\n")
    else:
        print(f"order    {args.order}: per size, the candidate order closest to the teacher (KL on "
              f"{best.tokens if best else '?'} calibration tokens; a size's KL under each candidate below)\n")
    print(f"{'layers':>6}  {'params':>12}  {'no embed':>12}  {'patched':>7}  runs")
    for s in sizes:
        tag = " (teacher)" if s.is_teacher else " (student)" if s.is_student else ""
        chosen = ""
        if best and not (s.is_teacher or s.is_student):
            kls = ", ".join(f"{name} {value:.3f}" for name, value in best.kl[s.n_layers].items())
            chosen = f"  [{best.chosen[s.n_layers]}; KL {kls}]"
        print(f"{s.n_layers:>6}  {s.params:>12,}  {s.params_no_embed:>12,}  {len(s.patched):>7}  "
              f"{compress_runs(s.layers)}{tag}{chosen}")
    if best and best.left_out:
        print("\nsizes other orders reach (not in the family: it keeps last-k's sizes, each in its best order):")
        for n, why in best.left_out.items():
            print(f"{n:>6}  {why}")
    if best:
        above = best.dominated()
        if above:
            print(f"\nfarther from the teacher than a smaller size on the calibration text: {', '.join(map(str, above))} "
                  "layers (a smaller size does better; they stay in the family, listed here so that none is "
                  "dropped unsaid)")
    return 0


def cmd_cut(args) -> int:
    check_output_dir(args.out, overwrite=args.overwrite)  # fail before loading anything
    teacher = load_teacher(args)
    plan = plan_from_args(args, teacher.n_layers)
    student = cut_student(teacher.model, plan)
    manifest = Manifest(teacher.source, teacher.fingerprint, plan, teacher_revision=teacher.revision)
    out = save_student(student, teacher.tokenizer, manifest, args.out, overwrite=args.overwrite)
    print(f"wrote the {plan.n_student}-layer student (teacher layers {list(plan.kept)}) to {out}")
    return 0


def cmd_export(args) -> int:
    req = export_request_from_args(args)
    out = run_export(req, device=args.device, dtype=args.dtype, calibration=args.calibration,
                     teacher=load_teacher(args) if req.teacher else None)
    if req.format == "gguf":
        print(f"exported the {req.layers}-layer size as GGUF ({req.type}, {out.stat().st_size / 2**20:.1f} MiB) to {out}")
        print(gguf_run_lines(out))
        return 0
    params = json.loads((out / "boomerang-size.json").read_text())["params"]
    print(f"exported the {req.layers}-layer size ({params:,} parameters) to {out}")
    return 0


def cmd_generate(args) -> int:
    from transformers import TextStreamer  # transformers' generation classes: only when a prompt runs

    sampling = Sampling(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_p)  # checked first
    if not args.prompt.strip():
        raise BoomerangError("the prompt is empty: give --prompt TEXT")
    teacher, family, _ = load_family(args)
    n_layers = args.layers or family.plan.n_teacher
    model = family.build(n_layers)
    tok = teacher.tokenizer
    if tok.chat_template and not args.no_chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(model.device)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                             streamer=streamer, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             **sampling.generate_kwargs())
    new = out.shape[1] - ids.shape[1]
    took = time.perf_counter() - start
    print(f"[{n_layers} layers: {new} tokens in {took:.2f} s, {new / took:.1f} tokens/s]", file=sys.stderr)
    return 0
