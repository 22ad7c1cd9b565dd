"""Bytes the quantized cache writes per decode step, at several context lengths.

One layer's keys and values (``QuantizedStream``, the Llama-3-8B attention shape: 8 KV heads, ranks
0.6 x 128 = 77, 4-bit codes, group 64, keys per channel, values per token, a 128-token window) are filled
to each context, then ``--steps`` single-token pushes are counted by the store's own counters
(``stream.traffic``: bytes written by appends, bytes moved inside the window's buffer or by growth).
The same for a ``CapturableStream`` (``_capturable`` rows: buffers for the whole context, a ring window, one
fused launch a step). The counts are deterministic (the same on any device). For comparison, ``concatenating``
is what a store
that concatenates on every step would copy: the window each step, and every held code, scale and zero
whenever a step quantizes (per-token values quantize every step).

    PYTHONPATH=. python benchmarks/bench_cache_step.py --contexts 1024,16384 --out DIR
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RowLog, results_path  # noqa: E402

from eigenkv.quant import KVQuantConfig  # noqa: E402
from eigenkv.quant.store import CapturableStream, QuantizedStream  # noqa: E402

FIELDS = ("device", "stream", "batch", "context", "steps", "metric", "value")


def measure(axis: str, batch: int, context: int, steps: int, kind: str, log: RowLog) -> dict:
    """Fill one stream (``kind``: reserved, unreserved, capturable) to ``context`` tokens and count ``steps``
    single-token pushes."""
    config = KVQuantConfig(bits=4, group_size=64, residual=128)
    if kind == "capturable":
        stream = CapturableStream(config, axis, None, context + steps)
    else:
        stream = QuantizedStream(config, axis, None)
    if kind == "reserved":
        stream.reserve(context + steps)
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(batch, 8, context + steps, 77, generator=generator, dtype=torch.float32).half()
    stream.push(states[:, :, :context])
    before = stream.traffic
    concatenating = 0
    for t in range(context, context + steps):
        quantized = stream.quantized_tokens
        stream.push(states[:, :, t : t + 1])
        held = stream.nbytes()
        concatenating += held["window"]  # cat(window, x).contiguous()
        if stream.quantized_tokens > quantized:  # cat(codes, new codes) and the same for scales and zeros
            concatenating += held["codes"] + held["scales"] + held["zeros"]
    row = {k: (stream.traffic[k] - before[k]) / steps for k in before}
    row |= {"concatenating": concatenating / steps, "held": sum(stream.nbytes().values())}
    name = f"{'keys' if axis == 'channel' else 'values'}_{axis}" + ("" if kind == "reserved" else f"_{kind}")
    for metric, value in row.items():
        log.add(stream=name, batch=batch, context=context, steps=steps, metric=f"{metric}_bytes", value=value)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,16384", help="comma-separated context lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=512, help="decode steps counted (a multiple of the group: 64)")
    parser.add_argument("--out", default=None, help="folder (default benchmarks/results) or a .csv path")
    args = parser.parse_args()
    log = RowLog(results_path(args.out, "cache_step"), fields=FIELDS)
    print(f"{'stream':24s} {'context':>8s} {'written/step':>13s} {'moved/step':>11s} {'concatenating':>14s}")
    for kind in ("reserved", "unreserved", "capturable"):
        for axis in ("channel", "token"):
            for context in (int(c) for c in args.contexts.split(",")):
                row = measure(axis, args.batch, context, args.steps, kind, log)
                name = axis + ("" if kind == "reserved" else f" ({kind})")
                print(
                    f"{name:24s} {context:8d} {row['written']:13.0f} {row['moved']:11.0f} {row['concatenating']:14.0f}"
                )
    print(f"rows in {log.path}")


if __name__ == "__main__":
    main()
