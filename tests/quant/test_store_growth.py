"""The store grows in place: any push sizes store the same bits, a decode step writes bytes that do not grow
with the context, growth is geometric, crop and batch selection keep exactly what they should, and a push
reads nothing back from the device."""

import pytest
import torch

from eigenkv.quant import KVQuantConfig
from eigenkv.quant.config import MixedKVQuantConfig
from eigenkv.quant.store import QuantizedStream, SegmentedStream

BATCH, HEADS = 2, 3


def make(config: KVQuantConfig, axis: str, width: int, high: int = 0):
    if high:
        mixed = MixedKVQuantConfig(config, 8, (high,), (high,))
        return SegmentedStream(mixed.segments(0, "key", width), axis)
    return QuantizedStream(config, axis, None)


def state(stream) -> dict:
    """Everything a stream holds, as plain tensors (segments flattened; a capturable stream's counts read back)."""
    packed = stream.packed().host_form()
    held = {"window": packed.window.clone(), "tokens": torch.tensor(packed.quantized_tokens)}
    for i, s in enumerate(packed.segments):
        held |= {f"codes{i}": s.codes.clone(), f"scale{i}": s.scale.clone()}
        if s.zero is not None:
            held[f"zero{i}"] = s.zero.clone()
    return held


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape and torch.equal(a[name], b[name]), name


CONFIGS = [
    # bits, group, residual, axis, width, high-precision features
    (4, 16, 0, "channel", 77, 0),
    (3, 32, 5, "channel", 38, 0),
    (2, 16, 7, "token", 77, 0),
    (4, 32, 0, "token", 64, 0),
    (4, 16, 3, "channel", 38, 9),
]


@pytest.mark.parametrize("case", CONFIGS, ids=[f"b{c[0]}-g{c[1]}-r{c[2]}-{c[3]}-w{c[4]}-h{c[5]}" for c in CONFIGS])
def test_any_push_sizes_store_the_same_bits(case):
    bits, group, residual, axis, width, high = case
    config = KVQuantConfig(bits=bits, group_size=group, axis_k=axis, axis_v=axis, residual=residual)
    x = torch.randn(BATCH, HEADS, 150, width, dtype=torch.float16)
    whole, pieces = make(config, axis, width, high), make(config, axis, width, high)
    whole.push(x)
    start = 0
    for size in [1, 1, 3, 17, 1, 40, 1, 1, 2, 33, 50]:  # decode steps, short and long pushes, group boundaries
        pieces.push(x[:, :, start : start + size])
        start += size
    assert start == 150 and pieces.tokens == whole.tokens == 150
    assert_same(state(whole), state(pieces))
    reserved = make(config, axis, width, high)
    reserved.reserve(200)
    reserved.push(x[:, :, :70])
    reserved.push(x[:, :, 70:])
    assert_same(state(whole), state(reserved))


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_bytes_written_per_decode_step_do_not_grow_with_context(axis):
    config = KVQuantConfig(bits=4, group_size=32, axis_k=axis, axis_v=axis, residual=16)
    stream = QuantizedStream(config, axis, None)
    stream.reserve(17_000)
    x = torch.randn(1, 2, 16_000 + 256, 64, dtype=torch.float16)

    def steps(first: int, count: int) -> dict:
        before = stream.traffic
        for t in range(first, first + count):
            stream.push(x[:, :, t : t + 1])
        return {k: stream.traffic[k] - before[k] for k in before}

    stream.push(x[:, :, :1000])
    at_1k = steps(1000, 128)  # 128 steps: four whole groups
    stream.push(x[:, :, 1128:16_000])
    at_16k = steps(16_000, 128)
    assert at_1k["written"] == at_16k["written"] > 0
    # each step writes its token, and the packed rows of the tokens it quantizes: about 2 + 0.5 + 4 / 32 bytes
    # a feature at 4 bits with fp16 scales and zeros per group of 32
    assert at_1k["written"] < 128 * 2 * 64 * (2 + 0.5 + 2 * 2 / 32 + 0.1)
    # the window (at most 16 + 31 tokens) moves to the front of its buffer (2 x (16 + 32) tokens) once per 49
    # tokens or more: at most three moves in 128 steps, the same at any context; no buffer grew (reserved)
    window_bytes = 2 * 47 * 64 * 2
    assert abs(at_1k["moved"] - at_16k["moved"]) <= window_bytes
    assert at_16k["moved"] <= 3 * window_bytes


def test_growth_without_a_reservation_is_geometric():
    config = KVQuantConfig(bits=4, group_size=16, axis_k="token", axis_v="token", residual=8)
    stream = QuantizedStream(config, "token", None)
    x = torch.randn(1, 2, 3000, 32, dtype=torch.float16)
    for t in range(3000):
        stream.push(x[:, :, t : t + 1])
    held = sum(stream.nbytes().values())
    assert stream.traffic["moved"] <= 2 * held  # doublings copy at most what is held, in all
    assert stream.reserved_bytes() <= held + 1  # at most one doubling of room (and the NaN flag)
    assert_same(state(stream), state(_pushed_once(config, "token", x)))


def _pushed_once(config, axis, x):
    stream = QuantizedStream(config, axis, None)
    stream.push(x)
    return stream


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("keep", [95, 80, 64, 33, 0])
def test_crop_keeps_exactly_the_first_tokens(axis, keep):
    config = KVQuantConfig(bits=3, group_size=16, axis_k=axis, axis_v=axis, residual=4)
    x = torch.randn(BATCH, HEADS, 100, 38, dtype=torch.float32)
    stream = _pushed_once(config, axis, x)
    before = stream.packed().dequantize(torch.float32)
    stream.crop(keep)
    assert stream.tokens == keep
    assert torch.equal(stream.packed().dequantize(torch.float32), before[:, :, :keep])
    stream.push(x[:, :, keep:])  # the stream goes on from there
    assert stream.tokens == 100
    with pytest.raises(ValueError, match="cannot crop"):
        stream.crop(101)


