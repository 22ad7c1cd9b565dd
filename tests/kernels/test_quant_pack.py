import pytest
import torch

from eigenkv.kernels.backend import interpreting
from eigenkv.kernels.quant_pack import (
    quantize_pack,
    quantize_pack_reference,
    unpack_dequantize,
    unpack_dequantize_reference,
)
from tests.helpers import DEVICE

# (rows, cols, group); rows of 77, 38 and 100 features end in a remainder group, and 77 and 38 are stored padded
# to 80 and 40 features (zero codes)
CASES = [
    (1, 16, 16),
    (37, 64, 32),
    (129, 128, 64),
    (5, 256, 128),
    (300, 32, 16),
    (9, 77, 64),
    (33, 38, 16),
    (4, 100, 32),
]


@pytest.mark.parametrize("rows, cols, group", CASES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric, paired", [(False, False), (True, False), (False, True)])
def test_quantize_pack_matches_reference_bit_for_bit(rows, cols, group, bits, symmetric, paired):
    x = torch.randn(rows, cols, device=DEVICE) * 3
    x[0, :group] = 1.5  # a constant group (scale 0)
    packed, scale, zero = quantize_pack(x, bits, group, symmetric=symmetric, paired=paired)
    ref_packed, ref_scale, ref_zero = quantize_pack_reference(x, bits, group, symmetric=symmetric, paired=paired)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(scale, ref_scale)
    assert (zero is None) == symmetric and (zero is None or torch.equal(zero, ref_zero))


@pytest.mark.parametrize("cols, group", [(77, 64), (38, 16)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("paired", [False, True])
def test_remainder_groups_round_trip(cols, group, bits, paired):
    x = torch.randn(6, cols, device=DEVICE)
    packed, scale, zero = quantize_pack(x, bits, group, paired=paired)
    assert scale.shape == (6, -(-cols // group))
    out = unpack_dequantize(packed, scale, zero, bits, group, cols, torch.float32, paired=paired)
    ref = unpack_dequantize_reference(packed, scale, zero, bits, group, cols, torch.float32, paired=paired)
    assert torch.equal(out, ref)
    assert (out - x).abs().max() <= scale.float().max() / 2 + 1e-6  # within half a step of each group


# per channel: (rows, cols, group), rows whole groups; 77 and 38 columns are stored padded to 80 and 40
CHANNEL_CASES = [(64, 77, 64), (48, 38, 16), (64, 128, 32), (128, 16, 128)]


@pytest.mark.parametrize("rows, cols, group", CHANNEL_CASES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric, paired", [(False, True), (True, True), (False, False)])
def test_per_channel_matches_reference_bit_for_bit(rows, cols, group, bits, symmetric, paired):
    """Groups of `group` consecutive rows of each column: the same packed rows as per token, parameters
    (rows / group, aligned columns) with the padding columns' zero; the round trip is the reference's and
    within half a step of each group."""
    x = torch.randn(rows, cols, device=DEVICE) * 3
    x[:group, 0] = -0.5  # a constant group (scale 0)
    packed, scale, zero = quantize_pack(x, bits, group, symmetric=symmetric, paired=paired, axis="channel")
    ref = quantize_pack_reference(x, bits, group, symmetric=symmetric, paired=paired, axis="channel")
    assert torch.equal(packed, ref[0]) and torch.equal(scale, ref[1])
    assert (zero is None) == symmetric and (zero is None or torch.equal(zero, ref[2]))
    stored = -(-cols // 8) * 8
    assert scale.shape == (rows // group, stored) and not scale[:, cols:].any()
    assert packed.shape == quantize_pack(x, bits, group, paired=paired)[0].shape  # the per-token rows' bytes
    out = unpack_dequantize(packed, scale, zero, bits, group, cols, torch.float32, paired=paired, axis="channel")
    expected = unpack_dequantize_reference(
        packed, scale, zero, bits, group, cols, torch.float32, paired=paired, axis="channel"
    )
    assert torch.equal(out, expected)
    step = scale[:, :cols].float().repeat_interleave(group, dim=0)
    assert ((out - x).abs() <= step / 2 + 1e-5).all() if not symmetric else ((out - x).abs() <= step + 1e-5).all()


def test_per_channel_rejects_partial_groups_and_unknown_axes():
    x = torch.randn(40, 16, device=DEVICE)
    with pytest.raises(ValueError, match="32 consecutive rows; got 40 rows"):
        quantize_pack(x, 4, 32, axis="channel")
    with pytest.raises(ValueError, match='axis must be "token" or "channel"'):
        quantize_pack(x, 4, 32, axis="feature")
    packed, scale, zero = quantize_pack(x[:32], 4, 32, axis="channel")
    with pytest.raises(ValueError, match=r"scale and zero must have shape \(1, 16\) \(per channel\)"):
        unpack_dequantize(packed, scale[:, :8], zero, 4, 32, 16, axis="channel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [3, 4])
def test_round_trip_in_each_dtype(dtype, bits):
    wide = (torch.randn(19, 96, device=DEVICE) * 2).to(dtype)
    x = wide[:, :64]  # row stride 96: the kernel reads strided rows without a copy
    packed, scale, zero = quantize_pack(x, bits, 32)
    assert torch.equal(packed, quantize_pack_reference(x, bits, 32)[0])
    out = unpack_dequantize(packed, scale, zero, bits, 32, 64, dtype)
    exact = unpack_dequantize_reference(packed, scale, zero, bits, 32, 64, torch.float32)
    assert out.dtype == dtype and out.shape == (19, 64)
    if dtype == torch.bfloat16 and interpreting():
        # the interpreter truncates when casting to bf16 instead of rounding: allow one bf16 ulp
        assert ((out.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()
    else:
        assert torch.equal(out, unpack_dequantize_reference(packed, scale, zero, bits, 32, 64, dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, about the NaN itself
def test_bad_input_names_the_fix():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="group size in"):
        quantize_pack(x, 4, 8)
    with pytest.raises(ValueError, match="bits=6"):
        quantize_pack(x, 6, 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_pack(torch.full((2, 32), float("nan"), device=DEVICE), 4, 32)
    with pytest.raises(ValueError, match="float16 scales"):
        quantize_pack(x, 4, 32, scale_dtype=torch.float32)
    packed, scale, zero = quantize_pack(x, 4, 32)
    with pytest.raises(ValueError, match=r"uint8 \(R, 32\) for 64 codes"):
        unpack_dequantize(packed[:, :16], scale, zero, 4, 32, 64)
    with pytest.raises(ValueError, match="scale and zero must have shape"):
        unpack_dequantize(packed, scale[:, :1], zero, 4, 32, 64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, about the NaN itself
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_non_finite_value_anywhere_is_refused(bad):
    x = torch.randn(300, 64, device=DEVICE)
    x[257, 40] = bad  # not in the first program's rows nor the first group
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_pack(x, 4, 32)
    x[257, 40] = 0.0
    quantize_pack(x, 4, 32)  # the flag does not leak across calls


# (axis, bits, group, residual, symmetric, width, held before the append): before any unit, completing a block
# (a token), between two completions (nothing quantized: rows unchanged), rings that wrap
RING_CASES = [
    ("channel", 4, 16, 3, False, 77, 5),
    ("channel", 3, 16, 3, False, 40, 18),
    ("channel", 2, 32, 0, True, 38, 31),
    ("channel", 8, 16, 2, False, 24, 70),
    ("token", 4, 16, 0, False, 77, 9),
    ("token", 3, 32, 5, True, 38, 40),
    ("token", 2, 16, 2, False, 100, 1),
]


@pytest.mark.parametrize("case", RING_CASES, ids=[f"{c[0]}-b{c[1]}-g{c[2]}-r{c[3]}-S{c[6]}" for c in RING_CASES])
def test_ring_append_matches_reference_bit_for_bit(case):
    """Every buffer the append writes (ring, codes, scales, zeros, counts, the NaN flag) equals the reference's,
    from random contents (what it must not touch stays as it was)."""
    from eigenkv.kernels.quant_pack import RingBuffers, ring_append, ring_append_reference
    from eigenkv.quant.config import KVQuantConfig
    from eigenkv.quant.packing import aligned_width, packed_length

    axis, bits, group, residual, symmetric, width, held = case
    batch, heads, capacity = 2, 3, 96
    unit = group if axis == "channel" else 1
    slots = residual + unit  # what a capturable stream holds
    stored = aligned_width(width)
    code_shape = (capacity, packed_length(stored, bits))  # a row per token, whichever the grouping
    param_shape = (capacity, -(-width // group)) if axis == "token" else (capacity // group, stored)
    x = torch.randn(batch, heads, 1, width, device=DEVICE, dtype=torch.float16)
    buffers = RingBuffers(
        ring=torch.randn(batch, heads, slots, width, device=DEVICE, dtype=torch.float16),
        codes=torch.randint(0, 256, (batch, heads, *code_shape), device=DEVICE, dtype=torch.uint8),
        scale=torch.rand(batch, heads, *param_shape, device=DEVICE).half(),
        zero=None if symmetric else torch.rand(batch, heads, *param_shape, device=DEVICE).half(),
        counts=torch.tensor([0, held], dtype=torch.int32, device=DEVICE),
        non_finite=torch.zeros((), dtype=torch.bool, device=DEVICE),
        next_counts=torch.zeros(2, dtype=torch.int32, device=DEVICE),
    )
    copies = RingBuffers(*(None if t is None else t.clone() for t in buffers))
    config = KVQuantConfig(bits=bits, group_size=group, residual=residual, symmetric=symmetric)
    ring_append(x, buffers, config, axis)
    ring_append_reference(x, copies, config, axis)
    for name, got, expected in zip(RingBuffers._fields[:-1], buffers, copies, strict=False):
        assert (got is None) == (expected is None) and (got is None or torch.equal(got, expected)), name
    after = held + 1
    expected_quantized = max(0, after - residual) // unit * unit
    assert buffers.counts.tolist() == [expected_quantized, after]
    x[0, 1, 0, 3] = float("nan")
    ring_append(x, buffers, config, axis)
    assert bool(buffers.non_finite)
    with pytest.raises(ValueError, match="next_counts"):
        ring_append(x, buffers._replace(next_counts=None), config, axis)
    with pytest.raises(ValueError, match="one fp16/bf16 token"):
        ring_append(x.float(), buffers, config, axis)
