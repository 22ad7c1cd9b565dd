"""Perplexity of a causal LM over token windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eigenkv.data import TokenWindows
from eigenkv.devices import input_device
from eigenkv.pipeline import CompressedModel


@dataclass(frozen=True)
class PerplexityResult:
    """Mean token negative log-likelihood and its exponential.

    Attributes:
        nll: mean negative log-likelihood per predicted token, in nats.
        ppl: ``exp(nll)``.
        tokens: predicted tokens (``seq_len - 1`` per window, BOS never predicted).
        windows: windows evaluated.
        seq_len: tokens per window.
        seconds: wall time of the evaluation.
    """

    nll: float
    ppl: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"ppl={self.ppl:.4f} nll={self.nll:.5f} tokens={self.tokens} "
            f"windows={self.windows}x{self.seq_len} time={self.seconds:.1f}s"
        )


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Summed next-token NLL of each row.

    Args:
        model: a Hugging Face causal LM.
        input_ids: ``(batch, seq_len)`` int64 on the model's device.
        cache: an empty transformers ``Cache`` the forward writes to and reads
            from (a quantized cache, say); None for a plain cacheless forward.

    Returns:
        ``(batch,)`` float64: sum over positions ``1..seq_len-1`` of ``-log p(x_t | x_<t)``.
    """
    if cache is None:
        logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    else:
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).double().sum(dim=1)


@torch.no_grad()
def perplexity(
    model,
    windows: TokenWindows | torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
    make_cache=None,
) -> PerplexityResult:
    """Perplexity of ``model`` over every window, each window a full causal forward.

    Args:
        model: a Hugging Face causal LM (put it on the device you want used), or a
            :class:`~eigenkv.pipeline.CompressedModel` (its quantized cache is then used).
        windows: ``TokenWindows`` or an int64 tensor ``(num_windows, seq_len)``.
        batch_size: windows per forward.
        progress: show a tqdm bar.
        make_cache: called once per batch for a fresh, empty ``Cache`` that every
            attention read goes through (e.g. ``QuantizedKV.new_cache``), so the
            perplexity reflects what that cache stores; None: no cache.

    Returns:
        ``PerplexityResult``; NLL is accumulated in float64 over all predicted tokens.
    """
    if isinstance(model, CompressedModel):
        if make_cache is not None:
            raise ValueError("a CompressedModel makes its own caches; do not pass make_cache with it")
        with model:
            cache = None if model.cache_config is None else model.new_cache
            return perplexity(
                model.model, windows, batch_size=batch_size, progress=progress, desc=desc, make_cache=cache
            )
    ids = windows.input_ids if isinstance(windows, TokenWindows) else windows
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(
            f"windows must be TokenWindows or an int64 tensor (num_windows, seq_len); got {_describe(ids)}"
        )
    num, seq_len = ids.shape
    if num < 1 or seq_len < 2:
        raise ValueError(f"need at least one window of >= 2 tokens; got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocab}); wrong tokenizer?")

    device = input_device(model)  # where the embeddings compute (a model may be spread over devices)
    was_training = model.training
    model.eval()
    total = 0.0
    start = time.perf_counter()
    try:
        with tqdm(total=num, desc=desc, unit="win", disable=not progress, leave=False) as bar:
            for i in range(0, num, batch_size):
                batch = ids[i : i + batch_size].to(device)
                cache = None if make_cache is None else make_cache()
                total += float(window_nll(model, batch, cache).sum())
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{math.exp(total / ((i + batch.shape[0]) * (seq_len - 1))):.3f}")
    finally:
        model.train(was_training)
    tokens = num * (seq_len - 1)
    nll = total / tokens
    if not math.isfinite(nll):
        raise FloatingPointError(f"non-finite NLL ({nll}); the model produced inf/NaN logits (try float32)")
    return PerplexityResult(
        nll=nll, ppl=math.exp(nll), tokens=tokens, windows=num, seq_len=seq_len, seconds=time.perf_counter() - start
    )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
