"""End-to-end generation: decode tokens/s, prefill time and memory of each KV cache, side by side.

For each (batch, prompt length) every method runs one greedy ``model.generate`` call on random
prompt ids, producing exactly ``--new-tokens`` tokens (EOS suppressed by ``min_new_tokens``),
eager (``disable_compile``: a static cache would otherwise trigger ``torch.compile`` on CUDA),
except the ``_graph`` methods, which run ``eigenkv.graphs.generate_static`` (below):

- ``dynamic_fp16``: transformers' ``DynamicCache`` in the model's dtype;
- ``static_fp16``: transformers' ``StaticCache`` sized for prompt + new tokens;
- ``hf_quantized``: transformers' ``QuantizedCache`` (quanto, else hqq backend; 4 bits, group 64,
  128 recent tokens in full precision), or a ``skipped`` row naming why when no backend imports;
- ``eigenkv_quant``: eigenkv's quantized cache alone, ``QuantizedKV(model, KVQuantConfig(bits=4,
  group_size=64, residual=128))`` and its ``new_cache()`` (decode steps read the packed cache with
  the Triton kernels on CUDA);
- ``eigenkv_lowrank_quant``: Eigen Attention at 0.6 of the KV size plus the same 4-bit cache, on a
  copy of the model: ``apply_recipe`` with PCA bases and uniform ranks (the cheapest calibration;
  the speed depends on the ranks, not on how the bases were chosen), calibrated on 2 windows of
  512 tokens: offline Brown text for a real model, random token ids for a random-weight one;
- ``eigenkv_quant_graph`` and ``eigenkv_lowrank_quant_graph``: the same models as ``eigenkv_quant`` and
  ``eigenkv_lowrank_quant`` (the same objects: calibrated once), greedy through ``generate_static``
  with a capturable cache sized for prompt + new tokens: the decode step captured once as a CUDA
  graph and replayed (on CPU, or when the capture fails, the same step runs eagerly).

Metrics (long format, one row per method x batch x prompt length x metric):
``prefill_s`` (from generate's start to the first new token: the prompt's forward and one
argmax), ``decode_tokens_per_s`` (``batch * (new_tokens - 1)`` over the time from the first to
the last new token; a streamer timestamps each token, and generate copies every token to the host,
so the timestamps are synchronous), ``kv_bytes`` (the bytes the cache object holds at the end:
``nbytes()`` of an eigenkv cache, else every tensor it reaches, quanto's packed tensors unpacked
to their storage) and, on CUDA only, ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated``
over the call, after a reset: weights, activations and cache). On CPU no peak is measured:
``kv_bytes`` is the memory figure there. A ``skipped`` or ``error`` row holds the reason instead.
The ``_graph`` methods time on their own (``generate_static``'s ``seconds``, the device synchronized at
the boundaries only): ``prefill_s`` (the prompt's forward and first token), ``capture_s`` (the second
token's step, eager, and the capture; 0 without a graph) and ``decode_tokens_per_s``: ``batch *
(new_tokens - 2)`` over ``seconds["decode"]`` when graphed (the replays: the tokens after the first two),
``batch * (new_tokens - 1)`` when not (then ``decode`` spans every step after the prefill, a failed
capture attempt included); ``kv_bytes`` and ``peak_memory_bytes`` as above; ``graphed`` (1 or 0) and,
when 0, ``graph_reason`` (text: why no graph, e.g. "no CUDA graphs on cpu").

Models: on CPU ``smollm2-135m`` (float32: the CPU's fast dtype, so its "fp16" caches hold float32;
the ``model`` column says the dtype); on CUDA ``llama3-8b`` by default: a Llama-3-8B-shaped model
(hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256) with random float16
weights and only ``--layers`` (default 4) layers, so that batch 8 x 32k tokens fits with room for
every method; per-layer cache behaviour is the same as the full model's (``llama-tiny``, hidden 256
with 4 / 2 heads of 64, is for CPU dry runs of the script). Every point is measured
after one short warm-up generate per method and batch (kernel compiles, allocator). Rows are
written as they are measured (a killed run keeps them); a plot of decode tokens/s against the
prompt length follows, both named after the device.

    PYTHONPATH=. python benchmarks/bench_generate.py                      # CPU: smollm2-135m, 512/2048 tokens
    PYTHONPATH=. python benchmarks/bench_generate.py --batches 8 --prompt-lengths 4096,32768 --new-tokens 64
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
import traceback
from collections.abc import Callable

import torch

from benchmarks._common import RowLog, plot_latency_panels, results_path, short_error
from eigenkv.memory import cache_held_bytes

FIELDS = ("device", "model", "method", "batch", "prompt_tokens", "new_tokens", "metric", "value")
METHODS = (
    "dynamic_fp16",
    "static_fp16",
    "hf_quantized",
    "eigenkv_quant",
    "eigenkv_lowrank_quant",
    "eigenkv_quant_graph",
    "eigenkv_lowrank_quant_graph",
)
GRAPHED = {"eigenkv_quant_graph": "eigenkv_quant", "eigenkv_lowrank_quant_graph": "eigenkv_lowrank_quant"}
BITS, GROUP, RESIDUAL, RATIO = 4, 64, 128, 0.6
CALIB_WINDOWS, CALIB_TOKENS = 2, 512
WARMUP_PROMPT, WARMUP_NEW = 64, 3


# --- models ----------------------------------------------------------------------------------------


# random-weight Llama shapes: Llama-3-8B's attention and MLP, and a tiny one for CPU dry runs of the script
RANDOM_LLAMAS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0),
    "llama-tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2),
}  # fmt: skip


def random_llama(name: str, layers: int, device: str, dtype: torch.dtype):
    """A causal LM of the ``RANDOM_LLAMAS[name]`` shape with ``layers`` layers and random weights, on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=131072, **RANDOM_LLAMAS[name])
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place: no copy of the weights from the host
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load(args, device: str, dtype: torch.dtype):
    """``(model, tokenizer or None, label for the model column)``."""
    precision = str(dtype).removeprefix("torch.")
    if args.model in RANDOM_LLAMAS:
        label = f"{args.model}-shape {args.layers} layers random ({precision})"
        return random_llama(args.model, args.layers, device, dtype), None, label
    from eigenkv import load_model

    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    return model, tokenizer, f"{args.model} ({precision})"


