"""Writing one size of a family as a plain Hugging Face model folder.

The folder loads with `AutoModelForCausalLM.from_pretrained` alone (nothing of ours imported): the
config has the size's layer count and per-layer fields, weights are safetensors, and a model card
says what the size is made of.
"""

from __future__ import annotations

import json
from pathlib import Path

from boomerang.family import Family, SizeInfo
from boomerang.outputs import replace_dir_atomically


def export_size(family: Family, n_layers: int, out: str | Path, *, tokenizer=None, teacher_source: str = "?",
                student_source: str = "?", overwrite: bool = False) -> Path:
    """Export the size with `n_layers` layers to `out`; returns the folder written."""
    info = family.info(n_layers)  # raises on a size the family does not have, before anything is written
    card = model_card(info, teacher_source, student_source, family)
    meta = {"teacher": teacher_source, "student": student_source, **info.to_dict()}
    return export_model(family.build(n_layers), out, tokenizer=tokenizer, card=card, meta=meta, overwrite=overwrite)


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


def model_card(info: SizeInfo, teacher_source: str, student_source: str, family: Family) -> str:
    kind = "the teacher itself" if info.is_teacher else (
        "the distilled student" if info.is_student else "an interpolated size (no training after distillation)")
    runs = " ".join(info.layers)
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
