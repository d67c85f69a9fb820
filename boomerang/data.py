"""Corpora to packed, fixed-length token batches with a held-out split.

Sources (`DataSpec.source`):
- a local `.txt`, `.jsonl` (a `text` field or the one named) or `.parquet` file, or a folder of them;
- `hub:NAME[:SPLIT]`, a Hugging Face dataset streamed from the hub (online only);
- `teacher`, text the teacher writes itself from seed prompts (batched, cached on disk, reusable),
  so a user with no dataset can still distill.

Documents are tokenised, joined with the end-of-text token and cut into blocks of `seq_len`. The
last `heldout_fraction` of the token stream is held out. Batches come in a seeded order that
depends only on the step, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from boomerang.errors import BoomerangError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class TokenData:
    """Packed token blocks for training and held-out evaluation."""

    train: torch.Tensor
    """(N, seq_len) int64 training blocks."""
    heldout: torch.Tensor
    """(M, seq_len) int64 held-out blocks."""
    description: str
    """Where the text came from, for logs and manifests."""

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Batch number `step` (B, seq_len): a seeded permutation per epoch, the same on every resume."""
        n = self.train.shape[0]
        idx = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            idx.append(int(perm[pos]))
        return self.train[idx]


# ----------------------------------------------------------------------------- reading text


