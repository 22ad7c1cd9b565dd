"""Real-model smoke test in CI: the embedded SmolLM2-135M, compressed with a short calibration."""

import copy

import torch
from transformers import DynamicCache

from eigenkv.compress import EigenConfig, apply_plan, compress_model
from eigenkv.compress.components import ComponentQuantConfig, prepare_components
from eigenkv.data import load_windows
from eigenkv.eval.perplexity import perplexity
from eigenkv.memory import cache_held_bytes, kv_cache_bytes
from eigenkv.quant import KVQuantConfig, QuantizedKV


def test_smollm2_compress_perplexity_and_decoding(smollm2, monkeypatch):
    original, tokenizer = smollm2
    model = copy.deepcopy(original)
    calib = load_windows("brown", tokenizer, 128, count=2)
    evaluated = load_windows("wikitext2", tokenizer, 128, count=2)
    plan = compress_model(model, calib, EigenConfig(target_ratio=0.8), progress=False)  # the default method
    assert plan.config.method_name == "eigenkv" and plan.extra["predicted_nll_increase"] > 0
    assert abs(plan.ratio - 0.8) <= 0.005 and len(plan.ranks) == 30
    base = perplexity(original, evaluated, progress=False).ppl
    compressed = perplexity(model, evaluated, progress=False).ppl
    assert base < compressed < 3 * base  # compression costs something, and not everything

    ids = evaluated.input_ids[:1, :24]
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :16], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(16, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-3, rtol=1e-3)

    # Mixed-precision components: the prepared plan is the same model; its cache holds what is counted.
    prepared, kv_config = prepare_components(plan, ComponentQuantConfig.parse("hi8x0.125"), KVQuantConfig(2, 32))
    twin = apply_plan(copy.deepcopy(original), prepared)
    assert abs(perplexity(twin, evaluated, progress=False).ppl - compressed) < 1e-3 * compressed
    with QuantizedKV(twin, kv_config) as kv:
        caches = []

        def new_cache():
            caches.append(kv.new_cache())
            return caches[-1]

        mixed = perplexity(twin, evaluated, progress=False, make_cache=new_cache).ppl
    assert compressed < mixed < 3 * compressed
    counted = kv_cache_bytes(twin, seq_len=128, batch_size=1, dtype=torch.float32, quant=kv_config)
    assert cache_held_bytes(caches[-1]) == counted.total - counted.components["bases"]

    # fp16 generation through the attention kernels (interpreted on CPU) gives the tokens of the PyTorch path;
    # the 40-token prompt (prefill kernel, reading the causal quantized view) leaves quantized blocks of both
    # precisions and a window in every stream for the decode kernel. 4-bit base codes: at 2 bits, rounding
    # to codes amplifies any fp16 difference over 30 layers (the PyTorch path alone moves the prompt's
    # logits by up to 5.9 between fp32 and fp16), so no two implementations agree token for token there.
    from eigenkv.kernels import lowrank_decode as decode_module
    from eigenkv.kernels import lowrank_prefill as prefill_module

    launches = []
    for module, name in ((decode_module, "lowrank_decode"), (prefill_module, "lowrank_prefill")):
        kernel = getattr(module, name)
        counted = lambda *a, _k=kernel, _n=name, **k: launches.append(_n) or _k(*a, **k)  # noqa: E731
        monkeypatch.setattr(module, name, counted)
    prepared, kv_config = prepare_components(plan, ComponentQuantConfig.parse("hi8x0.125"), KVQuantConfig(4, 32))
    half = apply_plan(copy.deepcopy(original), prepared).half()
    prompt, tokens = evaluated.input_ids[:1, :40], {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("EIGENKV_BACKEND", backend)
        with QuantizedKV(half, kv_config) as kv, torch.no_grad():
            tokens[backend] = half.generate(prompt, past_key_values=kv.new_cache(), max_new_tokens=2, do_sample=False)
    assert launches == ["lowrank_prefill"] * 30 + ["lowrank_decode"] * 30  # every layer: the prompt, one step
    assert torch.equal(tokens["triton"], tokens["torch"])
