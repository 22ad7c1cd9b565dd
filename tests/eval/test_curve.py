"""A tiny-model Figure-3 sweep end to end: rows, plot, table, resumption, and honest KV sizes."""

import json

import pytest
import torch
from transformers import DynamicCache

from eigenkv.compress import EigenPlan, apply_plan
from eigenkv.compress.components import ComponentQuantConfig, prepare_components
from eigenkv.data import load_windows
from eigenkv.eval.curve import CurveConfig, pareto_table, run_curve
from eigenkv.memory import cache_held_bytes
from eigenkv.models import load_model
from eigenkv.quant import KVQuantConfig, QuantizedKV
from eigenkv.recipe import Recipe

PLANS = {"paper-eigen0.5": "eigen0.5-pre-uniform", "eigenkv-eigen0.5": "eigen0.5-pre-output-fisher"}


@pytest.fixture
def texts(tmp_path):
    evaluated = tmp_path / "eval.txt"
    evaluated.write_text("It was the best of times, it was the worst of times.\n" * 24)
    calib = tmp_path / "calib.txt"
    calib.write_text("Call me Ishmael. Some years ago, never mind how long precisely.\n" * 12)
    return evaluated, calib


def test_tiny_sweep_writes_rows_plot_and_table_and_resumes(model_dir, texts, tmp_path):  # noqa: F811
    evaluated, calib = texts
    config = CurveConfig(
        model=str(model_dir),
        dataset=str(evaluated),
        windows=2,
        seq_len=64,
        bits=(4,),
        groups=(16,),
        ratios=(0.5,),
        components=(),
        calib_dataset=str(calib),
        calib_windows=2,
        dtype="float16",
    )
    out = run_curve(config, tmp_path / "runs", progress=False)
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    q = "4b-g16-kc-vt-r0"
    labels = [
        "baseline",
        f"quant {q}",
        "paper-eigen0.5",
        f"paper-eigen0.5 {q}",
        "eigenkv-eigen0.5",
        f"eigenkv-eigen0.5 {q}",
    ]
    assert [r["label"] for r in rows] == labels
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG" and (out / "curve.svg").exists()
    assert len((out / "points.csv").read_text().splitlines()) == 7
    sizes = {r["label"]: r["kv_gb_n2048"] for r in rows}
    assert sizes[f"paper-eigen0.5 {q}"] < sizes[f"quant {q}"] < sizes["baseline"]
    table = (out / "pareto.md").read_text()
    assert "best paper-eigen0.5+quant | best eigenkv-eigen0.5+quant | paper-eigen0.5+quant - quant" in table
    plans = {name: EigenPlan.load(out / "plans" / folder) for name, folder in PLANS.items()}
    assert plans["paper-eigen0.5"].config.basis == "pca" and plans["eigenkv-eigen0.5"].config.allot == "fisher"
    assert {r["recipe"]["lowrank"]["basis"] for r in rows if r["recipe"]["lowrank"]} == {"pca", "output"}
    assert all(Recipe.from_dict(r["recipe"]).label() for r in rows)  # every row records its whole recipe

    # Each row's size equals the bytes a real cache holds after one evaluated window (fp16 model).
    model0, tokenizer = load_model(str(model_dir), dtype=torch.float16)
    window = load_windows(str(evaluated), tokenizer, 64, count=1).input_ids
    for row in rows:
        model = load_model(str(model_dir), dtype=torch.float16)[0] if row["ratio"] else model0
        bases = 0
        if row["ratio"]:
            name = "paper-eigen0.5" if row["label"].startswith("paper") else "eigenkv-eigen0.5"
            apply_plan(model, EigenPlan.load(out / "plans" / PLANS[name]))
            bases = sum(b.numel() * 2 for n, b in model.named_buffers() if n.endswith(("key_basis", "query_basis")))
        with torch.no_grad():
            if row["recipe"]["kv"] is None:
                cache = DynamicCache(config=model.config)
                model(window, past_key_values=cache, use_cache=True)
            else:
                with QuantizedKV(model, KVQuantConfig.from_dict(row["recipe"]["kv"])) as kv:
                    cache = kv.new_cache()
                    model(window, past_key_values=cache, use_cache=True)
        assert cache_held_bytes(cache) + bases == row["kv_bytes_eval_seq_len"], row["label"]

    files = (out / "points.jsonl", out / "plans" / PLANS["eigenkv-eigen0.5"] / "plan.json")
    stamps = [p.stat().st_mtime_ns for p in files]
    run_curve(config, tmp_path / "runs", progress=False)  # nothing left to compute
    assert [p.stat().st_mtime_ns for p in files] == stamps

    # Adding a component variant extends the run: only its points are computed, sized honestly.
    extended = CurveConfig(**{**config.__dict__, "components": (*config.components, "scale+hi8x0.5")})
    run_curve(extended, tmp_path / "runs", progress=False)
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    added = rows[len(labels) :]
    assert [r["label"] for r in added] == [f"{m}-eigen0.5+scale+hi8x0.5 {q}" for m in ("paper", "eigenkv")]
    assert [p.stat().st_mtime_ns for p in files[1:]] == stamps[1:]
    for row in added:
        name = "paper-eigen0.5" if row["label"].startswith("paper") else "eigenkv-eigen0.5"
        plan, quant = prepare_components(
            EigenPlan.load(out / "plans" / PLANS[name]),
            ComponentQuantConfig.parse("scale+hi8x0.5"),
            KVQuantConfig(4, 16),
        )
        model = apply_plan(load_model(str(model_dir), dtype=torch.float16)[0], plan)
        with torch.no_grad(), QuantizedKV(model, quant) as kv:
            cache = kv.new_cache()
            model(window, past_key_values=cache, use_cache=True)
        bases = sum(b.numel() * 2 for n, b in model.named_buffers() if n.endswith(("key_basis", "query_basis")))
        assert cache_held_bytes(cache) + bases == row["kv_bytes_eval_seq_len"], row["label"]
        assert row["high_bits"] == 8 and Recipe.from_dict(row["recipe"]).components.high_fraction == 0.5
        same_plain = next(r for r in rows if r["label"] == row["label"].replace("+scale+hi8x0.5", ""))
        assert row["kv_bytes_eval_seq_len"] > same_plain["kv_bytes_eval_seq_len"]  # half the components at 8 bits
    assert "best eigenkv-eigen0.5+scale+hi8x0.5" in (out / "pareto.md").read_text()
    # Budgets add the byte allotment's curve, and quant_rotate the rotated quantization, to the run.
    allotted = CurveConfig(**{**extended.__dict__, "budgets": (0.3, 0.6), "quant_rotate": True})
    run_curve(allotted, tmp_path / "runs", progress=False)
    rows = {r["label"]: r for r in map(json.loads, (out / "points.jsonl").read_text().splitlines())}
    fp16 = rows["baseline"]["kv_bytes_n2048"]
    for budget in (0.3, 0.6):
        row = rows[f"allotted {budget:g}x"]
        assert row["method"] == "allotted" and 0.5 * budget * fp16 < row["kv_bytes_n2048"] <= budget * fp16
        assert len(row["candidates"]) in (2, 3) and all(c["held_out_nll"] > 0 for c in row["candidates"])
        assert {c["candidate"] for c in row["candidates"]} >= {"eigen", "fullrank"}
        assert (out / f"allotment_{budget:g}x.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((out / f"allotment_{budget:g}x.json").read_text())["bytes"] == row["kv_bytes_n2048"]
    assert rows[f"quant {q}-rot"]["method"] == "quant-rot" and (out / "sensitivity.json").is_file()
    assert "best allotted" in (out / "pareto.md").read_text()
    with pytest.raises(FileExistsError, match="other settings"):
        other = CurveConfig(**{**config.__dict__, "bits": (4,), "calib_windows": 3})
        run_curve(other, tmp_path / "runs", progress=False)


def test_pareto_table_picks_the_best_point_within_each_budget():
    rows = [
        {"label": "baseline", "method": "baseline", "kv_gb_n2048": 1.0, "ppl": 10.0, "bits": None, "group_size": None},
        {"label": "q4", "method": "quant", "kv_gb_n2048": 0.3, "ppl": 11.0, "bits": 4, "group_size": 64},
        {"label": "q2", "method": "quant", "kv_gb_n2048": 0.2, "ppl": 30.0, "bits": 2, "group_size": 64},
        {"label": "e4", "method": "eigen0.6+quant", "kv_gb_n2048": 0.18, "ppl": 14.0, "bits": 4, "group_size": 64},
        {"label": "f4", "method": "fisher+quant", "kv_gb_n2048": 0.25, "ppl": 12.0, "bits": 4, "group_size": 64},
    ]
    table = pareto_table(rows)
    assert "| 0.18000 | - | 14.00 (4b/g64, 0.1800 GB) | - | - | - |" in table
    assert "| 0.20000 | 30.00 (2b/g64, 0.2000 GB) | 14.00 (4b/g64, 0.1800 GB) | - | -16.00 | - |" in table
    assert (
        "| 0.30000 | 11.00 (4b/g64, 0.3000 GB) | 14.00 (4b/g64, 0.1800 GB) | 12.00 (4b/g64, 0.2500 GB) "
        "| +3.00 | +1.00 |" in table
    )
