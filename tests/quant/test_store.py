"""The stored layout of ``eigenkv.quant.store``: codes padded to ``aligned_width`` features, numerics unchanged."""

import pytest
import torch

from eigenkv.quant import KVQuantConfig
from eigenkv.quant.config import quantized_prefix
from eigenkv.quant.packing import aligned_width, pack, packed_length, pair_runs, unpack
from eigenkv.quant.reference import dequantize, quantize
from eigenkv.quant.store import QuantizedStream, SegmentedStream

BATCH, HEADS, TOKENS = 2, 3, 48


def reference(x: torch.Tensor, config: KVQuantConfig, axis: str):
    """What a stream of ``x`` must hold: ``(T_q, quantized groups, padded codes)`` from the reference functions."""
    b, h, s, d = x.shape
    g = config.group_size
    tq = quantized_prefix(s, axis, g, config.residual)
    dim = -1 if axis == "token" else -2
    q = quantize(x[..., :tq, :], config.bits, g, dim, symmetric=config.symmetric, scale_dtype=config.torch_scale_dtype)
    pad = aligned_width(d) - d
    # a row per token packed along features in the paired order, whichever the grouping
    codes = pack(pair_runs(torch.nn.functional.pad(q.codes, (0, pad)), config.bits), config.bits, dim=-1)
    assert codes.shape == (b, h, tq, packed_length(aligned_width(d), config.bits))
    return tq, q, codes


def padding_codes(codes: torch.Tensor, config: KVQuantConfig, width: int) -> torch.Tensor:
    """The codes of the padding features ``width .. aligned_width(width)`` of a stored tensor."""
    codes = unpack(codes, config.bits, aligned_width(width), dim=-1)
    return pair_runs(codes, config.bits, inverse=True)[..., width:]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("width", [77, 38, 48])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_padded_layout_round_trips_exactly(bits, axis, symmetric, width, backend, monkeypatch):
    """Codes, scales and zeros are the reference's, the codes padded with zero codes to ``aligned_width``;
    every read gives back exactly the reference's dequantization (group 16: the Triton path takes the
    per-channel rows and per-token rows of 48 features; per-token rows of 77 or 38 go through the reference)."""
    from eigenkv.kernels import quant_pack

    calls = []
    for name in ("quantize_pack", "unpack_dequantize"):
        original = getattr(quant_pack, name)
        monkeypatch.setattr(quant_pack, name, lambda *a, f=original, n=name, **k: calls.append(n) or f(*a, **k))
    monkeypatch.setenv("EIGENKV_BACKEND", backend)
    config = KVQuantConfig(bits=bits, group_size=16, residual=5, symmetric=symmetric)
    x = torch.randn(BATCH, HEADS, TOKENS, width)
    stream = QuantizedStream(config, axis, None)
    stream.push(x[..., :21, :])
    held, _ = stream.append(x[..., 21:, :])  # decodes the blocks this call quantized
    tq, q, codes = reference(x, config, axis)
    assert stream.quantized_tokens == tq > 0
    assert torch.equal(stream.codes, codes)
    assert not padding_codes(stream.codes, config, width).any()
    # per channel, scales and zeros are stored for the aligned features too, the padding ones zero
    pad = (0, aligned_width(width) - width) if axis == "channel" else (0, 0)
    assert torch.equal(stream.scale, torch.nn.functional.pad(q.scale, pad))
    assert (stream.zero is None) == symmetric and (
        symmetric or torch.equal(stream.zero, torch.nn.functional.pad(q.zero, pad))
    )
    assert torch.equal(stream.window, x[..., tq:, :])
    expected = torch.cat([dequantize(q, torch.float32), x[..., tq:, :]], dim=-2)
    assert torch.equal(held, expected)
    assert torch.equal(stream.read_quantized(torch.float32), expected[..., :tq, :])
    packed = stream.packed()
    assert packed.segments[0].width == width
    assert packed.segments[0].codes.data_ptr() == stream.codes.data_ptr()  # a view of the store: no copy
    assert torch.equal(packed.dequantize(torch.float32), expected)
    kernels = backend == "triton"  # any width: a remainder group, rows padded to aligned_width
    assert set(calls) == ({"quantize_pack", "unpack_dequantize"} if kernels else set())


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_segments_each_pad_their_own_width(axis):
    widths, bits = [5, 33], [8, 3]
    configs = [KVQuantConfig(bits=b, group_size=8, residual=3) for b in bits]
    stream = SegmentedStream(list(zip(widths, configs, strict=True)), axis)
    x = torch.randn(BATCH, HEADS, 29, sum(widths))
    stream.push(x)
    packed = stream.packed()
    parts = x.split(widths, dim=-1)
    expected = []
    for segment, part, config, width in zip(packed.segments, parts, configs, widths, strict=True):
        tq, q, codes = reference(part, config, axis)
        assert segment.width == width and torch.equal(segment.codes, codes)  # 8 and 40 features of codes
        assert not padding_codes(segment.codes, config, width).any()
        expected.append(dequantize(q, torch.float32))
    expected = torch.cat([torch.cat(expected, dim=-1), x[..., tq:, :]], dim=-2)
    assert torch.equal(packed.dequantize(torch.float32), expected)
