"""Quantization-aware components: folded transforms leave the model unchanged and do what they claim."""

import copy

import pytest
import torch

from eigenkv.compress import EigenConfig, EigenPlan, apply_plan, compress_model
from eigenkv.compress.basis import coefficient_variance
from eigenkv.compress.calibrate import calibrate
from eigenkv.compress.components import ComponentQuantConfig, high_components, prepare_components
from eigenkv.memory import cache_held_bytes, kv_cache_bytes
from eigenkv.quant import KVQuantConfig, QuantizedKV, fake_quantize
from eigenkv.quant.config import MixedKVQuantConfig
from tests.helpers import parallel_and_stepwise, random_tokens, random_windows, tiny_llama, tiny_opt

QUANT = KVQuantConfig(bits=2, group_size=8, axis_k="channel", axis_v="token", residual=4)
OPTIONS = ["scale", "rot", "hi8x0.25", "scale+rot+hi4x0.5", "hi8"]


def compressed(make, mode, method="eigenkv"):
    model = make().double()
    original = copy.deepcopy(model)
    windows = random_windows(model)
    calib = calibrate(model, windows, rotated=mode == "post", gradients=method == "eigenkv", progress=False)
    plan = compress_model(model, calib, EigenConfig.method(method, target_ratio=0.6, rope_mode=mode), progress=False)
    return original, model, plan, calib


@pytest.mark.parametrize(
    ("make", "mode", "method"),
    [
        (tiny_llama, "pre", "eigenkv"),
        (tiny_llama, "pre", "paper"),
        (tiny_llama, "post", "paper"),
        (tiny_opt, "pre", "eigenkv"),
    ],
    ids=["llama-pre-eigenkv", "llama-pre-paper", "llama-post-paper", "opt-eigenkv"],
)
@pytest.mark.parametrize("spec", OPTIONS)
def test_prepared_plan_computes_the_same_model(make, mode, method, spec):
    original, model, plan, _ = compressed(make, mode, method)
    prepared, config = prepare_components(plan, ComponentQuantConfig.parse(spec), QUANT)
    twin = apply_plan(copy.deepcopy(original), prepared)
    ids = random_tokens(model)
    with torch.no_grad():
        # bases are stored in float32: the transformed ones differ by its rounding
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    assert isinstance(config, MixedKVQuantConfig) == ("hi" in spec)
    assert prepared.extra["components"]["high_bits"] == ComponentQuantConfig.parse(spec).high_bits


def test_scaled_components_have_unit_variance_on_calibration_data():
    _, _, plan, calib = compressed(tiny_llama, "pre", "eigenkv")
    prepared, _ = prepare_components(plan, ComponentQuantConfig(scale=True), QUANT)
    for layer, stats in enumerate(calib.layers):
        for gram, encoder in ((stats.values, prepared.value_bases[layer]), (stats.keys, prepared.key_bases[layer])):
            variance = coefficient_variance(gram, encoder, stats.tokens)
            assert torch.allclose(variance, torch.ones_like(variance), atol=1e-6)
        before = plan.value_variances[layer][0]
        assert before.max() / before.min() > 2  # there was something to equalise


def test_scaling_trades_the_dominant_components_exactness_for_a_lower_total_error():
    gen = torch.Generator().manual_seed(0)
    rms = 0.7 ** torch.arange(32, dtype=torch.float64)  # sorted components, as a basis stores them
    coefficients = torch.randn(4096, 32, generator=gen, dtype=torch.float64) * rms

    def errors(scale: torch.Tensor) -> torch.Tensor:  # squared error per component, per-token groups of 16
        restored = fake_quantize(coefficients / scale, 3, 16, -1) * scale
        return (restored - coefficients).pow(2).sum(0)

    plain, scaled = errors(torch.ones(32, dtype=torch.float64)), errors(rms)
    assert scaled.sum() < 0.75 * plain.sum()  # 0.64: what a linear error model predicts
    # ... but a min-max group stores its extremes exactly, and the dominant component usually is one:
    # unscaled, it is the best-kept component; scaled, the worst (why `scale` loses on a real model)
    assert plain[0] < 0.5 * plain[1:16].min() and scaled[0] > 10 * plain[0]


