import json

from eigenkv.cli import main
from tests.eval.test_cli import model_dir, text_file  # noqa: F401  (fixtures)


def test_compress_then_ppl_on_the_plan(model_dir, text_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "plan"
    common = ["--model", str(model_dir), "--quiet"]
    calib = ["--calib-dataset", str(text_file), "--calib-windows", "3", "--calib-seq-len", "64"]
    assert main(["compress", *common, *calib, "--ratio", "0.5", "--rope-mode", "post", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio 0.5" in printed and "ranks (key, value) per layer" in printed
    meta = json.loads((out / "plan.json").read_text())
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert meta["config"]["target_ratio"] == 0.5 and meta["mode"] == "post"
    assert meta["calibration"]["windows"] == 3 and meta["calibration"]["first_window"] == 0

    assert main(["compress", *common, *calib, "--ratio", "0.5", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err

    ppl = ["ppl", *common, "--dataset", str(text_file), "--seq-len", "64", "--compressed", str(out)]
    assert main([*ppl, "--windows", "2"]) == 2  # windows 0-1 were calibration windows
    assert "overlap" in capsys.readouterr().err

    result = tmp_path / "r.json"
    assert main([*ppl, "--windows", "2", "--start", "3", "--json", str(result)]) == 0
    record = json.loads(result.read_text())
    assert record["config"]["compressed"]["ratio"] == meta["ratio"]
    bases = record["kv_cache_n2048"]["components"]["bases"]
    assert record["kv_cache_n2048"]["bytes"] - bases == round(meta["ratio"] * 2 * 2 * 2 * 16 * 2048 * 2)
    assert "eigen0.5-post-output-fisher" in capsys.readouterr().out
    assert meta["method"] == "eigenkv" and meta["config"]["basis"] == "output"

    paper = tmp_path / "paper"
    assert main(["compress", *common, *calib, "--method", "paper", "--allot", "budget", "--out", str(paper)]) == 0
    meta = json.loads((paper / "plan.json").read_text())
    assert meta["method"] == "paper" and meta["config"]["basis"] == "pca" and meta["config"]["allot"] == "budget"
    assert "eigen0.6-pre-budget" in capsys.readouterr().out


def test_compress_refuses_bad_ratio(model_dir, text_file, tmp_path, capsys):  # noqa: F811
    args = ["compress", "--model", str(model_dir), "--calib-dataset", str(text_file), "--calib-seq-len", "64"]
    assert main([*args, "--ratio", "1.5", "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "target_ratio must be in (0, 1]" in capsys.readouterr().err
