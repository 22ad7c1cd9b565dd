"""The prefill kernel and its SDPA path against their PyTorch reference over odd shapes, with and
without the causal quantized view; the mask check and the routing that decide which one the models use."""

import dataclasses

import pytest
import torch
from torch.nn.attention.bias import CausalBias

from eigenkv.compress import EigenConfig, compress_model
from eigenkv.kernels import lowrank_prefill as prefill_module
from eigenkv.kernels import sdpa_prefill as sdpa_module
from eigenkv.kernels.backend import backend
from eigenkv.kernels.lowrank_decode import lowrank_decode
from eigenkv.kernels.lowrank_prefill import lowrank_prefill, lowrank_prefill_reference
from eigenkv.kernels.scoring import Scoring
from eigenkv.kernels.sdpa_prefill import sdpa_prefill
from eigenkv.quant import KVQuantConfig, QuantizedKV, QuantizedKVCache, routing
from eigenkv.quant.config import quantized_prefix
from eigenkv.quant.packing import PackedStream
from eigenkv.quant.store import QuantizedStream
from tests.helpers import DEVICE, random_tokens, random_windows, tiny_llama, tiny_mpt, tiny_opt
from tests.kernels.test_lowrank_decode import ATOL, pre_rope


def check_against_reference(query, keys, values, scoring, **kwargs):
    out = lowrank_prefill(query, keys, values, scoring, **kwargs)
    same_dtype = lowrank_prefill_reference(query, keys, values, scoring, **kwargs)
    exact_kwargs = {k: ((v[0].double(), v[1]) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    exact = lowrank_prefill_reference(query.double(), keys.double(), values.double(), scoring.exact(), **exact_kwargs)
    assert out.shape == exact.shape == (query.shape[0], query.shape[2], query.shape[1], values.shape[-1])
    error = (out.double() - exact).abs().max().item()
    bound = 2 * (same_dtype.double() - exact).abs().max().item() + ATOL[query.dtype]
    assert error <= bound, f"kernel error {error:.3g} > {bound:.3g}"
    return out


CASES = [
    # mode, head size d, groups, key rank, value rank, new tokens T, cached S, quantized view, dtype
    ("rank", 64, 1, 20, 13, 70, 70, False, torch.float16),
    ("rank", 64, 3, 37, 24, 45, 83, True, torch.float16),
    ("rank", 128, 8, 77, 64, 33, 33, True, torch.bfloat16),
    ("rank", 64, 4, 16, 40, 65, 100, False, torch.bfloat16),
    ("pre", 64, 3, 38, 38, 70, 77, True, torch.float16),
    ("pre", 128, 4, 77, 50, 40, 40, False, torch.bfloat16),
    ("pre", 64, 1, 20, 13, 19, 50, True, torch.float16),
]


def random_prompt(mode, d, groups, key_rank, value_rank, length, seq, dtype):
    """``(query, keys, values, scoring)`` of 2 sequences over 2 KV heads: rank-space keys and values of ``seq``
    tokens, ``length`` queries strided as the models hand them ((B, T, H, e) transposed)."""
    batch, kv_heads = 2, 2
    keys = torch.randn(batch, kv_heads, seq, key_rank, device=DEVICE, dtype=dtype)
    values = torch.randn(batch, kv_heads, seq, value_rank, device=DEVICE, dtype=dtype)
    width = d if mode == "pre" else key_rank
    query = torch.randn(batch, length, kv_heads * groups, width, device=DEVICE, dtype=dtype).transpose(1, 2)
    scoring = pre_rope(d**-0.5, d, kv_heads, key_rank, dtype, groups == 1) if mode == "pre" else Scoring(d**-0.5)
    return query, keys, values, scoring


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-d{c[1]}-g{c[2]}-r{c[3]}x{c[4]}-T{c[5]}-S{c[6]}" for c in CASES])
def test_matches_reference_over_odd_shapes(case):
    mode, d, groups, key_rank, value_rank, length, seq, quantized, dtype = case
    query, keys, values, scoring = random_prompt(mode, d, groups, key_rank, value_rank, length, seq, dtype)
    kwargs = {"starts": torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)}  # the second row left-padded
    if quantized:  # query i reads a perturbed ("dequantized") version of the older keys and values
        first = seq - length
        bounds = torch.arange(length, dtype=torch.int32, device=DEVICE) + first
        kwargs["quantized_keys"] = (keys + 0.2 * torch.randn_like(keys), (bounds - 4).clamp(min=0))
        kwargs["quantized_values"] = (values + 0.2 * torch.randn_like(values), bounds)
    out = check_against_reference(query, keys, values, scoring, **kwargs)
    if quantized:
        plain = lowrank_prefill(query, keys, values, scoring, starts=kwargs["starts"])
        assert (out - plain).abs().max() > 1e-2  # the quantized versions are read


def test_rows_are_padded_with_zeros_not_read_past_their_features(monkeypatch):
    """The kernel reads rows of a multiple of 8 features as 16-byte vectors: states of an odd rank, or views of
    a wider tensor, reach it as padded copies whose added features are zero, never the memory beyond the view
    (NaN there would poison the scores)."""
    query, keys, values, scoring = random_prompt("rank", 64, 2, 37, 24, 40, 70, torch.float16)
    wide_keys = torch.full((*keys.shape[:3], 48), float("nan"), device=DEVICE, dtype=keys.dtype)
    wide_values = torch.full((*values.shape[:3], 40), float("nan"), device=DEVICE, dtype=values.dtype)
    wide_keys[..., :37], wide_values[..., :24] = keys, values
    seen = []
    original = prefill_module._prefill_kernel

    class Spy:  # records the states the kernel gets, then launches it
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.extend(args[4:8])
                return original[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(prefill_module, "_prefill_kernel", Spy())
    out = check_against_reference(query, wide_keys[..., :37], wide_values[..., :24], scoring)
    assert out.isfinite().all()
    k, _, v, _ = seen
    assert k.shape[-1] == 40 and v.shape[-1] == 24 and k.is_contiguous() and v.is_contiguous()
    assert not k[..., 37:].any() and torch.equal(k[..., :37], keys)
    # a "contiguous" tensor may stride an axis of size one oddly: the kernel gets the canonical strides
    odd = torch.empty_strided((1, 1, 1, 16), (1, 1, 7, 1), device=DEVICE)
    assert prefill_module._padded_rows(odd).stride() == (16, 16, 16, 1)
    assert prefill_module._padded_rows(keys[..., :32]).stride() == (2 * 70 * 32, 70 * 32, 32, 1)


CAPPED_CASES = [
    # mode, head size d, groups, key rank, value rank, new tokens T, cached S, quantized view, dtype
    ("rank", 64, 3, 37, 24, 45, 83, True, torch.float16),
    ("pre", 64, 2, 38, 20, 33, 40, False, torch.bfloat16),
]


@pytest.mark.parametrize(
    "case", CAPPED_CASES, ids=[f"{c[0]}-r{c[3]}x{c[4]}-T{c[5]}-S{c[6]}-{c[-1]}" for c in CAPPED_CASES]
)
def test_capped_logits_match_the_reference(case):
    """Gemma-2's cap after the scale, before the causal mask (and with the quantized view): scores of a few units
    (scale 0.5) bent by a cap of 5; the capped output differs from the plain one."""
    mode, d, groups, key_rank, value_rank, length, seq, quantized, dtype = case
    query, keys, values, scoring = random_prompt(mode, d, groups, key_rank, value_rank, length, seq, dtype)
    plain = dataclasses.replace(scoring, scaling=0.5)
    capped = dataclasses.replace(plain, softcap=5.0)
    kwargs = {"starts": torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)}
    if quantized:
        bounds = torch.arange(length, dtype=torch.int32, device=DEVICE) + seq - length
        kwargs["quantized_keys"] = (keys + 0.2 * torch.randn_like(keys), (bounds - 4).clamp(min=0))
        kwargs["quantized_values"] = (values + 0.2 * torch.randn_like(values), bounds)
    out = check_against_reference(query, keys, values, capped, **kwargs)
    assert (out - lowrank_prefill(query, keys, values, plain, **kwargs)).abs().max() > 0.1  # the cap is applied


SLIDING_CASES = [
    # mode, head size d, groups, key rank, value rank, new tokens T, cached S, quantized view, dtype, window
    ("rank", 64, 3, 37, 24, 70, 83, True, torch.float16, 16),  # windows inside one key tile
    ("rank", 128, 2, 77, 64, 45, 45, False, torch.bfloat16, 40),  # across tiles
    ("pre", 64, 2, 38, 20, 33, 90, True, torch.float16, 24),  # a cached prefix partly outside every window
    ("pre", 64, 1, 20, 13, 19, 19, False, torch.bfloat16, 1),  # each query sees itself only
]


@pytest.mark.parametrize(
    "case", SLIDING_CASES, ids=[f"{c[0]}-T{c[5]}-S{c[6]}-w{c[-1]}-held{int(c[7])}" for c in SLIDING_CASES]
)
def test_sliding_window_matches_the_reference(case):
    """A sliding layer's window: query ``i`` sees the keys less than ``window`` positions back, from its
    sequence's first valid key (the second row left-padded), with and without the quantized view."""
    *shape, quantized, dtype, window = case
    query, keys, values, scoring = random_prompt(*shape, dtype)
    length, seq = shape[5], shape[6]
    kwargs = {"starts": torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)}
    if quantized:
        bounds = torch.arange(length, dtype=torch.int32, device=DEVICE) + seq - length
        kwargs["quantized_keys"] = (keys + 0.2 * torch.randn_like(keys), (bounds - 4).clamp(min=0))
        kwargs["quantized_values"] = (values + 0.2 * torch.randn_like(values), bounds)
    out = check_against_reference(query, keys, values, scoring, window=window, **kwargs)
    assert (out - lowrank_prefill(query, keys, values, scoring, **kwargs)).abs().max() > 1e-2  # keys were hidden
    wide = lowrank_prefill(query, keys, values, scoring, window=seq, **kwargs)  # a window that hides nothing
    torch.testing.assert_close(wide, lowrank_prefill(query, keys, values, scoring, **kwargs), atol=0, rtol=0)


