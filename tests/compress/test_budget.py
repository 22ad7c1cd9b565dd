"""The byte allotment: exact bytes, the corners of its option space, its solver, and refusals."""

import copy
import itertools
from dataclasses import replace

import pytest
import torch

from eigenkv.compress import EigenConfig, compress_model
from eigenkv.compress.allot import Allotter, LayerSize
from eigenkv.compress.budget import (
    BudgetConfig,
    Sensitivity,
    StreamLosses,
    allot_bytes,
    measure_sensitivity,
    stream_bytes,
)
from eigenkv.compress.calibrate import calibrate
from eigenkv.memory import cache_held_bytes, kv_cache_bytes
from eigenkv.pipeline import allotted_recipe, apply_recipe, recipes_for_budget
from eigenkv.quant import KVQuantConfig
from eigenkv.recipe import Recipe
from tests.helpers import random_tokens, random_windows, tiny_llama, tiny_mistral, tiny_opt

SEQ = 64
OPTIONS = BudgetConfig(bits=(2, 4, 8), groups=(16, 32), seq_len=SEQ, rank_points=(0.5,), reference_bits=2)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = tiny_llama()
    calib = calibrate(model, random_windows(model, count=3, length=SEQ), gradients=True, progress=False)
    return model, calib, measure_sensitivity(model, calib, OPTIONS, progress=False)


def test_quantized_keys_and_values_lose_more_at_fewer_bits(llama):
    """Measured through a real quantized cache, causally (a missing mask would let queries see the future)."""
    _, _, sens = llama
    for keys, values in sens.streams:
        for losses in (keys.original, keys.quant, values.original, values.quant):
            assert losses["2b-g16-kc-vt-r0"] > losses["4b-g16-kc-vt-r0"] > losses["8b-g16-kc-vt-r0"] > 0


def fp16_bytes(model) -> int:
    return kv_cache_bytes(model, seq_len=SEQ).total


@pytest.mark.parametrize("fraction", [0.12, 0.2, 0.35, 0.6])
def test_the_allotment_meets_the_budget_and_a_real_cache_holds_those_bytes(llama, fraction):
    model, calib, sens = llama
    budget = int(fraction * fp16_bytes(model))
    for recipe, allotment in recipes_for_budget(sens, budget):
        assert allotment.bytes <= budget
        assert allotment.bytes > 0.9 * budget  # spent, not left over
        compressed = apply_recipe(copy.deepcopy(model), recipe, calib, progress=False)
        counted = compressed.kv_bytes(seq_len=SEQ)
        rotation = sens.rotation_bytes if allotment.rotate else 0  # one matrix, for every rotated stream
        assert counted.total == allotment.bytes == sum(row["bytes"] for row in allotment.streams) + rotation
        cache = compressed.new_cache()
        with compressed, torch.no_grad():
            compressed.model(random_tokens(model, batch=1, length=SEQ), past_key_values=cache)
        if cache is not None:  # the tiny model runs in float32: so do its windows and unquantized streams
            as_held = compressed.kv_bytes(seq_len=SEQ, dtype=torch.float32)
            assert cache_held_bytes(cache) == as_held.total - as_held.components.get("bases", 0)
        assert allotment.lowrank == (recipe.lowrank is not None)


def test_sliding_layers_are_counted_exactly():
    """Every sliding layer drops its oldest tokens with the others: the allotment counts the whole layout."""
    model = tiny_mistral(sliding_window=24)  # sliding layers compress post-RoPE
    windows = random_windows(model, count=2, length=SEQ)
    calib = calibrate(model, windows, gradients=True, rotated=True, progress=False)
    sens = measure_sensitivity(model, calib, replace(OPTIONS, rope_mode="post"), progress=False)
    assert sens.windows == [24, 24]
    for fraction in (0.15, 0.3):
        for recipe, allotment in recipes_for_budget(sens, int(fraction * fp16_bytes(model))):
            compressed = apply_recipe(copy.deepcopy(model), recipe, calib, progress=False)
            assert compressed.kv_bytes(seq_len=SEQ).total == allotment.bytes <= allotment.budget


def test_a_budget_that_fits_the_fp16_model_chooses_it(llama):
    model, _, sens = llama
    recipe, allotment = recipes_for_budget(sens, fp16_bytes(model))[0]
    assert recipe == Recipe() and allotment.predicted == 0.0 and allotment.bytes == fp16_bytes(model)


