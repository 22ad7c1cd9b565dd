"""Figures that artifacts carry (matplotlib, headless), written atomically."""

from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 130) -> Path:
    """Save ``fig`` (format from the suffix) through a temporary file and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    tmp.replace(path)
    return path


def plot_ranks(ranks: list[tuple[int, int]], head_dim: int, title: str, path: str | os.PathLike) -> Path:
    """Bar chart of the key and value rank ``(r_k, r_v)`` of every layer (PNG or SVG by suffix)."""
    plt = pyplot()
    layers = range(len(ranks))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(ranks)), 3.2))
    ax.bar([i - 0.2 for i in layers], [k for k, _ in ranks], width=0.4, label="keys $r_k$")
    ax.bar([i + 0.2 for i in layers], [v for _, v in ranks], width=0.4, label="values $r_v$")
    ax.axhline(head_dim, color="gray", lw=0.8, ls="--", label="head size")
    ax.set_xlabel("layer")
    ax.set_ylabel("rank")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, head_dim * 1.25)
    ax.legend(fontsize=7, ncols=3, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
