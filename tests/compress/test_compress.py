"""Eigen Attention on tiny random OPT, MPT and Llama (GQA) models: identity, ratios, decoding, artifacts."""

import json

import pytest
import torch
from transformers import DynamicCache

from eigenkv.compress import EigenConfig, EigenPlan, compress_model, is_compressed, load_compressed
from eigenkv.compress.attention import EigenAttention
from eigenkv.eval.data import TokenWindows
from eigenkv.eval.kv_memory import cache_tensor_bytes, kv_cache_bytes
from tests.helpers import tiny_llama, tiny_mpt, tiny_opt

# (family, model factory, RoPE mode); OPT/MPT have no RoPE, their mode argument is ignored.
CASES = [
    ("llama-gqa", lambda: tiny_llama(kv_heads=2), "pre"),
    ("llama-gqa", lambda: tiny_llama(kv_heads=2), "post"),
    ("llama-mha", lambda: tiny_llama(kv_heads=4), "pre"),
    ("opt", tiny_opt, "pre"),
    ("mpt", tiny_mpt, "pre"),
]
IDS = [f"{name}-{mode}" for name, _, mode in CASES]


def windows_for(model, count=4, length=48, seed=1) -> TokenWindows:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (count, length), generator=gen)
    return TokenWindows(ids, "random", length, "none", 0, count)


def tokens_for(model, batch=2, length=40, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=gen)


def compressed_with_logits(make, ratio, mode):
    """(plan, logits before, logits after) of a fresh model compressed to ``ratio``."""
    model = make()
    x = tokens_for(model)
    with torch.no_grad():
        before = model(x).logits
    plan = compress_model(model, windows_for(model), EigenConfig(target_ratio=ratio, rope_mode=mode), progress=False)
    assert is_compressed(model)
    with torch.no_grad():
        return plan, before, model(x).logits


@pytest.mark.parametrize(("name", "make", "mode"), CASES, ids=IDS)
def test_full_rank_equals_original(name, make, mode):
    plan, before, after = compressed_with_logits(make, 1.0, mode)
    assert plan.ratio == 1.0
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "make", "mode"), CASES, ids=IDS)
def test_reduced_rank_bases_are_orthonormal_and_change_the_model(name, make, mode):
    plan, before, after = compressed_with_logits(make, 0.5, mode)
    for basis in plan.key_bases + plan.value_bases:
        eye = torch.eye(basis.shape[-1]).expand(basis.shape[0], -1, -1)
        torch.testing.assert_close(basis.transpose(-1, -2) @ basis, eye, atol=1e-5, rtol=0)
    assert all(0 < e < 1 for e in plan.errors)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize(("name", "make", "mode"), CASES, ids=IDS)
def test_cached_decoding_equals_full_forward(name, make, mode):
    """The reference code rotates every cached key at the current position; here each key keeps its own."""
    model = make()
    compress_model(model, windows_for(model), EigenConfig(target_ratio=0.5, rope_mode=mode), progress=False)
    x = tokens_for(model, batch=2, length=24)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :8], past_key_values=cache, use_cache=True).logits]  # a prompt, then one token at a time
        for t in range(8, x.shape[1]):
            steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_generate_with_left_padding_matches_unpadded(mode):
    model = tiny_llama(kv_heads=2)
    compress_model(model, windows_for(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    prompts = [tokens_for(model, 1, 12, seed=3)[0], tokens_for(model, 1, 7, seed=4)[0]]
    pad = model.config.pad_token_id
    batch = torch.full((2, 12), pad)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, -len(p) :], mask[i, -len(p) :] = p, 1
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 12:]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert together[i].tolist() == alone[0, len(p) :].tolist()


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.8])
@pytest.mark.parametrize("allot", ["budget", "uniform"])
def test_target_ratio_is_met_and_cache_bytes_match_accounting(ratio, allot):
    model = tiny_llama(kv_heads=2, hidden_size=256)  # head size 64: one component is 1/256 of the cache
    plan = compress_model(model, windows_for(model), EigenConfig(target_ratio=ratio, allot=allot), progress=False)
    assert abs(plan.ratio - ratio) <= 0.005
    if allot == "uniform":
        flat = [r for pair in plan.ranks for r in pair]  # one rank; a few components more or less to meet the ratio
        assert sum(r == round(ratio * 64) for r in flat) >= len(flat) - 2
    x = tokens_for(model, batch=3, length=37)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True)
    counted = kv_cache_bytes(model, seq_len=37, batch_size=3, dtype=torch.float32)
    assert cache_tensor_bytes(cache) == counted.total - counted.components["bases"]
    basis_bytes = sum(m.key_basis.numel() * 4 for m in model.modules() if isinstance(m, EigenAttention))
    assert counted.components["bases"] == basis_bytes
    dense = kv_cache_bytes(tiny_llama(kv_heads=2, hidden_size=256), seq_len=37, batch_size=3, dtype=torch.float32)
    per_token = counted.total - counted.components["bases"]
    assert per_token / dense.total == pytest.approx(plan.ratio)


def test_budget_allotment_gives_values_more_components_when_their_spectrum_is_flatter():
    model = tiny_llama(kv_heads=2, hidden_size=256)
    with torch.no_grad():  # make keys low rank: only 8 input directions reach them
        model.model.layers[0].self_attn.k_proj.weight[:, 8:] *= 0.01
    plan = compress_model(model, windows_for(model), EigenConfig(target_ratio=0.5, allot="budget"), progress=False)
    assert plan.ranks[0][0] < plan.ranks[0][1]