def test_mixed_cache_reads_causally_and_its_bytes_match_the_accounting():
    _, model, plan, _ = compressed(tiny_llama, "pre", "eigenkv")
    prepared, config = prepare_components(plan, ComponentQuantConfig(scale=True, high_bits=8, high_fraction=0.5), QUANT)
    model = apply_plan(tiny_llama().double(), prepared)
    assert config.key_high == tuple((r + 1) // 2 for r, _ in prepared.ranks)
    ids = random_tokens(model, batch=2, length=29)
    with QuantizedKV(model, config) as kv, torch.no_grad():
        parallel, stepwise, cache = parallel_and_stepwise(model, kv.new_cache, ids)
    torch.testing.assert_close(parallel, stepwise, atol=1e-9, rtol=0)
    counted = kv_cache_bytes(model, seq_len=29, batch_size=2, dtype=torch.float64, quant=config)
    assert cache_held_bytes(cache) == counted.total - counted.components.get("bases", 0)
    plain = kv_cache_bytes(model, seq_len=29, batch_size=2, dtype=torch.float64, quant=QUANT)
    assert counted.components["keys.codes"] > plain.components["keys.codes"]  # the leading half at 8 bits


def test_high_precision_segment_has_the_smaller_error():
    model = tiny_llama().double()
    config = MixedKVQuantConfig(KVQuantConfig(bits=2, group_size=8, axis_v="token"), 8, (8, 8), (8, 8))
    ids = random_tokens(model, batch=1, length=24)
    with QuantizedKV(model, config) as kv, torch.no_grad():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
    dense_cache = __import__("transformers").DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=dense_cache, use_cache=True)
    held = cache.layers[0].value_stream.read_quantized(torch.float64)
    exact = dense_cache.layers[0].values
    high, low = (held - exact)[..., :8].abs().mean(), (held - exact)[..., 8:].abs().mean()
    assert high < 0.05 * low
    counted = kv_cache_bytes(model, seq_len=24, batch_size=1, dtype=torch.float64, quant=config)
    assert cache_held_bytes(cache) == counted.total


def test_spectrum_rule_gives_high_bits_to_components_that_dominate():
    spectrum = torch.tensor([[1000.0, 300.0, 10.0, 5.0, 1.0, 1.0, 0.5, 0.1]])
    options = ComponentQuantConfig(high_bits=4)
    # mean of the 6 kept = 219.5; x 4^(4-2) = 3512: none. At 1 bit apart: 878: only the first.
    assert high_components(spectrum, 6, options, low_bits=2) == 0
    assert high_components(spectrum, 6, options, low_bits=3) == 1
    assert high_components(spectrum, 6, ComponentQuantConfig(high_bits=8, high_fraction=0.2), low_bits=4) == 2
    assert high_components(spectrum, 6, ComponentQuantConfig(), low_bits=4) == 0


def test_prepared_plan_round_trips(tmp_path):
    original, model, plan, _ = compressed(tiny_llama, "pre", "paper")
    prepared, _ = prepare_components(plan, ComponentQuantConfig(scale=True, rotate=True), QUANT)
    prepared.save(tmp_path / "plan", figure=False)
    loaded = EigenPlan.load(tmp_path / "plan")
    assert loaded.extra["components"]["scale"] is True
    for a, b in zip(loaded.key_duals, prepared.key_duals, strict=True):
        torch.testing.assert_close(a, b)
    ids = random_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(
            apply_plan(copy.deepcopy(original), loaded)(ids).logits, model(ids).logits, atol=1e-5, rtol=0
        )


def test_bad_component_options_raise_clear_errors():
    _, _, plan, _ = compressed(tiny_llama, "pre", "eigenkv")
    with pytest.raises(ValueError, match="must exceed"):
        prepare_components(plan, ComponentQuantConfig(high_bits=2), QUANT)
    with pytest.raises(ValueError, match="needs high_bits"):
        ComponentQuantConfig(high_fraction=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ComponentQuantConfig(high_bits=8, high_fraction=1.5)
    with pytest.raises(ValueError, match="unknown component option 'hadamard'"):
        ComponentQuantConfig.parse("scale+hadamard")
    with pytest.raises(ValueError, match="head dimensions"):
        prepare_components(plan, ComponentQuantConfig(rotate=True), KVQuantConfig(rotate=True))
    prepared, _ = prepare_components(plan, ComponentQuantConfig(rotate=True), QUANT)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_components(prepared, ComponentQuantConfig(rotate=True), QUANT)
    old = copy.copy(plan)
    old.key_variances, old.value_variances = [], []
    with pytest.raises(ValueError, match="recompute"):
        prepare_components(old, ComponentQuantConfig(scale=True), QUANT)
    with pytest.raises(ValueError, match="above base.bits"):
        MixedKVQuantConfig(QUANT, 2, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="describes 3 layers"):
        QuantizedKV(tiny_llama(), MixedKVQuantConfig(QUANT, 8, (1, 1, 1), (1, 1, 1))).new_cache()
    for spec in OPTIONS:
        assert ComponentQuantConfig.parse(spec).label() == spec.replace("rot", "rot")
