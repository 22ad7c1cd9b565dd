import json

import pytest
import torch

from eigenkv.data import load_windows
from eigenkv.eval.perplexity import perplexity
from eigenkv.memory import cache_held_bytes, kv_cache_bytes
from eigenkv.quant import KVQuantConfig, LayerwiseKVQuantConfig, QuantizedKV, QuantizedKVCache
from tests.helpers import DEVICE, tiny_gemma2, tiny_gemma3, tiny_llama, tiny_mistral, tiny_olmo2, tiny_opt, tiny_qwen3

CONFIGS = [
    KVQuantConfig(bits=2, group_size=8, axis_k="token", axis_v="token"),
    KVQuantConfig(bits=2, group_size=8, axis_k="channel", residual=4),
    KVQuantConfig(bits=3, group_size=16, residual=5, rotate=True),
    KVQuantConfig(bits=4, group_size=8, axis_k="channel", axis_v="channel", residual=3, symmetric=True),
    KVQuantConfig(bits=8, group_size=12, axis_k="token", residual=2),  # group not dividing the head size
]


# Quantizers per layer and kind: bits, groups, axes and windows differ between streams, some are unquantized.
KEY_STREAMS = (
    KVQuantConfig(bits=2, group_size=8, axis_k="channel", residual=4),
    None,
    KVQuantConfig(bits=4, group_size=16, axis_k="token", residual=3, symmetric=True),
)
VALUE_STREAMS = (
    None,
    KVQuantConfig(bits=3, group_size=16, axis_v="channel", residual=2),
    KVQuantConfig(bits=8, group_size=12, axis_v="token", residual=1),
)


def layerwise(pattern: str, layers: int) -> LayerwiseKVQuantConfig:
    """``"alternating"``: every layer leaves one stream unquantized (the last of three quantizes both);
    ``"keys-only"``: keys quantized (per channel, then per token, ...), values unquantized; ``"values-only"``;
    ``"distinct"``: both quantized, keys and values of a layer with different bits, groups and axes."""
    cycle = [i % 3 for i in range(layers)]
    if pattern == "alternating":
        return LayerwiseKVQuantConfig(tuple(KEY_STREAMS[i] for i in cycle), tuple(VALUE_STREAMS[i] for i in cycle))
    quantized_keys = tuple(KEY_STREAMS[(0, 2)[i % 2]] for i in range(layers))
    quantized_values = tuple(VALUE_STREAMS[(1, 2)[i % 2]] for i in range(layers))
    return {
        "keys-only": LayerwiseKVQuantConfig(quantized_keys, (None,) * layers),
        "values-only": LayerwiseKVQuantConfig((None,) * layers, quantized_values),
        "distinct": LayerwiseKVQuantConfig(quantized_keys, quantized_values),
    }[pattern]


PATTERNS = ["alternating", "keys-only", "values-only", "distinct"]


@pytest.mark.parametrize(
    ("build", "pattern"),
    [(tiny_llama, p) for p in PATTERNS]
    + [
        (tiny_mistral, "alternating"),
        (tiny_mistral, "values-only"),
        (tiny_gemma3, "alternating"),
        (tiny_gemma3, "keys-only"),
    ],
    ids=[f"llama-gqa-{p}" for p in PATTERNS]
    + [
        "mistral-sliding-alternating",
        "mistral-sliding-values-only",
        "gemma3-mixed-alternating",
        "gemma3-mixed-keys-only",
    ],
)
def test_a_quantizer_per_layer_and_kind_reads_causally(build, pattern):
    """Streams quantized each their own way, or not at all: one forward, chunks and token-by-token decoding
    give the same logits (float64), and the cache holds what the accounting counts at the end of each."""
    model = build().double()
    config = layerwise(pattern, model.config.num_hidden_layers)
    ids = torch.randint(4, 96, (2, 37))
    with QuantizedKV(model, config) as kv, torch.no_grad():
        caches = [kv.new_cache() for _ in range(3)]
        parallel = model(ids, past_key_values=caches[0], use_cache=True).logits
        stepwise = torch.cat(
            [model(ids[:, t : t + 1], past_key_values=caches[1], use_cache=True).logits for t in range(37)], dim=1
        )
        chunks = ((0, 11), (11, 30), (30, 37))
        chunked = torch.cat([model(ids[:, a:b], past_key_values=caches[2]).logits for a, b in chunks], dim=1)
        plain = model(ids).logits
    torch.testing.assert_close(parallel, stepwise, atol=1e-9, rtol=0)
    torch.testing.assert_close(chunked, stepwise, atol=1e-9, rtol=0)
    assert (parallel - plain).abs().max() > 1e-5, "quantization had no effect on the logits"
    counted = kv_cache_bytes(model, seq_len=37, batch_size=2, dtype=torch.float64, quant=config)
    for cache in caches:
        assert cache_held_bytes(cache) == sum(cache.nbytes().values()) == counted.total
    held = caches[0].nbytes()
    for part in ("codes", "scales", "zeros", "window", "data"):
        assert held.get(part, 0) == counted.components.get(f"keys.{part}", 0) + counted.components.get(
            f"values.{part}", 0
        ), part
    unquantized = sum(c is None for c in config.keys + config.values)
    assert (held.get("data", 0) > 0) == (unquantized > 0)
    sliding = [layer for layer in caches[1].layers if layer.is_sliding]
    assert len({(s.dropped, s.tokens) for layer in sliding for s in layer.streams()}) <= 1  # one mask for all
    assert all(s.dropped > 0 for layer in sliding for s in layer.streams())


