"""The one pipeline: apply_recipe, perplexity through it, save_pretrained / from_pretrained / load_compressed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import eigenkv
from eigenkv import ComponentQuantConfig, EigenConfig, KVQuantConfig, Recipe
from eigenkv.memory import cache_held_bytes
from tests.helpers import random_tokens, random_windows, tiny_llama, tiny_opt

RECIPE = Recipe(
    lowrank=EigenConfig(target_ratio=0.6),
    components=ComponentQuantConfig(high_bits=8, high_fraction=0.25),
    kv=KVQuantConfig(bits=4, group_size=16),
)


def test_apply_recipe_composes_every_step_and_counts_its_bytes():
    model = tiny_llama(kv_heads=2)
    compressed = eigenkv.apply_recipe(model, RECIPE, random_windows(model), progress=False)
    assert compressed.model is model and eigenkv.compress.is_compressed(model)
    assert compressed.plan.ratio == pytest.approx(0.6, abs=0.03)
    assert type(compressed.cache_config).__name__ == "MixedKVQuantConfig"
    ids = random_tokens(model, batch=1, length=32)
    cache = compressed.new_cache()
    with compressed, torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    held = cache_held_bytes(cache)  # the cache holds exactly what the accounting counts
    counted = compressed.kv_bytes(seq_len=32, dtype=torch.float32)
    assert held == counted.total - counted.components.get("bases", 0)


def test_quantization_alone_and_the_empty_recipe():
    model = tiny_opt()
    windows = random_windows(model, count=2, length=24)
    plain = eigenkv.perplexity(model, windows, progress=False)
    same = eigenkv.perplexity(eigenkv.apply_recipe(copy.deepcopy(model), Recipe()), windows, progress=False)
    assert same.nll == pytest.approx(plain.nll, abs=1e-9)
    quantized = eigenkv.apply_recipe(copy.deepcopy(model), Recipe(kv=KVQuantConfig(bits=2, group_size=8)))
    assert eigenkv.perplexity(quantized, windows, progress=False).nll > plain.nll
    with pytest.raises(ValueError, match="pass calibration windows"):
        eigenkv.apply_recipe(copy.deepcopy(model), Recipe(lowrank=EigenConfig()))
    with pytest.raises(TypeError, match="recipe must be an eigenkv.Recipe"):
        eigenkv.apply_recipe(model, {"kv": None})


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    original = tiny_llama(kv_heads=2)
    model = copy.deepcopy(original)
    compressed = eigenkv.apply_recipe(model, RECIPE, random_windows(model), progress=False)
    path = compressed.save_pretrained(tmp_path / "saved")
    ids = random_tokens(model, batch=2, length=40)

    def logits(c):
        with c, torch.no_grad():
            return c.model(ids, past_key_values=c.new_cache(), use_cache=True).logits

    reference = logits(compressed)
    again = eigenkv.from_pretrained(path)
    assert again.recipe == RECIPE and again.cache_config == compressed.cache_config
    torch.testing.assert_close(logits(again), reference, atol=0, rtol=0)
    fresh = eigenkv.load_compressed(copy.deepcopy(original), path)
    torch.testing.assert_close(logits(fresh), reference, atol=1e-6, rtol=1e-6)
    with pytest.raises(FileExistsError, match="exists"):
        compressed.save_pretrained(path)
    assert (path / "eigenkv.json").stat().st_mode & 0o044  # readable by other users


def test_saved_artifacts_refuse_edits_and_other_models(tmp_path):
    original = tiny_llama(kv_heads=2)
    compressed = eigenkv.apply_recipe(copy.deepcopy(original), RECIPE, random_windows(original), progress=False)
    path = compressed.save_pretrained(tmp_path / "saved")

    edited = copy.deepcopy(original)
    with torch.no_grad():
        edited.model.layers[1].self_attn.o_proj.weight[3, 5] += 1e-3  # one weight of one layer
    with pytest.raises(ValueError, match="other attention weights"):
        eigenkv.load_compressed(edited, path)

    # The same weights in a narrower dtype are the same model: a float32 plan applies to float16/bfloat16.
    for dtype in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(original).to(dtype)
        assert eigenkv.load_compressed(half, path).model is half

    manifest = json.loads((path / "eigenkv.json").read_text())
    manifest["recipe"]["kv"]["bits"] = 3
    (path / "eigenkv.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="edited after it was written"):
        eigenkv.from_pretrained(path)
    compressed.save_pretrained(tmp_path / "other")
    weights = tmp_path / "other" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="was modified after it was saved with the model"):
        eigenkv.from_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="not a saved eigenkv model"):
        eigenkv.from_pretrained(tmp_path)


def test_api_cli_and_curve_give_the_same_perplexity_and_bytes(tmp_path, capsys):
    """One recipe through the three front doors: identical perplexity and KV bytes (one pipeline)."""
    from eigenkv.cli import main
    from eigenkv.eval.curve import CurveConfig, run_curve
    from tests.helpers import char_tokenizer

    tok = char_tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    evaluated, calib = tmp_path / "eval.txt", tmp_path / "calib.txt"
    evaluated.write_text("It was the best of times, it was the worst of times.\n" * 6)
    calib.write_text("Call me Ishmael. Some years ago, never mind how long precisely.\n" * 6)
    recipe = Recipe(lowrank=EigenConfig(target_ratio=0.5), kv=KVQuantConfig(bits=4, group_size=16))

    model, tokenizer = eigenkv.load_model(str(model_dir))
    calibration = eigenkv.load_windows(str(calib), tokenizer, 64, count=2)
    windows = eigenkv.load_windows(str(evaluated), tokenizer, 64, count=2)
    compressed = eigenkv.apply_recipe(model, recipe, calibration, progress=False)
    api = eigenkv.perplexity(compressed, windows, progress=False)
    api_bytes = compressed.kv_bytes(seq_len=2048).total

    recipe.save(tmp_path / "recipe.json")
    out = tmp_path / "cli.json"
    argv = ["ppl", "--model", str(model_dir), "--dataset", str(evaluated), "--windows", "2", "--seq-len", "64",
            "--recipe", str(tmp_path / "recipe.json"), "--calib-dataset", str(calib), "--calib-windows", "2",
            "--calib-seq-len", "64", "--json", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    cli = json.loads(out.read_text())

    config = CurveConfig(model=str(model_dir), dataset=str(evaluated), windows=2, seq_len=64, bits=(4,),
                         groups=(16,), ratios=(0.5,), methods=("eigenkv",), components=(),
                         calib_dataset=str(calib), calib_windows=2)  # fmt: skip
    folder = run_curve(config, tmp_path / "runs", progress=False)
    rows = {r["label"]: r for r in map(json.loads, (folder / "points.jsonl").read_text().splitlines())}
    curve = rows["eigenkv-eigen0.5 4b-g16-kc-vt-r0"]

    assert Recipe.from_dict(cli["recipe"]) == Recipe.from_dict(curve["recipe"]) == recipe
    assert cli["result"]["nll"] == pytest.approx(api.nll, abs=1e-12)
    assert curve["nll"] == pytest.approx(api.nll, abs=1e-12)
    assert cli["kv_cache_n2048"]["bytes"] == curve["kv_bytes_n2048"] == api_bytes
