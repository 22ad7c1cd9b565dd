"""Command line: ``eigenkv ppl | compress | generate | tasks | finetune | curve | plan`` (also ``python -m eigenkv``).

Every subcommand takes the same model and environment options (``--model
--device --dtype --data-dir --cache-dir --bos --threads --quiet``); ``ppl``,
``compress``, ``generate``, ``tasks`` and ``finetune`` take a recipe (``--recipe FILE`` or the flags that build one,
mirroring :class:`eigenkv.Recipe`). A user's mistake exits with status 2 and a
one-line message naming the fix, before any long work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from eigenkv import __version__
from eigenkv.io import atomic_write_json

DTYPES = ("float32", "float16", "bfloat16")


class UserError(Exception):
    """A mistake in the command line or its inputs (exit status 2)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def listed(kind):
    """Argument type of a comma-separated option (``"4,3,2"``) as a tuple of ``kind``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


# --- shared options ---------------------------------------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model and environment")
    group.add_argument("--model", default="smollm2-135m", help="embedded alias, local folder or hub id")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    group.add_argument(
        "--device-map",
        default=None,
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="spread the layers over the GPUs, the CPU and --offload-folder (accelerate) instead of --device",
    )
    group.add_argument("--offload-folder", default=None, help="where --device-map offloads weights to disk")
    group.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype")
    group.add_argument("--data-dir", default=None, help="offline text folder (default $EIGENKV_DATA_DIR)")
    group.add_argument(
        "--cache-dir", default=None, help="eigenkv cache (default $EIGENKV_CACHE_DIR or ~/.cache/eigenkv)"
    )
    group.add_argument("--bos", default="none", choices=["none", "window", "stream"], help="BOS policy of windows")
    group.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    return parent


def recipe_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("recipe (or --recipe FILE)")
    group.add_argument("--recipe", default=None, help="a recipe JSON file (Recipe.save); excludes the flags below")
    group.add_argument("--ratio", type=float, default=None, help="Eigen Attention: KV fraction to keep, e.g. 0.6")
    group.add_argument("--error-budget", type=float, default=None, help="Eigen Attention by the paper's error rule")
    group.add_argument("--method", default="eigenkv", choices=["eigenkv", "paper"], help="Eigen method preset")
    group.add_argument("--basis", default=None, choices=["pca", "output", "output-rope"], help="override the method's")
    group.add_argument("--allot", default=None, choices=["uniform", "budget", "fisher"], help="override the method's")
    group.add_argument("--rope-mode", default="pre", choices=["pre", "post"], help="RoPE models: basis before/after")
    group.add_argument("--rank-multiple", type=positive_int, default=1, help="round every rank to a multiple")
    group.add_argument("--error-windows", type=positive_int, default=1, help="windows kept to measure output errors")
    group.add_argument("--components", default=None, help="component options: scale, rot, hi<bits>[x<fraction>]")
    group.add_argument("--kv-bits", type=int, default=None, help="quantize the cache: 2, 3, 4 or 8 bits")
    group.add_argument("--kv-group", type=positive_int, default=64, help="group size")
    group.add_argument("--kv-axis-k", default="channel", choices=["channel", "token"], help="key grouping")
    group.add_argument("--kv-axis-v", default="token", choices=["channel", "token"], help="value grouping")
    group.add_argument("--kv-residual", type=int, default=0, help="recent tokens kept in full precision")
    group.add_argument("--kv-symmetric", action="store_true", help="scale only, no zero point")
    group.add_argument("--kv-rotate", action="store_true", help="Hadamard-rotate the head dimension first")
    group.add_argument("--weights", default=None, choices=["int8", "nf4"], help="bitsandbytes weight quantization")
    calib = parent.add_argument_group("calibration text (when the recipe has Eigen Attention)")
    calib.add_argument("--calib-dataset", default="brown", help="brown, wikitext2, or a text file")
    calib.add_argument("--calib-windows", type=positive_int, default=16)
    calib.add_argument("--calib-start", type=int, default=0, help="first calibration window")
    calib.add_argument("--calib-seq-len", type=positive_int, default=2048)
    return parent


def recipe_from(args: argparse.Namespace, default_ratio: float | None = None):
    """The :class:`~eigenkv.Recipe` named by ``--recipe`` or built from the recipe flags."""
    from eigenkv.compress.components import ComponentQuantConfig
    from eigenkv.compress.config import EigenConfig
    from eigenkv.quant.config import KVQuantConfig
    from eigenkv.recipe import Recipe

    flags = ("ratio", "error_budget", "basis", "allot", "components", "kv_bits", "weights")
    if args.recipe is not None:
        given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
        if given:
            raise UserError(f"--recipe already says everything; drop {', '.join(given)}")
        return Recipe.load(args.recipe)
    ratio = args.ratio
    if ratio is None and args.error_budget is None:
        ratio = default_ratio
    lowrank = None
    if ratio is not None or args.error_budget is not None:
        chosen = {name: value for name in ("basis", "allot") if (value := getattr(args, name)) is not None}
        lowrank = EigenConfig.method(
            args.method,
            target_ratio=ratio,
            error_budget=args.error_budget,
            rope_mode=args.rope_mode,
            error_windows=args.error_windows,
            rank_multiple=args.rank_multiple,
            **chosen,
        )
    kv = None
    if args.kv_bits is not None:
        kv = KVQuantConfig(
            bits=args.kv_bits,
            group_size=args.kv_group,
            axis_k=args.kv_axis_k,
            axis_v=args.kv_axis_v,
            residual=args.kv_residual,
            symmetric=args.kv_symmetric,
            rotate=args.kv_rotate,
        )
    components = None if args.components is None else ComponentQuantConfig.parse(args.components)
    return Recipe(lowrank=lowrank, components=components, kv=kv, weights=args.weights)


def recipe_unless_compressed(args: argparse.Namespace, default_ratio: float | None = None):
    """The recipe of the flags, or None with ``--compressed`` (a saved model holds its own; flags refused)."""
    if not args.compressed:
        return recipe_from(args, default_ratio)
    if args.recipe is not None or args.kv_bits is not None or args.ratio is not None:
        raise UserError("--compressed already holds a recipe; drop the recipe flags")
    return None


def resolve_device(name: str | None) -> str:
    """``--device`` checked against what this machine has (default: cuda when available)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: eigenkv runs on cpu or cuda")
    return name


