import math

import pytest
import torch
import torch.nn.functional as F

from eigenkv.data import tokenize_windows
from eigenkv.eval.perplexity import perplexity
from tests.helpers import char_tokenizer, tiny_llama


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = tiny_llama(vocab_size=96)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all zero -> p = 1/V for every token
    ids = torch.randint(0, 96, (3, 17))
    result = perplexity(model, ids, progress=False)
    assert result.ppl == pytest.approx(96, rel=1e-5)
    assert result.tokens == 3 * 16 and result.windows == 3 and result.seq_len == 17


def test_matches_manual_cross_entropy_and_is_batch_invariant():
    model = tiny_llama()
    ids = torch.randint(0, 96, (4, 33))
    with torch.no_grad():
        logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).item()
    one = perplexity(model, ids, batch_size=1, progress=False)
    three = perplexity(model, ids, batch_size=3, progress=False)
    assert one.nll == pytest.approx(expected, rel=1e-5)
    assert three.nll == pytest.approx(one.nll, rel=1e-5)
    assert one.ppl == pytest.approx(math.exp(one.nll))
    assert one.seconds > 0


def test_accepts_token_windows():
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    windows = tokenize_windows(tok, "the quick brown fox jumps over the lazy dog " * 4, seq_len=32)
    result = perplexity(model, windows, progress=False)
    assert result.windows == len(windows) and result.tokens == len(windows) * 31


def test_bad_input():
    model = tiny_llama(vocab_size=96)
    with pytest.raises(ValueError, match="int64 tensor"):
        perplexity(model, torch.zeros(2, 8), progress=False)
    with pytest.raises(ValueError, match=">= 2 tokens"):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(model, torch.full((1, 8), 500), progress=False)