# keys and values stored with their own configs: (bits, group, axis, symmetric, residual) of each stream
MIXED_CASES = [
    # per-channel keys in blocks of 32 tokens, per-token values in symmetric groups of 128 features
    ("rank", 64, 3, 37, 24, 70, 100, (4, 32, "channel", False, 3), (2, 128, "token", True, 5), torch.float16),
    # the reverse: per-token symmetric keys in groups of 16, per-channel values in blocks of 64 tokens
    ("pre", 64, 2, 38, 50, 45, 83, (3, 16, "token", True, 0), (8, 64, "channel", False, 2), torch.bfloat16),
]


def quantized_view(x, bits, group, axis, symmetric, residual, length):
    """``(held, bounds)`` of ``x`` (B, H, S, r) stored with its own config, as a quantized cache gives it to the
    last ``length`` queries: query ``i`` (holding ``S - length + i + 1`` tokens) reads token ``j`` dequantized
    for ``j < quantized_prefix`` of that count (a token's codes do not change once it is quantized)."""
    config = KVQuantConfig(
        bits=bits, group_size=group, axis_k=axis, axis_v=axis, residual=residual, symmetric=symmetric
    )
    stream = QuantizedStream(config, axis, None)
    stream.push(x)
    quantized = stream.read_quantized(x.dtype)
    held = torch.cat([quantized, x[..., quantized.shape[-2] :, :]], dim=-2)
    seq = x.shape[-2]
    bounds = [quantized_prefix(seq - length + i + 1, axis, group, residual) for i in range(length)]
    return held, torch.tensor(bounds, dtype=torch.int32, device=x.device)