def test_an_unquantized_stream_is_not_tagged_and_never_copied_whole():
    """Keys quantized, values not: only the keys carry a twin in a prompt; a decode step returns a view of the
    values' buffer (no copy of what they hold)."""
    from transformers import LlamaConfig

    from eigenkv.quant.routing import twin_of
    from eigenkv.quant.store import DenseStream

    config = LayerwiseKVQuantConfig((KVQuantConfig(bits=4, group_size=8, residual=2),), (None,))
    layer = QuantizedKVCache(config, LlamaConfig(num_hidden_layers=1), max_tokens=64).layers[0]
    k, v = torch.randn(2, 1, 2, 30, 16)
    keys, values = layer.update(k, v)
    assert twin_of(keys) is not None and twin_of(values) is None
    assert isinstance(layer.value_stream, DenseStream) and torch.equal(values, v)
    buffer = layer.value_stream.view().untyped_storage().data_ptr()
    for _ in range(3):
        step = torch.randn(2, 1, 2, 1, 16)
        _, values = layer.update(step[0], step[1])
        assert values.untyped_storage().data_ptr() == buffer and torch.equal(values[:, :, -1:], step[1])
    assert layer.value_stream.traffic["moved"] == 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
@pytest.mark.parametrize(
    "build",
    [tiny_llama, tiny_opt, tiny_qwen3, tiny_olmo2, tiny_mistral, tiny_gemma3, tiny_gemma2],
    ids=["llama-gqa", "opt", "qwen3", "olmo2", "mistral-sliding", "gemma3-mixed", "gemma2-softcap"],
)
def test_parallel_forward_equals_token_by_token_decoding(config, build):
    """One multi-token forward must read the cache exactly as decoding one token at a time does.

    float64, so that the different matmul shapes of the two paths cannot flip a code at a rounding boundary.
    """
    model = build().double()
    ids = torch.randint(4, 96, (2, 37))
    with QuantizedKV(model, config) as kv, torch.no_grad():
        parallel = model(ids, past_key_values=kv.new_cache(), use_cache=True).logits
        cache = kv.new_cache()
        stepwise = torch.cat(
            [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])], dim=1
        )
        chunked_cache = kv.new_cache()
        chunked = torch.cat(
            [
                model(ids[:, a:b], past_key_values=chunked_cache, use_cache=True).logits
                for a, b in ((0, 11), (11, 30), (30, 37))
            ],
            dim=1,
        )
        plain = model(ids).logits
    torch.testing.assert_close(parallel, stepwise, atol=1e-9, rtol=0)
    torch.testing.assert_close(chunked, stepwise, atol=1e-9, rtol=0)
    assert (parallel - plain).abs().max() > 1e-5, "quantization had no effect on the logits"


def test_attention_implementation_is_restored():
    model = tiny_llama()
    before = model.config._attn_implementation
    with QuantizedKV(model, KVQuantConfig()):
        assert model.config._attn_implementation == "eigenkv_quant"
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("config", CONFIGS + [layerwise(p, 2) for p in PATTERNS], ids=lambda c: c.label())
@pytest.mark.parametrize("tokens", [1, 19, 40])
def test_nbytes_equals_held_tensors_and_accounting(config, tokens):
    model = tiny_llama()
    ids = torch.randint(4, 96, (3, tokens))
    with QuantizedKV(model, config) as kv, torch.no_grad():
        cache = kv.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
    held = cache.nbytes()
    assert sum(held.values()) == cache_held_bytes(cache)
    counted = kv_cache_bytes(model, seq_len=tokens, batch_size=3, dtype=torch.float32, quant=config)
    assert counted.total == sum(held.values())
    for part in ("codes", "scales", "zeros", "window", "data"):
        expected = counted.components.get(f"keys.{part}", 0) + counted.components.get(f"values.{part}", 0)
        assert held.get(part, 0) == expected, part


