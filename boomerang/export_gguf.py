"""Writing one size of a family as a single GGUF file, the format llama.cpp, Ollama and LM Studio read.

The file holds the size's weights under llama.cpp's tensor names (`gguf.get_tensor_name_map`), the
hyper-parameters of *that size* (its layer count and, for Gemma, which layers use sliding-window
attention), the tokenizer and chat template, and `boomerang.*` keys naming the family it came from.

What differs from a Hugging Face folder, per architecture (llama.cpp's conventions, checked by running
llama.cpp on the result in tests/test_gguf.py):

- Llama and Mistral (llama.cpp's `llama`): the query and key projections are stored with the rotary
  halves interleaved per head (transformers keeps the halves apart);
- Gemma 2 / 3: RMSNorm weights are stored as `1 + w` (transformers adds the one at run time);
- GPT-2: the `Conv1D` projections are stored transposed (as `nn.Linear` would hold them).

Tokenizer: a teacher that arrived as a GGUF file (the default teacher does) lends its `tokenizer.*`
keys verbatim; otherwise a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM) is written from its
`tokenizer.json`. A SentencePiece tokenizer is refused with what to do instead.

Quantization: f32, f16, bf16 and q8_0 are written here (gguf's reference quantizers, bit-exact with
llama.cpp's); the k-quants (`q4_k_m`, ...) go through llama.cpp's own quantizer when the optional
`llama-cpp-python` extra is installed (`bash scripts/install_llamacpp.sh`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from boomerang.arch import adapter_for, intermediate_size
from boomerang.errors import BoomerangError

NATIVE_TYPES = ("f32", "f16", "bf16", "q8_0")
"""Written by this module."""
LLAMA_CPP_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                   "q5_k_s", "q5_k_m", "q6_k")
"""Written by llama.cpp's quantizer from an f16 file (needs the llama-cpp-python extra)."""
GGUF_TYPES = NATIVE_TYPES + LLAMA_CPP_TYPES
INSTALL_LLAMA_CPP = "bash scripts/install_llamacpp.sh"


@dataclass(frozen=True)
class GgufArch:
    """How one transformers `model_type` is written for llama.cpp."""

    name: str
    """llama.cpp's architecture name (`general.architecture`)."""
    enum: str
    """gguf's `MODEL_ARCH` member, for the tensor-name map."""
    permute_qk: bool = False
    norm_plus_one: bool = False
    transpose: tuple[str, ...] = ()
    """Suffixes of `Conv1D` weights stored transposed."""
    head_dim_keys: bool = False
    """Write key/value lengths (head_dim differs from hidden / heads)."""
    swa_array: bool = False
    """Write which layers use sliding-window attention, one bool per layer."""


GGUF_ARCHES: dict[str, GgufArch] = {
    "llama": GgufArch("llama", "LLAMA", permute_qk=True),
    "mistral": GgufArch("llama", "LLAMA", permute_qk=True),
    "qwen2": GgufArch("qwen2", "QWEN2"),
    "qwen3": GgufArch("qwen3", "QWEN3", head_dim_keys=True),
    "gemma2": GgufArch("gemma2", "GEMMA2", norm_plus_one=True, head_dim_keys=True, swa_array=True),
    "gemma3_text": GgufArch("gemma3", "GEMMA3", norm_plus_one=True, head_dim_keys=True, swa_array=True),
    "phi3": GgufArch("phi3", "PHI3"),
    "gpt2": GgufArch("gpt2", "GPT2", transpose=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                                  "mlp.c_proj.weight")),
}
NOT_WRITTEN = {
    "gpt_neox": "GPT-NeoX (Pythia) is not written as GGUF yet: export --format hf and convert it with llama.cpp's "
                "convert_hf_to_gguf.py",
}


def check_gguf_type(type_: str) -> str:
    t = type_.lower()
    if t not in GGUF_TYPES:
        raise BoomerangError(f"unknown GGUF type {type_!r}: choose one of {', '.join(GGUF_TYPES)}")
    return t


