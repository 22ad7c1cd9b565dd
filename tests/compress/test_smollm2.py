"""Real-model smoke test in CI: the embedded SmolLM2-135M, compressed with a short calibration."""

import copy

import torch
from transformers import DynamicCache

from eigenkv.compress import EigenConfig, compress_model
from eigenkv.eval.data import load_windows
from eigenkv.eval.perplexity import perplexity


def test_smollm2_compress_perplexity_and_decoding(smollm2):
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