def check_writable(path: Path, kind: str = "file") -> None:
    """Refuse an output path that cannot be written, before any long work."""
    parent = path if kind == "folder" else path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".eigenkv-write-test-"):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write {path}: {existing} is not writable ({err.strerror}); choose another path"
        ) from None


def load(args: argparse.Namespace):
    """``(model, tokenizer, device)`` for ``--model --dtype --device --cache-dir``, with finite weights."""
    import torch

    from eigenkv.models import load_model

    if args.device_map is not None:
        model, tokenizer = load_model(
            args.model, dtype=args.dtype, cache=args.cache_dir, device_map=args.device_map,
            offload_folder=args.offload_folder,
        )  # fmt: skip
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, cache=args.cache_dir)
    for name, parameter in model.named_parameters():
        if parameter.device.type != "meta" and not torch.isfinite(parameter).all():  # meta: offloaded
            raise UserError(f"the weights of {args.model} hold NaN or Inf ({name}); the checkpoint is broken")
    return model, tokenizer


def windows_of(args: argparse.Namespace, tokenizer, dataset, seq_len, count, start=0, split=None):
    from eigenkv.data import load_windows

    return load_windows(
        dataset, tokenizer, seq_len, split=split, start=start, count=count, bos=args.bos, data_dir_path=args.data_dir
    )


def calibration_windows(args: argparse.Namespace, tokenizer):
    return windows_of(args, tokenizer, args.calib_dataset, args.calib_seq_len, args.calib_windows, args.calib_start)


# --- subcommands ------------------------------------------------------------------------------------------