@pytest.mark.parametrize("high", [0, 9])
def test_select_equals_storing_the_selected_sequences(high):
    config = KVQuantConfig(bits=4, group_size=16, axis_k="channel", axis_v="channel", residual=5)
    x = torch.randn(3, HEADS, 70, 38, dtype=torch.float16)
    index = torch.tensor([2, 0, 0, 1])  # reorder, drop none, repeat one (beam search)
    stream, expected = make(config, "channel", 38, high), make(config, "channel", 38, high)
    stream.push(x[:, :, :40])
    expected.push(x[index, :, :40])
    stream.select(index)
    assert_same(state(stream), state(expected))
    stream.push(x[index, :, 40:])  # and it grows on
    expected.push(x[index, :, 40:])
    assert_same(state(stream), state(expected))


def test_a_push_reads_nothing_back_from_the_device(monkeypatch):
    """On CPU a device-to-host read is a Python-side read of a tensor's value: count them during pushes."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for axis in ("channel", "token"):
        config = KVQuantConfig(bits=4, group_size=16, axis_k=axis, axis_v=axis, residual=3)
        stream = QuantizedStream(config, axis, None)
        for _ in range(40):  # decode steps, flushing groups and tokens
            stream.push(torch.randn(2, 2, 1, 32))
        stream.push(torch.randn(2, 2, 20, 32))
        stream.packed()
    assert reads == []


def test_non_finite_states_are_flagged_on_the_device():
    config = KVQuantConfig(bits=4, group_size=16, axis_k="token", axis_v="token")
    stream = QuantizedStream(config, "token", None)
    stream.push(torch.randn(1, 2, 4, 32))
    assert not stream.non_finite
    bad = torch.randn(1, 2, 1, 32)
    bad[0, 1, 0, 5] = float("nan")
    stream.push(bad)  # no error in the step itself
    assert stream.non_finite


def test_a_dense_stream_grows_in_place_and_counts_what_it_holds():
    """An unquantized stream (a None quantizer) holds every token as it came: a decode step writes its token and
    moves nothing (growth doubles), reads are views of the buffer, and its bytes are the rows held plus the room
    reported as reserved."""
    from eigenkv.memory import cache_tensor_bytes
    from eigenkv.quant.store import DenseStream

    x = torch.randn(BATCH, HEADS, 300, 20, dtype=torch.float16)
    stream = DenseStream()
    held, same = stream.append(x[:, :, :5])
    assert held is same and torch.equal(held, x[:, :, :5])
    grown = []
    for t in range(5, 300):
        before = stream.traffic
        held, _ = stream.append(x[:, :, t : t + 1])
        assert held.untyped_storage().data_ptr() == stream.view().untyped_storage().data_ptr()  # no copy
        assert stream.traffic["written"] - before["written"] == BATCH * HEADS * 20 * 2
        if stream.traffic["moved"] != before["moved"]:
            grown.append(t)
    assert torch.equal(held, x) and stream.tokens == 300
    assert len(grown) == 6  # 5 -> 10 -> 20 -> ... -> 320 rows: geometric
    assert stream.nbytes() == {"data": x.numel() * 2}
    assert cache_tensor_bytes(stream) == stream.nbytes()["data"] + stream.reserved_bytes()
    assert stream.reserved_bytes() == BATCH * HEADS * 20 * 20 * 2  # 320 rows of room

    reserved = DenseStream()
    reserved.reserve(300)
    for t in range(300):
        reserved.push(x[:, :, t : t + 1])
    assert reserved.traffic["moved"] == 0 and reserved.reserved_bytes() == 0
    assert torch.equal(reserved.packed().dequantize(torch.float16), x)


def test_a_dense_stream_drops_crops_and_selects():
    from eigenkv.memory import cache_tensor_bytes
    from eigenkv.quant.store import DenseStream

    x = torch.randn(BATCH, HEADS, 400, 8)
    stream = DenseStream()
    stream.push(x[:, :, :10])
    allocated = []
    for t in range(10, 400):  # a sliding layer: the held rows stay 16, their room is reused
        stream.push(x[:, :, t : t + 1])
        stream.drop_to(max(0, t + 1 - 16))
        if t + 1 in (100, 400):
            allocated.append(cache_tensor_bytes(stream))
    assert allocated[0] == allocated[1]
    assert stream.tokens == 400 and stream.dropped == 384 and torch.equal(stream.view(), x[:, :, 384:])
    assert stream.nbytes() == {"data": BATCH * HEADS * 16 * 8 * 4}
    stream.crop(390)
    assert stream.tokens == 390 and torch.equal(stream.view(), x[:, :, 384:390])
    with pytest.raises(ValueError, match="no longer holds its first 384"):
        stream.crop(383)
    with pytest.raises(ValueError, match="cannot drop 391"):
        stream.drop_to(391)
    stream.select(torch.tensor([1, 1, 0]))
    assert stream.batch == 3 and torch.equal(stream.view(), x[[1, 1, 0], :, 384:390])
    with pytest.raises(ValueError, match="appending states of shape"):
        stream.push(x[:, :, :1])  # a batch of 2 into a stream of 3