def test_error_budget_rule_keeps_every_layer_within_its_budget():
    model = tiny_llama(kv_heads=2, hidden_size=128)
    windows = windows_for(model)
    tight = compress_model(
        tiny_llama(kv_heads=2, hidden_size=128),
        windows,
        EigenConfig(target_ratio=None, error_budget=0.05),
        progress=False,
    )
    loose = compress_model(model, windows, EigenConfig(target_ratio=None, error_budget=0.3), progress=False)
    assert all(e <= 0.05 for e in tight.errors) and all(e <= 0.3 for e in loose.errors)
    assert all(lk <= tk and lv <= tv for (lk, lv), (tk, tv) in zip(loose.ranks, tight.ranks, strict=True))
    assert loose.ratio < tight.ratio < 1


def test_plan_round_trip_and_refusals(tmp_path):
    model = tiny_llama(kv_heads=2)
    windows = windows_for(model)
    plan = compress_model(model, windows, EigenConfig(target_ratio=0.5, rope_mode="post"), progress=False)
    path = plan.save(tmp_path / "plan")
    meta = json.loads((path / "plan.json").read_text())
    assert meta["config"]["rope_mode"] == "post" and meta["ranks"] == [list(r) for r in plan.ranks]
    assert meta["calibration"]["source"] == "random" and meta["calibration"]["tokens"] == 4 * 48
    with pytest.raises(FileExistsError, match="exists"):
        plan.save(tmp_path / "plan")

    fresh = tiny_llama(kv_heads=2)
    loaded = load_compressed(fresh, path)
    assert loaded.ranks == plan.ranks and loaded.mode == "post"
    x = tokens_for(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="another model"):
        load_compressed(tiny_llama(kv_heads=2, seed=7), path)  # same shapes, other weights
    with pytest.raises(ValueError, match="another model"):
        load_compressed(tiny_llama(kv_heads=4), path)
    with pytest.raises(ValueError, match="already compressed"):
        load_compressed(fresh, path)

    corrupt = tmp_path / "corrupt"
    plan.save(corrupt)
    data = (corrupt / "bases.safetensors").read_bytes()
    (corrupt / "bases.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        EigenPlan.load(corrupt)
    with pytest.raises(FileNotFoundError, match="not a compression plan"):
        EigenPlan.load(tmp_path)


def test_bad_input_raises_clear_errors():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="target_ratio"):
            EigenConfig(target_ratio=bad)
    with pytest.raises(ValueError, match="exactly one"):
        EigenConfig(target_ratio=0.6, error_budget=0.1)
    with pytest.raises(ValueError, match="allot"):
        EigenConfig(allot="greedy")
    with pytest.raises(ValueError, match="rope_mode"):
        EigenConfig(rope_mode="mid")

    model = tiny_llama()
    empty = TokenWindows(torch.empty(0, 16, dtype=torch.long), "random", 16, "none", 0, 0)
    with pytest.raises(ValueError, match="at least one window"):
        compress_model(model, empty, progress=False)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress_model(model, windows_for(model), progress=False)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="unsupported model GPT2LMHeadModel"):
        compress_model(gpt2, windows_for(gpt2), progress=False)
    with pytest.raises(ValueError, match="below what this model can keep"):
        compress_model(
            tiny_llama(), windows_for(tiny_llama()), EigenConfig(target_ratio=0.01, min_rank=2), progress=False
        )


def test_one_calibration_serves_several_configs():
    from eigenkv.compress.calibrate import calibrate

    model = tiny_llama(kv_heads=2, hidden_size=128)
    windows = windows_for(model)
    stats = calibrate(model, windows, rotated=False, progress=False)
    reused = compress_model(
        tiny_llama(kv_heads=2, hidden_size=128), stats, EigenConfig(target_ratio=0.5), progress=False
    )
    direct = compress_model(model, windows, EigenConfig(target_ratio=0.5), progress=False)
    assert reused.ranks == direct.ranks and reused.calibration["source"] == "random"
    for a, b in zip(reused.key_bases + reused.value_bases, direct.key_bases + direct.value_bases, strict=True):
        torch.testing.assert_close(a.abs(), b.abs())
    with pytest.raises(ValueError, match="pre-RoPE statistics"):
        compress_model(tiny_llama(kv_heads=2, hidden_size=128), stats, EigenConfig(rope_mode="post"), progress=False)
    with pytest.raises(ValueError, match="another model"):
        compress_model(tiny_llama(kv_heads=2, hidden_size=128, seed=5), stats, progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_full_rank_in_half_precision_is_within_rounding(dtype, mode):
    model = tiny_llama(kv_heads=2).to(dtype)
    x = tokens_for(model)
    with torch.no_grad():
        before = model(x).logits.float()
    compress_model(model, windows_for(model), EigenConfig(target_ratio=1.0, rope_mode=mode), progress=False)
    assert all(m.key_basis.dtype == dtype for m in model.modules() if isinstance(m, EigenAttention))
    with torch.no_grad():
        after = model(x).logits.float()
    eps = torch.finfo(dtype).eps
    assert (after - before).abs().max() <= 4 * eps * before.abs().max()