@pytest.mark.parametrize(
    "case", MIXED_CASES, ids=[f"{c[0]}-k{c[7][2][0]}{c[7][1]}-v{c[8][2][0]}{c[8][1]}" for c in MIXED_CASES]
)
def test_keys_and_values_with_their_own_configs_match_the_reference(case):
    """The causal quantized views of keys and values stored with different groups, axes, bits and symmetry
    (each stream's bounds follow its own rule: blocks of G tokens per channel, every token per token)."""
    mode, d, groups, key_rank, value_rank, length, seq, key_cfg, value_cfg, dtype = case
    query, keys, values, scoring = random_prompt(mode, d, groups, key_rank, value_rank, length, seq, dtype)
    kwargs = {
        "starts": torch.tensor([0, 6], dtype=torch.int32, device=DEVICE),
        "quantized_keys": quantized_view(keys, *key_cfg, length),
        "quantized_values": quantized_view(values, *value_cfg, length),
    }
    assert not torch.equal(kwargs["quantized_keys"][1], kwargs["quantized_values"][1])  # bounds of their own
    out = check_against_reference(query, keys, values, scoring, **kwargs)
    plain = lowrank_prefill(query, keys, values, scoring, starts=kwargs["starts"])
    assert (out - plain).abs().max() > 1e-2  # the quantized versions are read


