"""The budget planner on a tiny model: exact sizes, budget respected, proxy reused, clear refusals."""

import json

import pytest

from eigenkv.cli import main
from eigenkv.eval.planner import PlannerConfig, PlannerExperiment, candidates, plan_for_budget
from eigenkv.eval.runs import RunFolder
from eigenkv.memory import GB
from eigenkv.recipe import Recipe


@pytest.fixture
def config(model_dir, tmp_path):  # noqa: F811
    evaluated = tmp_path / "eval.txt"
    evaluated.write_text("It was the best of times, it was the worst of times.\n" * 6)
    calib = tmp_path / "calib.txt"
    calib.write_text("Call me Ishmael. Some years ago, never mind how long precisely.\n" * 10)
    return PlannerConfig(
        model=str(model_dir),
        dataset=str(evaluated),
        windows=2,
        seq_len=64,
        ratios=(1.0, 0.5),
        bits=(4, 2),
        groups=(16,),
        components=("plain", "scale", "hi8x0.5"),
        calib_dataset=str(calib),
        calib_windows=2,
        proxy_windows=1,
        proxy_seq_len=64,
        min_fill=0.0,
        finalists=2,
    )


def test_planner_chooses_within_the_budget_and_reuses_its_work(config, tmp_path):
    labels = list(candidates(config))
    # no component variants without Eigen or without quantization; hi8 only above the grid's bits
    assert "eigen0.5+scale 4b-g16-kc-vt-r0" in labels and "eigen0.5+hi8x0.5 2b-g16-kc-vt-r0" in labels
    assert not any("scale fp16" in x or x.startswith("fp16-model ") and "+" in x for x in labels)
    assert len(labels) == 3 + 1 + 2 * 3

    out = tmp_path / "runs"
    sizes_probe = plan_for_budget(config, 1.0, out, progress=False)  # everything fits
    run = sizes_probe.report.parent
    sizes = json.loads((run / "sizes.json").read_text())
    assert sizes["fp16-model fp16"] > sizes["fp16-model 4b-g16-kc-vt-r0"] > sizes["eigen0.5 2b-g16-kc-vt-r0"]
    assert sizes["eigen0.5+hi8x0.5 2b-g16-kc-vt-r0"] > sizes["eigen0.5 2b-g16-kc-vt-r0"]
    assert sizes_probe.chosen["ppl"] == min(f["ppl"] for f in sizes_probe.finalists)

    budget = (sizes["eigen0.5 4b-g16-kc-vt-r0"] + 1) / GB
    choice = plan_for_budget(config, budget, out, progress=False)
    assert choice.chosen["kv_bytes_n2048"] <= budget * GB
    sizes = json.loads((run / "sizes.json").read_text())
    fitting = [x for x in labels if sizes[x] <= budget * GB]
    # the byte allotment's candidates for this budget (with and without Eigen Attention) join the uniform ones
    allotted = [x for x in sizes if x.startswith("allotted-") and x.endswith(f"@{budget:g}GB")]
    kinds = {x.split("@")[0].removeprefix("allotted-") for x in allotted}
    assert {"eigen", "fullrank"} <= kinds <= {"eigen", "fullrank", "fullrank-rot"}
    assert all(sizes[x] <= budget * GB for x in allotted)
    assert choice.considered == len(fitting) + len(allotted)
    proxies = {json.loads(r)["label"]: json.loads(r)["nll"] for r in (run / "proxy.jsonl").read_text().splitlines()}
    assert set(labels) <= set(proxies) and len(proxies) == len(sizes)  # the second budget scored only its own
    finalists = [f["label"] for f in choice.finalists]  # every allotted candidate, then the best uniform ones
    assert set(finalists[: len(allotted)]) == set(allotted)
    assert finalists[len(allotted) :] == sorted(fitting, key=proxies.get)[:2]
    assert (run / f"budget_{budget:g}.md").read_text().count("|") > 8
    assert Recipe.load(run / f"budget_{budget:g}.recipe.json") == choice.recipe  # the choice is a recipe
    assert (run / "sensitivity.json").is_file()

    # min_fill drops candidates far below the largest one within the budget
    filled = PlannerConfig(**{**config.__dict__, "min_fill": 0.9, "proxy": "calibration"})
    assert filled.run_name() == config.run_name()
    strict = plan_for_budget(filled, budget, out / "filled", progress=False)
    largest = max(sizes[x] for x in labels + allotted if sizes[x] <= budget * GB)
    kept = sum(0.9 * largest <= sizes[x] <= budget * GB for x in labels)
    assert strict.considered == kept + len(allotted) < choice.considered
    # the proxy text is held out: after the evaluated windows, or after the calibration windows
    run = PlannerExperiment(config, RunFolder(tmp_path, "a", config.to_dict()), progress=False)
    assert run.proxy.source == run.evaluated.source and run.proxy.disjoint_from(run.evaluated)
    assert run.proxy.first * 64 >= 2 * 64
    run = PlannerExperiment(filled, RunFolder(tmp_path, "b", filled.to_dict()), progress=False)
    assert run.proxy.source == run.calibration_windows.source and run.proxy.disjoint_from(run.calibration_windows)

    with pytest.raises(ValueError, match="no candidate fits"):
        plan_for_budget(config, 1e-9, out, progress=False)
    with pytest.raises(FileExistsError, match="other settings"):
        plan_for_budget(PlannerConfig(**{**config.__dict__, "finalists": 1}), budget, out, progress=False)


def test_planner_cli_and_bad_settings(config, tmp_path, capsys):
    args = ["plan", "--budget-gb", "1", "--model", config.model, "--dataset", config.dataset, "--windows", "1"]
    args += ["--seq-len", "64", "--ratios", "1", "--bits", "4", "--groups", "16", "--components", "plain"]
    args += ["--calib-dataset", config.calib_dataset, "--calib-windows", "2", "--proxy-windows", "1"]
    args += ["--proxy-seq-len", "64", "--finalists", "1", "--out-root", str(tmp_path / "cli"), "--quiet"]
    assert main(args) == 0
    assert "chosen for 1 GB: fp16-model" in capsys.readouterr().out
    with pytest.raises(ValueError, match="ratios must lie"):
        PlannerConfig(ratios=(1.5,))
    with pytest.raises(ValueError, match="unknown component option"):
        PlannerConfig(ratios=(1.0, 0.5), components=("plain", "hadamard"))
    with pytest.raises(ValueError, match="proxy must be one of"):
        PlannerConfig(proxy="other")
    with pytest.raises(ValueError, match="min_fill"):
        PlannerConfig(min_fill=1.0)