@pytest.mark.parametrize("build", [tiny_mistral, tiny_gemma3], ids=["mistral-sliding", "gemma3-mixed"])
@pytest.mark.parametrize(
    "config", CONFIGS[1:3] + CONFIGS[4:] + PATTERNS, ids=lambda c: c if isinstance(c, str) else c.label()
)
def test_sliding_layers_hold_their_window_and_the_accounting_knows(build, config):
    """A sliding layer drops the whole quantized units before the next query's window: what the cache holds
    equals the accounting at every length (below, at and past the 16-token window), prompt or decode steps;
    with quantizers per layer and kind too (unquantized streams among them)."""
    model = build()
    ids = torch.randint(4, 96, (2, 70))
    if isinstance(config, str):
        config = layerwise(config, model.config.num_hidden_layers)
    else:
        config = KVQuantConfig(**{**config.to_dict(), "rotate": False})
    with QuantizedKV(model, config) as kv, torch.no_grad():
        cache = kv.new_cache()
        model(ids[:, :9], past_key_values=cache)
        for t in range(9, ids.shape[1]):
            model(ids[:, t : t + 1], past_key_values=cache)
            counted = kv_cache_bytes(model, seq_len=t + 1, batch_size=2, dtype=torch.float32, quant=config)
            held = cache.nbytes()
            assert sum(held.values()) == counted.total == cache_held_bytes(cache), t
        prompt = kv.new_cache()
        model(ids, past_key_values=prompt)
    assert sum(prompt.nbytes().values()) == counted.total
    windows = [layer.window for layer in cache.layers]
    sliding = [i for i, w in enumerate(windows) if w]
    assert sliding and all(cache.layers[i].key_stream.dropped > 0 for i in sliding)
    assert all(cache.layers[i].key_stream.dropped == 0 for i, w in enumerate(windows) if w is None)


def test_a_long_generation_keeps_a_sliding_cache_bounded():
    """400 decode steps through 16-token windows: the room of dropped rows is reused, so what the cache allocates
    stops growing (all bytes at step 400 = at step 100)."""
    from eigenkv.memory import cache_tensor_bytes

    model = tiny_mistral()
    ids = torch.randint(4, 96, (1, 400))
    allocated = {}
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=8, axis_k="channel", residual=2)) as kv, torch.no_grad():
        cache = kv.new_cache()
        for t in range(ids.shape[1]):
            model(ids[:, t : t + 1], past_key_values=cache)
            if t + 1 in (100, 400):
                allocated[t + 1] = cache_tensor_bytes(cache)
    assert allocated[400] == allocated[100]
    assert cache.get_seq_length() == 400 and cache.layers[0].key_stream.dropped >= 400 - 16 - 8


def test_sliding_layers_drop_whole_quantized_units_before_the_next_window():
    from eigenkv.quant.config import sliding_dropped, sliding_streams

    def dropped(tokens, config, windows=(16,)):
        return sliding_dropped(tokens, 16, sliding_streams(config, windows))

    # 70 tokens, a 16-token window: the next query reads tokens 55..70
    per_channel_keys = KVQuantConfig(bits=2, group_size=8, axis_k="channel", residual=4)  # keys quantize 64
    assert dropped(70, per_channel_keys) == 48  # whole blocks of 8 before token 55
    assert dropped(70, KVQuantConfig(bits=2, group_size=8, axis_k="token", residual=2)) == 55
    assert dropped(70, KVQuantConfig(bits=2, group_size=8, axis_k="token", residual=20)) == 50  # quantized
    assert dropped(15, per_channel_keys) == 0
    token = KVQuantConfig(bits=2, group_size=8, axis_k="token", residual=2)
    # an unquantized stream drops any token: the other stream decides
    assert dropped(70, LayerwiseKVQuantConfig((None,), (token,))) == 55
    assert dropped(70, LayerwiseKVQuantConfig((per_channel_keys,), (None,))) == 48
    assert dropped(70, LayerwiseKVQuantConfig((KVQuantConfig(residual=20),), (None,))) == 0  # nothing quantized yet
    # every sliding layer drops alike (one mask): units of both group sizes, what every stream quantized
    wide = KVQuantConfig(bits=4, group_size=16, axis_k="channel", residual=0)
    mixed = LayerwiseKVQuantConfig((per_channel_keys, None, wide), (None, token, None))
    assert dropped(70, mixed, (16, None, 16)) == 48  # whole blocks of 16, not 8
    assert dropped(70, mixed, (16, 16, None)) == 48  # the full-attention layer 2 does not count
    assert dropped(82, mixed, (16, 16, None)) == 64 and dropped(82, mixed, (16, None, 16)) == 64
    assert dropped(75, mixed, (16, None, 16)) == 48 and dropped(75, mixed, (16, 16, None)) == 56  # 60 droppable