def test_full_rank_only_is_per_layer_mixed_precision(llama):
    model, calib, _ = llama
    options = BudgetConfig(bits=(2, 4), groups=(16, 32), seq_len=SEQ, lowrank=False, unquantized=False, rotate=False)
    sens = measure_sensitivity(model, calib, options, progress=False)
    uniform = KVQuantConfig(bits=4, group_size=32)
    budget = kv_cache_bytes(model, seq_len=SEQ, quant=uniform).total
    [(recipe, allotment)] = recipes_for_budget(sens, budget)
    assert recipe.lowrank is None and all(r == (16, 16) for r in allotment.ranks)
    assert all(q is not None for q in allotment.keys + allotment.values)
    # at least as good as the uniform setting of the same size, by the same prediction
    uniform_loss = sum(sens.streams[i][k].original[uniform.label()] for i in range(2) for k in (0, 1))
    assert allotment.predicted <= uniform_loss + 1e-15
    with pytest.raises(ValueError, match="lowrank=False"):
        allot_bytes(sens, budget, lowrank=True)


def test_rotated_quantizers_pay_for_their_matrix(llama):
    model, calib, sens = llama
    assert sens.rotatable and "2b-g16-kc-vt-r0-rot" in sens.streams[0][0].original
    assert "2b-g16-kc-vt-r0-rot" not in sens.streams[0][0].quant  # rank-space caches are not rotated
    rotated = [a for a in (allot_bytes(sens, int(f * fp16_bytes(model)), False, True) for f in (0.35, 0.5, 0.6))]
    assert any(a.rotate for a in rotated)
    for allotment in rotated:
        recipe = allotted_recipe(allotment, sens.config)
        counted = apply_recipe(copy.deepcopy(model), recipe, progress=False).kv_bytes(seq_len=SEQ)
        assert counted.total == allotment.bytes <= allotment.budget
        assert counted.components.get("rotation", 0) == (sens.rotation_bytes if allotment.rotate else 0)
    with pytest.raises(ValueError, match="rotated quantizers apply to the model without Eigen Attention"):
        allot_bytes(sens, fp16_bytes(model), True, True)


def test_sixteen_bits_only_is_the_rank_allotment():
    """Without quantizers the allotment is the Fisher rank allotment, solved exactly (OPT keeps no bases)."""
    model = tiny_opt()
    calib = calibrate(model, random_windows(model, count=3, length=SEQ), gradients=True, progress=False)
    sens = measure_sensitivity(model, calib, BudgetConfig(bits=(), seq_len=SEQ), progress=False)
    assert sens.key_basis == [(0, 0)] * 2
    plan = compress_model(copy.deepcopy(model), calib, EigenConfig(target_ratio=0.5), progress=False, apply=False)
    sizes, fisher_ranks = sens.sizes, plan.ranks
    budget = sum(
        stream_bytes(rk, None, "key", s, None, SEQ) + stream_bytes(rv, None, "value", s, None, SEQ)
        for (rk, rv), s in zip(fisher_ranks, sizes, strict=True)
    )
    [(recipe, allotment), *_] = recipes_for_budget(sens, budget)
    assert recipe.kv is None and allotment.lowrank and allotment.bytes <= budget
    predicted = Allotter(None, sizes, EigenConfig(), None)
    predicted.use_curves([(k.rank, v.rank) for k, v in sens.streams], 0)
    assert allotment.predicted <= predicted.predicted(fisher_ranks) + 1e-12


