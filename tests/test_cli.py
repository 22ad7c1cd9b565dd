"""The command line: ppl, compress, curve and plan on a tiny model; bad input exits 2 with a message."""

import json
import subprocess
import sys

import pytest

from eigenkv.cli import main
from tests.helpers import char_tokenizer, tiny_llama


def ppl_args(model_dir, text_file, out, windows="3"):
    return ["ppl", "--model", str(model_dir), "--dataset", str(text_file), "--windows", windows, "--seq-len", "64",
            "--json", str(out), "--quiet"]  # fmt: skip


def test_ppl_prints_one_line_writes_json_and_reuses_it(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(ppl_args(model_dir, text_file, out)) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "ppl=" in line and "windows=3x64" in line and "recipe=fp16" in line
    record = json.loads(out.read_text())
    assert record["result"]["windows"] == 3 and record["result"]["tokens"] == 3 * 63
    assert record["kv_cache_n2048"]["bytes"] == 2 * 2 * 2 * 16 * 2048 * 2
    stamp = out.stat().st_mtime_ns
    assert main(ppl_args(model_dir, text_file, out)) == 0  # same config: reuse, do not recompute
    assert "already computed" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp
    assert main(ppl_args(model_dir, text_file, out, windows="2")) == 2  # other config: refuse to overwrite
    assert "another configuration" in capsys.readouterr().err
    assert json.loads(out.read_text())["result"]["windows"] == 3


def test_ppl_with_a_quantized_cache_records_the_recipe_and_size(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(ppl_args(model_dir, text_file, out) + ["--kv-bits", "2", "--kv-group", "16", "--kv-residual", "4"]) == 0
    assert "recipe=2b-g16-kc-vt-r4" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["recipe"]["kv"] == {
        "bits": 2,
        "group_size": 16,
        "axis_k": "channel",
        "axis_v": "token",
        "residual": 4,
        "symmetric": False,
        "rotate": False,
        "scale_dtype": "float16",
    }
    assert record["kv_fraction_of_fp16"] < 0.3
    plain = tmp_path / "p.json"
    assert main(ppl_args(model_dir, text_file, plain)) == 0
    assert record["result"]["ppl"] != json.loads(plain.read_text())["result"]["ppl"]


def test_compress_saves_a_model_that_ppl_and_the_api_read(model_dir, text_file, tmp_path, capsys):
    import eigenkv

    out = tmp_path / "saved"
    common = ["--model", str(model_dir), "--quiet"]
    calib = ["--calib-dataset", str(text_file), "--calib-windows", "3", "--calib-seq-len", "64"]
    assert main(["compress", *common, *calib, "--ratio", "0.5", "--rope-mode", "post", "--kv-bits", "4",
                 "--kv-group", "16", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "ratio 0.5" in printed and "ranks (key, value) per layer" in printed
    meta = json.loads((out / "plan" / "plan.json").read_text())
    assert meta["config"]["target_ratio"] == 0.5 and meta["mode"] == "post"
    assert meta["calibration"]["windows"] == 3 and meta["calibration"]["first_window"] == 0
    assert (out / "plan" / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert eigenkv.from_pretrained(out).recipe.kv.bits == 4

    assert main(["compress", *common, *calib, "--ratio", "0.5", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err

    ppl = ["ppl", *common, "--dataset", str(text_file), "--seq-len", "64", "--compressed", str(out)]
    assert main([*ppl, "--windows", "2"]) == 2  # windows 0-1 were calibration windows
    assert "overlap" in capsys.readouterr().err
    result = tmp_path / "r.json"
    assert main([*ppl, "--windows", "2", "--start", "3", "--json", str(result)]) == 0
    assert "eigen0.5-post-output-fisher+4b-g16" in capsys.readouterr().out
    record = json.loads(result.read_text())
    assert record["recipe"]["lowrank"]["target_ratio"] == 0.5

    recipe = tmp_path / "recipe.json"
    eigenkv.Recipe(lowrank=eigenkv.EigenConfig.method("paper", allot="budget")).save(recipe)
    assert main(["compress", *common, *calib, "--recipe", str(recipe), "--out", str(tmp_path / "paper")]) == 0
    assert "eigen0.6-pre-budget" in capsys.readouterr().out


def test_curve_refuses_calibration_text_that_overlaps_the_evaluated_text(model_dir, text_file, tmp_path, capsys):
    common = ["--model", str(model_dir), "--dataset", str(text_file), "--seq-len", "64", "--quiet",
              "--calib-dataset", str(text_file), "--calib-windows", "2", "--out-root", str(tmp_path)]  # fmt: skip
    curve = ["curve", *common, "--windows", "2", "--bits", "4", "--groups", "16", "--methods", "eigenkv",
             "--components", "", "--ratios", "0.6"]  # fmt: skip
    assert main(curve) == 2  # the calibration windows (0-1) overlap the evaluated ones (same text)
    assert "overlap" in capsys.readouterr().err


BAD = [
    (["ppl", "--windows", "0"], "positive integer or 'all'"),
    (["ppl", "--windows", "x"], "positive integer or 'all'"),
    (["ppl", "--dataset", "nope"], "unknown dataset"),
    (["ppl", "--kv-bits", "5"], "bits=5 is not supported"),
    (["ppl", "--kv-bits", "4", "--kv-group", "0"], "expected a positive integer"),
    (["ppl", "--kv-bits", "4.5"], "invalid int value"),
    (["ppl", "--ratio", "1.5"], "target_ratio must be in (0, 1]"),
    (["ppl", "--ratio", "0.6", "--error-budget", "0.1"], "set exactly one of target_ratio"),
    (["ppl", "--components", "hi9"], "high_bits=9"),
    (["ppl", "--components", "scale"], "set lowrank and kv"),
    (["ppl", "--device", "cuda:7"], "CUDA"),
    (["ppl", "--device", "tpu"], "not a device name"),
    (["ppl", "--dtype", "float8"], "invalid choice"),
    (["ppl", "--recipe", "missing.json"], "no recipe file"),
    (["ppl", "--recipe", "BADJSON"], "is not JSON"),
    (["ppl", "--recipe", "RECIPE", "--kv-bits", "4"], "--recipe already says everything"),
    (["ppl", "--json", "/proc/nope/r.json"], "cannot write"),
    (["ppl", "--compressed", "NOTSAVED"], "not a saved eigenkv model"),
    (["compress", "--out", "/proc/nope"], "cannot write"),
    (["compress", "--out", "OUT", "--weights", "int8"], "drop --weights"),
    (["curve", "--bits", "4,x"], "comma-separated list of int"),
    (["curve", "--windows", "-1"], "positive integer or 'all'"),
    (["plan", "--budget-gb", "0"], "--budget-gb must be positive"),
    (["plan", "--budget-gb", "0.01", "--min-fill", "2"], "min_fill must be in [0, 1)"),
    (["plan", "--budget-gb", "0.01", "--ratios", "1.5"], "ratios must lie in (0, 1]"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_a_message(argv, message, model_dir, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "recipe.json").write_text(json.dumps({"format": "eigenkv-recipe", "version": 1}))
    names = {"BADJSON": tmp_path / "bad.json", "RECIPE": tmp_path / "recipe.json", "NOTSAVED": tmp_path,
             "OUT": tmp_path / "out", "missing.json": tmp_path / "missing.json"}  # fmt: skip
    argv = [str(names.get(a, a)) for a in argv]
    argv += ["--model", str(model_dir), "--quiet"]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse rejects malformed flags itself, also with status 2
        code = exit.code
    assert code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err


def test_version_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "eigenkv", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("eigenkv 0.")
    done = subprocess.run([sys.executable, "-m", "eigenkv", "ppl", "--windows"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and "expected one argument" in done.stderr


def test_nan_weights_and_unwritable_outputs_are_refused_before_work(tmp_path, capsys):
    import torch

    tok = char_tokenizer()
    broken = tiny_llama(vocab_size=len(tok))
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    tok.save_pretrained(tmp_path / "broken")
    assert main(["ppl", "--model", str(tmp_path / "broken"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "hold NaN or Inf (model.layers.0.mlp.up_proj.weight)" in err and "Traceback" not in err


def test_device_map_loads_through_accelerate_and_excludes_device(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(ppl_args(model_dir, text_file, out) + ["--device-map", "auto", "--kv-bits", "4"]) == 0
    mapped = json.loads(out.read_text())["result"]["ppl"]
    assert main(ppl_args(model_dir, text_file, tmp_path / "d.json") + ["--kv-bits", "4"]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["result"]["ppl"] == mapped
    capsys.readouterr()
    argv = ppl_args(model_dir, text_file, tmp_path / "x.json") + ["--device", "cpu", "--device-map", "auto"]
    assert main(argv) == 2 and "--device and --device-map" in capsys.readouterr().err