def calibration(model, tokenizer):
    """``CALIB_WINDOWS`` x ``CALIB_TOKENS`` windows: Brown text (real model) or random ids (random weights)."""
    from eigenkv import load_windows
    from eigenkv.data import TokenWindows

    if tokenizer is not None:
        return load_windows("brown", tokenizer, CALIB_TOKENS, count=CALIB_WINDOWS)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (CALIB_WINDOWS, CALIB_TOKENS), generator=generator)
    return TokenWindows(ids, "random", CALIB_TOKENS, "none", 0, CALIB_WINDOWS)


# --- methods ---------------------------------------------------------------------------------------


# how a method generates: ``generate(ids (B, P), **model.generate keywords)`` -> the cache object it filled
Generate = Callable[..., object]


def with_cache(model, new_cache: Callable[[int], object]) -> Generate:
    """``model.generate`` through a fresh transformers cache, ``new_cache(prompt + new tokens)``."""

    def generate(ids: torch.Tensor, **kwargs) -> object:
        cache = new_cache(ids.shape[1] + kwargs["max_new_tokens"])
        model.generate(ids, past_key_values=cache, **kwargs)
        return cache

    return generate


def through(compressed) -> Generate:
    """``CompressedModel.generate``: the library's own path (its quantized cache, made and checked as it does)."""
    return lambda ids, **kwargs: compressed.generate(ids, return_dict_in_generate=True, **kwargs).past_key_values


class Static:
    """A method that generates through ``CompressedModel.generate_static`` (``eigenkv.graphs``): a capturable
    cache sized for prompt + new tokens, the decode step captured once in a CUDA graph."""

    def __init__(self, compressed):
        self.compressed = compressed

    def __call__(self, ids: torch.Tensor, new_tokens: int):
        """``(StaticGeneration, the cache it filled)``."""
        out = self.compressed.generate_static(ids, new_tokens)
        return out, out.cache


def hf_backend() -> str | None:
    """The first importable backend of transformers' QuantizedCache (quanto, hqq), or None."""
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        return "quanto"
    return "hqq" if importlib.util.find_spec("hqq") else None