def test_alibi_and_rows_without_valid_keys():
    batch, heads, length = 2, 4, 40
    keys = torch.randn(batch, heads, length, 24, device=DEVICE, dtype=torch.float16)
    values = torch.randn(batch, heads, length, 20, device=DEVICE, dtype=torch.float16)
    query = torch.randn(batch, heads, length, 24, device=DEVICE, dtype=torch.float16)
    slopes = 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32, device=DEVICE)
    starts = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    out = check_against_reference(query, keys, values, Scoring(0.2, alibi_slopes=slopes), starts=starts)
    assert torch.count_nonzero(out[1, :9]) == 0  # padding queries see no key
    plain = lowrank_prefill(query, keys, values, Scoring(0.2), starts=starts)
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("attend", [lowrank_prefill, sdpa_prefill], ids=["kernel", "sdpa"])
def test_both_prefills_refuse_bad_shapes_and_scorings(attend):
    keys = torch.randn(1, 2, 20, 16, device=DEVICE, dtype=torch.float16)
    query = torch.randn(1, 4, 20, 16, device=DEVICE, dtype=torch.float16)
    one = Scoring(1.0)
    with pytest.raises(ValueError, match="at least as many keys"):
        attend(torch.cat([query, query], dim=2), keys, keys, one)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        attend(query[:, :3], keys, keys, one)
    with pytest.raises(ValueError, match="values must be torch.float16"):
        attend(query, keys, keys.bfloat16(), one)
    with pytest.raises(TypeError, match="Scoring"):
        attend(query, keys, keys, 1.0)
    if attend is sdpa_prefill:  # SDPA has no cap: the routing sends capped logits to the kernel
        with pytest.raises(ValueError, match="SDPA cannot cap logits"):
            attend(query, keys, keys, Scoring(1.0, softcap=5.0))


