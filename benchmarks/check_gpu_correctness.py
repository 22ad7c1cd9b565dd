"""The attention kernels against their PyTorch references at the Llama-3-8B shape, on the GPU (or, with
``--cpu-smoke``, at tiny sizes in the Triton interpreter).

- decode: :func:`lowrank_decode` over a cache of ``--tokens`` tokens (32 query
  heads, 8 KV heads, head size 128, ranks 77 / 77, 4-bit codes, groups 64 and 16, keys
  per channel, values per token, a full-precision window of ``--residual``
  tokens), stored through the library's ``QuantizedStream``; rank and pre modes,
  fp16 and bf16; then the other code widths of ``--bits`` (each converted by its
  own PTX or word path) at the first group, rank mode;
- prefill: :func:`lowrank_prefill` of ``--prefill-tokens`` new tokens, rank and
  pre modes, fp16 and bf16.

Criterion (the kernel tests', after FlashAttention's): the kernel's max abs
error against the float64 reference is at most twice the same-dtype
reference's error plus a small atol (2e-3 fp16, 1.6e-2 bf16). Queries are
scaled by ``--query-scale`` so the softmax is peaked and the outputs are O(1)
(flat attention over 4k random values would average them to ~0, where any
kernel passes). Each check prints its error, the bound and PASS/FAIL and
appends rows (``max_abs_err``, ``ref_err``, ``bound``, ``rel_err``, ``pass``)
to ``correct_<device>.csv`` as soon as it is done. Exit status 1 when a check
fails or errors.

    PYTHONPATH=. python benchmarks/check_gpu_correctness.py [--out DIR] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

from benchmarks._common import RowLog, add_gpu_step_arguments, results_path, short_error

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import: the interpreter runs them on CPU

from benchmarks.bench_decode import SHAPES, decode_case  # noqa: E402
from eigenkv.kernels.lowrank_decode import lowrank_decode, lowrank_decode_reference  # noqa: E402
from eigenkv.kernels.lowrank_prefill import lowrank_prefill, lowrank_prefill_reference  # noqa: E402
from eigenkv.kernels.scoring import Scoring  # noqa: E402
from eigenkv.quant.config import KVQuantConfig  # noqa: E402

ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # as tests/kernels/test_lowrank_decode.py
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SHAPE = "llama3-8b"
RATIO = 77 / 128  # ranks 77 / 77


def compare(out: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor) -> dict:
    """Errors of the kernel's ``out`` and of the same-dtype reference against the float64 ``exact``."""
    err = (out.double() - exact).abs().max().item()
    ref_err = (same_dtype.double() - exact).abs().max().item()
    bound = 2 * ref_err + ATOL[out.dtype]
    finite = bool(torch.isfinite(out).all())
    scale = exact.abs().max().item() or 1.0
    passed = finite and err <= bound
    return {"max_abs_err": err, "ref_err": ref_err, "bound": bound, "rel_err": err / scale, "pass": passed}


def log_check(log: RowLog, common: dict, result: dict, seconds: float) -> bool:
    """Append a check's rows and print its line; return whether it passed."""
    for metric in ("max_abs_err", "ref_err", "bound", "rel_err"):
        log.add(**common, metric=metric, value=f"{result[metric]:.4g}")
    log.add(**common, metric="pass", value=int(result["pass"]))
    verdict = "PASS" if result["pass"] else "FAIL"
    print(
        f"{verdict} {common['method']:14s} {common['shape']:13s} {common['mode']:4s} {common['dtype']:8s} "
        f"B={common['batch']} S={common['context']}: max abs err {result['max_abs_err']:.3g} "
        f"(bound {result['bound']:.3g}, same-dtype reference {result['ref_err']:.3g}, "
        f"relative {result['rel_err']:.2g}) [{seconds:.1f} s]",
        flush=True,
    )
    return result["pass"]


def run_check(log: RowLog, common: dict, outputs) -> bool:
    """Run ``outputs() -> (kernel, same-dtype reference, float64 reference)``, log and print the verdict; a launch
    or shape error is recorded as a failed check, so the other checks still run."""
    began = time.perf_counter()
    try:
        return log_check(log, common, compare(*outputs()), time.perf_counter() - began)
    except Exception as exc:
        traceback.print_exc()
        log.add(**common, metric="error", value=short_error(exc))
        print(f"ERROR {common['method']} {common['mode']} {common['dtype']}: {short_error(exc)}", flush=True)
        return False