def read_documents(source: str, *, text_field: str = "text") -> list[str]:
    """The documents of a local file or folder; errors name the file and line."""
    path = Path(source).expanduser()
    if not path.exists():
        raise BoomerangError(f"data not found: {path} (give a .txt/.jsonl/.parquet file or folder, hub:NAME, or teacher)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise BoomerangError(f"{path} holds no .txt, .jsonl or .parquet files")
    docs: list[str] = []
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise BoomerangError(f"{f}: unsupported file type {f.suffix!r}; use .txt, .jsonl or .parquet")
        got = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[f.suffix](f, text_field)
        if not any(d.strip() for d in got):
            raise BoomerangError(f"{f} is empty: it holds no text")
        docs.extend(got)
    return docs


def _read_txt(path: Path, _field: str) -> list[str]:
    raw = path.read_bytes()
    try:
        return [raw.decode("utf-8")]
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BoomerangError(f"{path}, line {line}: not UTF-8 text (byte {exc.start}); convert the file to UTF-8") from None


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """Each non-empty line of a UTF-8 .jsonl file as (line number, value); a bad line is named by file and line."""
    for number, line in enumerate(_read_txt(path, "")[0].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise BoomerangError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise BoomerangError(f"{path}, line {number}: no text field {field!r} (choose the field with --text-field)")
        docs.append(row[field])
    return docs


def _read_parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq  # only for .parquet files
    except ImportError:
        raise BoomerangError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if field not in table.column_names:
        raise BoomerangError(f"{path}: no column {field!r} (columns: {table.column_names}); choose one with --text-field")
    return [t for t in table.column(field).to_pylist() if isinstance(t, str)]


def stream_hub_documents(name: str, *, text_field: str, max_chars: int) -> list[str]:
    """Documents of a hub dataset, streamed until `max_chars` characters; online only."""

    dataset, _, split = name.partition(":")
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BoomerangError(
            f"hub dataset {dataset!r} needs the Hugging Face Hub, which is switched off here "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1). Save the text as .txt/.jsonl files and pass that folder"
        )
    try:
        from datasets import load_dataset  # only for hub: data
    except ImportError:
        raise BoomerangError("streaming a hub dataset needs the datasets package: pip install datasets") from None
    try:
        rows = load_dataset(dataset, split=split or "train", streaming=True)
        docs, total = [], 0
        for row in rows:
            docs.append(row[text_field])
            total += len(docs[-1])
            if total >= max_chars:
                break
        return docs
    except Exception as exc:
        raise BoomerangError(
            f"could not stream hub dataset {dataset!r} ({type(exc).__name__}: {str(exc)[:200]}). "
            "Save the text as .txt/.jsonl files and pass that folder instead"
        ) from exc


# ----------------------------------------------------------------------------- teacher-written text


TEACHER_DOC_TOKENS = 192
"""New tokens per teacher-written document."""


def _seed_prompts() -> list[str]:
    text = resources.files("boomerang.resources").joinpath("seed_prompts.txt").read_text()
    return [p for p in text.splitlines() if p.strip()]


def teacher_corpus_path(fingerprint: str, n_docs: int, seed: int, cache_dir: Path,
                        max_new_tokens: int | None = None) -> Path:
    """Where the corpus a teacher writes with these settings is cached (it may not exist yet)."""
    max_new_tokens = max_new_tokens or TEACHER_DOC_TOKENS
    key = hashlib.sha256(json.dumps([fingerprint, n_docs, max_new_tokens, seed, _seed_prompts()]).encode()).hexdigest()
    return Path(cache_dir) / f"teacher-{key[:16]}.jsonl"


def teacher_documents(teacher, *, n_docs: int, max_new_tokens: int = TEACHER_DOC_TOKENS, batch_size: int = 32,
                      seed: int = 0, cache_dir: Path | None = None, on_tokens=None) -> list[str]:
    """Text written by the teacher from built-in seed prompts; cached by teacher and settings.

    Work is counted in decode slots, `n_docs * max_new_tokens` in all (a row that ends early still
    occupies its slot until its batch ends): `on_tokens(n)` is called with each n slots done, at most
    every 2 s and at the end of each batch (not when the cache answers). The batch of 32 writes about
    twice the tokens/s of 8 on a 2-core CPU (`bench/bench_corpus.py`)."""
    prompts = _seed_prompts()
    path = teacher_corpus_path(teacher.fingerprint, n_docs, seed, cache_dir, max_new_tokens) if cache_dir else None
    if path and path.is_file():
        return _read_jsonl(path, "text")
    docs = _generate(teacher, [prompts[i % len(prompts)] for i in range(n_docs)], max_new_tokens, batch_size, seed,
                     on_tokens)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tmp.replace(path)
    return docs


class _SlotCounter(BaseStreamer):
    """Counts decode slots (rows x steps) and hands them to `on_tokens` at most every `every` seconds."""

    def __init__(self, rows: int, on_tokens, every: float = 2.0):
        self.rows, self.on_tokens, self.every = rows, on_tokens, every
        self.steps, self.pending, self.last, self.prompt_seen = 0, 0, time.monotonic(), False

    def put(self, value):
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        self.steps += 1
        self.pending += self.rows
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self):
        if self.pending and self.on_tokens:
            self.on_tokens(self.pending)
        self.pending, self.last = 0, time.monotonic()

    def end(self):
        pass


@torch.no_grad()
def _generate(teacher, prompts: list[str], max_new_tokens: int, batch_size: int, seed: int, on_tokens=None) -> list[str]:
    tok, model = teacher.tokenizer, teacher.model
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    docs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if tok.chat_template:
            chunk = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                     for p in chunk]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template).to(model.device)
        counter = _SlotCounter(len(chunk), on_tokens)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                             pad_token_id=tok.pad_token_id, streamer=counter)
        docs.extend(tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True))
        counter.pending += (max_new_tokens - counter.steps) * len(chunk)  # the slots of rows that ended early
        counter.flush()
    return docs


# ----------------------------------------------------------------------------- packing