def test_capped_attention_logits_are_computed_as_the_model_does():
    """Gemma-2 caps its logits: with nothing quantized yet (a window wider than the sequence) the quantized
    cache's attention equals the model's own, prompt and decode steps; without the cap the logits differ."""
    ids = torch.randint(4, 96, (2, 30))
    model, uncapped = tiny_gemma2().double(), tiny_gemma2(softcap=None).double()
    with torch.no_grad():
        expected = model(ids).logits
        assert (uncapped(ids).logits - expected).abs().max() > 1e-3  # the cap matters for these weights
        with QuantizedKV(model, KVQuantConfig(bits=4, group_size=8, residual=64)) as kv:
            parallel = model(ids, past_key_values=kv.new_cache()).logits
            cache = kv.new_cache()
            steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(ids.shape[1])]
    # Gemma-2's eager attention takes its softmax in float32 even in a float64 model: agreement to that precision
    torch.testing.assert_close(parallel, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-6, rtol=0)


def test_layer_windows_are_those_transformers_caches_use():
    from transformers import DynamicCache, Qwen2Config

    from eigenkv.quant.config import layer_windows

    configs = [tiny_mistral().config, tiny_gemma3().config, tiny_llama().config, Qwen2Config(num_hidden_layers=3)]
    for model_config in configs:
        cache = DynamicCache(config=model_config)
        expected = [getattr(layer, "sliding_window", None) if layer.is_sliding else None for layer in cache.layers]
        assert layer_windows(model_config) == expected, type(model_config).__name__


def test_quantized_fraction_at_2048_matches_bits_plus_scale_overhead():
    model = tiny_llama()  # head size 16: use group 16 so per-token groups are full
    fp16 = kv_cache_bytes(model)
    for bits in (2, 3, 4, 8):
        cfg = KVQuantConfig(bits=bits, group_size=16, axis_k="token")
        assert kv_cache_bytes(model, quant=cfg).fraction_of(fp16) == pytest.approx((bits + 32 / 16) / 16)


def test_generate_through_the_cache_matches_manual_greedy_decoding():
    model = tiny_llama()
    ids = torch.randint(4, 96, (1, 9))
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=8, residual=2)) as kv, torch.no_grad():
        out = model.generate(ids, past_key_values=kv.new_cache(), max_new_tokens=6, do_sample=False, pad_token_id=3)
        cache, tokens = kv.new_cache(), ids
        logits = model(tokens, past_key_values=cache, use_cache=True).logits
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, past_key_values=cache, use_cache=True).logits
    assert torch.equal(out, tokens)


def test_perplexity_reflects_quantization():
    model = tiny_llama()
    ids = torch.randint(4, 96, (2, 64))
    base = perplexity(model, ids, progress=False).ppl
    with QuantizedKV(model, KVQuantConfig(bits=8, group_size=16)) as kv:
        eight = perplexity(model, ids, progress=False, make_cache=kv.new_cache).ppl
    with QuantizedKV(model, KVQuantConfig(bits=2, group_size=16, axis_k="token")) as kv:
        two = perplexity(model, ids, progress=False, make_cache=kv.new_cache).ppl
    assert abs(eight - base) / base < 1e-3
    assert abs(two - base) / base > 1e-3 and abs(two - base) > 10 * abs(eight - base)


def test_config_validation_and_round_trip():
    cfg = KVQuantConfig(bits=3, group_size=32, residual=16, rotate=True)
    assert KVQuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        KVQuantConfig(bits=5)
    with pytest.raises(ValueError, match=r"residual \(tokens kept in full precision\) must be >= 0"):
        KVQuantConfig(residual=-1)
    with pytest.raises(ValueError, match="axis_k='rows'"):
        KVQuantConfig(axis_k="rows")
    with pytest.raises(ValueError, match="unknown KVQuantConfig fields"):
        KVQuantConfig.from_dict({"bits": 4, "nbits": 4})
    with pytest.raises(TypeError, match="must be a KVQuantConfig"):
        QuantizedKV(tiny_llama(), {"bits": 4})


