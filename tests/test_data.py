"""Data sources: local formats, packing, the held-out split, batch order and the errors."""

import json

import pytest
import torch

from boomerang.data import TokenData, pack, read_documents, split_blocks, stream_hub_documents, teacher_documents
from boomerang.errors import BoomerangError
from boomerang.models import Teacher
from tiny import tiny_model, tiny_tokenizer


def test_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    assert read_documents(str(tmp_path / "a.txt")) == ["first doc"]
    assert read_documents(str(tmp_path)) == ["first doc", "second", "third"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert read_documents(str(tmp_path / "c.jsonl"), text_field="body") == ["x"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"   \n", "empty.txt is empty"),
    ("latin.txt", b"line one\nna\xefve caf\xe9\n", r"latin.txt, line 2: not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl, line 2: not valid JSON"),
    ("field.jsonl", b'{"text": "ok"}\n{"content": "x"}\n', r"field.jsonl, line 2: no text field 'text'"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BoomerangError, match=message):
        read_documents(str(tmp_path / name))


def test_missing_data_and_empty_folder(tmp_path):
    with pytest.raises(BoomerangError, match="data not found"):
        read_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BoomerangError, match="holds no .txt, .jsonl or .parquet files"):
        read_documents(str(tmp_path / "empty"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "d.parquet")
    assert read_documents(str(tmp_path / "d.parquet")) == ["one", "two"]
    with pytest.raises(BoomerangError, match="no column 'body'"):
        read_documents(str(tmp_path / "d.parquet"), text_field="body")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BoomerangError, match="hub dataset 'roneneldan/TinyStories' needs the Hugging Face Hub"):
        stream_hub_documents("roneneldan/TinyStories", text_field="text", max_chars=1000)


def test_packing_split_and_batch_order():
    tok = tiny_tokenizer()
    stream = pack(["abc", "de"], tok, 4)
    assert stream.tolist() == tok("abc").input_ids + [tok.eos_token_id] + tok("de").input_ids + [tok.eos_token_id]
    train, held = split_blocks(torch.arange(100), 8, 0.2, "x")
    assert train.shape == (10, 8) and held.shape == (2, 8)
    assert train[-1, -1] < held[0, 0], "held-out text must come after the training text"
    data = TokenData(train, held, "x")
    first = [data.batch(s, 4, seed=3) for s in range(5)]
    again = [data.batch(s, 4, seed=3) for s in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=False))
    epoch = torch.cat([data.batch(s, 5, seed=3) for s in range(2)])  # 10 blocks: one epoch, each block once
    assert sorted(epoch[:, 0].tolist()) == sorted(train[:, 0].tolist())
    with pytest.raises(BoomerangError, match="not one training block of 64"):
        split_blocks(torch.arange(50), 64, 0.1, "tiny.txt")


def test_teacher_written_corpus_is_cached(tmp_path):
    model = tiny_model("llama")
    teacher = Teacher(model, tiny_tokenizer(), "tiny", "f" * 32)
    counted = []
    docs = teacher_documents(teacher, n_docs=3, max_new_tokens=8, batch_size=2, cache_dir=tmp_path,
                             on_tokens=counted.append)
    assert len(docs) == 3
    assert sum(counted) == 3 * 8  # every decode slot counted once, rows that ended early included
    cached = list(tmp_path.glob("teacher-*.jsonl"))
    assert len(cached) == 1
    again = teacher_documents(Teacher(None, None, "tiny", "f" * 32), n_docs=3, max_new_tokens=8, cache_dir=tmp_path)
    assert again == docs  # read back without touching the (absent) model
