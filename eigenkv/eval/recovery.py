"""The recovery curve: held-out perplexity against LoRA steps, through the quantized cache and without it.

    recovery, rows = recovery_curve(compressed, train_windows, held_out, LoraRecovery(steps=200, eval_every=50))
    write_recovery(rows, "out/", title="SmolLM2 0.6x + 4b-g32")   # out/recovery.csv, out/recovery.png

One training run gives both curves: the adapters are trained without the cache
(``eigenkv.finetune``), and each evaluation measures the held-out perplexity of
the compressed model through its quantized cache (what is deployed) and, when
the recipe quantizes the cache, of the same model with an unquantized cache.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from eigenkv.data import TokenWindows
from eigenkv.eval.perplexity import perplexity
from eigenkv.finetune import LoraRecovery, Recovery, finetune
from eigenkv.io import atomic_write_text
from eigenkv.pipeline import CompressedModel
from eigenkv.plots import pyplot, save_figure

FIELDS = ("step", "ppl", "ppl_unquantized", "train_loss")


def recovery_curve(
    compressed: CompressedModel,
    train: TokenWindows,
    held_out: TokenWindows,
    config: LoraRecovery,
    *,
    progress: bool = True,
) -> tuple[Recovery, list[dict]]:
    """Train adapters on ``train`` and measure ``held_out`` perplexity at every evaluation of ``config``.

    Returns:
        ``(recovery, rows)``; a row per evaluated step: ``step``, ``ppl`` (through the quantized cache, or
        the model's own cache without one), ``ppl_unquantized`` (None when the cache is not quantized) and
        ``train_loss`` (mean of the steps since the previous row; None at step 0).
    """
    measured = []

    def evaluate(_model) -> float:
        through_cache = perplexity(compressed, held_out, progress=False).ppl
        plain = None if compressed.cache_config is None else perplexity(compressed.model, held_out, progress=False).ppl
        measured.append(plain)
        return through_cache

    recovery = finetune(compressed, train, config, evaluate=evaluate, progress=progress)
    rows, previous = [], 0
    for (step, ppl), plain in zip(recovery.evaluations, measured, strict=True):
        losses = recovery.losses[previous:step]
        loss = sum(losses) / len(losses) if losses else None
        rows.append({"step": step, "ppl": ppl, "ppl_unquantized": plain, "train_loss": loss})
        previous = step
    return recovery, rows


def write_recovery(rows: list[dict], folder: str | os.PathLike, title: str, references: dict | None = None) -> Path:
    """``folder/recovery.csv`` (:data:`FIELDS`) and ``folder/recovery.png``: perplexity against steps, with
    ``references`` (label -> perplexity, e.g. the uncompressed model) as horizontal lines. Returns the CSV."""
    folder = Path(folder)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({k: ("" if row[k] is None else row[k]) for k in FIELDS} for row in rows)
    path = atomic_write_text(folder / "recovery.csv", buffer.getvalue())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    steps = [r["step"] for r in rows]
    quantized = any(r["ppl_unquantized"] is not None for r in rows)
    ax.plot(steps, [r["ppl"] for r in rows], "o-", label="through the quantized cache" if quantized else "compressed")
    if quantized:
        ax.plot(steps, [r["ppl_unquantized"] for r in rows], "s--", label="unquantized cache")
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{i + 2}", lw=0.9, ls=":", label=f"{label} ({value:.2f})")
    ax.set_xlabel("LoRA steps")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, folder / "recovery.png")
    return path
