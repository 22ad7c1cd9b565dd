"""``eigenkv generate``: prompt in, text out (through the recipe's cache), one stats line; bad input exits 2."""

import re

import pytest
import torch

import eigenkv
from eigenkv.cli import main

PROMPT = "It was the best of"
STATS = re.compile(
    r"prompt_tokens=(?P<prompt>\d+) new_tokens=(?P<new>\d+) batch=(?P<batch>\d+) "
    r"time=(?P<time>[\d.]+)s \(prefill\+decode\) tokens/s=(?P<rate>[\d.]+) "
    r"kv_cache_bytes=(?P<bytes>\d+) \((?P<parts>[^)]*)\) fp16_bytes=(?P<fp16>\d+) \((?P<fraction>[\d.]+) of fp16\) "
    r"recipe=(?P<recipe>\S+)$"
)


def generate(capsys, model_dir, *extra) -> tuple[list[str], re.Match]:
    """Run ``eigenkv generate`` on the tiny model: (printed text lines, the parsed stats line)."""
    argv = ["generate", "--model", str(model_dir), "--quiet", *extra]
    if "--prompt" not in extra and "--prompt-file" not in extra:
        argv += ["--prompt", PROMPT]
    assert main(argv) == 0
    *text, stats = capsys.readouterr().out.rstrip("\n").split("\n")
    match = STATS.match(stats)
    assert match, stats
    return text, match


@torch.no_grad()
def reference(model_dir, new_tokens: int, batch: int = 1, recipe=None) -> list[str]:
    """Greedy continuations of ``PROMPT`` by ``model.generate`` (through ``CompressedModel.generate``)."""
    model, tok = eigenkv.load_model(str(model_dir))
    ids = tok([PROMPT] * batch, return_tensors="pt").input_ids
    if recipe is None:
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    else:
        compressed = eigenkv.apply_recipe(model, recipe, progress=False)
        out = compressed.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def test_greedy_text_and_the_bytes_of_the_dense_cache(model_dir, capsys):
    text, stats = generate(capsys, model_dir, "--max-new-tokens", "6")
    assert text == reference(model_dir, 6)
    prompt, new = int(stats["prompt"]), int(stats["new"])
    assert (prompt, new, stats["batch"], stats["recipe"]) == (len(PROMPT), 6, "1", "fp16")  # one token a character
    assert float(stats["time"]) > 0 and float(stats["rate"]) > 0
    # the cache holds every token but the last one generated: 2 layers x (K, V) x 2 KV heads x head size 16,
    # float32 (the model's dtype), twice the fp16 cache of the same tokens
    held = 2 * 2 * 2 * 16 * (prompt + new - 1)
    assert int(stats["bytes"]) == 4 * held and int(stats["fp16"]) == 2 * held and stats["fraction"] == "2.000"
    assert stats["parts"] == f"keys+values={4 * held}"


def test_quantized_cache_batch_and_its_bytes(model_dir, capsys):
    from eigenkv.memory import kv_cache_bytes

    config = eigenkv.KVQuantConfig(bits=4, group_size=16, residual=4)
    text, stats = generate(
        capsys, model_dir, "--kv-bits", "4", "--kv-group", "16", "--kv-residual", "4", "--max-new-tokens", "8",
        "--batch-size", "2",
    )  # fmt: skip
    expected = reference(model_dir, 8, batch=2, recipe=eigenkv.Recipe(kv=config))
    assert text == ["--- sequence 1 of 2 ---", expected[0], "--- sequence 2 of 2 ---", expected[1]]
    assert stats["recipe"] == "4b-g16-kc-vt-r4" and stats["batch"] == "2"
    assert re.fullmatch(r"codes=\d+ scales=\d+ zeros=\d+ window=\d+", stats["parts"])
    tokens = int(stats["prompt"]) + int(stats["new"]) - 1
    model, _ = eigenkv.load_model(str(model_dir))
    predicted = kv_cache_bytes(model, seq_len=tokens, batch_size=2, dtype=torch.float32, quant=config)
    assert int(stats["bytes"]) == predicted.total  # what the cache held, as the byte accounting says
    assert int(stats["fp16"]) == kv_cache_bytes(model, seq_len=tokens, batch_size=2).total


