import json

import pytest

from eigenkv.cli import main
from tests.helpers import char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("It was the best of times, it was the worst of times.\n" * 20)
    return path


def _args(model_dir, text_file, out, windows="3"):
    return [
        "ppl",
        "--model",
        str(model_dir),
        "--dataset",
        str(text_file),
        "--windows",
        windows,
        "--seq-len",
        "64",
        "--json",
        str(out),
        "--quiet",
    ]


def test_ppl_prints_one_line_writes_json_and_reuses_it(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(_args(model_dir, text_file, out)) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "ppl=" in line and "windows=3x64" in line
    record = json.loads(out.read_text())
    assert record["result"]["windows"] == 3 and record["result"]["tokens"] == 3 * 63
    assert record["windows"]["seq_len"] == 64 and record["config"]["seq_len"] == 64
    assert record["kv_cache_n2048"]["bytes"] == 2 * 2 * 2 * 16 * 2048 * 2

    stamp = out.stat().st_mtime_ns
    assert main(_args(model_dir, text_file, out)) == 0  # same config: reuse, do not recompute
    assert "already computed" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp

    assert main(_args(model_dir, text_file, out, windows="2")) == 2  # other config: refuse to overwrite
    assert "another configuration" in capsys.readouterr().err
    assert json.loads(out.read_text())["result"]["windows"] == 3


def test_bad_input_exits_2_with_message(model_dir, text_file, tmp_path, capsys):
    assert main(_args(model_dir, text_file, tmp_path / "x.json", windows="500")) == 2
    assert "holds only" in capsys.readouterr().err
    assert main(["ppl", "--model", str(model_dir), "--dataset", "nope", "--quiet"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(_args(model_dir, text_file, tmp_path / "y.json", windows="x")) == 2
    assert "positive integer or 'all'" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert main(_args(model_dir, text_file, tmp_path / "broken.json")) == 2
    assert "not a result file" in capsys.readouterr().err


def test_ppl_with_quantized_cache_records_config_and_size(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q.json"
    args = _args(model_dir, text_file, out) + ["--kv-bits", "2", "--kv-group", "16", "--kv-residual", "4"]
    assert main(args) == 0
    line = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert "kv=2b-g16-kc-vt-r4" in line
    assert record["config"]["kv_quant"] == {
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
    assert main(_args(model_dir, text_file, plain)) == 0
    assert record["result"]["ppl"] != json.loads(plain.read_text())["result"]["ppl"]
    assert main(_args(model_dir, text_file, tmp_path / "bad.json") + ["--kv-bits", "5"]) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err