def test_rotation_needs_a_power_of_two_head_size():
    model = tiny_llama(hidden_size=48)  # head size 12
    with QuantizedKV(model, KVQuantConfig(rotate=True)) as kv, pytest.raises(ValueError, match="power-of-two"):
        model(torch.randint(0, 96, (1, 4)), past_key_values=kv.new_cache(), use_cache=True)


def test_models_without_the_attention_interface_are_refused():
    from tests.helpers import tiny_mpt

    with (
        pytest.raises(ValueError, match="MptForCausalLM computes attention itself"),
        QuantizedKV(tiny_mpt(), KVQuantConfig()),
    ):
        pass


def manual_beam_search(model, cache, ids: torch.Tensor, beams: int, steps: int) -> torch.Tensor:
    """Beam search written out (no EOS): keep the ``beams`` best (beam, token) continuations by summed log
    probability, reorder the cache to them, go on; return the best sequence ``(1, T + steps)``."""
    seqs = ids.repeat_interleave(beams, 0)
    logits = model(seqs, past_key_values=cache, use_cache=True).logits[:, -1]
    scores = torch.full((beams,), -1e9)
    scores[0] = 0.0  # all beams start equal: only the first may expand at the first step
    for step in range(steps):
        total = (scores[:, None] + torch.log_softmax(logits.float(), -1)).view(-1)
        scores, flat = total.topk(beams)
        beam, token = flat // logits.shape[-1], flat % logits.shape[-1]
        cache.reorder_cache(beam)
        seqs = torch.cat([seqs[beam], token[:, None]], dim=1)
        if step < steps - 1:
            logits = model(token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return seqs[:1]


def test_beam_search_through_generate_equals_a_manual_beam_search():
    model = tiny_llama()
    ids = torch.randint(4, 96, (1, 11))
    config = KVQuantConfig(bits=3, group_size=8, axis_k="channel", residual=2)  # most tokens quantized
    with QuantizedKV(model, config) as kv, torch.no_grad():
        out = model.generate(
            ids, past_key_values=kv.new_cache(), max_new_tokens=7, num_beams=3, do_sample=False,
            eos_token_id=None, pad_token_id=3, length_penalty=0.0,
        )  # fmt: skip
        manual = manual_beam_search(model, kv.new_cache(), ids, beams=3, steps=7)
    assert torch.equal(out, manual)


@pytest.mark.parametrize(
    "config",
    [KVQuantConfig(bits=4, group_size=8, axis_k="channel", axis_v="token", residual=3), layerwise("alternating", 2)],
    ids=lambda c: c.label(),
)
def test_reorder_and_repeat_equal_storing_the_selected_sequences(config):
    model = tiny_llama()
    ids = torch.randint(4, 96, (3, 21))
    index = torch.tensor([1, 1, 0, 2, 2, 2])
    with QuantizedKV(model, config) as kv, torch.no_grad():
        reordered, expected, repeated = kv.new_cache(), kv.new_cache(), kv.new_cache()
        model(ids, past_key_values=reordered, use_cache=True)
        model(ids[index], past_key_values=expected, use_cache=True)
        model(ids, past_key_values=repeated, use_cache=True)
        reordered.reorder_cache(index)
        repeated.batch_repeat_interleave(2)
        twice = kv.new_cache()
        model(ids.repeat_interleave(2, 0), past_key_values=twice, use_cache=True)
    for got, want in ((reordered, expected), (repeated, twice)):
        for a, b in zip(got.layers, want.layers, strict=True):
            for sa, sb in zip(a.streams(), b.streams(), strict=True):
                assert torch.equal(sa.packed().dequantize(torch.float32), sb.packed().dequantize(torch.float32))


@pytest.mark.parametrize(
    "config",
    [
        KVQuantConfig(bits=4, group_size=8, axis_k="token", axis_v="token", residual=8),
        LayerwiseKVQuantConfig((None, KVQuantConfig(bits=4, group_size=8, residual=8)), (KVQuantConfig(), None)),
    ],
    ids=lambda c: c.label(),
)
def test_assisted_decoding_crops_the_cache_and_matches_greedy(config):
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])  # repeated n-grams: prompt lookup proposes
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 3}
    with QuantizedKV(model, config) as kv, torch.no_grad():
        greedy = model.generate(ids, past_key_values=kv.new_cache(), **kwargs)
        cache = kv.new_cache()
        crops = []
        original = type(cache.layers[0]).crop
        for layer in cache.layers:
            layer.crop = lambda n, _layer=layer: (crops.append(n), original(_layer, n))[-1]
        assisted = model.generate(ids, past_key_values=cache, prompt_lookup_num_tokens=3, **kwargs)
    assert crops, "prompt lookup decoding never cropped the cache"
    assert torch.equal(assisted, greedy)