def test_beam_search_through_the_quantized_cache(model_dir, capsys):
    text, stats = generate(capsys, model_dir, "--kv-bits", "4", "--kv-group", "16", "--num-beams", "3",
                           "--max-new-tokens", "6")  # fmt: skip
    model, tok = eigenkv.load_model(str(model_dir))
    recipe = eigenkv.Recipe(kv=eigenkv.KVQuantConfig(bits=4, group_size=16))
    ids = tok([PROMPT], return_tensors="pt").input_ids
    out = eigenkv.apply_recipe(model, recipe, progress=False).generate(
        ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert text == tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    assert int(stats["new"]) == 6


def test_saved_compressed_model_low_rank_beams_and_a_prompt_file(model_dir, text_file, tmp_path, capsys):
    calib = ["--calib-dataset", str(text_file), "--calib-windows", "2", "--calib-seq-len", "64"]
    saved = tmp_path / "saved"
    assert main(["compress", "--model", str(model_dir), "--quiet", *calib, "--ratio", "0.5", "--rope-mode", "post",
                 "--kv-bits", "4", "--kv-group", "16", "--out", str(saved)]) == 0  # fmt: skip
    capsys.readouterr()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT + "\n")  # the trailing line break is dropped
    file_prompt = ["--prompt-file", str(prompt), "--max-new-tokens", "40"]
    _, stats = generate(capsys, model_dir, "--compressed", str(saved), *file_prompt)
    assert stats["recipe"].startswith("eigen0.5-post") and stats["recipe"].endswith("+4b-g16-kc-vt-r0")
    assert int(stats["prompt"]) == len(PROMPT) and 1 <= int(stats["new"]) <= 40  # a random model may stop early
    assert float(stats["fraction"]) < 0.5  # rank-space codes

    # low rank without quantization: a plain cache of rank-space states, which beam search can reorder
    _, stats = generate(capsys, model_dir, *calib, "--ratio", "0.5", "--num-beams", "2", "--max-new-tokens", "5")
    assert stats["recipe"].startswith("eigen0.5") and int(stats["new"]) == 5
    assert float(stats["fraction"]) == pytest.approx(1.0, abs=0.05)  # float32 states at half the head size


def test_sampling_is_seeded(model_dir, capsys):
    sample = ["--do-sample", "--temperature", "1.5", "--top-p", "0.95", "--max-new-tokens", "12"]
    first, _ = generate(capsys, model_dir, *sample, "--seed", "1")
    again, _ = generate(capsys, model_dir, *sample, "--seed", "1")
    other, _ = generate(capsys, model_dir, *sample, "--seed", "2")
    assert first == again and first != other


BAD = [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "  \n"], "the prompt is empty"),
    (["--prompt-file", "MISSING"], "missing.txt: no such file"),
    (["--prompt-file", "EMPTY"], "the prompt is empty"),
    ([], "one of the arguments --prompt --prompt-file is required"),
    (["--prompt", "x", "--prompt-file", "EMPTY"], "not allowed with argument"),
    (["--prompt", "x", "--max-new-tokens", "0"], "expected a positive integer, got '0'"),
    (["--prompt", "x", "--max-new-tokens", "-3"], "expected a positive integer, got '-3'"),
    (["--prompt", "x", "--temperature", "0.7"], "add --do-sample"),
    (["--prompt", "x", "--do-sample", "--temperature", "0"], "--temperature must be positive"),
    (["--prompt", "x", "--do-sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--kv-bits", "5"], "bits=5 is not supported"),
    (["--prompt", "x", "--compressed", "NOTSAVED"], "not a saved eigenkv model"),
    (["--prompt", "x", "--compressed", "NOTSAVED", "--kv-bits", "4"], "--compressed already holds a recipe"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) or "no prompt" for a, _ in BAD])
def test_bad_input_exits_2_with_a_message(argv, message, model_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    names = {"MISSING": tmp_path / "missing.txt", "EMPTY": tmp_path / "empty.txt", "NOTSAVED": tmp_path}
    argv = ["generate", *[str(names.get(a, a)) for a in argv], "--model", str(model_dir), "--quiet"]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse rejects malformed flags itself, also with status 2
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert "eigenkv generate: error:" in err and message in err and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_answers(smollm2, smollm2_cache, capsys):
    """The real model (slow: its first conversion takes ~40 s on CPU)."""
    text, stats = generate(
        capsys, "smollm2-135m", "--cache-dir", str(smollm2_cache), "--prompt", "The capital of France is",
        "--max-new-tokens", "3", "--kv-bits", "4", "--kv-group", "32",
    )  # fmt: skip
    assert "Paris" in text[0] and stats["new"] == "3" and stats["prompt"] == "5"


def test_cuda_graph_decoding_gives_the_greedy_text(model_dir, capsys):
    """``--cuda-graph``: the same greedy text as generate through the same recipe (eager steps on CPU, said on
    stderr); sampling and beams are refused with it, and so is a recipe without a quantized cache."""
    recipe = eigenkv.Recipe(kv=eigenkv.KVQuantConfig(bits=4, group_size=16))
    argv = ["generate", "--model", str(model_dir), "--quiet", "--prompt", PROMPT, "--kv-bits", "4", "--kv-group", "16"]
    assert main([*argv, "--max-new-tokens", "6", "--cuda-graph"]) == 0
    captured = capsys.readouterr()
    *text, stats = captured.out.rstrip("\n").split("\n")
    assert STATS.match(stats) and text == reference(model_dir, 6, recipe=recipe)
    expected = "replays of one captured CUDA graph" if torch.cuda.is_available() else "eager (no CUDA graphs on cpu)"
    assert f"decode steps: {expected}" in captured.err
    for extra in (["--do-sample"], ["--num-beams", "2"]):
        assert main([*argv, "--cuda-graph", *extra]) == 2
        assert "--cuda-graph decodes greedily" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--quiet", "--prompt", PROMPT, "--cuda-graph"]) == 2
    assert "add --kv-bits" in capsys.readouterr().err
