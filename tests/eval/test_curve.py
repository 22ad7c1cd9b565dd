"""A tiny-model Figure-3 sweep end to end: rows, plot, table, resumption, and honest KV sizes."""

import json

import pytest
import torch
from transformers import DynamicCache

from eigenkv.compress import EigenPlan, apply_plan
from eigenkv.eval.curve import CurveConfig, pareto_table, run_curve
from eigenkv.eval.data import load_windows
from eigenkv.eval.kv_memory import cache_tensor_bytes
from eigenkv.eval.models import load_model
from eigenkv.quant import KVQuantConfig, QuantizedKV
from tests.eval.test_cli import model_dir  # noqa: F401  (fixture)


@pytest.fixture
def texts(tmp_path):
    evaluated = tmp_path / "eval.txt"
    evaluated.write_text("It was the best of times, it was the worst of times.\n" * 12)
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
        calib_dataset=str(calib),
        calib_windows=2,
        dtype="float16",
    )
    out = run_curve(config, tmp_path / "runs", progress=False)
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["baseline", "quant 4b-g16-kc-vt-r0", "eigen0.5", "eigen0.5 4b-g16-kc-vt-r0"]
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG" and (out / "curve.svg").exists()
    assert len((out / "points.csv").read_text().splitlines()) == 5
    sizes = {r["label"]: r["kv_gb_n2048"] for r in rows}
    assert sizes["eigen0.5 4b-g16-kc-vt-r0"] < sizes["quant 4b-g16-kc-vt-r0"] < sizes["baseline"]
    assert "best eigen0.5+quant" in (out / "pareto.md").read_text()

    # Each row's size equals the bytes a real cache holds after one evaluated window (fp16 model).
    model0, tokenizer = load_model(str(model_dir), dtype=torch.float16)
    window = load_windows(str(evaluated), tokenizer, 64, count=1).input_ids
    plan = EigenPlan.load(out / "plans" / "eigen0.5")
    for row in rows:
        model = load_model(str(model_dir), dtype=torch.float16)[0] if row["ratio"] else model0
        bases = 0
        if row["ratio"]:
            apply_plan(model, plan)
            bases = sum(b.numel() * 2 for n, b in model.named_buffers() if n.endswith("key_basis"))
        with torch.no_grad():
            if row["quant"] is None:
                cache = DynamicCache(config=model.config)
                model(window, past_key_values=cache, use_cache=True)
            else:
                with QuantizedKV(model, KVQuantConfig.from_dict(row["quant"])) as kv:
                    cache = kv.new_cache()
                    model(window, past_key_values=cache, use_cache=True)
        assert cache_tensor_bytes(cache) + bases == row["kv_bytes_eval_seq_len"], row["label"]

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points.jsonl", out / "plans" / "eigen0.5" / "plan.json")}
    run_curve(config, tmp_path / "runs", progress=False)  # nothing left to compute
    assert {
        p: (out / p if p != "plan.json" else out / "plans" / "eigen0.5" / p).stat().st_mtime_ns for p in stamps
    } == stamps
    with pytest.raises(FileExistsError, match="other settings"):
        other = CurveConfig(**{**config.__dict__, "bits": (4,), "calib_windows": 3})
        run_curve(other, tmp_path / "runs", progress=False)


def test_pareto_table_picks_the_best_point_within_each_budget():
    rows = [
        {"label": "baseline", "method": "baseline", "kv_gb_n2048": 1.0, "ppl": 10.0, "bits": None, "group_size": None},
        {"label": "q4", "method": "quant", "kv_gb_n2048": 0.3, "ppl": 11.0, "bits": 4, "group_size": 64},
        {"label": "q2", "method": "quant", "kv_gb_n2048": 0.2, "ppl": 30.0, "bits": 2, "group_size": 64},
        {"label": "e4", "method": "eigen0.6+quant", "kv_gb_n2048": 0.18, "ppl": 14.0, "bits": 4, "group_size": 64},
    ]
    table = pareto_table(rows)
    assert "| 0.1800 | - | 14.00 (4b/g64, 0.1800 GB) | - |" in table
    assert "| 0.2000 | 30.00 (2b/g64, 0.2000 GB) | 14.00 (4b/g64, 0.1800 GB) | -16.00 |" in table
    assert "| 0.3000 | 11.00 (4b/g64, 0.3000 GB) | 14.00 (4b/g64, 0.1800 GB) | +3.00 |" in table
