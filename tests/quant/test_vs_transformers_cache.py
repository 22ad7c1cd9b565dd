"""What separates QuantizedKVCache from transformers' own QuantizedCache (quanto backend).

transformers' cache returns the unquantized states to every query of a
multi-token forward, so a perplexity evaluated in one forward through it is
the full-precision perplexity; eigenkv's cache makes that forward read what
decoding would read.
"""

import pytest
import torch

from eigenkv.quant import KVQuantConfig, QuantizedKV
from tests.helpers import tiny_llama

pytest.importorskip("optimum.quanto", reason="optional test dependency: pip install optimum-quanto")


def test_one_forward_through_transformers_cache_is_unquantized_but_ours_is_not():
    from transformers import QuantizedCache

    model = tiny_llama()
    ids = torch.randint(4, 96, (1, 40))
    with torch.no_grad():
        plain = model(ids).logits
        theirs = model(
            ids,
            past_key_values=QuantizedCache("quanto", model.config, nbits=2, q_group_size=16, residual_length=8),
            use_cache=True,
        ).logits
        steps_cache = QuantizedCache("quanto", model.config, nbits=2, q_group_size=16, residual_length=8)
        theirs_stepwise = torch.cat(
            [model(ids[:, t : t + 1], past_key_values=steps_cache, use_cache=True).logits for t in range(ids.shape[1])],
            dim=1,
        )
        with QuantizedKV(model, KVQuantConfig(bits=2, group_size=16, residual=8)) as kv:
            ours = model(ids, past_key_values=kv.new_cache(), use_cache=True).logits
    assert torch.equal(theirs, plain)  # measures nothing
    assert (theirs_stepwise - plain).abs().max() > 1e-2  # although decoding through it is quantized
    assert (ours - plain).abs().max() > 1e-2