def check_decode(
    log: RowLog, dtype_name: str, modes: list[str], batch: int, tokens: int, group: int, args, device, bits: int = 4
) -> bool:
    """Decode kernel vs reference in each mode, on one cache (stored once per dtype, group and width)."""
    dtype = DTYPES[dtype_name]
    config = KVQuantConfig(bits=bits, group_size=group, axis_k="channel", axis_v="token", residual=args.residual)
    case = decode_case(SHAPE, batch, tokens, RATIO, config, dtype, device, query_scale=args.query_scale)

    def outputs(mode):
        query, scoring = case.queries[mode]
        return (
            lowrank_decode(query, case.keys, case.values, scoring),
            lowrank_decode_reference(query, case.keys, case.values, scoring),
            lowrank_decode_reference(query.double(), case.keys, case.values, scoring.exact()),
        )

    ok = True
    for mode in modes:
        shape = f"{SHAPE},g{group}" + ("" if bits == 4 else f",b{bits}")
        common = {"step": "correct", "shape": shape, "dtype": dtype_name, "method": "lowrank_decode"}
        common["mode"] = mode
        ok &= run_check(log, common | {"batch": batch, "context": tokens}, lambda m=mode: outputs(m))
    return ok


def prefill_inputs(batch: int, length: int, dtype, device, query_scale: float, seed: int = 0) -> dict:
    """Rank-space keys / values ``(B, 8, T, 77)``; rank and full queries with their scorings, per mode."""
    q_heads, kv_heads, d = SHAPES[SHAPE]
    rank = round(RATIO * d)
    gen = torch.Generator().manual_seed(seed)

    def states(heads, width, scale=1.0):
        return (scale * torch.randn(batch, heads, length, width, generator=gen)).to(device, dtype)

    keys, values = states(kv_heads, rank), states(kv_heads, rank)
    decoder = torch.linalg.qr(torch.randn(kv_heads, d, d, generator=gen))[0][..., :rank].to(device, dtype)
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(device)
    return {
        "keys": keys,
        "values": values,
        "rank": (states(q_heads, rank, query_scale), Scoring(d**-0.5)),
        "pre": (states(q_heads, d, query_scale), Scoring(d**-0.5, "pre", decoder, inv_freq)),
    }


def check_prefill(log: RowLog, dtype_name: str, modes: list[str], batch: int, length: int, args, device) -> bool:
    """Prefill kernel vs reference (float64 exact, and same dtype) in each mode."""
    dtype = DTYPES[dtype_name]
    inputs = prefill_inputs(batch, length, dtype, device, args.query_scale)
    keys, values = inputs["keys"], inputs["values"]

    def outputs(mode):
        query, scoring = inputs[mode]
        return (
            lowrank_prefill(query, keys, values, scoring),
            lowrank_prefill_reference(query, keys, values, scoring),
            lowrank_prefill_reference(query.double(), keys.double(), values.double(), scoring.exact()),
        )

    ok = True
    for mode in modes:
        common = {"step": "correct", "shape": SHAPE, "dtype": dtype_name, "method": "lowrank_prefill", "mode": mode}
        ok &= run_check(log, common | {"batch": batch, "context": length}, lambda m=mode: outputs(m))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="decode: cached tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--residual", type=int, default=32, help="decode: full-precision window (KVQuantConfig)")
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--prefill-batch", type=int, default=1)
    parser.add_argument(
        "--groups", default="64,16", help="decode: group sizes (16: 64-token tiles holding four blocks of keys)"
    )
    parser.add_argument(
        "--bits", default="2,3,8", help="decode: code widths checked after 4 bits (rank mode, first group)"
    )
    parser.add_argument("--modes", default="rank,pre")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--query-scale", type=float, default=4.0)
    parser.add_argument("--skip", default="", help="comma-separated: decode, prefill")
    add_gpu_step_arguments(parser, "no CUDA: tiny sizes in the Triton interpreter")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA device: these checks are for a GPU; --cpu-smoke runs them tiny in the interpreter")
    device = torch.device("cuda" if cuda else "cpu")
    batch, tokens, length = args.batch, args.tokens, args.prefill_tokens
    if not cuda:  # the interpreter takes ~7 ms per program and key tile
        batch, tokens, length = 1, min(tokens, 160), min(length, 48)
        print(f"no CUDA device: interpreter smoke run at B={batch}, {tokens} cached / {length} prompt tokens")
    log = RowLog(results_path(args.out, "correct"), fresh=not args.append)
    modes, skip = args.modes.split(","), set(args.skip.split(","))
    ok = True
    dtypes = args.dtypes.split(",")
    # decode first (the step the GPU run is for), fp16 before bf16: a timeout keeps the most useful checks
    groups = [int(g) for g in args.groups.split(",")]
    for dtype_name in dtypes if "decode" not in skip else []:
        for group in groups:
            ok &= check_decode(log, dtype_name, modes, batch, tokens, group, args, device)
    for bits in [int(b) for b in args.bits.split(",") if b] if "decode" not in skip else []:
        for dtype_name in dtypes:
            ok &= check_decode(log, dtype_name, modes[:1], batch, tokens, groups[0], args, device, bits)
    for dtype_name in dtypes if "prefill" not in skip else []:
        ok &= check_prefill(log, dtype_name, modes, args.prefill_batch, length, args, device)
    print(f"correctness: {'all PASS' if ok else 'FAILURES above'}; rows in {log.path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
