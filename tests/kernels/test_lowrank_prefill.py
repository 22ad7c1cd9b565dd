"""The prefill kernel against its PyTorch reference over odd shapes, with and without the causal
quantized view; the mask check that decides when the models use it."""

import pytest
import torch

from eigenkv.kernels.lowrank_prefill import lowrank_prefill, lowrank_prefill_reference
from eigenkv.kernels.scoring import Scoring
from eigenkv.quant import routing
from tests.helpers import DEVICE
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


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-d{c[1]}-g{c[2]}-r{c[3]}x{c[4]}-T{c[5]}-S{c[6]}" for c in CASES])
def test_matches_reference_over_odd_shapes(case):
    mode, d, groups, key_rank, value_rank, length, seq, quantized, dtype = case
    batch, kv_heads = 2, 2
    keys = torch.randn(batch, kv_heads, seq, key_rank, device=DEVICE, dtype=dtype)
    values = torch.randn(batch, kv_heads, seq, value_rank, device=DEVICE, dtype=dtype)
    width = d if mode == "pre" else key_rank
    # a strided query, as the models hand it: (B, T, H, e) transposed
    query = torch.randn(batch, length, kv_heads * groups, width, device=DEVICE, dtype=dtype).transpose(1, 2)
    scoring = pre_rope(d**-0.5, d, kv_heads, key_rank, dtype, groups == 1) if mode == "pre" else Scoring(d**-0.5)
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


def test_bad_input_is_refused_with_the_fix():
    keys = torch.randn(1, 2, 20, 16, device=DEVICE, dtype=torch.float16)
    query = torch.randn(1, 4, 20, 16, device=DEVICE, dtype=torch.float16)
    one = Scoring(1.0)
    with pytest.raises(ValueError, match="lowrank_prefill_reference"):
        lowrank_prefill(query.float(), keys, keys, one)
    with pytest.raises(ValueError, match="at least as many keys"):
        lowrank_prefill(torch.cat([query, query], dim=2), keys, keys, one)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        lowrank_prefill(query[:, :3], keys, keys, one)
    with pytest.raises(ValueError, match="values must be torch.float16"):
        lowrank_prefill(query, keys, keys.bfloat16(), one)
    with pytest.raises(ValueError, match="bounds must be int32"):
        lowrank_prefill(query, keys, keys, one, quantized_keys=(keys, torch.zeros(20, dtype=torch.int64)))
    with pytest.raises(ValueError, match="quantized version must match"):
        lowrank_prefill(query, keys, keys, one, quantized_values=(keys[..., :8], torch.zeros(20, dtype=torch.int32)))
    with pytest.raises(TypeError, match="Scoring"):
        lowrank_prefill(query, keys, keys, 1.0)


def test_causal_starts_accepts_only_causal_attention_to_one_range():
    length, seq = 3, 5
    positions = torch.arange(seq)
    causal = positions[None, :] <= (seq - length + torch.arange(length))[:, None]
    padded = causal & (positions >= 3)[None, :]  # second row left-padded by 3: its first query sees nothing
    mask = torch.stack([causal, padded])[:, None]  # (B, 1, T, S) bool, True = attend
    assert routing.causal_starts(mask, 2, length, seq, False, "cpu").tolist() == [0, 3]
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert routing.causal_starts(additive, 2, length, seq, False, "cpu").tolist() == [0, 3]
    assert routing.causal_starts(~mask, 2, length, seq, True, "cpu").tolist() == [0, 3]  # MPT's convention
    full = torch.ones_like(mask)  # bidirectional: not causal
    assert routing.causal_starts(full, 2, length, seq, False, "cpu") is None