def test_kernel_prefill_refuses_bad_dtypes_and_quantized_views():
    keys = torch.randn(1, 2, 20, 16, device=DEVICE, dtype=torch.float16)
    query = torch.randn(1, 4, 20, 16, device=DEVICE, dtype=torch.float16)
    one = Scoring(1.0)
    with pytest.raises(ValueError, match="lowrank_prefill_reference"):
        lowrank_prefill(query.float(), keys, keys, one)
    with pytest.raises(ValueError, match="bounds must be int32"):
        lowrank_prefill(query, keys, keys, one, quantized_keys=(keys, torch.zeros(20, dtype=torch.int64)))
    with pytest.raises(ValueError, match="quantized version must match"):
        lowrank_prefill(query, keys, keys, one, quantized_values=(keys[..., :8], torch.zeros(20, dtype=torch.int32)))
    with pytest.raises(ValueError, match="window must be a positive int"):
        lowrank_prefill(query, keys, keys, one, window=0)
    wide = torch.randn(1, 4, 20, 256, device=DEVICE, dtype=torch.float16)  # Gemma's heads, pre mode
    scoring = pre_rope(1.0, 256, 2, 16, torch.float16, True)
    with pytest.raises(ValueError, match="heads of up to 128 features"):
        lowrank_prefill(wide, keys, keys, scoring)
    with pytest.raises(ValueError, match="heads of up to 128 features"):
        lowrank_decode(wide[:, :, 0], PackedStream.full_precision(keys), PackedStream.full_precision(keys), scoring)
    lowrank_prefill_reference(wide, keys, keys, scoring)  # the references take any head size


def test_causal_starts_accepts_only_causal_attention_to_one_range():
    length, seq = 3, 5
    positions = torch.arange(seq)
    causal = positions[None, :] <= (seq - length + torch.arange(length))[:, None]
    padded = causal & (positions >= 3)[None, :]  # second row left-padded by 3: its first query sees nothing
    mask = torch.stack([causal, padded])[:, None]  # (B, 1, T, S) bool, True = attend
    rows = routing.causal_starts(mask, 2, length, seq, False, "cpu")
    assert rows.starts.tolist() == [0, 3] and rows.padded is True
    assert routing.causal_starts(mask, 2, length, seq, False, "cpu") is rows  # kept on the mask: no second sync
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert routing.causal_starts(additive, 2, length, seq, False, "cpu").starts.tolist() == [0, 3]
    assert routing.causal_starts(~mask, 2, length, seq, True, "cpu").starts.tolist() == [0, 3]  # MPT's convention
    unpadded = routing.causal_starts(torch.stack([causal, causal])[:, None], 2, length, seq, False, "cpu")
    assert unpadded.starts.tolist() == [0, 0] and unpadded.padded is False
    assert routing.causal_starts(None, 2, length, seq, False, "cpu").padded is False  # no mask: causal, no sync
    full = torch.ones_like(mask)  # bidirectional: not causal
    assert routing.causal_starts(full, 2, length, seq, False, "cpu") is None
    assert routing.causal_starts(full, 2, length, seq, False, "cpu") is None  # the verdict is kept too


def test_causal_starts_accepts_a_sliding_mask_for_its_window_only():
    """transformers' sliding mask (key j visible to query p when p - window < j <= p), left padding on the
    second row: accepted for its window, refused for another or none; a window that hides nothing is none."""
    length, seq, window = 6, 10, 3
    positions = torch.arange(seq)
    query_positions = seq - length + torch.arange(length)
    causal = positions[None, :] <= query_positions[:, None]
    sliding = causal & (positions[None, :] > query_positions[:, None] - window)
    mask = torch.stack([sliding, sliding & (positions >= 5)[None, :]])[:, None]
    rows = routing.causal_starts(mask, 2, length, seq, False, "cpu", window=window)
    assert rows.window == window and rows.starts.tolist() == [2, 5]  # the first keys any query sees
    assert routing.causal_starts(mask, 2, length, seq, False, "cpu", window=window) is rows  # kept, per window
    assert routing.causal_starts(mask, 2, length, seq, False, "cpu", window=4) is None
    assert routing.causal_starts(mask, 2, length, seq, False, "cpu") is None  # not plain causal
    plain = torch.stack([causal, causal])[:, None]
    assert routing.causal_starts(plain, 2, length, seq, False, "cpu", window=seq).window is None


# --- the SDPA path ----------------------------------------------------------------------------------


