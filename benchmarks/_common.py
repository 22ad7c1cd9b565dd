"""Shared benchmark plumbing: device naming, timing, long-format CSV and plots."""

from __future__ import annotations

import csv
import math
import platform
import time
from functools import partial
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def device_slug() -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-").replace("--", "-")


def time_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of ``fn()``: CUDA events via triton.testing.do_bench on GPU, perf_counter on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup * 5, rep=reps * 5, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def plot_latency_panels(rows: list[dict], path: Path, x: str, xlabel: str, ylabel: str, title: str) -> None:
    """One log-log panel of ``ms`` against ``x`` per (shape, batch), a line per method (rows in long format).

    No rows: no plot. No matplotlib (a GPU machine): a line says so, and the CSV holds everything."""
    if not rows:
        return
    try:
        import matplotlib
    except ImportError as exc:
        print(f"no plot: {exc}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["metric"] == "ms" and r.get("shape", "-") != "-"]
    panels = sorted({(r["shape"], r["batch"]) for r in timed})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, batch) in zip(axes[0], panels, strict=True):
        for method in sorted({r["method"] for r in timed}):
            pts = [r for r in timed if (r["shape"], r["batch"], r["method"]) == (shape, batch, method)]
            ax.plot([r[x] for r in pts], [r["value"] for r in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{shape}, batch {batch}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} on {rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_folder(out: Path, args, **extra):
    """The ``eigenkv.eval.runs.RunFolder`` at ``out`` for a script's settings (its options but ``--out``, and
    ``extra``); a folder holding a run with other settings is refused."""
    from eigenkv.eval.runs import RunFolder

    config = {k: v for k, v in vars(args).items() if k != "out"} | extra
    try:
        return RunFolder(out.parent, out.name, config)
    except FileExistsError:
        raise SystemExit(f"{out} holds a run with other settings; choose another --out or delete it") from None


# --- long-format rows, written as they are measured -------------------------------------------

FIELDS = ("device", "step", "shape", "dtype", "method", "mode", "timing", "batch", "context", "metric", "value")


class RowLog:
    """Long-format CSV (:data:`FIELDS`, or a script's own ``fields``) that gets each row as soon as it is measured.

    Every row is written and flushed at once, so a step killed by its timeout keeps
    the points it finished. ``fresh`` starts the file over; otherwise rows are
    appended (the header is written only to a new or empty file). Fields a row
    leaves out are ``-``; ``device`` is filled in.
    """

    def __init__(self, path: Path, fresh: bool = True, fields: tuple[str, ...] = FIELDS):
        self.path = path
        self.fields = fields
        self.rows: list[dict] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115 (lives as long as the log)
        self._writer = csv.DictWriter(self._file, fieldnames=fields)
        if self._file.tell() == 0:
            self._writer.writeheader()
        self._device = device_name()

    def add(self, **fields) -> dict:
        row = {name: "-" for name in self.fields} | {"device": self._device} | fields
        self._writer.writerow(row)  # raises on a field outside FIELDS: a typo would otherwise vanish
        self._file.flush()
        self.rows.append(row)
        return row


def results_path(out: str | None, stem: str) -> Path:
    """Where a step writes ``<stem>_<device>.csv``: in the folder ``out`` (default ``benchmarks/results``),
    or at ``out`` itself when it names a ``.csv`` file."""
    if out and out.endswith(".csv"):
        return Path(out)
    return Path(out or RESULTS) / f"{stem}_{device_slug()}.csv"


def short_error(exc: BaseException) -> str:
    """One line naming an exception, for a log row (the full traceback goes to stderr)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


# --- timing: CUDA events after an L2 flush, plain or replayed from a CUDA graph ------------------

_L2_FLUSH: torch.Tensor | None = None


def _flush_l2() -> None:
    # 256 MiB, several times the L2 of an H100 / H200 (50 MiB): each timed call starts from a cold cache,
    # as a decode step meets a layer's cache after the other layers' traffic evicted it.
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    _L2_FLUSH.zero_()


def cuda_ms(fn, warmup: int = 3, budget_ms: float = 150.0, min_reps: int = 5, max_reps: int = 100) -> float:
    """Median milliseconds of ``fn()`` measured by CUDA events, each call after an L2 flush.

    ``warmup`` calls first (compiles, allocator), then as many calls as fit ``budget_ms``
    (within ``[min_reps, max_reps]``, from two calls timed after the warm-up, so that a
    compile does not count): a point costs about the same wall time at any size.
    """
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(2):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 2, 1e-3)
    reps = int(min(max_reps, max(min_reps, budget_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return times[len(times) // 2]


def cpu_ms(fn, warmup: int = 1, reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` by ``perf_counter`` (CPU runs: references, or the interpreter)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """``fn``'s launches captured in a CUDA graph (after warm-up calls on a side stream, as torch requires:
    Triton compiles and the allocator settles before capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def measure_ms(fn, timing: str = "plain", **kwargs) -> float:
    """Milliseconds of one call of ``fn``: ``"plain"`` launches it from Python each time (its CPU overhead
    counts whenever it exceeds the GPU time); ``"graph"`` replays it from a CUDA graph (GPU time only)."""
    if not torch.cuda.is_available():
        if timing != "plain":
            raise RuntimeError(f"{timing} timing needs CUDA")
        return cpu_ms(fn, **kwargs)
    if timing == "plain":
        return cuda_ms(fn, **kwargs)
    if timing != "graph":
        raise ValueError(f"timing={timing!r}; use plain or graph")
    graph = capture_graph(fn)
    try:
        return cuda_ms(graph.replay, **kwargs)
    finally:
        del graph  # frees the graph's private memory pool before the next point


def copy_bandwidth_gbs(gib: float = 1.0) -> float:
    """The device's practical bandwidth: GB/s (1e9) of a device-to-device copy of ``gib`` GiB,
    counting the bytes read and the bytes written."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_ms(partial(y.copy_, x), warmup=3, budget_ms=200.0)
    return 2 * gib * 2**30 / ms / 1e6


# --- SDPA backends -------------------------------------------------------------------------------

# our names -> torch.nn.attention.SDPBackend members (CUDNN_ATTENTION is missing from older torch)
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def sdpa_backends(names: str | list[str] = "flash,efficient,cudnn,math") -> dict:
    """``{name: torch.nn.attention.SDPBackend}`` for the wanted names this torch knows."""
    from torch.nn.attention import SDPBackend

    wanted = names.split(",") if isinstance(names, str) else names
    unknown = [n for n in wanted if n not in SDPA_BACKENDS]
    if unknown:
        raise ValueError(f"unknown SDPA backends {unknown}; use some of {list(SDPA_BACKENDS)}")
    return {n: getattr(SDPBackend, SDPA_BACKENDS[n]) for n in wanted if hasattr(SDPBackend, SDPA_BACKENDS[n])}


def try_sdpa_backend(backend, fn) -> str | None:
    """Run ``fn`` once with SDPA forced to ``backend``: None when it runs, else why not (the reasons
    torch gives in its warnings when no kernel fits, or the error)."""
    import warnings

    from torch.nn.attention import sdpa_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(backend):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        except Exception as exc:  # RuntimeError("No available kernel"), or whatever the backend raises
            reasons = " | ".join(" ".join(str(w.message).split())[:160] for w in caught[:3])
            return short_error(exc) + (f" ({reasons})" if reasons else "")


def add_gpu_step_arguments(parser, smoke_help: str = "no CUDA: run the kernels in the interpreter") -> None:
    """``--cpu-smoke``, ``--append``, ``--out``: the options every step of ``run_gpu_checks.sh`` takes."""
    parser.add_argument("--cpu-smoke", action="store_true", help=smoke_help)
    parser.add_argument("--append", action="store_true", help="append to the CSV instead of starting it over")
    parser.add_argument("--out", default=None, help="folder (default benchmarks/results) or a .csv path")


def pearson_r(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def spearman_rho(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (ties broken by order)."""

    def ranks(values: list[float]) -> list[float]:
        out = [0.0] * len(values)
        for rank, i in enumerate(sorted(range(len(values)), key=values.__getitem__)):
            out[i] = float(rank)
        return out

    return pearson_r(ranks(xs), ranks(ys))