def eigenkv_model(name: str, model, tokenizer, built: dict):
    """The ``CompressedModel`` of ``eigenkv_quant`` or ``eigenkv_lowrank_quant``, made once in ``built`` (its
    ``_graph`` method shares it; a failed build is kept too, and raised again, not calibrated twice)."""
    from eigenkv import EigenConfig, KVQuantConfig, Recipe, apply_recipe

    if name not in built:
        kv = KVQuantConfig(bits=BITS, group_size=GROUP, residual=RESIDUAL)
        try:
            if name == "eigenkv_quant":  # quantization alone leaves the model as it is: no copy
                built[name] = apply_recipe(model, Recipe(kv=kv), progress=False)
            else:
                lowrank = EigenConfig(target_ratio=RATIO, basis="pca", allot="uniform")
                began = time.perf_counter()
                built[name] = apply_recipe(
                    copy.deepcopy(model), Recipe(lowrank=lowrank, kv=kv), calibration(model, tokenizer), progress=False
                )
                elapsed = time.perf_counter() - began
                print(f"  {built[name].recipe.label()}: calibrated in {elapsed:.1f} s", flush=True)
        except Exception as exc:
            built[name] = exc
            raise
    if isinstance(built[name], Exception):
        raise built[name]
    return built[name]


def build(name: str, model, tokenizer, built: dict) -> Generate | Static | str:
    """How the method called ``name`` generates, or why it cannot run here (a ``skipped`` row); ``built``
    holds the eigenkv models made so far (shared by a method and its ``_graph`` twin)."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    if name == "dynamic_fp16":
        return with_cache(model, lambda tokens: DynamicCache(config=model.config))
    if name == "static_fp16":
        return with_cache(model, lambda tokens: StaticCache(config=model.config, max_cache_len=tokens))
    if name == "hf_quantized":
        backend = hf_backend()
        if backend is None:
            return "no QuantizedCache backend: neither optimum-quanto nor hqq is installed"
        return with_cache(
            model,
            lambda tokens: QuantizedCache(
                backend, model.config, nbits=BITS, q_group_size=GROUP, residual_length=RESIDUAL
            ),
        )
    if name in ("eigenkv_quant", "eigenkv_lowrank_quant"):
        return through(eigenkv_model(name, model, tokenizer, built))
    if name in GRAPHED:
        return Static(eigenkv_model(GRAPHED[name], model, tokenizer, built))
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


# --- one measurement -------------------------------------------------------------------------------


class Clock:
    """A ``generate`` streamer that timestamps its calls: the prompt (before the prefill), then each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:  # generate hands over host copies: the device has finished the step
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def run(generate: Generate, ids: torch.Tensor, new_tokens: int, pad: int | None) -> dict[str, float]:
    """One greedy generate of exactly ``new_tokens`` tokens after ``ids (B, P)``: the metrics of the module doc."""
    cuda = ids.is_cuda
    clock = Clock()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cache = generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, streamer=clock, disable_compile=True, pad_token_id=pad,
    )  # fmt: skip
    assert len(clock.times) == new_tokens + 1, f"{len(clock.times) - 1} tokens streamed, expected {new_tokens}"
    prompt, first, last = clock.times[0], clock.times[1], clock.times[-1]
    metrics = {
        "prefill_s": first - prompt,
        "decode_tokens_per_s": ids.shape[0] * (new_tokens - 1) / (last - first),
        "kv_bytes": cache_held_bytes(cache),  # wrapper tensors (quanto's) counted by what they store
    }
    if cuda:
        metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return metrics


@torch.no_grad()
def run_static(method: Static, ids: torch.Tensor, new_tokens: int, pad: int | None = None) -> dict[str, float | str]:
    """One ``generate_static`` of ``new_tokens`` tokens after ``ids (B, P)``: the ``_graph`` metrics of the module
    doc (``pad`` unused: every sequence runs every step, no EOS stops it)."""
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out, cache = method(ids, new_tokens)
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + new_tokens), tuple(out.sequences.shape)
    steps = out.decode_steps  # graphed: the replays (the prefill gave the first token, the eager step the second)
    seconds = out.seconds
    metrics: dict[str, float | str] = {
        "prefill_s": seconds["prefill"],
        "capture_s": seconds["capture"],
        "decode_tokens_per_s": ids.shape[0] * steps / seconds["decode"] if steps else float("nan"),
        "kv_bytes": cache_held_bytes(cache),
    }
    if cuda:
        metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    metrics["graphed"] = int(out.graphed)
    if not out.graphed:
        metrics["graph_reason"] = out.reason or "unknown"
    return metrics


# --- main ------------------------------------------------------------------------------------------