def check_sdpa_against_reference(query, keys, values, scoring, starts=None):
    """``sdpa_prefill`` against the float64 reference: within twice the same-dtype reference's error (fp16,
    bf16), or 1e-5 (float32, float64: the reference's softmax is float32)."""
    out = sdpa_prefill(query, keys, values, scoring, starts=starts)
    exact = lowrank_prefill_reference(query.double(), keys.double(), values.double(), scoring.exact(), starts=starts)
    assert out.shape == exact.shape == (query.shape[0], query.shape[2], query.shape[1], values.shape[-1])
    assert out.dtype == query.dtype and out.is_contiguous()
    error = (out.double() - exact).abs().max().item()
    if query.dtype in ATOL:
        same_dtype = lowrank_prefill_reference(query, keys, values, scoring, starts=starts)
        bound = 2 * (same_dtype.double() - exact).abs().max().item() + ATOL[query.dtype]
    else:
        bound = 1e-5
    assert error <= bound, f"sdpa_prefill error {error:.3g} > {bound:.3g}"
    return out


SDPA_CASES = [
    # mode, head size d, groups, key rank, value rank, new tokens T, cached S, left padding, dtype
    ("rank", 64, 1, 13, 38, 40, 40, False, torch.float16),  # T == S: is_causal, no mask
    ("rank", 64, 3, 38, 13, 25, 60, False, torch.float32),  # a cache prefix: bottom-right causal bias
    ("rank", 128, 4, 77, 77, 33, 33, True, torch.float16),  # left padding: the additive mask
    ("rank", 64, 4, 13, 77, 20, 45, True, torch.float64),
    ("rank", 64, 3, 38, 38, 30, 50, True, torch.bfloat16),
    ("pre", 64, 3, 38, 38, 30, 30, False, torch.float16),
    ("pre", 64, 1, 13, 77, 20, 50, True, torch.float32),
    ("pre", 128, 4, 77, 13, 40, 40, True, torch.float64),
    ("pre", 64, 4, 38, 13, 17, 41, False, torch.float16),
]


@pytest.mark.parametrize(
    "case", SDPA_CASES, ids=[f"{c[0]}-d{c[1]}-g{c[2]}-r{c[3]}x{c[4]}-T{c[5]}-S{c[6]}-{c[8]}" for c in SDPA_CASES]
)
def test_sdpa_prefill_matches_reference_over_odd_shapes(case):
    mode, d, groups, key_rank, value_rank, length, seq, padded, dtype = case
    query, keys, values, scoring = random_prompt(mode, d, groups, key_rank, value_rank, length, seq, dtype)
    # the second row left-padded so that its first 5 queries see no key
    starts = torch.tensor([0, seq - length + 5], dtype=torch.int32, device=DEVICE) if padded else None
    out = check_sdpa_against_reference(query, keys, values, scoring, starts)
    if padded:
        assert torch.count_nonzero(out[1, :5]) == 0  # queries without a valid key give zeros, as the reference
        assert torch.count_nonzero(out[1, 5:]) == out[1, 5:].numel()