def test_a_layer_whose_output_is_scaled_down_gets_fewer_bytes():
    def layer_bytes(model):
        calib = calibrate(model, random_windows(model, count=3, length=SEQ), gradients=True, progress=False)
        sens = measure_sensitivity(model, calib, OPTIONS, progress=False)
        allotment = recipes_for_budget(sens, int(0.25 * fp16_bytes(model)))[0][1]
        return [sum(r["bytes"] for r in allotment.streams if r["layer"] == i) for i in range(2)]

    torch.manual_seed(0)
    model = tiny_llama()
    before = layer_bytes(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(0.05)
    after = layer_bytes(model)
    assert after[1] < before[1] and after[0] > before[0]


def synthetic(losses: dict, d: int = 4) -> Sensitivity:
    """A hand-made sensitivity of 2 layers, head size ``d``, 1 KV head: ``losses[(layer, kind)] = (rank curve,
    {label: full-rank quantized loss})``."""
    config = BudgetConfig(bits=(2, 4), groups=(4,), seq_len=16, rank_points=(0.5,), reference_bits=2)
    streams = []
    for layer in range(2):
        pair = []
        for kind in (0, 1):
            rank, quant = losses[(layer, kind)]
            pair.append(StreamLosses(rank=rank, quant=quant, share=[r / d for r in range(d + 1)], original=quant))
        streams.append(tuple(pair))
    return Sensitivity(streams, [LayerSize(1, d)] * 2, [None, None], [(0, 8)] * 2, config, 0, 0.0, {})


def test_the_knapsack_is_exact_on_a_small_instance():
    gen = torch.Generator().manual_seed(3)
    labels = [
        q.label() for q in synthetic({(i, k): ([0.0] * 5, {}) for i in range(2) for k in (0, 1)}).config.quantizers()
    ]
    losses = {}
    for layer, kind in itertools.product(range(2), range(2)):
        drops = torch.rand(4, generator=gen).sort(descending=True).values.tolist()
        rank = [sum(drops[r:]) for r in range(5)]  # decreasing to 0 at full rank
        losses[(layer, kind)] = (
            rank,
            dict(zip(labels, sorted(torch.rand(2, generator=gen).tolist(), reverse=True), strict=True)),
        )
    sens = synthetic(losses)
    from eigenkv.compress.budget import _options  # the solver's own option lists, to enumerate every choice

    items = [_options(sens, layer, kind, True) for layer in range(2) for kind in ("key", "value")]
    for budget in (300, 420, 600, 900):
        combos = [c for c in itertools.product(*items) if sum(o.bytes for o in c) <= budget]
        best = min(sum(o.loss for o in c) for c in combos)
        allotment = allot_bytes(sens, budget, lowrank=True)
        assert allotment.predicted == pytest.approx(best, abs=1e-12) and allotment.bytes <= budget


def test_bad_input_gets_clear_errors(llama):
    model, calib, sens = llama
    with pytest.raises(ValueError, match="below the smallest cache"):
        recipes_for_budget(sens, 100)
    with pytest.raises(ValueError, match="not supported"):
        BudgetConfig(bits=(5,))
    with pytest.raises(ValueError, match="no option left"):
        BudgetConfig(bits=(), unquantized=False)
    with pytest.raises(ValueError, match="reference_bits"):
        BudgetConfig(bits=(4, 8), reference_bits=3)
    with pytest.raises(ValueError, match="unknown BudgetConfig fields"):
        BudgetConfig.from_dict({"bitz": [2]})
    without = calibrate(model, random_windows(model, count=2, length=SEQ), progress=False)
    with pytest.raises(ValueError, match="gradients=True"):
        measure_sensitivity(model, without, OPTIONS, progress=False)
    with pytest.raises(ValueError, match="another model"):
        measure_sensitivity(tiny_llama(seed=5), calib, OPTIONS, progress=False)
    assert Sensitivity.from_dict(sens.to_dict()).to_dict() == sens.to_dict()
    with pytest.raises(ValueError, match="measure it again"):
        Sensitivity.from_dict({"streams": []})


def test_an_allotted_recipe_decodes_through_the_kernels_as_through_pytorch(llama, monkeypatch):
    """Per-layer and per-kind bits and groups (and ranks) reach the decode kernel (the interpreter on CPU)."""
    model, calib, _ = llama
    keys = (KVQuantConfig(bits=4, group_size=16), KVQuantConfig(bits=2, group_size=32, symmetric=True))
    values = (KVQuantConfig(bits=3, group_size=32), KVQuantConfig(bits=8, group_size=16))
    recipe = Recipe(
        lowrank=OPTIONS.eigen().with_ranks([(12, 9), (16, 13)]),
        kv=keys[0],
        kv_layers={0: (keys[0], values[0]), 1: (keys[1], values[1])},
    )
    compressed = apply_recipe(copy.deepcopy(model), recipe, calib, progress=False)
    compressed.model.half()
    ids = random_tokens(model, batch=2, length=40)
    import eigenkv.kernels.lowrank_decode as decode

    calls, kernel = [], decode.lowrank_decode
    monkeypatch.setattr(decode, "lowrank_decode", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    logits = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("EIGENKV_BACKEND", backend)
        cache = compressed.new_cache()
        with compressed, torch.no_grad():
            out = [compressed.model(ids, past_key_values=cache).logits[:, -1]]
            for _ in range(3):
                out.append(compressed.model(out[-1].argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1])
        logits[backend] = torch.stack(out).float()
    assert len(calls) == 3 * 2  # every decode step of both layers
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=2e-2, rtol=2e-2)
