import pytest
import torch
from transformers import LlamaConfig

from eigenkv.memory import (
    AttentionShape,
    DenseStorage,
    KVLayout,
    LayerKV,
    LayerSlide,
    QuantizedStorage,
    SegmentedStorage,
    SlidStorage,
    cache_held_bytes,
    cache_tensor_bytes,
    kv_cache_bytes,
    quantized_layout,
)
from eigenkv.quant import KVQuantConfig, LayerwiseKVQuantConfig, QuantizedKV
from eigenkv.quant.store import QuantizedStream, SegmentedStream
from tests.helpers import random_tokens, random_windows, tiny_gemma3, tiny_llama, tiny_mistral, tiny_mpt, tiny_opt


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


def test_each_stream_is_counted_with_its_own_quantizer():
    """Per layer and kind: an unquantized stream is dense in the window dtype, a quantized one has its own codes;
    the rotation matrix is counted once when any stream rotates."""
    shape = AttentionShape(layers=2, q_heads=4, kv_heads=2, head_dim=16)
    four, rotated = KVQuantConfig(bits=4, group_size=16, axis_k="token"), KVQuantConfig(bits=2, rotate=True)
    config = LayerwiseKVQuantConfig((four, None), (None, rotated))
    layout = quantized_layout(shape, config, torch.bfloat16)
    assert layout.layers[0].keys == QuantizedStorage(16, four, "token", torch.bfloat16)
    assert layout.layers[0].values == layout.layers[1].keys == DenseStorage(16, torch.bfloat16)
    assert layout.layers[1].values == QuantizedStorage(16, rotated, "token", torch.bfloat16)
    assert layout.fixed == {"rotation": 16 * 16 * 4}
    assert quantized_layout(shape, LayerwiseKVQuantConfig((four, None), (None, four))).fixed == {}
    kv = layout.nbytes(100, batch_size=3)
    assert kv.components["keys.data"] == kv.components["values.data"] == 3 * 2 * 100 * 16 * 2
    assert kv.components["keys.codes"] == 3 * 2 * 100 * 16 * 4 // 8


def test_an_unquantized_stream_of_a_sliding_layer_drops_what_its_partner_drops():
    shape = AttentionShape(layers=1, q_heads=4, kv_heads=2, head_dim=16, windows=(16,))
    keys = KVQuantConfig(bits=2, group_size=8, axis_k="channel", residual=4)
    layout = quantized_layout(shape, LayerwiseKVQuantConfig((keys,), (None,)), torch.float32)
    dense = layout.layers[0].values
    assert isinstance(dense, SlidStorage)
    # 70 tokens: keys quantized 64, the next query reads 55..70: whole blocks of 8 before 55 dropped, 22 held
    assert dense.nbytes(70) == {"data": 22 * 16 * 4}
    assert dense.nbytes(15) == {"data": 15 * 16 * 4}  # nothing dropped before the window is full
    # a window alone: a layer whose keys and values both follow the config (48 tokens dropped at 70)
    both = QuantizedStorage(16, keys, "channel", torch.float32, 16)
    assert both == QuantizedStorage(
        16, keys, "channel", torch.float32, LayerSlide(16, ((keys, "key"), (keys, "value")))
    )
    assert both.nbytes(70)["codes"] == (64 - 48) // 8 * 2 * 16


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral], ids=["llama", "mistral-sliding"])
def test_count_equals_bytes_a_compressed_model_holds_with_a_quantizer_per_layer_and_kind(build):
    from eigenkv.compress import EigenConfig, compress_model

    model = build()
    # post-RoPE: a sliding cache drops keys, so their index does not give their position (pre-RoPE needs it)
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode="post"), progress=False)
    config = LayerwiseKVQuantConfig(
        (KVQuantConfig(bits=4, group_size=8, axis_k="token", residual=3), None),
        (None, KVQuantConfig(bits=2, group_size=16, axis_v="channel", residual=2)),
    )
    ids = random_tokens(model, batch=2, length=40)
    with QuantizedKV(model, config) as kv, torch.no_grad():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        for t in range(3):  # and decode steps
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    counted = kv_cache_bytes(model, seq_len=43, batch_size=2, dtype=torch.float32, quant=config)
    assert cache_held_bytes(cache) == sum(cache.nbytes().values()) == counted.total - counted.components["bases"]
    assert counted.components["keys.data"] > 0 and counted.components["values.codes"] > 0
