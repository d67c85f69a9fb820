"""GGUF export: every writable architecture reloads through transformers' own GGUF reader to the same logits,
the metadata round-trips, bad requests leave nothing behind; and, where llama.cpp is installed
(`bash scripts/install_llamacpp.sh`), llama.cpp itself runs the default teacher's sizes as we do."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from test_family import make_family
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from boomerang.errors import BoomerangError
from boomerang.export import ExportRequest, export_size_gguf, run_export
from boomerang.export_gguf import GGUF_ARCHES, llama_cpp_available, write_gguf
from boomerang.family import mean_kl
from tiny import CONFIGS, tokens

WRITTEN = [t for t in CONFIGS if t in GGUF_ARCHES]


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def without_sliding(model_type):
    """qwen2's tiny config has sliding-window layers, which llama.cpp's qwen2 does not run (refused below)."""
    if model_type == "qwen2":
        CONFIGS["qwen2"] = dict(CONFIGS["qwen2"], use_sliding_window=False)
    return make_family(model_type)


@pytest.fixture(autouse=True)
def keep_configs():
    saved = dict(CONFIGS)
    yield
    CONFIGS.clear()
    CONFIGS.update(saved)


def reload_gguf(path, config=None):
    kw = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("model_type", WRITTEN)
def test_a_middle_size_reloads_through_transformers_gguf_reader_to_the_same_logits(model_type, tmp_path):
    teacher, student, plan, fam = without_sliding(model_type)
    n = fam.layer_counts[1]
    size = fam.build(n)
    x = tokens()
    f32 = export_size_gguf(fam, n, tmp_path / "f32.gguf", type_="f32", teacher_source="tiny", student_source="st")
    config = size.config if model_type != "mistral" else None  # llama.cpp has no mistral: it is read back as llama
    assert_close(reload_gguf(f32, config)(x).logits, size(x).logits, rtol=0, atol=1e-5)
    f16 = export_size_gguf(fam, n, tmp_path / "f16.gguf", type_="f16", teacher_source="tiny", student_source="st")
    assert_close(reload_gguf(f16, config)(x).logits, size(x).logits, rtol=0, atol=2e-2)
    assert f16.stat().st_size < 0.6 * f32.stat().st_size

    reader = GGUFReader(str(f32))
    arch = GGUF_ARCHES[model_type].name
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == n
    info = fam.info(n)
    assert json.loads(field(reader, "boomerang.patched")) == list(info.patched)
    assert field(reader, "boomerang.layers") == str(n) and field(reader, "boomerang.student") == "st"
    types = getattr(size.config, "layer_types", None)
    if GGUF_ARCHES[model_type].swa_array:  # which layers slide is carried per layer, as the cut moved them
        assert list(field(reader, f"{arch}.attention.sliding_window_pattern")) == [
            t == "sliding_attention" for t in types]
        assert types != list(teacher.config.layer_types[:n])  # the cut did move them: the check means something


def test_llama_query_and_key_are_stored_interleaved_and_gemma_norms_plus_one(tmp_path):
    teacher, student, plan, fam = make_family("llama")
    path = write_gguf(teacher, tmp_path / "t.gguf", type_="f32")
    tensors = {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}
    q = teacher.model.layers[0].self_attn.q_proj.weight.numpy()
    assert not np.array_equal(tensors["blk.0.attn_q.weight"], q)  # permuted ...
    assert sorted(tensors["blk.0.attn_q.weight"].ravel()) == sorted(q.ravel())  # ... not changed
    assert_close(torch.from_numpy(tensors["blk.0.attn_v.weight"]), teacher.model.layers[0].self_attn.v_proj.weight)
    g = make_family("gemma2")[0]
    path = write_gguf(g, tmp_path / "g.gguf", type_="f32")
    norm = {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}["output_norm.weight"]
    assert_close(torch.from_numpy(norm), g.model.norm.weight + 1)


def test_q8_0_is_close_and_smaller(tmp_path):
    teacher, student, plan, fam = make_family("llama")
    x = tokens()
    path = write_gguf(teacher, tmp_path / "q.gguf", type_="q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    got, want = reload_gguf(path, teacher.config)(x).logits, teacher(x).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert not torch.equal(got, want)


def test_refusals_name_the_reason_and_leave_nothing(tmp_path):
    teacher, student, plan, fam = make_family("qwen2")  # sliding-window layers
    with pytest.raises(BoomerangError, match="sliding-window attention.*llama.cpp"):
        write_gguf(teacher, tmp_path / "a.gguf")
    neox = make_family("gpt_neox")[0]
    with pytest.raises(BoomerangError, match="GPT-NeoX.*not written as GGUF.*--format hf"):
        write_gguf(neox, tmp_path / "a.gguf")
    llama = make_family("llama")[0]
    with pytest.raises(BoomerangError, match="unknown GGUF type 'q3'"):
        write_gguf(llama, tmp_path / "a.gguf", type_="q3")
    with pytest.raises(BoomerangError, match="does not end in .gguf"):
        write_gguf(llama, tmp_path / "a.bin")
    with pytest.raises(BoomerangError, match="parent folder .* does not exist"):
        write_gguf(llama, tmp_path / "no" / "a.gguf")
    if not llama_cpp_available():
        with pytest.raises(BoomerangError, match="q4_k_m.*install_llamacpp.sh"):
            write_gguf(llama, tmp_path / "a.gguf", type_="q4_k_m")
    assert list(tmp_path.iterdir()) == []
    first = write_gguf(llama, tmp_path / "a.gguf", type_="f32")
    before = first.read_bytes()
    with pytest.raises(BoomerangError, match="already exists.*--overwrite"):
        write_gguf(llama, first, type_="f16")
    assert first.read_bytes() == before
    write_gguf(llama, first, type_="f16", overwrite=True)
    assert first.stat().st_size < len(before)
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


# ----------------------------------------------------------------------------- the real default teacher


@pytest.fixture(scope="module")
def real_student(tmp_path_factory, default_teacher):
    from boomerang.plan import LayerPlan
    from boomerang.student import Manifest, cut_student, save_student

    plan = LayerPlan.from_rule(default_teacher.n_layers)
    folder = tmp_path_factory.mktemp("real") / "student"
    manifest = Manifest(default_teacher.source, default_teacher.fingerprint, plan)
    save_student(cut_student(default_teacher.model, plan), default_teacher.tokenizer, manifest, folder)
    return folder


@pytest.mark.slow
@pytest.mark.real
def test_default_teacher_size_as_gguf_carries_its_tokenizer_and_reloads(real_student, default_teacher, tmp_path):
    from transformers import AutoTokenizer

    from boomerang.student import open_family

    out = run_export(ExportRequest(student=str(real_student), layers=23, out=str(tmp_path / "s23.gguf"),
                                   format="gguf", order="last"), teacher=default_teacher)
    reader = GGUFReader(str(out))
    assert field(reader, "tokenizer.ggml.pre") == "smollm" and field(reader, "llama.block_count") == 23
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")
    assert 'stop "<|im_end|>"' in out.with_suffix(".Modelfile").read_text()
    text = "The boomerang came back to the hand that threw it, and the crowd cheered."
    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    ids = default_teacher.tokenizer(text, return_tensors="pt").input_ids
    assert tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    size = open_family(real_student, teacher=default_teacher, order="last").family.build(23)
    with torch.no_grad():
        got, want = reload_gguf(out)(ids).logits, size(ids).logits
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert mean_kl(want, got) < 1e-3  # f16 rounding of the weights: 0.2-1.3 nats separate the sizes


# ----------------------------------------------------------------------------- llama.cpp itself



LLAMA_CPP_SCRIPT = """
import json, sys
import llama_cpp, llama_cpp.llama_cpp as native, numpy as np
path, ids, greedy, out, repack = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
if not repack:  # llama.cpp's --no-repack: no extra buffer types (the CPU's repacked and AMX weight layouts)
    defaults = native.llama_model_default_params
    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params
    native.llama_model_default_params = without_repacking