def plot(rows: list[dict], path) -> None:
    """Decode tokens/s against the prompt length, a panel per batch, a line per method (needs matplotlib)."""
    points = [
        {**r, "shape": r["model"], "metric": "ms", "context": r["prompt_tokens"]}  # the panels helper's names
        for r in rows
        if r["metric"] == "decode_tokens_per_s"
    ]
    plot_latency_panels(points, path, "context", "prompt (tokens)", "decode tokens/s (all sequences)", "generate")


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="llama3-8b / llama-tiny (random weights; GPU default llama3-8b) or a model name"
    )
    parser.add_argument("--layers", type=int, default=4, help="layers of a random-weight model")
    parser.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    parser.add_argument("--prompt-lengths", default=None, help="default 4096,32768 (GPU) or 512,2048 (CPU)")
    parser.add_argument("--batches", default=None, help="default 1,8 (GPU) or 1 (CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (GPU) or 32 (CPU); at least 2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--append", action="store_true", help="append to the CSV instead of starting it over")
    parser.add_argument("--out", default=None, help="folder (default benchmarks/results) or a .csv path")
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    args.model = args.model or ("llama3-8b" if cuda else "smollm2-135m")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    lengths = numbers(args.prompt_lengths or ("4096,32768" if cuda else "512,2048"))
    batches = numbers(args.batches or ("1,8" if cuda else "1"))
    new_tokens = args.new_tokens or (256 if cuda else 32)
    if new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode is timed from the first new token to the last)")
    names = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")

    log = RowLog(results_path(args.out, "generate"), fresh=not args.append, fields=FIELDS)
    began = time.perf_counter()
    model, tokenizer, label = load(args, device, dtype)
    print(f"{label} on {device}: methods {', '.join(names)}; {new_tokens} new tokens", flush=True)
    methods: dict[str, Generate | Static | str] = {}
    built: dict = {}  # the eigenkv models, each made once
    for name in names:
        try:
            methods[name] = build(name, model, tokenizer, built)
        except Exception as exc:  # a failed calibration must not cost the other methods
            traceback.print_exc()
            methods[name] = f"build failed: {short_error(exc)}"

    pad = model.config.eos_token_id  # no padding happens (every prompt is full length): this only quiets generate
    generator = torch.Generator().manual_seed(0)
    warm: set[tuple[str, int]] = set()
    for batch in batches:
        for length in lengths:
            ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
            point = {"model": label, "batch": batch, "prompt_tokens": length, "new_tokens": new_tokens}
            print(f"B={batch} prompt={length}", flush=True)
            for name, method in methods.items():
                if isinstance(method, str):
                    log.add(**point, method=name, metric="skipped", value=method)
                    print(f"  {name:27s} skipped: {method}", flush=True)
                    continue
                measure = run_static if isinstance(method, Static) else run
                try:
                    if (name, batch) not in warm:
                        measure(method, ids[:, : min(length, WARMUP_PROMPT)], WARMUP_NEW, pad)
                        warm.add((name, batch))
                    metrics = measure(method, ids, new_tokens, pad)
                except Exception as exc:  # out of memory, a backend error: keep the other methods and points
                    traceback.print_exc()
                    log.add(**point, method=name, metric="error", value=short_error(exc))
                    print(f"  {name:27s} error: {short_error(exc)}", flush=True)
                    metrics = None
                if cuda:
                    torch.cuda.empty_cache()
                if metrics is None:
                    continue
                for metric, value in metrics.items():
                    value = value if isinstance(value, str) else round(value, 4)  # graph_reason: text
                    log.add(**point, method=name, metric=metric, value=value)
                line = (
                    f"  {name:27s} prefill {metrics['prefill_s']:8.3f} s  decode {metrics['decode_tokens_per_s']:9.1f}"
                    f" tok/s  kv {metrics['kv_bytes'] / 2**20:9.2f} MiB"
                )
                if "peak_memory_bytes" in metrics:
                    line += f"  peak {metrics['peak_memory_bytes'] / 2**30:7.2f} GiB"
                if "capture_s" in metrics:
                    line += f"  capture {metrics['capture_s']:.3f} s"
                if "graphed" in metrics:
                    line += "  graphed" if metrics["graphed"] else f"  not graphed: {metrics['graph_reason']}"
                print(line, flush=True)
    print(f"generate: {time.perf_counter() - began:.0f} s; rows in {log.path}")
    plot(log.rows, log.path.with_suffix(".png"))


if __name__ == "__main__":
    main()