def test_non_finite_states_raise_within_check_every_steps():
    model = tiny_llama()
    config = KVQuantConfig(bits=4, group_size=8, residual=2)
    cache = QuantizedKVCache(config, model.config, check_every=3)
    k = torch.randn(1, 2, 5, 16)
    layer = cache.layers[0]
    layer.update(k, k)
    bad = torch.full((1, 2, 1, 16), float("nan"))
    layer.update(bad, bad)  # step 1: flagged, not read
    layer.update(k[:, :, :1], k[:, :, :1])  # step 2
    with pytest.raises(ValueError, match="layer 0 keys: .*NaN or Inf"):  # noqa: PT012
        layer.update(k[:, :, :1], k[:, :, :1])  # step 3 reads the flags
    with pytest.raises(ValueError, match="check_every"):
        QuantizedKVCache(config, model.config, check_every=0)


def test_real_model_smoke(smollm2):
    """SmolLM2 on one 512-token window: 8-bit is lossless, 4-bit KIVI close, 2-bit per token much worse."""
    model, tokenizer = smollm2
    try:
        windows = load_windows("wikitext2", tokenizer, 512, count=1)
    except FileNotFoundError:
        pytest.skip("../shared/data is not beside the checkout")
    base = perplexity(model, windows, progress=False).ppl
    results = {}
    for name, cfg in {
        "8": KVQuantConfig(bits=8),
        "4": KVQuantConfig(bits=4),
        "2": KVQuantConfig(bits=2, axis_k="token"),
    }.items():
        with QuantizedKV(model, cfg) as kv:
            results[name] = perplexity(model, windows, progress=False, make_cache=kv.new_cache).ppl
    assert abs(results["8"] / base - 1) < 0.01
    assert 1.0 < results["4"] / base < 1.15
    assert results["2"] / base > 1.5