llm = llama_cpp.Llama(path, n_ctx=1024, logits_all=True, verbose=False, n_threads=2, seed=0)
llm.eval(ids)
logits = np.array(llm.scores[:len(ids)])
continuation = []
if greedy:
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        continuation.append(token)
        if len(continuation) == greedy:
            break
llm.close()
np.savez(out, logits=logits, continuation=np.array(continuation, dtype=np.int64))
"""


def llama_cpp_run(path, ids: list[int], greedy: int = 0, *, repack_may_crash: bool = False):
    """llama.cpp's logits at every position of `ids` (and its greedy continuation of `greedy` tokens), in a process of
    its own, so that a crash inside llama.cpp fails this test instead of taking the whole test run down.

    `repack_may_crash`: quantized files. llama.cpp repacks quantized weights for the CPU it runs on; on CPUs with
    AMX (Intel Sapphire Rapids and later, this machine among them) that path segfaults in its AMX matmul
    (ggml-org/llama.cpp#20824, reproduced here with llama-cpp-python 0.3.36 on q8_0 and q4_k_m files, ours and
    llama.cpp's own quantizer's alike). Such a crash is reported and the file is run again without repacking
    (`--no-repack`), which computes the same quantized model with the plain kernels; any other failure fails."""
    import subprocess
    import sys

    out = Path(str(path) + ".llama-cpp.npz")

    def run(repack: bool):
        return subprocess.run([sys.executable, "-c", LLAMA_CPP_SCRIPT, str(path), json.dumps(list(ids)), str(greedy),
                               str(out), "1" if repack else "0"], capture_output=True, text=True, timeout=600)

    done = run(repack=True)
    if done.returncode < 0 and repack_may_crash:
        import llama_cpp

        print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) crashed with signal {-done.returncode} running "
              f"{Path(path).name} with its repacked weights; run again without repacking (--no-repack)")
        done = run(repack=False)
    assert done.returncode == 0, f"llama.cpp exited {done.returncode}:\n{done.stderr[-3000:]}"
    data = np.load(out)
    return torch.from_numpy(data["logits"]), data["continuation"].tolist()


def heldout_ids(tokenizer, n=512):
    from importlib.resources import files

    ids = tokenizer(files("boomerang.resources").joinpath("general_heldout.txt").read_text()).input_ids[:n]
    assert len(ids) == n
    return ids


@pytest.mark.llamacpp
@pytest.mark.skipif(not llama_cpp_available(), reason="llama.cpp is not installed: bash scripts/install_llamacpp.sh")
@pytest.mark.parametrize("model_type", WRITTEN)
def test_llama_cpp_runs_every_architecture_s_middle_size_to_our_logits(model_type, tmp_path):
    """llama.cpp itself, on token ids: rotary layouts, Gemma's norms and moved sliding layers, Phi-3's fused
    projections, GPT-2's transposed ones. A planted fault (Llama's query/key left unpermuted) must fail."""
    teacher, student, plan, fam = without_sliding(model_type)
    n = fam.layer_counts[1]
    size = fam.build(n)
    path = write_gguf(size, tmp_path / "s.gguf", type_="f32")
    ids = tokens(1, 12)[0].tolist()  # longer than the tiny Gemmas' sliding window (6)
    theirs, _ = llama_cpp_run(path, ids)
    with torch.no_grad():
        ours = size(torch.tensor([ids])).logits[0]
    assert_close(theirs, ours, rtol=0, atol=3e-3)
    if model_type == "llama":
        import boomerang.export_gguf as eg

        planted = dataclasses.replace(eg.GGUF_ARCHES["llama"], permute_qk=False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(eg.GGUF_ARCHES, "llama", planted)
            wrong = write_gguf(size, tmp_path / "wrong.gguf", type_="f32")
        assert (llama_cpp_run(wrong, ids)[0] - ours).abs().max() > 10 * 3e-3


PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
FLIP_MARGIN = 0.1
"""A greedy token may differ only where the float32 model's two best logits are closer than this: float16
rounding, not a wrong weight (a misplaced or mis-permuted tensor moves logits by whole units)."""


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.llamacpp
@pytest.mark.skipif(not llama_cpp_available(), reason="llama.cpp is not installed: bash scripts/install_llamacpp.sh")
@pytest.mark.parametrize("n_layers", [30, 23, 16])  # the teacher, a middle size, the student
def test_llama_cpp_runs_the_f16_size_as_boomerang_does(real_student, default_teacher, tmp_path, n_layers):
    from boomerang.student import open_family

    out = run_export(ExportRequest(student=str(real_student), layers=n_layers, out=str(tmp_path / "s.gguf"),
                                   format="gguf", order="last"), teacher=default_teacher)
    tok = default_teacher.tokenizer
    size = open_family(real_student, teacher=default_teacher, order="last").family.build(n_layers)
    flips = []
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        _, theirs = llama_cpp_run(out, ids, greedy=32)
        with torch.no_grad():
            ours = size.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        theirs = theirs[:len(ours)]  # ours stops at the end-of-text token, llama.cpp's generator goes on
        if theirs != ours:
            k = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
            with torch.no_grad():
                top2 = size(torch.tensor([ids + ours[:k]])).logits[0, -1].topk(2).values
            flips.append((prompt, k, float(top2[0] - top2[1])))
    assert all(margin < FLIP_MARGIN for *_, margin in flips), flips
    if flips:
        print(f"float16 rounding flipped a near-tie in {len(flips)} of {len(PROMPTS)} continuations: {flips}")
    ids = heldout_ids(tok)
    theirs, _ = llama_cpp_run(out, ids)
    with torch.no_grad():
        ours = size(torch.tensor([ids])).logits[0]
    top2 = ours.topk(2, -1).values
    differ = theirs.argmax(-1) != ours.argmax(-1)
    assert ((top2[:, 0] - top2[:, 1])[differ] < FLIP_MARGIN).all()
    assert 1 - differ.float().mean() >= (0.99 if n_layers == 30 else 0.97)
    assert mean_kl(ours[None], theirs[None]) < 1e-3


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.llamacpp
@pytest.mark.skipif(not llama_cpp_available(), reason="llama.cpp is not installed: bash scripts/install_llamacpp.sh")
@pytest.mark.parametrize("type_, top1, kl", [("q8_0", 0.93, 0.01), ("q4_k_m", 0.8, 0.1)])  # measured: 0.955, 0.0036
def test_quantized_teacher_stays_close_in_llama_cpp(real_student, default_teacher, tmp_path, type_, top1, kl):
    f16 = run_export(ExportRequest(student=str(real_student), layers=30, out=str(tmp_path / "f16.gguf"),
                                   format="gguf", order="last"), teacher=default_teacher)
    small = run_export(ExportRequest(student=str(real_student), layers=30, out=str(tmp_path / f"{type_}.gguf"),
                                     format="gguf", type=type_, order="last"), teacher=default_teacher)
    assert small.stat().st_size < 0.65 * f16.stat().st_size
    assert field(GGUFReader(str(small)), "general.file_type") == {"q8_0": 7, "q4_k_m": 15}[type_]
    ids = heldout_ids(default_teacher.tokenizer)
    theirs, _ = llama_cpp_run(small, ids, repack_may_crash=True)
    with torch.no_grad():
        ours = default_teacher.model(torch.tensor([ids])).logits[0]
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= top1
    assert mean_kl(ours[None], theirs[None]) < kl
