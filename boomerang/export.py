"""Writing one size of a family as a plain Hugging Face model folder.

The folder loads with `AutoModelForCausalLM.from_pretrained` alone (nothing of ours imported): the
config has the size's layer count and per-layer fields, weights are safetensors, and a model card
says what the size is made of.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from boomerang.errors import BoomerangError
from boomerang.export_gguf import check_gguf_out, check_gguf_type, gguf_arch_for, modelfile_text, write_gguf
from boomerang.family import Family, SizeInfo, check_ends, compress_runs
from boomerang.models import classify_source, default_gguf_path
from boomerang.outputs import check_output_dir, replace_dir_atomically
from boomerang.settings import Settings
from boomerang.student import named_schedule, open_family, read_manifest


@dataclass
class ExportRequest(Settings):
    """One size of a student's family to write as a plain Hugging Face folder or one GGUF file (a command or a
    queued job)."""

    student: str
    """Student folder."""
    layers: int
    """The size, by its number of layers."""
    out: str
    """Folder to write (format hf) or file (format gguf, ending in .gguf)."""
    format: str = "hf"
    """hf (a Hugging Face folder) | gguf (one file for llama.cpp, Ollama, LM Studio)."""
    type: str = "f16"
    """GGUF tensor type: f32 | f16 | bf16 | q8_0, or a llama.cpp k-quant (q4_k_m, ...) where llama-cpp-python is
    installed."""
    order: str = "best"
    """Patch order: best (the best measured per size, measured once if the manifest lacks it) | last | first |
    greedy."""
    overwrite: bool = False
    """Replace an existing model folder at `out`."""
    teacher: str | None = None
    """Teacher source (default: the student's own)."""
    ends: str = "student"
    """Whose embeddings and final norm + head the size uses: student | teacher | auto (see `family.ENDS`)."""

    def __post_init__(self):
        self.check_types()
        check_ends(self.ends)
        self.student = str(Path(self.student).expanduser().resolve())
        self.out = str(Path(self.out).expanduser().resolve())
        if self.layers < 1:
            raise BoomerangError(f"layers must be at least 1, got {self.layers}")
        if self.format not in FORMATS:
            raise BoomerangError(f"unknown export format {self.format!r}: choose hf or gguf")
        if self.format == "gguf":
            self.type = check_gguf_type(self.type)

    def check(self) -> None:
        """Before any work: the student exists, the family has this size, the output folder may be written."""
        manifest = read_manifest(self.student)
        measured = set(manifest.patch_orders) | ({"best"} if manifest.best else set())
        if self.order in ("greedy", "reverse", "best") and self.order not in measured:
            counts = [self.layers]  # its sizes are known once the order is computed, when the export runs
        else:
            counts = sorted(named_schedule(manifest, self.order))
        if self.layers not in counts:
            raise BoomerangError(f"no size with {self.layers} layers in this family: its sizes are "
                                 f"{', '.join(map(str, counts))}")
        if self.format == "gguf":
            check_gguf_out(self.out, overwrite=self.overwrite)
            gguf_arch_for(_folder_config(self.student))
        else:
            check_output_dir(self.out, overwrite=self.overwrite)


FORMATS = ("hf", "gguf")


def _folder_config(folder: str):
    from transformers import AutoConfig  # transformers' config classes: only when a GGUF export is checked

    return AutoConfig.from_pretrained(folder)


def run_export(req: ExportRequest, *, teacher=None, device: str = "cpu", dtype: str | None = None,
               calibration: str | None = None) -> Path:
    """Do what `req` asks (with `teacher` already loaded, or the student's own); returns the folder written."""

    req.check()
    opened = open_family(req.student, teacher=teacher or req.teacher, order=req.order, device=device, dtype=dtype,
                         calibration=calibration, ends=req.ends)
    if req.format == "gguf":
        return export_size_gguf(opened.family, req.layers, req.out, type_=req.type, tokenizer=opened.teacher.tokenizer,
                                teacher_source=opened.teacher.source, student_source=str(opened.folder),
                                overwrite=req.overwrite)
    return export_size(opened.family, req.layers, req.out, tokenizer=opened.teacher.tokenizer,
                       teacher_source=opened.teacher.source, student_source=str(opened.folder), overwrite=req.overwrite,
                       distilled=opened.manifest.distilled is not None)


def export_size(family: Family, n_layers: int, out: str | Path, *, tokenizer=None, teacher_source: str = "?",
                student_source: str = "?", overwrite: bool = False, distilled: bool = True) -> Path:
    """Export the size with `n_layers` layers to `out`; returns the folder written.

    `distilled`: whether the student was trained (its manifest says); the model card says which."""
    info = family.info(n_layers)  # raises on a size the family does not have, before anything is written
    card = model_card(info, teacher_source, student_source, family, distilled=distilled)
    meta = {"teacher": teacher_source, "student": student_source, **info.to_dict()}
    return export_model(family.build(n_layers), out, tokenizer=tokenizer, card=card, meta=meta, overwrite=overwrite)


def source_gguf(teacher_source: str) -> Path | None:
    """The GGUF file a teacher came from (the default teacher's included), whose tokenizer keys a GGUF export
    carries verbatim; None for a folder or hub teacher."""
    try:
        kind = classify_source(teacher_source)
    except BoomerangError:
        return None
    if kind == "default":
        return default_gguf_path()
    return Path(teacher_source) if kind == "gguf" else None


def export_size_gguf(family: Family, n_layers: int, out: str | Path, *, type_: str = "f16", tokenizer=None,
                     teacher_source: str = "?", student_source: str = "?", overwrite: bool = False) -> Path:
    """Export the size with `n_layers` layers as one GGUF file at `out`, with an Ollama Modelfile beside it
    (`<name>.Modelfile`); returns the file written."""
    info = family.info(n_layers)
    model = family.build(n_layers)
    meta = {"teacher": teacher_source, "student": student_source, "layers": str(info.n_layers),
            "patched": info.patched, "run": compress_runs(info.layers), "ends": family.ends,
            "patch_order": family.order or "best"}
    name = f"{Path(student_source).name} {info.n_layers}-layer size (boomerang)"
    path = write_gguf(model, out, type_=type_, tokenizer=tokenizer, source_gguf=source_gguf(teacher_source),
                      name=name, meta=meta, overwrite=overwrite)
    path.with_suffix(".Modelfile").write_text(modelfile_text(path, tokenizer))
    return path


def gguf_run_lines(path: Path) -> str:
    """How to run an exported GGUF file with llama.cpp's server and with Ollama."""
    modelfile = path.with_suffix(".Modelfile")
    tag = path.stem.lower().replace("_", "-")
    return (f"run it with llama.cpp:  llama-server -m {path}\n"
            f"or with Ollama:         cd {path.parent} && ollama create {tag} -f {modelfile.name} && ollama run {tag}")


def export_model(model, out: str | Path, *, tokenizer=None, card: str | None = None, meta: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Save any assembled model (shared weights included) as a standalone folder, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        if meta is not None:
            (tmp / "boomerang-size.json").write_text(json.dumps(meta, indent=2) + "\n")

    return replace_dir_atomically(out, write, overwrite=overwrite)


def model_card(info: SizeInfo, teacher_source: str, student_source: str, family: Family, *,
               distilled: bool = True) -> str:
    if distilled:
        kind = "the teacher itself" if info.is_teacher else (
            "the distilled student" if info.is_student else "an interpolated size (no training after distillation)")
    else:
        kind = "the teacher itself" if info.is_teacher else (
            "the undistilled student: the teacher's kept layers, not trained" if info.is_student else
            "a size of an undistilled family: the teacher with layers dropped by the plan, not trained")
    runs = " ".join(info.layers)
    if info.is_teacher or info.is_student:
        ends_text = "its own"
    else:
        embeddings, head = family.ends_for(info.patched)
        ends_text = f"embeddings from the {embeddings}, final norm and head from the {head}"
    return f"""---
library_name: transformers
tags: [boomerang-distillation, text-generation]
---
# {info.n_layers}-layer size of a boomerang family

This is {kind}, exported by Boomerang Studio.

| | |
|---|---|
| teacher | `{teacher_source}` ({family.plan.n_teacher} layers) |
| student | `{student_source}` ({family.plan.n_student} layers) |
| student layers patched with their teacher blocks | {list(info.patched) or "none"} |
| embeddings, final norm and head | {ends_text} |
| layers | {info.n_layers} |
| parameters | {info.params:,} ({info.params_no_embed:,} without embeddings and head) |

Layers run, in order (`T` = teacher layer, `S` = student layer): {runs}

Load it with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""