def run_ppl(args: argparse.Namespace) -> int:
    from eigenkv.eval.perplexity import perplexity
    from eigenkv.eval.runs import environment
    from eigenkv.memory import kv_cache_bytes
    from eigenkv.models import describe_model

    count = None if args.windows == "all" else (int(args.windows) if args.windows.isdigit() else 0)
    if count is not None and count < 1:
        raise UserError(f"--windows must be a positive integer or 'all'; got {args.windows!r}")
    recipe = recipe_unless_compressed(args)
    config = {
        "command": "ppl",
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "windows": args.windows,
        "start": args.start,
        "seq_len": args.seq_len,
        "bos": args.bos,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "recipe": None if recipe is None else recipe.to_dict(),
        "compressed": None if args.compressed is None else str(Path(args.compressed).resolve()),
    }
    out = Path(args.json) if args.json else None
    if out is not None and already_computed(out, config, args.overwrite):
        return 0

    model, tokenizer = load(args)
    windows = windows_of(args, tokenizer, args.dataset, args.seq_len, count, args.start, args.split)
    kv_fp16 = kv_cache_bytes(model, seq_len=2048)
    compressed = compressed_for(args, recipe, model, tokenizer, windows)
    result = perplexity(compressed, windows, batch_size=args.batch_size, progress=not args.quiet)
    kv = compressed.kv_bytes(seq_len=2048)
    line = (
        f"{args.model} {windows.source} windows={result.windows}x{result.seq_len} (from #{windows.first}) "
        f"bos={args.bos} {args.dtype} recipe={compressed.recipe.label()}: "
        f"ppl={result.ppl:.4f} nll={result.nll:.5f} tokens={result.tokens} "
        f"kv@2048={kv.gb:.4f}GB ({kv.fraction_of(kv_fp16):.3f} of fp16) time={result.seconds:.1f}s"
    )
    print(line)
    if out is not None:
        atomic_write_json(
            out,
            {
                "config": config,
                "recipe": compressed.recipe.to_dict(),
                "result": result.to_dict(),
                "windows": windows.describe(),
                "model": describe_model(args.model, args.cache_dir),
                "kv_cache_n2048": kv.to_dict(),
                "kv_fraction_of_fp16": kv.fraction_of(kv_fp16),
                "environment": environment(args.device),
                "line": line,
            },
        )
    return 0


def already_computed(out: Path, config: dict, overwrite: bool) -> bool:
    """Print and reuse the result ``out`` holds for ``config``; refuse one for another config; check writability."""
    if out.exists() and not overwrite:
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{out} exists but is not a result file ({err}); delete it or pass --overwrite") from None
        if previous.get("config") != config:
            raise UserError(f"{out} holds a result for another configuration; choose another output or --overwrite")
        print(previous["line"] + "  (already computed: " + str(out) + ")")
        return True
    check_writable(out)
    return False


def compressed_for(args: argparse.Namespace, recipe, model, tokenizer, windows):
    """``model`` with ``recipe`` applied (calibrated on windows disjoint from ``windows``) or ``--compressed``.

    ``windows`` None (generation: no evaluated text) skips the overlap checks."""
    from eigenkv.data import windows_overlap
    from eigenkv.pipeline import apply_recipe, load_compressed

    if args.compressed:
        compressed = load_compressed(model, args.compressed)
        if (
            windows is not None
            and compressed.plan is not None
            and windows_overlap(compressed.plan.calibration, windows.describe())
        ):
            raise UserError(
                f"the plan in {args.compressed} was calibrated on windows that overlap the evaluated ones; "
                "evaluate other windows (--start)"
            )
        return compressed
    calibration = None
    if recipe.lowrank is not None:
        calibration = calibration_windows(args, tokenizer)
        if windows is not None and not calibration.disjoint_from(windows):
            raise UserError("the calibration windows overlap the evaluated ones: use --calib-start or --start")
    return apply_recipe(model, recipe, calibration, progress=not args.quiet)


def run_compress(args: argparse.Namespace) -> int:
    from eigenkv.pipeline import apply_recipe

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")
    check_writable(out, "folder")
    recipe = recipe_from(args, default_ratio=0.6)
    if recipe.weights is not None:
        raise UserError(
            "a saved model keeps float weights: drop --weights here and pass it when loading "
            "(from_pretrained(path, weights=...))"
        )
    model, tokenizer = load(args)
    calibration = None
    if recipe.lowrank is not None:
        calibration = calibration_windows(args, tokenizer)
    compressed = apply_recipe(model, recipe, calibration, progress=not args.quiet)
    compressed.save_pretrained(out, tokenizer=tokenizer, overwrite=args.overwrite)
    if compressed.plan is not None:
        print(compressed.plan.summary())
        print("ranks (key, value) per layer: " + " ".join(f"{k}/{v}" for k, v in compressed.plan.ranks))
    kv = compressed.kv_bytes(seq_len=2048)
    print(f"recipe {recipe.label()}: KV cache {kv.gb:.5f} GB at n = 2048")
    print(f"saved {out} (eigenkv.json, plan/, model.safetensors): eigenkv.from_pretrained({str(out)!r})")
    return 0


def prompt_text(args: argparse.Namespace) -> str:
    """The prompt of ``--prompt``, or of ``--prompt-file`` (its trailing line breaks dropped); never empty."""
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file {path} is not UTF-8 text") from None
    else:
        text = args.prompt
    if not text.strip():
        raise UserError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


