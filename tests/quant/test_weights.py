"""bitsandbytes weight quantization composed with a compressed, quantized KV cache."""

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from eigenkv.compress import EigenConfig, compress_model  # noqa: E402
from eigenkv.quant import KVQuantConfig, QuantizedKV  # noqa: E402
from eigenkv.quant.weights import quantize_weights, weight_bytes  # noqa: E402
from tests.helpers import (  # noqa: E402
    random_tokens,
    random_windows,
    tiny_llama,  # noqa: E402
)


def test_weight_formats_shrink_the_weights_and_stay_close():
    model = tiny_llama(hidden_size=128)
    ids = random_tokens(model)
    with torch.no_grad():
        reference = model(ids).logits
    full = weight_bytes(model)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head")
    errors, sizes = {}, {}
    for fmt in ("int8", "nf4"):
        quantized = quantize_weights(copy.deepcopy(model), fmt)
        assert not any(type(m) is torch.nn.Linear and n != "lm_head" for n, m in quantized.named_modules())
        with torch.no_grad():
            logits = quantized(ids).logits
        errors[fmt] = float((logits - reference).norm() / reference.norm())
        sizes[fmt] = weight_bytes(quantized)
    assert errors["int8"] < 0.02 and errors["nf4"] < 0.2 and errors["int8"] < errors["nf4"]
    # fp32 linear weights (4 bytes) become 1 byte (+ a float per row) or half a byte (+ scales)
    assert full - sizes["int8"] >= 3 * linear - 4 * linear // 128 - 1024
    assert sizes["nf4"] < sizes["int8"]
    nf4_linear = full - 4 * linear  # what stayed in fp32 (embeddings, norms)
    assert sizes["nf4"] - nf4_linear < 0.6 * linear  # 0.5 byte per weight plus < 0.1 for scales and states


def test_compressed_model_with_quantized_weights_and_kv_decodes():
    model = tiny_llama(hidden_size=128)
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6), progress=False)
    before = weight_bytes(model)
    quantize_weights(model, "nf4")
    assert weight_bytes(model) < before / 3
    ids = random_tokens(model, batch=1, length=12)
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=8, residual=4)) as kv, torch.no_grad():
        out = model.generate(ids, past_key_values=kv.new_cache(), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)


def test_bad_weight_format_and_double_quantization_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="use one of"):
        quantize_weights(model, "int4")
    quantize_weights(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights(model, "nf4")