def check_gguf_out(out: str | Path, *, overwrite: bool = False) -> Path:
    """Validate a .gguf destination; a `BoomerangError` naming what is wrong otherwise."""
    if not str(out).strip():
        raise BoomerangError("no output file given")
    path = Path(out).expanduser().resolve()
    if path.suffix.lower() != ".gguf":
        raise BoomerangError(f"{path} does not end in .gguf; give a file name like size-23L.gguf")
    if path.is_dir():
        raise BoomerangError(f"{path} is a folder; give a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise BoomerangError(f"{path} already exists; choose another name or pass --overwrite")
    if not path.parent.is_dir():
        raise BoomerangError(f"the parent folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise BoomerangError(f"cannot write in {path.parent}: permission denied")
    return path


def _rope_thetas(config) -> tuple[float | None, float | None]:
    """(base frequency of full-attention layers, of sliding-window layers where they differ)."""
    params = getattr(config, "rope_parameters", None) or {}
    per_type = params if isinstance(params, dict) and "full_attention" in params else {"full_attention": params}
    for p in per_type.values():
        if isinstance(p, dict) and p.get("rope_type", "default") not in ("default", None):
            raise BoomerangError(f"this model's rotary scaling ({p['rope_type']}) is not written as GGUF yet: "
                                 "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    full = (per_type.get("full_attention") or {}).get("rope_theta", getattr(config, "rope_theta", None))
    swa = (per_type.get("sliding_attention") or {}).get("rope_theta")
    return (float(full) if full is not None else None), (float(swa) if swa is not None else None)


def gguf_arch_for(config) -> GgufArch:
    """The writer for a model with this config, or a one-line refusal that says why."""
    kind = config.model_type
    if kind in NOT_WRITTEN:
        raise BoomerangError(NOT_WRITTEN[kind])
    if kind not in GGUF_ARCHES:
        raise BoomerangError(f"{kind} models are not written as GGUF here: supported are {', '.join(GGUF_ARCHES)} "
                             "(export --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py)")
    spec = GGUF_ARCHES[kind]
    types = list(getattr(config, "layer_types", None) or [])
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not spec.swa_array:
        raise BoomerangError(f"this {kind} model uses sliding-window attention in some layers, which llama.cpp's "
                             f"{spec.name} does not run: it would compute something else")
    if kind == "mistral" and getattr(config, "sliding_window", None):
        raise BoomerangError("this Mistral model uses sliding-window attention, which llama.cpp's llama does not "
                             "run: it would compute something else")
    if spec.name.startswith("gemma"):
        head_dim = config.head_dim
        if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
            raise BoomerangError("this Gemma model scales attention by query_pre_attn_scalar != head_dim, which "
                                 "llama.cpp does not read from the file")
    _rope_thetas(config)
    return spec


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotary halves (transformers) -> interleaved pairs (llama.cpp's llama), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, spec: GgufArch):
    """(llama.cpp name, float32 array) for every weight of `model`, shared weights written once."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.enum), config.num_hidden_layers)
    arch = adapter_for(model)
    embed: torch.Tensor = arch.token_embedding(model).weight
    head: torch.Tensor = arch.head_module(model).weight  # type: ignore[assignment]
    tied = head.data_ptr() == embed.data_ptr()
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for hf_name, param in model.named_parameters():  # a weight shared by two names comes once
        if hf_name.endswith("lm_head.weight") and tied:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BoomerangError(f"no llama.cpp name for the weight {hf_name!r} of this {config.model_type} model")
        data = param.detach().to(torch.float32).cpu().numpy()
        if spec.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_rotary(data, n_head)
        elif spec.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_rotary(data, n_kv)
        if spec.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1.0
        if any(hf_name.endswith(s) for s in spec.transpose):
            data = data.T
        yield name, np.ascontiguousarray(data)


def _hyper_parameters(writer, model, spec: GgufArch) -> None:
    config = model.config
    n_layers, hidden, n_head = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    writer.add_block_count(n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate_size(config))
    writer.add_head_count(n_head)
    writer.add_vocab_size(config.vocab_size)
    if spec.name == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, theta_swa = _rope_thetas(config)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if theta_swa is not None and spec.swa_array:
        writer.add_rope_freq_base_swa(theta_swa)
    head_dim = getattr(config, "head_dim", None) or hidden // n_head
    writer.add_rope_dimension_count(int(head_dim * getattr(config, "partial_rotary_factor", 1.0)))
    if spec.head_dim_keys:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spec.swa_array:
        window = getattr(config, "sliding_window", None)
        if window:
            writer.add_sliding_window(window)
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(config, key, None)
        if value is not None:
            getattr(writer, f"add_{key}")(float(value))


# ----------------------------------------------------------------------------- tokenizer


def _copy_tokenizer_keys(writer, source_gguf: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        value = field.contents()
        if main == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, main)


# Which of llama.cpp's pre-tokenizers a byte-level BPE tokenizer uses, by the model family it came with.
_PRE_TOKENIZER = {"qwen2": "qwen2", "qwen3": "qwen2", "gpt2": "gpt-2"}


def _pre_tokenizer(model, vocab_size: int) -> str | None:
    kind = model.config.model_type
    if kind == "llama":
        return {49152: "smollm", 128256: "llama-bpe"}.get(vocab_size)
    return _PRE_TOKENIZER.get(kind)


def _write_hf_tokenizer(writer, tokenizer, model) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_spec = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if model_spec.get("type") != "BPE" or not byte_level:
        raise BoomerangError(
            f"this tokenizer ({model_spec.get('type') or type(tokenizer).__name__}) is not a byte-level BPE; writing it "
            "to GGUF is not supported yet: export --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    n_vocab = model.config.vocab_size
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    pre = _pre_tokenizer(model, n_vocab)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------- the file


def _write(writer, tensors, type_: str) -> None:
    from gguf import GGMLQuantizationType, quants

    for name, data in tensors:
        if data.ndim < 2 or type_ == "f32":  # norms and biases stay float32, as llama.cpp's converter keeps them
            writer.add_tensor(name, data.astype(np.float32))
        elif type_ == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            qtype = GGMLQuantizationType.BF16 if type_ == "bf16" else GGMLQuantizationType.Q8_0
            if qtype == GGMLQuantizationType.Q8_0 and (data.shape[-1] % 32):
                writer.add_tensor(name, data.astype(np.float16))  # rows not a whole number of blocks
                continue
            writer.add_tensor(name, quants.quantize(data, qtype), raw_dtype=qtype)


_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
"""llama.cpp's `LLAMA_FTYPE_*` numbers (`general.file_type`)."""


def write_gguf(model, out: str | Path, *, type_: str = "f16", tokenizer=None, source_gguf: Path | None = None,
               name: str = "boomerang size", meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model` (any assembled size) as one GGUF file at `out`, atomically; returns its path.

    Tokenizer keys come from `source_gguf` when given, else from `tokenizer`; with neither the file says it has
    no vocabulary (`tokenizer.ggml.model = none`): llama.cpp and transformers then run it on token ids."""
    import gguf

    type_ = check_gguf_type(type_)
    path = check_gguf_out(out, overwrite=overwrite)
    spec = gguf_arch_for(model.config)
    if type_ in LLAMA_CPP_TYPES:
        return _quantize_with_llama_cpp(model, path, type_, tokenizer=tokenizer, source_gguf=source_gguf, name=name,
                                        meta=meta)
    tmp = _temp_beside(path)
    try:
        writer = gguf.GGUFWriter(str(tmp), spec.name)
        writer.add_name(name)
        writer.add_file_type(_FILE_TYPE[type_])
        _hyper_parameters(writer, model, spec)
        if source_gguf is not None:
            _copy_tokenizer_keys(writer, Path(source_gguf))
        elif tokenizer is not None:
            _write_hf_tokenizer(writer, tokenizer, model)
        else:
            writer.add_tokenizer_model("none")
        for key, value in (meta or {}).items():
            writer.add_string(f"boomerang.{key}", value if isinstance(value, str) else json.dumps(value))
        _write(writer, gguf_tensors(model, spec), type_)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _temp_beside(path: Path) -> Path:
    """An empty temporary file in `path`'s folder (the final rename is then atomic)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise BoomerangError(f"cannot write in {path.parent}: {exc.strerror}") from None
    os.close(fd)
    return Path(name)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _quantize_with_llama_cpp(model, path: Path, type_: str, **kw) -> Path:
    if not llama_cpp_available():
        raise BoomerangError(f"--type {type_} is written by llama.cpp's quantizer, which is not installed here: "
                             f"run `{INSTALL_LLAMA_CPP}` (or use f16, bf16 or q8_0)")
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_.upper()}")
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.") as work:
        f16 = write_gguf(model, Path(work) / "f16.gguf", type_="f16", **kw)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        tmp_name = str(_temp_beside(path))
        try:
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), tmp_name.encode(), params)
            if rc != 0:
                raise BoomerangError(f"llama.cpp's quantizer failed (code {rc}) writing {type_}")
            Path(tmp_name).chmod(0o644)
            os.replace(tmp_name, path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- Ollama


_CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile_text(gguf_path: Path, tokenizer=None) -> str:
    """An Ollama Modelfile for the file: FROM, the chat template where it is ChatML, and stop strings."""
    lines = [f"FROM ./{gguf_path.name}"]
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:
        lines += [f'TEMPLATE """{_CHATML}"""', 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    elif getattr(tokenizer, "eos_token", None):
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"