def sampling_options(args: argparse.Namespace) -> dict:
    """``model.generate`` keywords of the decoding strategy: greedy unless ``--do-sample``."""
    if not args.do_sample:
        flags = (("--temperature", args.temperature), ("--top-p", args.top_p))
        given = [flag for flag, value in flags if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} only apply when sampling; add --do-sample")
        return {"do_sample": False}
    temperature = 1.0 if args.temperature is None else args.temperature
    top_p = 1.0 if args.top_p is None else args.top_p
    if not temperature > 0:
        raise UserError(f"--temperature must be positive; got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1]; got {top_p}")
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


def run_generate(args: argparse.Namespace) -> int:
    """Prompt in, text out: generate through the recipe's cache, then print the new text and one stats line.

    The stats line counts prompt tokens ``P`` and new tokens ``N`` (per sequence), the wall time of the
    whole ``generate`` call (prefill and decode), new tokens per second over all ``B`` sequences
    (``B * N / wall``), the bytes the cache holds at the end (``nbytes()`` of a quantized cache, the key
    and value tensors of a plain one), and the bytes an fp16 cache of the original model would take for
    the same tokens.

    ``--cuda-graph``: greedy decoding through :meth:`~eigenkv.pipeline.CompressedModel.generate_static`, the
    decode step captured once in a CUDA graph and replayed (eager steps on CPU; stderr says which).
    """
    import time

    import torch

    from eigenkv.memory import cache_held_bytes, kv_cache_bytes

    prompt = prompt_text(args)
    options = sampling_options(args)
    if args.cuda_graph and (args.do_sample or args.num_beams > 1):
        raise UserError("--cuda-graph decodes greedily; drop --do-sample and --num-beams")
    recipe = recipe_unless_compressed(args)
    model, tokenizer = load(args)
    compressed = compressed_for(args, recipe, model, tokenizer, None)

    inputs = tokenizer([prompt] * args.batch_size, return_tensors="pt").to(model.device)
    prompt_tokens = inputs["input_ids"].shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if args.cuda_graph:
        if compressed.cache_config is None:
            raise UserError("--cuda-graph decodes through a quantized cache; add --kv-bits (or a recipe with it)")
        out = compressed.generate_static(
            inputs["input_ids"], args.max_new_tokens, attention_mask=inputs["attention_mask"],
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        )  # fmt: skip
        cache = out.cache
        how = "replays of one captured CUDA graph" if out.graphed else f"eager ({out.reason})"
        print(f"decode steps: {how}", file=sys.stderr)
    else:
        # the pipeline's own generate (its quantized cache, or the model's own without one); the returned dict
        # hands back the cache object, whose bytes are counted below
        out = compressed.generate(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams, pad_token_id=pad, return_dict_in_generate=True, **options,
        )  # fmt: skip
        cache = out.past_key_values
    sync()
    wall = time.perf_counter() - start

    texts = tokenizer.batch_decode(out.sequences[:, prompt_tokens:], skip_special_tokens=True)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sequence {i + 1} of {len(texts)} ---")
        print(text)
    new_tokens = out.sequences.shape[1] - prompt_tokens
    held = cache.nbytes() if callable(getattr(cache, "nbytes", None)) else {"keys+values": cache_held_bytes(cache)}
    total = sum(held.values())
    rows = args.batch_size * args.num_beams
    fp16 = kv_cache_bytes(model.config, seq_len=cache.get_seq_length(), batch_size=rows).total  # the config: dense
    parts = " ".join(f"{name}={n}" for name, n in held.items())
    print(
        f"prompt_tokens={prompt_tokens} new_tokens={new_tokens} batch={args.batch_size} "
        f"time={wall:.3f}s (prefill+decode) tokens/s={args.batch_size * new_tokens / wall:.1f} "
        f"kv_cache_bytes={total} ({parts}) fp16_bytes={fp16} ({total / fp16:.3f} of fp16) "
        f"recipe={compressed.recipe.label()}"
    )
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    try:
        from eigenkv.eval.tasks import TaskConfig, accuracy_rows, evaluate_tasks, save_task_results
    except ImportError as err:
        raise UserError(str(err)) from None
    from eigenkv.eval.runs import environment
    from eigenkv.eval.text_tasks import TASKS as TEXT_TASKS
    from eigenkv.eval.text_tasks import write_text_tasks
    from eigenkv.memory import kv_cache_bytes
    from eigenkv.models import cache_dir, describe_model

    recipe = recipe_unless_compressed(args)
    include = args.include_path
    if include is None and set(args.tasks) & set(TEXT_TASKS):
        # eigenkv's offline tasks: written once into the eigenkv cache (deterministic for the text and count)
        include = cache_dir(args.cache_dir) / "tasks" / f"wikitext2-{args.text_documents}"
        write_text_tasks(include, documents=args.text_documents, data_dir_path=args.data_dir)
    config = TaskConfig(
        tasks=args.tasks,
        include_path=None if include is None else str(include),
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        log_samples=args.log_samples,
    )
    run = {
        "command": "tasks",
        "model": args.model,
        "dtype": args.dtype,
        "recipe": None if recipe is None else recipe.to_dict(),
        "compressed": None if args.compressed is None else str(Path(args.compressed).resolve()),
        "task_config": config.to_dict(),
    }
    name = f"{Path(args.model).name}_{'compressed' if recipe is None else recipe.label()}_{'+'.join(config.tasks)}"
    out = Path(args.out) if args.out else Path("results") / "tasks" / name.replace("/", "-")
    record = out / "run.json"
    if already_computed(record, run, args.overwrite):
        return 0

    model, tokenizer = load(args)
    kv_fp16 = kv_cache_bytes(model, seq_len=2048)
    compressed = compressed_for(args, recipe, model, tokenizer, None)
    results = evaluate_tasks(compressed, tokenizer, config, progress=not args.quiet)
    kv = compressed.kv_bytes(seq_len=2048)
    rows = accuracy_rows(results)
    lines = [
        f"{args.model} recipe={compressed.recipe.label()} kv@2048={kv.gb:.4f}GB ({kv.fraction_of(kv_fp16):.3f} of fp16)"
    ]
    for row in rows:
        stderr = "" if row["stderr"] is None else f" +- {row['stderr']:.4f}"
        lines.append(f"  {row['task']:<24} {row['metric']:<12} {row['value']:.4f}{stderr}")
    table = "\n".join(lines)
    save_task_results(results, out)
    atomic_write_json(
        record,
        {
            "config": run,
            "rows": rows,
            "line": table,
            "model": describe_model(args.model, args.cache_dir),
            "kv_cache_n2048": kv.to_dict(),
            "kv_fraction_of_fp16": kv.fraction_of(kv_fp16),
            "environment": environment(args.device),
        },
    )
    print(table)
    print(f"saved {out} (results.json in lm-eval's format, recipe.json, run.json)")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    try:
        from eigenkv.finetune import LoraRecovery, save_adapters
    except ImportError as err:
        raise UserError(str(err)) from None
    from eigenkv.eval.perplexity import perplexity
    from eigenkv.eval.recovery import recovery_curve, write_recovery

    recipe = recipe_unless_compressed(args, default_ratio=0.6)
    if args.out is None and not args.compressed:
        raise UserError("--out is needed: the compressed model and its adapters are saved there")
    out = Path(args.out or args.compressed)
    if not args.compressed and out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")
    if args.compressed and (out / "adapters").exists() and not args.overwrite:
        raise UserError(f"{out} already holds adapters; pass --overwrite to replace them")
    config = LoraRecovery(
        steps=args.steps,
        rank=args.rank,
        alpha=args.alpha,
        targets=args.targets,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        warmup=args.warmup,
        eval_every=args.eval_every,
    )
    check_writable(out, "folder")

    model, tokenizer = load(args)
    held_out = windows_of(args, tokenizer, args.eval_dataset, args.eval_seq_len, args.eval_windows, args.eval_start)
    # training text: the calibration corpus, after the calibration windows (never the same tokens twice)
    start = args.train_start
    if start is None:
        start = -(-(args.calib_start + args.calib_windows) * args.calib_seq_len // args.train_seq_len)
    count = args.train_windows or args.steps * args.batch_size
    train = windows_of(args, tokenizer, args.calib_dataset, args.train_seq_len, count, start)
    if not train.disjoint_from(held_out):
        raise UserError("the training windows overlap the held-out ones: use another --eval-dataset or --train-start")
    fp16_ppl = perplexity(model, held_out, progress=False).ppl
    compressed = compressed_for(args, recipe, model, tokenizer, held_out)
    if not args.compressed:
        compressed.save_pretrained(out, tokenizer=tokenizer, overwrite=args.overwrite)
    recovery, rows = recovery_curve(compressed, train, held_out, config, progress=not args.quiet)
    save_adapters(recovery, out, overwrite=args.overwrite)
    label = compressed.recipe.label()
    write_recovery(rows, out, f"{args.model} {label}\nLoRA {config.label()}", {"uncompressed": fp16_ppl})
    print(
        f"{args.model} recipe={label} {config.label()}: held-out {held_out.source} {len(held_out)}x{held_out.seq_len}"
    )
    print(f"  uncompressed ppl {fp16_ppl:.4f}")
    for row in rows:
        plain = "" if row["ppl_unquantized"] is None else f" (unquantized cache {row['ppl_unquantized']:.4f})"
        print(f"  step {row['step']:>5}: ppl {row['ppl']:.4f}{plain}")
    print(f"  {recovery.trainable_parameters} adapter parameters, {recovery.seconds:.0f} s")
    print(f"saved {out} (adapters/, finetune.json, recovery.csv, recovery.png): eigenkv.finetune.load_adapters")
    return 0


def run_curve(args: argparse.Namespace) -> int:
    from eigenkv.eval.curve import CurveConfig, run_curve

    settings = dict(
        model=args.model,
        dataset=args.dataset,
        windows=None if args.windows == "all" else _count(args.windows),
        seq_len=args.seq_len,
        axis_k=args.kv_axis_k,
        axis_v=args.kv_axis_v,
        rope_mode=args.rope_mode,
        calib_dataset=args.calib_dataset,
        calib_windows=args.calib_windows,
        dtype=args.dtype,
        bos=args.bos,
    )
    for name in ("bits", "groups", "ratios", "methods", "components", "budgets"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["quant_rotate"] = args.quant_rotate
    config = CurveConfig.full(**settings) if args.full else CurveConfig(**settings)
    check_writable(Path(args.out_root), "folder")
    out = run_curve(
        config, args.out_root, progress=not args.quiet, plans=shared_plans(args), device=args.device,
        cache_dir=args.cache_dir, data_dir=args.data_dir,
    )  # fmt: skip
    print((out / "pareto.md").read_text())
    print(f"figure: {out / 'curve.png'} (and .svg); rows: {out / 'points.csv'}")
    return 0


def shared_plans(args: argparse.Namespace) -> Path:
    """``--plans``, else the eigenkv cache's plan folder (plans are checked before reuse)."""
    from eigenkv.models import cache_dir

    return Path(args.plans) if args.plans else cache_dir(args.cache_dir) / "plans"


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--windows must be a positive integer or 'all'; got {text!r}")
    return int(text)


def run_plan(args: argparse.Namespace) -> int:
    from eigenkv.eval.planner import PlannerConfig, plan_for_budget

    config = PlannerConfig(
        model=args.model,
        dataset=args.dataset,
        windows=args.windows,
        seq_len=args.seq_len,
        allot=not args.no_allot,
        ratios=args.ratios,
        bits=args.bits,
        groups=args.groups,
        components=args.components,
        method=args.method,
        calib_dataset=args.calib_dataset,
        calib_windows=args.calib_windows,
        proxy=args.proxy,
        proxy_split=args.proxy_split,
        proxy_windows=args.proxy_windows,
        proxy_seq_len=args.proxy_seq_len,
        min_fill=args.min_fill,
        finalists=args.finalists,
        dtype=args.dtype,
        bos=args.bos,
    )
    for budget in args.budget_gb:
        if not budget > 0:
            raise UserError(f"--budget-gb must be positive; got {budget}")
    check_writable(Path(args.out_root), "folder")
    for budget in args.budget_gb:
        choice = plan_for_budget(
            config, budget, args.out_root, progress=not args.quiet, plans=shared_plans(args), device=args.device,
            cache_dir=args.cache_dir, data_dir=args.data_dir,
        )  # fmt: skip
        print(choice.report.with_suffix(".md").read_text())
        chosen = choice.chosen
        print(
            f"chosen for {budget:g} GB: {chosen['label']} ({chosen['kv_gb_n2048']:.5f} GB, measured ppl "
            f"{chosen['ppl']:.3f}); recipe {choice.report.parent / f'budget_{budget:g}.recipe.json'}"
        )
    return 0


# --- parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenkv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"eigenkv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common, recipe = common_options(), recipe_options()

    ppl = sub.add_parser("ppl", parents=[common, recipe], help="perplexity of a model (with a recipe) on a text")
    ppl.add_argument("--dataset", default="wikitext2", help="wikitext2, brown, or a path to a text file")
    ppl.add_argument("--split", default=None, help="dataset split (wikitext2: test offline; brown: all)")
    ppl.add_argument("--windows", default="16", help="number of windows, or 'all'")
    ppl.add_argument("--start", type=int, default=0, help="index of the first window")
    ppl.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per window")
    ppl.add_argument("--batch-size", type=positive_int, default=1)
    ppl.add_argument("--compressed", default=None, help="a folder saved by `eigenkv compress` (instead of a recipe)")
    ppl.add_argument("--json", default=None, help="write the result here (atomically); reruns reuse it")
    ppl.add_argument("--overwrite", action="store_true", help="recompute even if --json already holds the result")
    ppl.set_defaults(func=run_ppl)

    comp = sub.add_parser("compress", parents=[common, recipe], help="apply a recipe and save the compressed model")
    comp.add_argument("--out", required=True, help="folder for the compressed model (save_pretrained)")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    comp.set_defaults(func=run_compress)

    gen = sub.add_parser("generate", parents=[common, recipe], help="generate text from a prompt (with a recipe)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", default=None, help="the prompt text")
    source.add_argument("--prompt-file", default=None, help="a UTF-8 file holding the prompt")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per sequence")
    gen.add_argument("--batch-size", type=positive_int, default=1, help="sequences (the prompt repeated)")
    gen.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, default=0, help="torch seed, for sampling")
    gen.add_argument("--num-beams", type=positive_int, default=1, help="beam search (1: none)")
    gen.add_argument("--compressed", default=None, help="a folder saved by `eigenkv compress` (instead of a recipe)")
    gen.add_argument(
        "--cuda-graph",
        action="store_true",
        help="greedy; the decode step captured once as a CUDA graph (needs --kv-bits)",
    )
    gen.set_defaults(func=run_generate)

    tasks = sub.add_parser(
        "tasks", parents=[common, recipe], help="lm-evaluation-harness tasks on a model (with a recipe)"
    )
    tasks.add_argument(
        "--tasks",
        type=listed(str),
        required=True,
        help="lm-eval task names, e.g. hellaswag,arc_easy (hub data), wikitext2_lastword,wikitext2_ending "
        "(eigenkv's offline tasks), or tasks of --include-path",
    )
    tasks.add_argument("--include-path", default=None, help="a folder of local task YAML files")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    tasks.add_argument("--limit", type=positive_int, default=None, help="documents per task (default: all)")
    tasks.add_argument("--batch-size", type=positive_int, default=1)
    tasks.add_argument("--seed", type=int, default=0, help="few-shot sampling and torch/numpy seed")
    tasks.add_argument("--log-samples", action="store_true", help="also save every document's scores")
    tasks.add_argument(
        "--text-documents", type=positive_int, default=500, help="documents of eigenkv's offline Wikitext-2 tasks"
    )
    tasks.add_argument("--compressed", default=None, help="a folder saved by `eigenkv compress` (instead of a recipe)")
    tasks.add_argument("--out", default=None, help="run folder (default results/tasks/<model>_<recipe>_<tasks>)")
    tasks.add_argument("--overwrite", action="store_true", help="rerun even if --out holds these results")
    tasks.set_defaults(func=run_tasks)

    tune = sub.add_parser(
        "finetune", parents=[common, recipe], help="LoRA recovery of a compressed model; curve of held-out ppl"
    )
    tune.add_argument("--steps", type=positive_int, default=200, help="optimizer steps")
    tune.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    tune.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    tune.add_argument("--targets", default="attention", choices=["attention", "attention+mlp"])
    tune.add_argument("--lr", type=float, default=2e-4)
    tune.add_argument("--batch-size", type=positive_int, default=1, help="training windows per step")
    tune.add_argument("--warmup", type=int, default=0, help="learning-rate warmup steps")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--train-seq-len", type=positive_int, default=512, help="tokens per training window")
    tune.add_argument("--train-windows", type=positive_int, default=None, help="default: steps x batch size")
    tune.add_argument(
        "--train-start", type=int, default=None, help="first training window (default: after the calibration text)"
    )
    tune.add_argument("--eval-every", type=int, default=50, help="held-out perplexity every this many steps")
    tune.add_argument("--eval-dataset", default="wikitext2", help="held-out text of the curve")
    tune.add_argument("--eval-windows", type=positive_int, default=3)
    tune.add_argument("--eval-seq-len", type=positive_int, default=2048)
    tune.add_argument("--eval-start", type=int, default=0)
    tune.add_argument("--compressed", default=None, help="a folder saved by `eigenkv compress`: adapters go there")
    tune.add_argument("--out", default=None, help="folder for the compressed model and its adapters")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing folder or adapters")
    tune.set_defaults(func=run_finetune)

    curve = sub.add_parser("curve", parents=[common], help="perplexity vs KV GB: quantization alone vs low rank + it")
    curve.add_argument("--dataset", default="wikitext2")
    curve.add_argument("--windows", default="3", help="evaluated windows from the start, or 'all'")
    curve.add_argument("--full", action="store_true", help="the complete grid: bits 8,4,3,2 x groups 128,64,32")
    curve.add_argument("--seq-len", type=positive_int, default=2048)
    curve.add_argument("--bits", type=listed(int), default=None, help="e.g. 4,3,2 (default 4,3,2; --full 8,4,3,2)")
    curve.add_argument("--groups", type=listed(int), default=None, help="e.g. 64,32 (default 32; --full 128,64,32)")
    curve.add_argument("--kv-axis-k", default="channel", choices=["channel", "token"])
    curve.add_argument("--kv-axis-v", default="token", choices=["channel", "token"])
    curve.add_argument("--ratios", type=listed(float), default=None, help="Eigen KV ratios, e.g. 0.6,0.8")
    curve.add_argument("--rope-mode", default="pre", choices=["pre", "post"])
    curve.add_argument("--methods", type=listed(str), default=None, help="Eigen methods (default paper,eigenkv)")
    curve.add_argument("--components", type=listed(str), default=None, help="component variants, e.g. hi4x0.25,scale")
    curve.add_argument("--quant-rotate", action="store_true", help="also quantization alone with Hadamard rotation")
    curve.add_argument(
        "--budgets", type=listed(float), default=None, help="byte allotment's curve: fractions of fp16, e.g. 0.15,0.2"
    )
    curve.add_argument("--calib-dataset", default="brown")
    curve.add_argument("--calib-windows", type=positive_int, default=16)
    curve.add_argument("--plans", default=None, help="plans shared between runs (default: the eigenkv cache's)")
    curve.add_argument("--out-root", default="results", help="run folders are created here, named after the settings")
    curve.set_defaults(func=run_curve)

    plan = sub.add_parser("plan", parents=[common], help="the recipe with the best perplexity within a KV budget")
    plan.add_argument("--budget-gb", type=float, nargs="+", required=True, help="KV GB at n = 2048, batch 1")
    plan.add_argument("--dataset", default="wikitext2")
    plan.add_argument("--windows", type=positive_int, default=3, help="evaluated windows (finalists' perplexity)")
    plan.add_argument("--seq-len", type=positive_int, default=2048)
    plan.add_argument("--no-allot", action="store_true", help="uniform candidates only (no byte allotment)")
    plan.add_argument("--ratios", type=listed(float), default=(1.0,), help="uniform candidates' Eigen ratios (1: none)")
    plan.add_argument("--bits", type=listed(int), default=(8, 4, 3, 2))
    plan.add_argument("--groups", type=listed(int), default=(128, 64, 32))
    plan.add_argument("--components", type=listed(str), default=("plain",), help="e.g. plain,hi4x0.25")
    plan.add_argument("--method", default="eigenkv", choices=["eigenkv", "paper"])
    plan.add_argument("--calib-dataset", default="brown")
    plan.add_argument("--calib-windows", type=positive_int, default=16)
    plan.add_argument(
        "--proxy",
        default="evaluated",
        choices=["evaluated", "calibration"],
        help="held-out text of the proxy loss: the evaluated corpus after the evaluated windows (or --proxy-split "
        "of it), or the calibration corpus after the calibration windows",
    )
    plan.add_argument("--proxy-split", default=None, help="a split of the evaluated corpus for the proxy")
    plan.add_argument("--proxy-windows", type=positive_int, default=2, help="held-out windows of the proxy")
    plan.add_argument("--proxy-seq-len", type=positive_int, default=1024)
    plan.add_argument("--min-fill", type=float, default=0.6, help="candidates use at least this share of the budget")
    plan.add_argument("--finalists", type=positive_int, default=3, help="best-by-proxy settings measured")
    plan.add_argument("--plans", default=None, help="plans shared between runs (default: the eigenkv cache's)")
    plan.add_argument("--out-root", default="results")
    plan.set_defaults(func=run_plan)
    return parser


# Exceptions that describe a user's mistake (bad value, missing file, refused artifact): no traceback.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if getattr(args, "device_map", None) is not None and args.device is not None:
            raise UserError("--device and --device-map both place the model; pass one of them")
        args.device = resolve_device(args.device)
        return args.func(args)
    except USER_ERRORS as err:
        print(f"eigenkv {args.command}: error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:
        print(f"eigenkv {args.command}: error: {err.filename or err}: permission denied", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eigenkv {args.command}: interrupted (finished records are kept; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
