"""A compressed model with a quantized cache: the cache holds quantized rank-space tensors, read causally."""

import pytest
import torch

from eigenkv.compress import EigenConfig, compress_model
from eigenkv.memory import cache_held_bytes, kv_cache_bytes
from eigenkv.quant import KVQuantConfig, QuantizedKV
from tests.helpers import (
    parallel_and_stepwise,
    random_tokens,
    random_windows,
    tiny_gemma2,
    tiny_gemma3,
    tiny_gptneox,
    tiny_llama,
    tiny_mistral,
    tiny_olmo2,
    tiny_opt,
    tiny_phi3,
    tiny_qwen3,
)

QUANT = KVQuantConfig(bits=2, group_size=8, axis_k="channel", axis_v="token", residual=4)


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (tiny_llama, "pre"),
        (tiny_llama, "post"),
        (tiny_opt, "pre"),
        (tiny_qwen3, "pre"),
        (tiny_olmo2, "post"),
        (tiny_mistral, "pre"),
        (tiny_mistral, "post"),
        (tiny_gemma3, "pre"),
        (tiny_gemma3, "post"),
        (lambda: tiny_phi3(partial_rotary_factor=0.5), "post"),
        (lambda: tiny_phi3(partial_rotary_factor=0.5), "pre"),
        (tiny_gptneox, "post"),
        (tiny_gemma2, "pre"),
        (tiny_gemma2, "post"),
    ],
    ids=[
        "llama-pre",
        "llama-post",
        "opt",
        "qwen3-pre",
        "olmo2-post",
        "mistral-sliding-pre",
        "mistral-sliding-post",
        "gemma3-pre",
        "gemma3-post",
        "phi3-partial-rope-post",
        "phi3-partial-rope-pre",
        "gptneox-post",
        "gemma2-softcap-pre",
        "gemma2-softcap-post",
    ],  # fmt: skip
)
def test_parallel_forward_equals_decoding_and_bytes_match(make, mode):
    model = make().double()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    ids = random_tokens(model, batch=2, length=29)
    with QuantizedKV(model, QUANT) as kv, torch.no_grad():
        parallel, stepwise, cache = parallel_and_stepwise(model, kv.new_cache, ids)
        dense = model(ids).logits
    # the pre-RoPE rebuild must carry the unquantized twins of the keys, or the two paths differ
    torch.testing.assert_close(parallel, stepwise, atol=1e-9, rtol=0)
    assert (parallel - dense).abs().max() > 1e-4
    counted = kv_cache_bytes(model, seq_len=29, batch_size=2, dtype=torch.float64, quant=QUANT)
    assert cache_held_bytes(cache) == counted.total - counted.components.get("bases", 0)
    with pytest.raises(ValueError, match="ranks, not heads"):
        kv_cache_bytes(model, quant=KVQuantConfig(rotate=True))
