"""The recovery curve and `eigenkv finetune` on a tiny model: adapters saved beside the compressed model."""

import csv
import json

import pytest
import torch

pytest.importorskip("peft")

import eigenkv  # noqa: E402
from eigenkv.cli import main  # noqa: E402
from eigenkv.eval.recovery import recovery_curve, write_recovery  # noqa: E402
from eigenkv.finetune import LoraRecovery, load_adapters  # noqa: E402
from tests.helpers import char_tokenizer, tiny_llama  # noqa: E402

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 40


def windows(start: int, count: int, length: int = 48) -> eigenkv.TokenWindows:
    ids = torch.tensor(char_tokenizer()(TEXT)["input_ids"])[start * length : (start + count) * length]
    return eigenkv.TokenWindows(ids.view(count, length), "text", length, "none", start, count)


def test_one_training_gives_the_curve_through_the_quantized_cache_and_without_it(tmp_path):
    model = tiny_llama(vocab_size=len(char_tokenizer()))
    recipe = eigenkv.Recipe(
        lowrank=eigenkv.EigenConfig(target_ratio=0.5), kv=eigenkv.KVQuantConfig(bits=2, group_size=8)
    )
    compressed = eigenkv.apply_recipe(model, recipe, windows(0, 2), progress=False)
    held_out = windows(30, 2)
    config = LoraRecovery(steps=12, rank=4, lr=1e-2, eval_every=4)
    recovery, rows = recovery_curve(compressed, windows(2, 12), held_out, config, progress=False)
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert rows[0]["train_loss"] is None and all(r["train_loss"] > 0 for r in rows[1:])
    assert rows[-1]["ppl"] < rows[0]["ppl"] and rows[-1]["ppl_unquantized"] < rows[0]["ppl_unquantized"]
    assert all(r["ppl"] != r["ppl_unquantized"] for r in rows)  # the 2-bit cache is read
    final = eigenkv.perplexity(compressed, held_out, progress=False).ppl
    assert final == pytest.approx(rows[-1]["ppl"], rel=1e-6)
    path = write_recovery(rows, tmp_path, "tiny", {"uncompressed": 90.0})
    table = list(csv.DictReader(path.open()))
    assert [int(r["step"]) for r in table] == [0, 4, 8, 12] and table[0]["train_loss"] == ""
    assert (tmp_path / "recovery.png").stat().st_size > 1000


def test_cli_finetune_saves_model_adapters_and_curve_that_load_back(model_dir, tmp_path, capsys):
    tok = char_tokenizer()
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(model_dir), "--ratio", "0.5", "--kv-bits", "2", "--kv-group", "8",
            "--calib-dataset", str(text), "--calib-windows", "2", "--calib-seq-len", "64", "--steps", "6",
            "--eval-every", "3", "--lr", "1e-2", "--rank", "4", "--train-seq-len", "64", "--eval-dataset", str(text),
            "--eval-start", "30", "--eval-windows", "2", "--eval-seq-len", "64",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step     6: ppl" in printed and "unquantized cache" in printed
    record = json.loads((out / "finetune.json").read_text())
    assert [step for step, _ in record["evaluations"]] == [0, 3, 6] and len(record["losses"]) == 6
    rows = list(csv.DictReader((out / "recovery.csv").open()))
    assert float(rows[-1]["ppl"]) == pytest.approx(record["evaluations"][-1][1])
    # the saved compressed model (without adapters) + the adapters give the curve's last perplexity
    again = load_adapters(eigenkv.from_pretrained(out), out)
    ids = eigenkv.load_windows(str(text), tok, 64, start=30, count=2)
    assert eigenkv.perplexity(again, ids, progress=False).ppl == pytest.approx(float(rows[-1]["ppl"]), rel=1e-5)
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # never overwritten silently
