import pytest
import torch
from transformers import LlamaConfig

from eigenkv.memory import (
    AttentionShape,
    DenseStorage,
    KVLayout,
    LayerKV,
    QuantizedStorage,
    SegmentedStorage,
    cache_held_bytes,
    cache_tensor_bytes,
    kv_cache_bytes,
)
from eigenkv.quant import KVQuantConfig, QuantizedKV
from eigenkv.quant.store import QuantizedStream, SegmentedStream
from tests.helpers import tiny_gemma3, tiny_llama, tiny_mpt, tiny_opt


def test_llama2_7b_fp16_at_2048_is_one_gb():
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    kv = kv_cache_bytes(config)
    assert kv.total == 2 * 32 * 32 * 128 * 2048 * 2
    assert kv.gb == pytest.approx(1.0)
    assert kv.components == {"keys.data": kv.total // 2, "values.data": kv.total // 2}


def test_gqa_batch_and_dtype_scale_the_count():
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    base = kv_cache_bytes(config)
    assert base.gb == pytest.approx(0.25)
    assert kv_cache_bytes(config, seq_len=4096, batch_size=8).total == 16 * base.total
    assert kv_cache_bytes(config, dtype=torch.float32).total == 2 * base.total


@pytest.mark.parametrize(
    "build",
    [lambda: tiny_llama(kv_heads=2), lambda: tiny_llama(kv_heads=4), lambda: tiny_opt(64, 32), tiny_mpt],
    ids=["llama-gqa", "llama-mha", "opt", "mpt"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_count_equals_bytes_a_real_cache_holds(build, dtype):
    model = build().to(dtype)
    batch, seq = 3, 21
    ids = torch.randint(0, 64, (batch, seq))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert cache_tensor_bytes(cache) == kv_cache_bytes(model, seq_len=seq, batch_size=batch, dtype=dtype).total


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("width", [77, 38])
def test_quantized_count_includes_the_code_padding(width, bits, axis):
    """Codes are stored for ``aligned_width(width)`` features (a multiple of 8); the count is what a stream holds."""
    batch, heads, tokens = 2, 3, 45
    config = KVQuantConfig(bits=bits, group_size=16, residual=4)
    stream = QuantizedStream(config, axis, None)
    stream.push(torch.randn(batch, heads, tokens, width))
    held = stream.nbytes()
    tensors = (stream.codes, stream.scale, stream.zero, stream.window)
    assert sum(held.values()) == sum(t.numel() * t.element_size() for t in tensors)
    counted = QuantizedStorage(width, config, axis, torch.float32).nbytes(tokens)
    assert {name: batch * heads * n for name, n in counted.items()} == held
    padded = {77: 80, 38: 40}[width]
    if axis == "token":  # T_q = 41 tokens of padded * bits / 8 bytes each
        assert counted["codes"] == 41 * padded * bits // 8
        if (width, bits) == (77, 4):
            assert counted["codes"] == 41 * 40  # 40 bytes per token, not the 39 of 77 dense codes
    else:  # T_q = 32 tokens: 2 blocks of 16 tokens, 2 * bits bytes per block and feature, padded features
        assert counted["codes"] == 2 * 2 * bits * padded


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_segmented_count_pads_each_segment(axis):
    widths, configs = [5, 33], [KVQuantConfig(bits=8, group_size=8), KVQuantConfig(bits=3, group_size=8)]
    stream = SegmentedStream(list(zip(widths, configs, strict=True)), axis)
    stream.push(torch.randn(1, 2, 24, sum(widths)))
    counted = SegmentedStorage(
        tuple(QuantizedStorage(w, c, axis, torch.float32) for w, c in zip(widths, configs, strict=True))
    ).nbytes(24)
    assert {name: 2 * n for name, n in counted.items()} == stream.nbytes()
    assert counted["codes"] == 24 * (8 * 8 + 40 * 3) // 8  # 8 and 40 features of codes for 5 and 33


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [3, 4])
def test_count_equals_bytes_a_quantized_cache_of_unaligned_head_size_holds(bits, axis):
    model = tiny_llama(hidden_size=152)  # head size 38: codes stored for 40 features
    config = KVQuantConfig(bits=bits, group_size=16, axis_k=axis, axis_v=axis, residual=3)
    ids = torch.randint(4, 96, (3, 40))
    with QuantizedKV(model, config) as kv, torch.no_grad():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
    counted = kv_cache_bytes(model, seq_len=40, batch_size=3, dtype=torch.float32, quant=config)
    assert counted.total == cache_held_bytes(cache) == sum(cache.nbytes().values())
    assert cache_tensor_bytes(cache) == counted.total + cache.reserved_bytes()
    tq = 37 if axis == "token" else 32
    codes = tq * 40 * bits // 8 * 2 * 2 * 3  # tokens x padded bytes per token x layers x KV heads x batch
    assert counted.components["keys.codes"] == counted.components["values.codes"] == codes


def test_attention_shape_reads_each_family():
    assert AttentionShape.from_config(tiny_llama(kv_heads=2).config) == AttentionShape(2, 4, 2, 16)
    assert AttentionShape.from_config(tiny_opt(64, 32).config) == AttentionShape(2, 4, 4, 8)
    assert AttentionShape.from_config(tiny_mpt().config) == AttentionShape(2, 4, 4, 8)
    assert AttentionShape.from_config(tiny_gemma3().config) == AttentionShape(3, 4, 2, 16, (16, None, 16))


def test_layout_sums_custom_storages_and_fixed_bytes():
    layout = KVLayout(
        layers=(LayerKV(2, DenseStorage(10), DenseStorage(12)), LayerKV(2, DenseStorage(6), DenseStorage(64))),
        fixed={"bases": 1000},
    )
    kv = kv_cache_bytes(layout, seq_len=100, batch_size=2)
    assert kv.components["keys.data"] == 2 * 2 * 100 * (10 + 6) * 2
    assert kv.components["values.data"] == 2 * 2 * 100 * (12 + 64) * 2
    assert kv.total == kv.components["keys.data"] + kv.components["values.data"] + 1000
    with pytest.raises(ValueError, match="do not pass dtype or quant"):
        kv_cache_bytes(layout, dtype=torch.float16)


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported model config"):
        kv_cache_bytes(object())
    with pytest.raises(ValueError, match="width must be >= 1"):
        DenseStorage(0)
    with pytest.raises(ValueError, match="seq_len >= 0 and batch_size >= 1"):
        kv_cache_bytes(tiny_llama(), batch_size=0)
    windowed = LlamaConfig(num_hidden_layers=2, sliding_window=512, layer_types=["sliding_attention"] * 2)
    # a sliding layer holds its last window - 1 tokens (transformers' DynamicSlidingWindowLayer)
    assert kv_cache_bytes(windowed, seq_len=2048).total == kv_cache_bytes(windowed, seq_len=511).total
    assert kv_cache_bytes(windowed, seq_len=300).total < kv_cache_bytes(windowed, seq_len=511).total
    with pytest.raises(ValueError, match="not supported"):
        kv_cache_bytes(LlamaConfig(num_hidden_layers=1, layer_types=["chunked_attention"]))
