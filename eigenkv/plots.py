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


BITS_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#2ca02c", 8: "#1f77b4", None: "#7f7f7f"}


def plot_allotment(streams: list[dict], head_dim: int, title: str, path: str | os.PathLike) -> Path:
    """Two panels (keys, values): every layer's rank as a bar coloured by its bits (hatched: quantized after a
    Hadamard rotation), its group size above it.

    Args:
        streams: rows ``{"layer", "kind" ("key"/"value"), "rank", "bits" (None: 16-bit), "group_size", "rotate"}``.
    """
    plt = pyplot()
    layers = 1 + max(row["layer"] for row in streams)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * layers), 4.6), sharex=True)
    for ax, kind in zip(axes, ("key", "value"), strict=True):
        rows = sorted((r for r in streams if r["kind"] == kind), key=lambda r: r["layer"])
        ax.bar(
            [r["layer"] for r in rows],
            [r["rank"] for r in rows],
            color=[BITS_COLORS.get(r["bits"], "black") for r in rows],
            hatch=["//" if r.get("rotate") else "" for r in rows],
            width=0.8,
        )
        for r in rows:
            if r["group_size"] is not None:
                ax.text(r["layer"], r["rank"] + head_dim * 0.02, f"g{r['group_size']}", ha="center", fontsize=5)
        ax.axhline(head_dim, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, head_dim * 1.2)
        ax.set_ylabel(f"{kind} rank")
    axes[-1].set_xlabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in BITS_COLORS.values()]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
    labels = [f"{b} bits" if b else "16 bits" for b in BITS_COLORS] + ["Hadamard-rotated"]
    fig.suptitle(title, fontsize=8)
    fig.legend(handles, labels, fontsize=6, ncols=6, loc="upper center", bbox_to_anchor=(0.5, 0.95), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return save_figure(fig, path, dpi=120)
