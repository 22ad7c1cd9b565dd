"""Command line: ``eigenkv ppl ...`` and ``eigenkv compress ...``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from eigenkv.io import atomic_write_json


def _environment() -> dict:
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def _load_model(args: argparse.Namespace, dtype):
    """Load ``--model`` with ``--threads``, ``--device`` (cuda when available) and ``--cache-dir``."""
    import torch

    from eigenkv.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=dtype, device=device, cache=args.cache_dir)
    return model, tokenizer, device


def _ppl(args: argparse.Namespace) -> int:

    from eigenkv.data import load_windows
    from eigenkv.memory import kv_cache_bytes
    from eigenkv.models import describe_model, resolve_dtype
    from eigenkv.eval.perplexity import perplexity
    from eigenkv.quant import KVQuantConfig, QuantizedKV

    dtype = resolve_dtype(args.dtype)
    quant = None
    if args.kv_bits is not None:
        quant = KVQuantConfig(
            bits=args.kv_bits,
            group_size=args.kv_group,
            axis_k=args.kv_axis_k,
            axis_v=args.kv_axis_v,
            residual=args.kv_residual,
            symmetric=args.kv_symmetric,
            rotate=args.kv_rotate,
        )
    count = None if args.windows == "all" else (int(args.windows) if args.windows.isdigit() else 0)
    if count is not None and count < 1:
        raise ValueError(f"--windows must be a positive integer or 'all'; got {args.windows!r}")
    config = {
        "command": "ppl",
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "windows": args.windows,
        "start": args.start,
        "seq_len": args.seq_len,
        "bos": args.bos,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "kv_quant": None if quant is None else quant.to_dict(),
        "compressed": None,
    }
    plan = None
    if args.compressed:
        from eigenkv.compress import EigenPlan

        plan = EigenPlan.load(args.compressed)
        config["compressed"] = {
            "path": str(Path(args.compressed).resolve()),
            "config": plan.config.to_dict(),
            "mode": plan.mode,
            "ratio": plan.ratio,
            "calibration": {k: v for k, v in plan.calibration.items() if not k.endswith(("seconds", "evaluations"))},
        }
    out = Path(args.json) if args.json else None
    if out is not None and out.exists() and not args.overwrite:
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{out} exists but is not a result file ({err}); delete it or pass --overwrite") from err
        if previous.get("config") != config:
            raise FileExistsError(
                f"{out} holds a result for another configuration ({previous.get('config')}); "
                "choose another --json path or pass --overwrite"
            )
        print(previous["line"] + "  (already computed: " + str(out) + ")")
        return 0

    model, tokenizer, device = _load_model(args, dtype)
    windows = load_windows(
        args.dataset,
        tokenizer,
        args.seq_len,
        split=args.split,
        start=args.start,
        count=count,
        bos=args.bos,
        data_dir_path=args.data_dir,
    )
    kv_fp16 = kv_cache_bytes(model, seq_len=2048, batch_size=1)
    if plan is not None:
        from eigenkv.compress import apply_plan
        from eigenkv.data import windows_overlap

        if windows_overlap(plan.calibration, windows.describe()):
            raise ValueError(
                f"the plan in {args.compressed} was calibrated on windows that overlap the evaluated ones "
                f"({plan.calibration['source']} windows from #{plan.calibration['first_window']}); evaluate other "
                "windows (--start) or calibrate on Brown or on disjoint windows"
            )
        apply_plan(model, plan)
    kv = kv_cache_bytes(model, seq_len=2048, batch_size=1, quant=quant)
    if quant is None:
        result = perplexity(model, windows, batch_size=args.batch_size, progress=not args.quiet)
    else:
        with QuantizedKV(model, quant) as kv_quant:
            result = perplexity(
                model, windows, batch_size=args.batch_size, progress=not args.quiet, make_cache=kv_quant.new_cache
            )
    kv_label = "fp16" if quant is None else quant.label()
    if plan is not None:
        kv_label = f"{plan.config.label()}({plan.ratio:.3f})+{kv_label}"
    line = (
        f"{args.model} {windows.source} windows={result.windows}x{result.seq_len} (from #{windows.first}) "
        f"bos={args.bos} {config['dtype']} kv={kv_label}: "
        f"ppl={result.ppl:.4f} nll={result.nll:.5f} tokens={result.tokens} "
        f"kv@2048={kv.gb:.4f}GB ({kv.fraction_of(kv_fp16):.3f} of fp16) time={result.seconds:.1f}s"
    )
    print(line)
    if out is not None:
        atomic_write_json(
            out,
            {
                "config": config,
                "result": result.to_dict(),
                "windows": windows.describe(),
                "model": describe_model(args.model, args.cache_dir),
                "kv_cache_n2048": kv.to_dict(),
                "kv_fraction_of_fp16": kv.fraction_of(kv_fp16),
                "environment": {**_environment(), "device_used": device},
                "line": line,
            },
        )
    return 0


def _compress(args: argparse.Namespace) -> int:

    from eigenkv.compress import EigenConfig, compress_model
    from eigenkv.data import load_windows
    from eigenkv.models import describe_model, resolve_dtype

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    ratio = args.ratio if args.ratio is not None or args.error_budget is not None else 0.6
    chosen = {name: value for name in ("basis", "allot") if (value := getattr(args, name)) is not None}
    config = EigenConfig.method(
        args.method,
        target_ratio=ratio,
        error_budget=args.error_budget,
        rope_mode=args.rope_mode,
        error_windows=args.error_windows,
        rank_multiple=args.rank_multiple,
        **chosen,
    )
    model, tokenizer, _ = _load_model(args, resolve_dtype(args.dtype))
    windows = load_windows(
        args.calib_dataset,
        tokenizer,
        args.calib_seq_len,
        split=args.calib_split,
        start=args.calib_start,
        count=args.calib_windows,
        data_dir_path=args.data_dir,
    )
    plan = compress_model(model, windows, config, progress=not args.quiet)
    plan.extra.update({"model": describe_model(args.model, args.cache_dir), "environment": _environment()})
    plan.save(out, overwrite=args.overwrite)
    cal = plan.calibration
    print(plan.summary())
    print(
        f"calibration: {cal['source']} {cal['windows']}x{cal['seq_len']} from window #{cal['first_window']} "
        f"({cal['calibration_seconds']:.0f}s); allotment {cal['allotment_seconds']:.0f}s "
        f"({cal['error_evaluations']} error evaluations)"
    )
    print("ranks (key, value) per layer: " + " ".join(f"{k}/{v}" for k, v in plan.ranks))
    print(f"saved {out} (plan.json, bases.safetensors, ranks.png)")
    return 0


def _listed(text: str, kind=str) -> tuple:
    """A comma-separated option (``"4,3,2"``) as a tuple of ``kind``; empty items are dropped."""
    return tuple(kind(x) for x in text.split(",") if x)


def _curve(args: argparse.Namespace) -> int:
    import torch

    from eigenkv.eval.curve import CurveConfig, run_curve

    if args.threads:
        torch.set_num_threads(args.threads)
    config = CurveConfig(
        model=args.model,
        dataset=args.dataset,
        windows=None if args.full else args.windows,
        seq_len=args.seq_len,
        bits=_listed(args.bits, int),
        groups=_listed(args.groups, int),
        axis_k=args.kv_axis_k,
        axis_v=args.kv_axis_v,
        ratios=_listed(args.ratios, float),
        methods=_listed(args.methods),
        components=_listed(args.components),
        rope_mode=args.rope_mode,
        calib_dataset=args.calib_dataset,
        calib_windows=args.calib_windows,
    )
    out = run_curve(config, args.out_root, progress=not args.quiet)
    print((out / "pareto.md").read_text())
    print(f"figure: {out / 'curve.png'} (and .svg); rows: {out / 'points.csv'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import torch

    from eigenkv.eval.planner import PlannerConfig, plan_for_budget

    if args.threads:
        torch.set_num_threads(args.threads)
    config = PlannerConfig(
        model=args.model,
        dataset=args.dataset,
        windows=args.windows,
        seq_len=args.seq_len,
        ratios=_listed(args.ratios, float),
        bits=_listed(args.bits, int),
        groups=_listed(args.groups, int),
        components=_listed(args.components),
        method=args.method,
        calib_dataset=args.calib_dataset,
        calib_windows=args.calib_windows,
        proxy=args.proxy,
        proxy_split=args.proxy_split,
        proxy_windows=args.proxy_windows,
        proxy_seq_len=args.proxy_seq_len,
        min_fill=args.min_fill,
        finalists=args.finalists,
    )
    for budget in args.budget_gb:
        choice = plan_for_budget(config, budget, args.out_root, progress=not args.quiet)
        print(choice.report.with_suffix(".md").read_text())
        chosen = choice.chosen
        print(
            f"chosen for {budget:g} GB: {chosen['label']} ({chosen['kv_gb_n2048']:.5f} GB, "
            f"measured ppl {chosen['ppl']:.3f}); report {choice.report}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity of a model on token windows of a text")
    ppl.add_argument("--model", default="smollm2-135m", help="embedded alias, local folder or hub id")
    ppl.add_argument("--dataset", default="wikitext2", help="wikitext2, brown, or a path to a text file")
    ppl.add_argument("--split", default=None, help="dataset split (wikitext2: test offline; brown: all)")
    ppl.add_argument("--windows", default="16", help="number of windows, or 'all'")
    ppl.add_argument("--start", type=int, default=0, help="index of the first window")
    ppl.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    ppl.add_argument("--bos", default="none", choices=["none", "window", "stream"], help="BOS policy")
    ppl.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ppl.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ppl.add_argument("--json", default=None, help="write the result here (atomically); reruns reuse it")
    ppl.add_argument("--overwrite", action="store_true", help="recompute even if --json already holds the result")
    ppl.add_argument("--cache-dir", default=None, help="eigenkv cache (default $EIGENKV_CACHE_DIR or ~/.cache/eigenkv)")
    ppl.add_argument("--data-dir", default=None, help="offline data folder (default $EIGENKV_DATA_DIR)")
    ppl.add_argument("--quiet", action="store_true", help="no progress bar")
    quant = ppl.add_argument_group("quantized KV cache (off unless --kv-bits is given)")
    quant.add_argument("--kv-bits", type=int, default=None, help="2, 3, 4 or 8")
    quant.add_argument("--kv-group", type=int, default=64, help="group size")
    quant.add_argument("--kv-axis-k", default="channel", choices=["channel", "token"], help="key grouping")
    quant.add_argument("--kv-axis-v", default="token", choices=["channel", "token"], help="value grouping")
    quant.add_argument("--kv-residual", type=int, default=0, help="recent tokens kept in full precision")
    quant.add_argument("--kv-symmetric", action="store_true", help="scale only, no zero point")
    quant.add_argument("--kv-rotate", action="store_true", help="Hadamard-rotate the head dimension first")
    ppl.add_argument("--compressed", default=None, help="apply the Eigen Attention plan saved in this folder")
    ppl.set_defaults(func=_ppl)

    comp = sub.add_parser("compress", help="calibrate Eigen Attention bases and ranks; save the plan")
    comp.add_argument("--model", default="smollm2-135m", help="embedded alias, local folder or hub id")
    comp.add_argument("--out", required=True, help="folder for the plan (plan.json + bases.safetensors)")
    size = comp.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, default=None, help="KV fraction to keep (default 0.6)")
    size.add_argument("--error-budget", type=float, default=None, help="the paper's per-layer output-error rule")
    comp.add_argument(
        "--rope-mode", default="pre", choices=["pre", "post"], help="RoPE models: basis before/after RoPE"
    )
    comp.add_argument(
        "--method",
        default="eigenkv",
        choices=["eigenkv", "paper"],
        help="eigenkv: output-aware bases + Fisher allotment (best measured); paper: PCA bases, uniform ranks",
    )
    comp.add_argument("--basis", default=None, choices=["pca", "output", "output-rope"], help="override the method's")
    comp.add_argument(
        "--allot", default=None, choices=["uniform", "budget", "fisher"], help="override the method's allotment"
    )
    comp.add_argument("--calib-dataset", default="brown", help="brown, wikitext2, or a text file")
    comp.add_argument("--calib-split", default=None)
    comp.add_argument("--calib-windows", type=int, default=16)
    comp.add_argument("--calib-start", type=int, default=0, help="first calibration window")
    comp.add_argument("--calib-seq-len", type=int, default=2048)
    comp.add_argument("--error-windows", type=int, default=1, help="windows kept to measure layer output errors")
    comp.add_argument("--rank-multiple", type=int, default=1, help="round every rank to a multiple of this")
    comp.add_argument("--dtype", default="float32", help="dtype of the model during calibration")
    comp.add_argument("--device", default=None)
    comp.add_argument("--threads", type=int, default=0)
    comp.add_argument("--overwrite", action="store_true", help="replace an existing plan folder")
    comp.add_argument("--cache-dir", default=None)
    comp.add_argument("--data-dir", default=None)
    comp.add_argument("--quiet", action="store_true")
    comp.set_defaults(func=_compress)

    curve = sub.add_parser("curve", help="perplexity vs KV GB: quantization alone vs Eigen Attention + quantization")
    curve.add_argument("--model", default="smollm2-135m")
    curve.add_argument("--dataset", default="wikitext2")
    curve.add_argument("--windows", type=int, default=3, help="evaluated windows from the start (quick run: 3)")
    curve.add_argument("--full", action="store_true", help="evaluate every window of the split")
    curve.add_argument("--seq-len", type=int, default=2048)
    curve.add_argument("--bits", default="8,4,3,2")
    curve.add_argument("--groups", default="128,64,32")
    curve.add_argument("--kv-axis-k", default="channel", choices=["channel", "token"])
    curve.add_argument("--kv-axis-v", default="token", choices=["channel", "token"])
    curve.add_argument("--ratios", default="0.6", help="Eigen Attention KV ratios, e.g. 0.6,0.8")
    curve.add_argument("--rope-mode", default="pre", choices=["pre", "post"])
    curve.add_argument("--methods", default="paper,eigenkv", help="Eigen methods, one curve each")
    curve.add_argument(
        "--components",
        default="hi4x0.25",
        help="component variants before quantizing, one curve each per method: e.g. scale,rot,scale+hi8x0.125 "
        "(adding variants to a finished run extends it)",
    )
    curve.add_argument("--calib-dataset", default="brown")
    curve.add_argument("--calib-windows", type=int, default=16)
    curve.add_argument("--out-root", default="results", help="run folders are created here, named after the settings")
    curve.add_argument("--threads", type=int, default=0)
    curve.add_argument("--quiet", action="store_true")
    curve.set_defaults(func=_curve)

    plan = sub.add_parser("plan", help="the Eigen ratio, bits, group and component options that fit a KV budget")
    plan.add_argument("--budget-gb", type=float, nargs="+", required=True, help="KV GB at n = 2048, batch 1")
    plan.add_argument("--model", default="smollm2-135m")
    plan.add_argument("--dataset", default="wikitext2")
    plan.add_argument("--windows", type=int, default=3, help="evaluated windows (finalists' perplexity)")
    plan.add_argument("--seq-len", type=int, default=2048)
    plan.add_argument("--ratios", default="1,0.8,0.7,0.6,0.5", help="Eigen ratios (1: uncompressed)")
    plan.add_argument("--bits", default="8,4,3,2")
    plan.add_argument("--groups", default="128,64,32")
    plan.add_argument("--components", default="plain,hi4x0.25", help="component variants, e.g. plain,hi4x0.25")
    plan.add_argument("--method", default="eigenkv", choices=["eigenkv", "paper"])
    plan.add_argument("--calib-dataset", default="brown")
    plan.add_argument("--calib-windows", type=int, default=16)
    plan.add_argument(
        "--proxy",
        default="evaluated",
        choices=["evaluated", "calibration"],
        help="held-out text the proxy loss is measured on: the evaluated corpus after the evaluated windows "
        "(or --proxy-split of it), or the calibration corpus after the calibration windows",
    )
    plan.add_argument("--proxy-split", default=None, help="a split of the evaluated corpus for the proxy")
    plan.add_argument("--proxy-windows", type=int, default=2, help="held-out windows the proxy is measured on")
    plan.add_argument("--proxy-seq-len", type=int, default=1024)
    plan.add_argument("--min-fill", type=float, default=0.6, help="candidates use at least this share of the budget")
    plan.add_argument("--finalists", type=int, default=3, help="best-by-proxy settings measured on the evaluated text")
    plan.add_argument("--out-root", default="results")
    plan.add_argument("--threads", type=int, default=0)
    plan.add_argument("--quiet", action="store_true")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        print(f"eigenkv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
