import pytest
import torch
from transformers import LlamaConfig

from eigenkv.memory import AttentionShape, DenseStorage, KVLayout, LayerKV, cache_tensor_bytes, kv_cache_bytes
from tests.helpers import tiny_llama, tiny_mpt, tiny_opt


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


def test_attention_shape_reads_each_family():
    assert AttentionShape.from_config(tiny_llama(kv_heads=2).config) == AttentionShape(2, 4, 2, 16)
    assert AttentionShape.from_config(tiny_opt(64, 32).config) == AttentionShape(2, 4, 4, 8)
    assert AttentionShape.from_config(tiny_mpt().config) == AttentionShape(2, 4, 4, 8)


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
    with pytest.raises(NotImplementedError, match="sliding-window"):
        kv_cache_bytes(windowed, seq_len=2048)
    assert kv_cache_bytes(windowed, seq_len=512).total > 0
