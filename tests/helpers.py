"""Small offline building blocks for tests: tiny random models and a character tokenizer."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CHARS = "\n !\"'(),-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz@=<>"


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (ids 0-3 special: <unk>, <s>, </s>, <pad>)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_llama(vocab_size: int = 96, kv_heads: int = 2, seed: int = 0, hidden_size: int = 64):
    """A 2-layer Llama with GQA (4 query heads, ``kv_heads`` KV heads, head size ``hidden_size / 4``), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlamaForCausalLM(config).eval()


def tiny_opt(vocab_size: int = 96, hidden_size: int = 64, seed: int = 0):
    """A 2-layer OPT (4 heads), random weights, eval mode."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        ffn_dim=2 * hidden_size,
        num_attention_heads=4,
        word_embed_proj_dim=hidden_size,
        max_position_embeddings=128,
    )
    return OPTForCausalLM(config).eval()


def _random_norms(model):
    """Query/key norm weights away from their initial ones, so that skipping a norm changes the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 + torch.rand_like(p))
    return model


def tiny_qwen3(vocab_size: int = 96, seed: int = 0):
    """A 2-layer Qwen3 (4 query / 2 KV heads of 16, a per-head RMSNorm of queries and keys), eval mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )  # fmt: skip
    return _random_norms(Qwen3ForCausalLM(config)).eval()


def tiny_olmo2(vocab_size: int = 96, seed: int = 0):
    """A 2-layer OLMo-2 (4 query / 2 KV heads of 16, an RMSNorm of all heads' queries and keys), eval mode."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    config = Olmo2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    return _random_norms(Olmo2ForCausalLM(config)).eval()


def tiny_mistral(vocab_size: int = 96, seed: int = 0, sliding_window: int = 16):
    """A 2-layer Mistral whose every layer attends a sliding window of ``sliding_window`` tokens, eval mode."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=sliding_window, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    return MistralForCausalLM(config).eval()


def tiny_gemma2(vocab_size: int = 96, seed: int = 0, softcap: float | None = 0.01, head_dim: int = 16):
    """A 2-layer Gemma-2 (sliding then global, 16-token window) whose attention logits are capped at ``softcap``
    (small, so that the cap changes the outputs of random weights), heads of ``head_dim``, eval mode."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, sliding_window=16, max_position_embeddings=512,
        attn_logit_softcapping=softcap, layer_types=["sliding_attention", "full_attention"], bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def tiny_gemma3(vocab_size: int = 96, seed: int = 0):
    """A 3-layer Gemma-3 text model: sliding (16 tokens), global, sliding; per-head query/key norms, eval mode."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )  # fmt: skip
    return _random_norms(Gemma3ForCausalLM(config)).eval()


def tiny_phi3(vocab_size: int = 96, seed: int = 0, partial_rotary_factor: float = 1.0):
    """A 2-layer Phi-3 (a fused ``qkv_proj``; 4 query / 2 KV heads of 16; RoPE on ``partial_rotary_factor`` of
    each head), eval mode."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        partial_rotary_factor=partial_rotary_factor,
    )  # fmt: skip
    return Phi3ForCausalLM(config).eval()


def tiny_llama3_scaled(vocab_size: int = 96, seed: int = 0, rope_type: str = "llama3", layers: int = 2):
    """A Llama of ``layers`` layers with scaled RoPE, eval mode: Llama-3.1's (frequencies rescaled past 64
    original positions), YaRN's (``rope_type="yarn"``: rescaled frequencies and an attention scale on the
    angles), or one whose frequencies change with the length past 16 positions: dynamic NTK (``"dynamic"``) or
    LongRoPE (``"longrope"``: short and long factors, an attention scale)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    scaling = {"rope_type": rope_type, "factor": 8.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    max_positions = 512
    if rope_type == "llama3":
        scaling |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    elif rope_type == "dynamic":  # grows past max_position_embeddings
        scaling = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
        max_positions = 16
    elif rope_type == "longrope":  # head size 16: 8 frequencies, rescaled past 16 original positions
        factors = {"short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)]}
        scaling |= {"factor": 4.0, "original_max_position_embeddings": 16, **factors}
        max_positions = 64
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, rope_parameters=scaling, bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_gptneox(vocab_size: int = 96, seed: int = 0):
    """A 2-layer GPT-NeoX (Pythia's architecture: a per-head interleaved ``query_key_value``, RoPE on a quarter
    of each head, ``dense`` output, biases), eval mode."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.25, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return GPTNeoXForCausalLM(config).eval()


def tiny_mpt(vocab_size: int = 64, seed: int = 0):
    """A 2-layer MPT (4 heads, ALiBi), random weights, eval mode."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    return MptForCausalLM(MptConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=128)).eval()


@torch.no_grad()
def parallel_and_stepwise(model, new_cache, ids: torch.Tensor):
    """``(logits of one forward over ids, logits decoding ids token by token, the first forward's cache)``."""
    cache = new_cache()
    parallel = model(ids, past_key_values=cache, use_cache=True).logits
    steps = new_cache()
    stepwise = [model(ids[:, t : t + 1], past_key_values=steps, use_cache=True).logits for t in range(ids.shape[1])]
    return parallel, torch.cat(stepwise, dim=1), cache


def random_windows(model, count: int = 4, length: int = 48, seed: int = 1):
    """``TokenWindows`` of random token ids (calibration text for tiny models)."""
    from eigenkv.data import TokenWindows

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (count, length), generator=gen)
    return TokenWindows(ids, "random", length, "none", 0, count)


def random_tokens(model, batch: int = 2, length: int = 40, seed: int = 2) -> torch.Tensor:
    """``(batch, length)`` random int64 token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=gen)