@pytest.mark.parametrize(
    "config",
    [c for c in CONFIGS if c.group_size in (8, 16)]
    + [
        KVQuantConfig(bits=3, group_size=16, axis_k="token", axis_v="channel", residual=3),
        KVQuantConfig(bits=4, group_size=16, symmetric=True, rotate=True),
    ],
    ids=lambda c: c.label(),
)
def test_triton_backend_gives_the_same_cache_as_the_torch_backend(config, monkeypatch):
    """The cache's Triton path (kernels; interpreter on CPU) stores and returns exactly what the reference does."""
    from eigenkv.kernels import quant_pack

    calls = []
    original = quant_pack.quantize_pack
    monkeypatch.setattr(quant_pack, "quantize_pack", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tiny_llama().to(DEVICE)
    ids = torch.randint(4, 96, (2, 45), device=DEVICE)
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("EIGENKV_BACKEND", name)
        with QuantizedKV(model, config) as kv, torch.no_grad():
            cache = kv.new_cache()
            logits = model(ids, past_key_values=cache, use_cache=True).logits
            logits = torch.cat([logits, model(ids[:, :3], past_key_values=cache, use_cache=True).logits], dim=1)
        stream = cache.layers[1].key_stream
        results[name] = (logits, stream.codes, stream.scale)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        assert torch.equal(a, b)
    # head size 16: the kernels take groups of 16 and leave other sizes to the reference
    assert bool(calls) == (config.group_size == 16)


@pytest.mark.parametrize(
    "config",
    [
        KVQuantConfig(bits=4, group_size=8),  # only keys read a twin
        KVQuantConfig(bits=2, group_size=8, axis_k="token", axis_v="channel"),  # only values
        KVQuantConfig(bits=2, group_size=8, axis_k="channel", residual=4),  # both: four versions
        KVQuantConfig(bits=3, group_size=16, axis_v="channel", residual=3, rotate=True),
        KVQuantConfig(bits=8, group_size=12, axis_k="token", residual=2),
        LayerwiseKVQuantConfig(
            (KVQuantConfig(bits=2, group_size=8, residual=4),), (None,)
        ),  # keys tagged, values exact
        LayerwiseKVQuantConfig((None,), (KVQuantConfig(bits=2, group_size=8, residual=3),)),  # the reverse
        LayerwiseKVQuantConfig(  # both, with their own groups and windows
            (KVQuantConfig(bits=2, group_size=16, residual=1),), (KVQuantConfig(bits=3, group_size=8, residual=5),)
        ),
    ],
    ids=lambda c: c.label(),
)
@pytest.mark.parametrize(("past", "block"), [(0, 7), (13, 16), (5, 64)])
def test_banded_attention_equals_attention_over_all_versions(config, past, block):
    """The block-by-block attention of a multi-token update reads exactly what one SDPA over every
    version of every key does: GQA, odd lengths, a chunk after earlier tokens, left padding."""
    from transformers import LlamaConfig

    from eigenkv.quant.attention import banded_attention, versions_attention
    from eigenkv.quant.routing import twin_of

    torch.manual_seed(0)
    batch, heads, kv_heads, new, dim = 2, 6, 3, 41, 16
    layer = QuantizedKVCache(config, LlamaConfig(num_hidden_layers=1)).layers[0]
    if past:
        layer.update(*torch.randn(2, batch, kv_heads, past, dim, dtype=torch.float64))
    key, value = layer.update(*torch.randn(2, batch, kv_heads, new, dim, dtype=torch.float64))
    assert twin_of(key) is not None or twin_of(value) is not None
    seq = past + new
    visible = (torch.arange(seq)[None, :] <= past + torch.arange(new)[:, None]).repeat(batch, 1, 1, 1)
    visible = visible.view(batch, 1, new, seq)
    visible[1, ..., :3] = False  # the second sequence is left-padded by 3 tokens
    mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    query = torch.randn(batch, heads, new, dim, dtype=torch.float64)
    expected = versions_attention(query, key, value, mask, 0.3)
    for _ in range(2):  # the second call reuses the plan kept on the mask
        torch.testing.assert_close(banded_attention(query, key, value, mask, 0.3, block), expected, atol=1e-9, rtol=0)
    twin = (twin_of(key) or twin_of(value))[0]
    twin.add_(1.0)  # a changed twin changes both results alike: the twins are read
    changed = banded_attention(query, key, value, mask, 0.3, block)
    torch.testing.assert_close(changed, versions_attention(query, key, value, mask, 0.3), atol=1e-9, rtol=0)
    assert (changed - expected).abs().max() > 1e-3


def test_a_capturable_cache_refuses_unquantized_streams():
    model = tiny_llama()
    config = LayerwiseKVQuantConfig.per_layer([KVQuantConfig(group_size=16), None])
    with pytest.raises(ValueError, match="layer 1's keys are unquantized: quantize every stream, or use capturable"):
        QuantizedKVCache(config, model.config, max_tokens=64, capturable=True)
    cache = QuantizedKVCache(config, model.config, max_tokens=64)  # not capturable: fine
    assert [layer.key_config for layer in cache.layers] == [KVQuantConfig(group_size=16), None]


def test_decode_kernels_read_only_layers_whose_streams_are_both_quantized(monkeypatch):
    """A decode step returns handles to the packed store (for the kernel) in a layer whose keys and values are
    both quantized, even with different group sizes; a layer with an unquantized stream returns what it holds."""
    from eigenkv.quant.routing import STREAM_ATTR

    monkeypatch.setenv("EIGENKV_BACKEND", "triton")
    model = tiny_llama()
    config = LayerwiseKVQuantConfig(
        (KVQuantConfig(bits=4, group_size=16, residual=2), KVQuantConfig(bits=4, group_size=16, residual=2)),
        (None, KVQuantConfig(bits=2, group_size=32, axis_v="token", symmetric=True)),
    )
    cache = QuantizedKVCache(config, model.config, read_packed=True)
    x = torch.randn(2, 2, 2, 20, 16, dtype=torch.float16)
    step = torch.randn(2, 2, 2, 1, 16, dtype=torch.float16)
    for index, layer in enumerate(cache.layers):
        layer.update(x[0], x[1])
        keys, values = layer.update(step[0], step[1])
        handles = [getattr(t, STREAM_ATTR, None) is not None for t in (keys, values)]
        assert handles == [index == 1] * 2, index
        if index == 0:
            assert keys.shape[-2] == values.shape[-2] == 21 and torch.equal(values[:, :, -1:], step[1])


def test_layerwise_config_round_trip_old_format_and_errors():
    from eigenkv.quant.config import base_config, quant_config_from_dict, stream_config

    four, two = KVQuantConfig(bits=4, group_size=32), KVQuantConfig(bits=2, group_size=128, axis_v="channel")
    config = LayerwiseKVQuantConfig((four, None, two), (two, four, None))
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {"keys": [four.to_dict(), None, two.to_dict()], "values": [two.to_dict(), four.to_dict(), None]}
    assert quant_config_from_dict(data) == LayerwiseKVQuantConfig.from_dict(data) == config
    assert config.layers == 3
    assert [stream_config(config, 1, kind) for kind in ("key", "value")] == [None, four]
    assert stream_config(four, 7, "value") == four  # one quantizer for every stream
    assert config.label() == "k4b-g32-c-r0/v2b-g128-c-r0|kfp/v4b-g32-t-r0|k2b-g128-c-r0/vfp"
    # saved models hold the older form: one config per layer, for keys and values alike
    old = {"layers": [four.to_dict(), two.to_dict()]}
    assert quant_config_from_dict(old) == LayerwiseKVQuantConfig.per_layer([four, two])
    assert LayerwiseKVQuantConfig.per_layer([four, two]) == LayerwiseKVQuantConfig((four, two), (four, two))
    assert LayerwiseKVQuantConfig.per_layer([four, two]).label() == f"{four.label()}|{two.label()}"
    assert base_config(LayerwiseKVQuantConfig.per_layer([four, four])) == four
    with pytest.raises(ValueError, match="quantizes streams differently"):
        base_config(config)
    with pytest.raises(ValueError, match="every stream is unquantized: use no KV quantization"):
        LayerwiseKVQuantConfig((None, None), (None, None))
    with pytest.raises(ValueError, match="keys describe 2 layers but values 1"):
        LayerwiseKVQuantConfig((four, two), (four,))
    with pytest.raises(TypeError, match="layer 1 is a dict"):
        LayerwiseKVQuantConfig((four, four), (four, {"bits": 4}))
    with pytest.raises(TypeError, match="keys must be a non-empty sequence"):
        LayerwiseKVQuantConfig((), ())
    with pytest.raises(ValueError, match="fields keys and values"):
        LayerwiseKVQuantConfig.from_dict({"keys": [four.to_dict()]})
    with pytest.raises(ValueError, match="values must be a list"):
        LayerwiseKVQuantConfig.from_dict({"keys": [four.to_dict()], "values": four.to_dict()})
    with pytest.raises(ValueError, match="unknown KVQuantConfig fields"):
        quant_config_from_dict({"keys": [{"nbits": 4}], "values": [None]})
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        stream_config(config, 3, "key")
    with pytest.raises(ValueError, match="kind='keys'"):
        stream_config(config, 0, "keys")
    with pytest.raises(ValueError, match="describes 3 layers; this model has 2"):
        QuantizedKVCache(config, tiny_llama().config)


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_a_compressed_model_reads_streams_quantized_per_layer_and_kind_causally(mode):
    """Eigen Attention's rank-space streams, some quantized (each its own way), some not: one forward equals
    token-by-token decoding."""
    from eigenkv.compress import EigenConfig, compress_model
    from tests.helpers import random_windows

    model = tiny_llama()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    model = model.double()
    config = LayerwiseKVQuantConfig(
        (KVQuantConfig(bits=2, group_size=8, axis_k="channel", residual=4), None),
        (None, KVQuantConfig(bits=3, group_size=8, axis_v="channel", residual=2)),
    )
    ids = torch.randint(4, 96, (2, 30))
    with QuantizedKV(model, config) as kv, torch.no_grad():
        parallel = model(ids, past_key_values=kv.new_cache()).logits
        cache = kv.new_cache()
        stepwise = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(30)], dim=1)
        plain = model(ids).logits
    torch.testing.assert_close(parallel, stepwise, atol=1e-9, rtol=0)
    assert (parallel - plain).abs().max() > 1e-5


def test_a_capturable_layer_gives_keys_and_values_the_same_room_in_groups_of_both():
    """Keys in groups of 16, values of 64: both streams have room for 64 tokens (max_tokens 40 rounded up to
    whole groups of both), the one span the decode kernel reads."""
    config = LayerwiseKVQuantConfig(
        (KVQuantConfig(bits=4, group_size=16, residual=2),) * 2,
        (KVQuantConfig(bits=2, group_size=64, axis_v="channel"), KVQuantConfig(bits=4, group_size=16)),
    )
    cache = QuantizedKVCache(config, tiny_llama().config, max_tokens=40, capturable=True)
    x = torch.randn(2, 1, 2, 5, 16)
    for layer in cache.layers:
        layer.update(x[0], x[1])
    assert [[s.capacity for s in layer.streams()] for layer in cache.layers] == [[64, 64], [48, 48]]