def pack(docs: list[str], tokenizer, seq_len: int, *, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise, join with end-of-text and return the flat token stream (int64)."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if sep is not None:
            ids.append(sep)
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


HELDOUT_FILE = "heldout-tokens.pt"
"""In a student folder: token blocks of its distillation's held-out split (never trained on)."""
HELDOUT_MAX_BLOCKS = 256
HELDOUT_EVALUATED = 4096
"""Held-out tokens an evaluation measures by default (the first ones); the blocks after them are a calibration
split of the same text, which choosing a family's patch order and ranking the drop-bi baseline may read."""


def save_heldout(heldout: torch.Tensor, folder: str | Path) -> Path | None:
    """Keep (up to 256 of) a run's held-out blocks in the student folder, as int32; None if there are none."""
    if heldout.numel() == 0:
        return None
    path = Path(folder) / HELDOUT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(heldout[:HELDOUT_MAX_BLOCKS].to(torch.int32).clone(), tmp)
    tmp.replace(path)
    return path


def heldout_blocks(source: str, tokenizer, tokens: int, *, seq_len: int = 128, fraction: float = 0.1,
                   skip_blocks: int = 0) -> torch.Tensor:
    """The first `tokens` held-out tokens of a text file or folder (its last `fraction`), as (N, seq_len) blocks;
    or of a `heldout-tokens.pt` a distillation left in its student folder (all of it held out). `skip_blocks`
    starts that many blocks in (the blocks after an evaluation's are a calibration split of the same text);
    the result may then be empty."""
    if str(source).endswith(".pt"):
        try:
            held = torch.load(Path(source).expanduser(), weights_only=True)
        except Exception as exc:  # a broken or foreign file: say which
            raise BoomerangError(f"cannot read held-out tokens from {source}: {type(exc).__name__}: {exc}") from None
        if not isinstance(held, torch.Tensor) or held.dim() != 2 or held.is_floating_point() or held.numel() == 0:
            raise BoomerangError(f"{source} holds no (blocks, tokens) integer tensor of held-out tokens")
        if int(held.max()) >= len(tokenizer):
            raise BoomerangError(f"{source} has token ids beyond this teacher's vocabulary: not its held-out text")
        per = held.shape[1]
        return held[skip_blocks: skip_blocks + max(1, tokens // per)].long()
    stream = pack(read_documents(source), tokenizer, seq_len)
    held = split_blocks(stream, seq_len, fraction, source)[1]
    return held[skip_blocks: skip_blocks + max(1, tokens // seq_len)]


def heldout_split(source: str, tokenizer, evaluated_tokens: int, calibration_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluated blocks, calibration blocks) of a held-out text, read once: the first `evaluated_tokens` are
    what an evaluation measures, up to `calibration_tokens` after them a calibration split no evaluation reads
    (empty when the text ends first). The evaluation and the choice of a family's patch order split alike."""
    held = heldout_blocks(source, tokenizer, evaluated_tokens + calibration_tokens)
    evaluated = max(1, evaluated_tokens // held.shape[1])
    return held[:evaluated], held[evaluated:]


SHIPPED_GENERAL = "shipped"
"""`general_data` naming the general text shipped in the package (an excerpt of WikiText-2 test, see
boomerang/resources/README.md)."""


def general_blocks(source: str, tokenizer, tokens: int, *, seq_len: int = 128) -> torch.Tensor:
    """The first `tokens` tokens of a text of another domain than the training text (all of it is held out), as
    (N, seq_len) blocks; `source` is a text file or folder, or SHIPPED_GENERAL."""
    if source == SHIPPED_GENERAL:
        source = str(resources.files("boomerang.resources").joinpath("general_heldout.txt"))
    stream = pack(read_documents(source), tokenizer, seq_len)
    held = blocks(stream, seq_len)[: max(1, tokens // seq_len)]
    if held.shape[0] == 0:
        raise BoomerangError(f"{source} gives only {stream.numel()} tokens: not one block of {seq_len}")
    return held


def blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)  # (N, seq_len)


def split_blocks(stream: torch.Tensor, seq_len: int, heldout_fraction: float, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(stream.numel() * (1 - heldout_fraction))
    train, heldout = blocks(stream[:cut], seq_len), blocks(stream[cut:], seq_len)
    if train.shape[0] == 0:
        raise BoomerangError(
            f"{source} gives only {stream.numel()} tokens: not one training block of {seq_len}; "
            "use more text or a shorter --seq-len"
        )
    return train, heldout


