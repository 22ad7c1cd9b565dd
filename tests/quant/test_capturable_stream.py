"""A capturable stream (fixed buffers, ring window, counts on the device) stores exactly what the growing
stream stores, counts its bytes honestly, and refuses what a fixed shape cannot do, naming the fix."""

import pytest
import torch

from eigenkv.memory import cache_tensor_bytes, kv_cache_bytes
from eigenkv.quant import KVQuantConfig, QuantizedKV
from eigenkv.quant.store import CapturableStream, QuantizedStream
from tests.helpers import DEVICE, tiny_llama
from tests.quant.test_store_growth import assert_same, state

CONFIGS = [
    # bits, group, residual, axis, width, symmetric, prompt length
    (4, 16, 0, "channel", 77, False, 1),
    (3, 32, 5, "channel", 38, False, 40),
    (2, 16, 7, "token", 77, False, 3),
    (8, 64, 0, "token", 64, True, 70),
    (4, 16, 3, "token", 38, False, 16),
    (2, 16, 2, "channel", 24, True, 33),
]


@pytest.mark.parametrize("case", CONFIGS, ids=[f"b{c[0]}-g{c[1]}-r{c[2]}-{c[3]}-w{c[4]}-p{c[6]}" for c in CONFIGS])
def test_stores_the_same_bits_as_the_growing_stream(case):
    bits, group, residual, axis, width, symmetric, prompt = case
    config = KVQuantConfig(bits=bits, group_size=group, residual=residual, symmetric=symmetric)
    x = torch.randn(2, 3, prompt + 130, width)
    growing, fixed = QuantizedStream(config, axis, None), CapturableStream(config, axis, None, prompt + 130)
    for stream in (growing, fixed):
        stream.push(x[:, :, :prompt])
    for t in range(prompt, prompt + 130):  # decode steps: every group boundary of the window passes by
        growing.push(x[:, :, t : t + 1])
        fixed.push(x[:, :, t : t + 1])
        if t % 23 == 0 or t == prompt + 129:
            assert_same(state(growing), state(fixed))
            assert fixed.counts.tolist() == [growing.quantized_tokens, growing.tokens]
            assert fixed.nbytes() == growing.nbytes()
            assert torch.equal(fixed.read_quantized(x.dtype), growing.read_quantized(x.dtype))
    # the PyTorch path's append returns what the growing stream returns, prompt and step alike
    a, b = QuantizedStream(config, axis, None), CapturableStream(config, axis, None, prompt + 130)
    for piece in (x[:, :, :prompt], x[:, :, prompt : prompt + 1], x[:, :, prompt + 1 : prompt + 40]):
        for got, expected in zip(b.append(piece), a.append(piece), strict=True):
            assert torch.equal(got, expected)


FUSED = [(3, 16, False, torch.float16), (4, 64, True, torch.bfloat16), (2, 32, False, torch.float16),
         (8, 128, False, torch.float16)]  # fmt: skip


@pytest.mark.parametrize("case", FUSED, ids=[f"b{c[0]}-g{c[1]}-sym{int(c[2])}-{c[3]}" for c in FUSED])
def test_the_fused_kernel_path_stores_the_same_bits(case, monkeypatch):
    """fp16/bf16 states through the one-launch append (the interpreter on CPU), as a decode step on a GPU."""
    bits, group, symmetric, dtype = case
    monkeypatch.setenv("EIGENKV_BACKEND", "triton")
    from eigenkv.kernels import quant_pack

    launches = []
    original = quant_pack.ring_append
    monkeypatch.setattr(quant_pack, "ring_append", lambda *a, **k: launches.append(1) or original(*a, **k))
    prompt, steps = group - 1, 8  # per channel (residual 3): block 0 completes at the fourth step
    for axis, residual in (("channel", 3), ("token", 0)):
        config = KVQuantConfig(bits=bits, group_size=group, residual=residual, symmetric=symmetric)
        x = torch.randn(2, 2, prompt + steps, 40, dtype=dtype, device=DEVICE)
        growing, fixed = QuantizedStream(config, axis, None), CapturableStream(config, axis, None, prompt + steps)
        for stream in (growing, fixed):
            stream.push(x[:, :, :prompt])
            for t in range(prompt, prompt + steps):
                stream.push(x[:, :, t : t + 1])
        assert fixed.quantized_tokens == (group if axis == "channel" else prompt + steps)
        assert_same(state(growing), state(fixed))
    assert len(launches) == 2 * steps  # every step of both streams through the fused kernel


def test_a_capturable_cache_counts_every_byte_it_allocates():
    """Held bytes equal the accounting of a growing cache at the same length; every other allocated byte
    (room for the tokens to come, the ring's free slots, counts, flags, index tensors) is reserved."""
    model = tiny_llama()
    config = KVQuantConfig(bits=3, group_size=16, residual=5)
    ids = torch.randint(4, 96, (2, 37))
    with QuantizedKV(model, config) as kv, torch.no_grad():
        cache = kv.new_cache(max_tokens=100, capturable=True)
        model(ids, past_key_values=cache)
        for _ in range(5):
            model(ids[:, :1], past_key_values=cache)
    held = cache.nbytes()
    counted = kv_cache_bytes(model, seq_len=42, batch_size=2, dtype=torch.float32, quant=config)
    assert sum(held.values()) == counted.total
    assert cache_tensor_bytes(cache) == counted.total + cache.reserved_bytes()


def test_fixed_shapes_refuse_what_they_cannot_hold():
    config = KVQuantConfig(bits=4, group_size=16, residual=4)
    stream = CapturableStream(config, "channel", None, 40)
    assert stream.capacity == 48  # whole groups
    x = torch.randn(2, 3, 60, 24)
    stream.push(x[:, :, :45])
    with pytest.raises(ValueError, match="larger max_tokens"):
        stream.push(x[:, :, 45:50])
    with pytest.raises(ValueError, match="max_tokens >= 60"):
        stream.reserve(60)
    with pytest.raises(ValueError, match="within its full-precision window"):
        stream.crop(20)  # below the quantized tokens (32)
    with pytest.raises(ValueError, match="fixed batch of 2"):
        stream.select(torch.tensor([0, 1, 1]))
    model = tiny_llama()
    with pytest.raises(ValueError, match="pass max_tokens"):
        QuantizedKV(model, config).new_cache(capturable=True)
    with pytest.raises(ValueError, match="rotate=False"):
        QuantizedKV(model, KVQuantConfig(bits=4, rotate=True)).new_cache(max_tokens=64, capturable=True)


def test_crop_within_the_window_and_select_in_place():
    config = KVQuantConfig(bits=4, group_size=16, residual=4)
    x = torch.randn(2, 3, 45, 24)
    growing, fixed = QuantizedStream(config, "channel", None), CapturableStream(config, "channel", None, 64)
    for stream in (growing, fixed):
        stream.push(x[:, :, :40])  # 32 quantized, 8 in the window
        stream.push(x[:, :, 40:41])
        stream.crop(38)  # drops three of the window's tokens
        stream.push(x[:, :, 41:42])
    with pytest.raises(ValueError, match="keeping its 32 quantized tokens"):
        fixed.crop(35)  # the rule would hold 16 quantized at 35
    assert_same(state(growing), state(fixed))
    buffer = fixed.packed().segments[0].codes
    index = torch.tensor([1, 0])
    growing.select(index)
    fixed.select(index)
    assert_same(state(growing), state(fixed))
    assert fixed.packed().segments[0].codes.data_ptr() == buffer.data_ptr()  # in place: a captured step's address