def test_sdpa_prefill_with_alibi():
    batch, heads, length, seq = 2, 4, 30, 44
    keys = torch.randn(batch, heads, seq, 13, device=DEVICE, dtype=torch.float16)
    values = torch.randn(batch, heads, seq, 21, device=DEVICE, dtype=torch.float16)
    query = torch.randn(batch, heads, length, 13, device=DEVICE, dtype=torch.float16)
    slopes = 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32, device=DEVICE)
    for starts in (None, torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)):
        out = check_sdpa_against_reference(query, keys, values, Scoring(0.3, alibi_slopes=slopes), starts)
        plain = sdpa_prefill(query, keys, values, Scoring(0.3), starts=starts)
        assert (out - plain).abs().max() > 1e-2


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Record every ``scaled_dot_product_attention`` call of ``sdpa_prefill``: ``(q, k, v, kwargs)``."""
    calls = []
    original = sdpa_module.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append((q, k, v, kwargs))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa_module, "scaled_dot_product_attention", recording)
    return calls


def test_sdpa_prefill_pads_to_eight_and_masks_only_when_needed(sdpa_calls, monkeypatch):
    batch, kv_heads, groups, length, seq = 2, 2, 3, 12, 20
    keys = torch.randn(batch, kv_heads, seq, 13, device=DEVICE, dtype=torch.float16)
    values = torch.randn(batch, kv_heads, seq, 38, device=DEVICE, dtype=torch.float16)
    query = torch.randn(batch, kv_heads * groups, length, 13, device=DEVICE, dtype=torch.float16)
    scoring = Scoring(0.25)
    sdpa_prefill(query, keys[:, :, :length], values[:, :, :length], scoring)  # T == S, no padding
    q, k, v, kwargs = sdpa_calls[-1]
    assert kwargs["attn_mask"] is None and kwargs["is_causal"] is True  # the flash path: no mask
    assert q.shape[-1] == k.shape[-1] == v.shape[-1] == 40  # one width, a multiple of 8, for flash
    assert kwargs["scale"] == 0.25 and kwargs["enable_gqa"] is True and k.shape[1] == kv_heads
    sdpa_prefill(query, keys, values, scoring)  # T < S: torch's bottom-right causal bias, still no dense mask
    q, k, v, kwargs = sdpa_calls[-1]
    assert isinstance(kwargs["attn_mask"], CausalBias) and kwargs["is_causal"] is False
    starts = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    first = sdpa_prefill(query, keys, values, scoring, starts=starts)  # left padding: an additive mask
    q, k, v, kwargs = sdpa_calls[-1]
    mask = kwargs["attn_mask"]
    assert mask.dtype == torch.float16 and mask.shape == (batch, 1, length, seq)
    assert mask.stride(-2) % 16 == 0  # aligned rows: the memory-efficient backend uses the mask as it is
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (16, 16, 40)  # no flash: each width padded on its own
    second = sdpa_prefill(query, keys, values, scoring, starts=starts)  # the next layer: the same mask, kept
    assert sdpa_calls[-1][3]["attn_mask"] is mask
    assert torch.equal(first, second)
    monkeypatch.setattr(sdpa_module, "HAS_ENABLE_GQA", False)  # torch < 2.5: keys and values repeated per head
    repeated = sdpa_prefill(query, keys, values, scoring, starts=starts)
    q, k, v, kwargs = sdpa_calls[-1]
    assert "enable_gqa" not in kwargs and k.shape[1] == v.shape[1] == kv_heads * groups
    torch.testing.assert_close(repeated, first, atol=1e-3, rtol=0)


def test_sdpa_prefill_refuses_bad_starts_and_widths():
    keys = torch.randn(1, 2, 20, 16, device=DEVICE, dtype=torch.float16)
    query = torch.randn(1, 4, 20, 16, device=DEVICE, dtype=torch.float16)
    one = Scoring(1.0)
    with pytest.raises(ValueError, match="starts must be int32"):
        sdpa_prefill(query, keys, keys, one, starts=torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="rank mode"):
        sdpa_prefill(query[..., :8], keys, keys, one)


# --- routing: which prompts take SDPA, which the kernel ------------------------------------------------


def test_prefill_through_sdpa_only_without_a_quantized_view_or_alibi(monkeypatch):
    held = torch.zeros(1, 2, 5, 8)
    plain = torch.zeros(1, 2, 5, 8)
    tagged = torch.zeros(1, 2, 5, 8)
    routing.tag_twin(tagged, held, torch.arange(5, dtype=torch.int32))
    slopes = torch.ones(4)
    monkeypatch.setenv("EIGENKV_BACKEND", "auto")
    assert routing.prefill_through_sdpa(plain, plain, Scoring(1.0))
    assert not routing.prefill_through_sdpa(tagged, plain, Scoring(1.0))  # keys read in two versions
    assert not routing.prefill_through_sdpa(plain, tagged, Scoring(1.0))  # values read in two versions
    assert not routing.prefill_through_sdpa(plain, plain, Scoring(1.0, alibi_slopes=slopes))  # ALiBi: the kernel
    assert not routing.prefill_through_sdpa(plain, plain, Scoring(1.0, softcap=50.0))  # capped logits: the kernel
    monkeypatch.setenv("EIGENKV_BACKEND", "triton")  # the kernels forced: every prompt too
    assert not routing.prefill_through_sdpa(plain, plain, Scoring(1.0))


@pytest.fixture
def counted_prefill(monkeypatch):
    """Attention routed as on CUDA under ``auto`` (``torch`` still the PyTorch path), prompts counted:
    ``[("sdpa" | "kernel", mode)]``."""
    calls = []
    paths = (("kernel", prefill_module, "lowrank_prefill"), ("sdpa", sdpa_module, "sdpa_prefill"))
    for name, module, function in paths:
        original = getattr(module, function)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, args[3].mode))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function, counting)
    monkeypatch.setattr(routing, "use_triton", lambda x: backend() != "torch")
    return calls


def prompt_logits(model, ids, attention, cache, split=None):
    """Logits of a left-padded prompt ``ids`` (B, T): one forward, or two (``split`` tokens, then the rest over
    the cached prefix)."""
    parts = [(0, ids.shape[1])] if split is None else [(0, split), (split, ids.shape[1])]
    with torch.no_grad():
        out = [
            model(ids[:, a:e], attention_mask=attention[:, :e], past_key_values=cache, use_cache=True).logits
            for a, e in parts
        ]
    return torch.cat(out, dim=1).float()


MODELS = [(tiny_llama, "pre"), (tiny_llama, "post"), (tiny_opt, "pre"), (tiny_mpt, "pre")]


@pytest.mark.parametrize(("make", "mode"), MODELS, ids=["llama-pre", "llama-post", "opt", "mpt"])
def test_prompts_take_sdpa_unless_the_quantized_view_or_alibi_needs_it(make, mode, counted_prefill, monkeypatch):
    from transformers import DynamicCache

    model = make()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    model = model.to(DEVICE, torch.float16)
    ids = random_tokens(model, batch=2, length=21)
    attention = torch.ones_like(ids)
    attention[1, :4] = 0  # left padding
    quant = KVQuantConfig(bits=4, group_size=16, residual=3)
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layers
    expected_mode = "pre" if (make is tiny_llama and mode == "pre") else "rank"
    plain_tool = "kernel" if make is tiny_mpt else "sdpa"  # ALiBi stays on the kernel
    results = {}
    for backend_name in ("torch", "auto"):
        monkeypatch.setenv("EIGENKV_BACKEND", backend_name)
        counted_prefill.clear()
        # a DynamicCache: a padded prompt (T == S), then more tokens over the cached prefix (T < S)
        results[backend_name, "plain"] = prompt_logits(model, ids, attention, DynamicCache(config=model.config), 13)
        plain_calls = list(counted_prefill)
        counted_prefill.clear()
        # a quantized cache whose held keys and values are read quantized by later queries: the causal view
        if make is tiny_mpt:  # MPT attends itself: no QuantizedKV context, a cache that reads packed
            cache = QuantizedKVCache(quant, model.config, read_packed=True)
            results[backend_name, "quantized"] = prompt_logits(model, ids, attention, cache)
        else:
            with QuantizedKV(model, quant) as kv:
                results[backend_name, "quantized"] = prompt_logits(model, ids, attention, kv.new_cache())
        quantized_calls = list(counted_prefill)
        if backend_name == "torch":
            assert plain_calls == quantized_calls == []
    assert plain_calls == [(plain_tool, expected_mode)] * 2 * layers
    assert quantized_calls == [("kernel", expected_mode)] * layers  # the prefill kernel still launched
    real = attention.bool()  # padding queries see no key: zeros here, what the model's own path gives them there
    for cache in ("plain", "quantized"):
        got, want = results["auto", cache][real], results["torch", cache][real]
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
