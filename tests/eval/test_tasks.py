"""lm-evaluation-harness tasks on compressed models: a local task on a tiny model, through the quantized cache."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="the tasks extra (lm-eval) is part of the test setup: pip install '.[test]'")

import eigenkv  # noqa: E402
from eigenkv.cli import main  # noqa: E402
from eigenkv.eval.tasks import (  # noqa: E402
    TaskConfig,
    accuracy_rows,
    evaluate_tasks,
    load_task_results,
    save_task_results,
)
from eigenkv.eval.text_tasks import ending_documents, lastword_documents, write_text_tasks  # noqa: E402
from tests.helpers import char_tokenizer, tiny_llama  # noqa: E402

CHOICE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GENERATE_YAML = """task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local multiple-choice task (40 documents of near-equal choices) and a generation task."""
    folder = tmp_path_factory.mktemp("tasks")
    gen = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "sun", "map", "ink", "owl", "fig", "jar"]
    with open(folder / "choice.jsonl", "w") as f:
        for i in range(40):
            picks = torch.randperm(len(words), generator=gen)[:3].tolist()
            question = "The " + " ".join(words[j] for j in torch.randperm(8, generator=gen)[:6].tolist()) + " and the"
            f.write(json.dumps({"question": question, "choices": [" " + words[j] for j in picks], "answer": i % 3}))
            f.write("\n")
    (folder / "choice.yaml").write_text(
        CHOICE_YAML.format(name="tiny_choice", data=json.dumps(str(folder / "choice.jsonl")))
    )
    with open(folder / "generate.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"question": f"Say {i}:", "answer": f" {i}"}) + "\n")
    (folder / "generate.yaml").write_text(GENERATE_YAML.format(data=json.dumps(str(folder / "generate.jsonl"))))
    return folder


def compressed(bits=None, ratio=None):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    kv = None if bits is None else eigenkv.KVQuantConfig(bits=bits, group_size=16)
    lowrank = None if ratio is None else eigenkv.EigenConfig(target_ratio=ratio)
    calibration = None
    if lowrank is not None:
        from tests.helpers import random_windows

        calibration = random_windows(model, count=4, length=48)
    return eigenkv.apply_recipe(model, eigenkv.Recipe(lowrank=lowrank, kv=kv), calibration, progress=False), tok


def loglikelihoods(results, task="tiny_choice") -> torch.Tensor:
    """``(documents, choices)`` float64: the loglikelihood lm-eval computed for every choice."""
    rows = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return torch.tensor([[r[0][0] for r in s["resps"]] for s in rows], dtype=torch.float64)


def run(c, tok, task_dir, **kwargs):
    config = TaskConfig(tasks=("tiny_choice",), include_path=str(task_dir), log_samples=True, **kwargs)
    return evaluate_tasks(c, tok, config, progress=False)


def test_a_2bit_cache_changes_the_accuracy_and_every_loglikelihood(task_dir):
    base = run(*compressed(), task_dir)
    quant = run(*compressed(bits=2), task_dir)
    acc = [r["value"] for r in accuracy_rows(base)], [r["value"] for r in accuracy_rows(quant)]
    assert accuracy_rows(base)[0]["metric"] == "acc" and len(acc[0]) == 1
    assert acc[0] != acc[1]
    a, b = loglikelihoods(base), loglikelihoods(quant)
    assert a.shape == (40, 3) and (a - b).abs().min() > 0  # every scored continuation read the quantized cache
    assert quant["eigenkv"]["recipe"]["kv"]["bits"] == 2 and base["eigenkv"]["recipe"]["kv"] is None


def test_loglikelihoods_are_those_of_token_by_token_decoding_through_the_quantized_cache(task_dir):
    c, tok = compressed(bits=2)
    results = run(c, tok, task_dir, limit=2)
    sample = min(results["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    context, choice = (tok(text, add_special_tokens=False)["input_ids"] for text in sample["arguments"][0])
    ids = torch.tensor([context + choice])
    with torch.no_grad(), c:
        cache = c.new_cache()
        steps = [c.model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])]
    logp = torch.cat(steps, dim=1).log_softmax(-1)[0, :-1].double()
    expected = logp[len(context) - 1 :].gather(1, ids[0, len(context) :, None]).sum()
    assert loglikelihoods(results)[0, 0].item() == pytest.approx(expected.item(), abs=2e-4)


def test_batches_give_the_loglikelihoods_of_single_sequences_with_a_quantized_lowrank_cache(task_dir):
    c, tok = compressed(bits=2, ratio=0.6)
    one = loglikelihoods(run(c, tok, task_dir, limit=12))
    four = loglikelihoods(run(c, tok, task_dir, limit=12, batch_size=4))
    torch.testing.assert_close(one, four, atol=1e-4, rtol=0)


def test_generation_tasks_decode_through_the_quantized_cache(task_dir):
    c, tok = compressed(bits=2)
    config = TaskConfig(tasks=("tiny_generate",), include_path=str(task_dir), log_samples=True)
    results = evaluate_tasks(c, tok, config, progress=False)
    rows = accuracy_rows(results)
    assert [r["metric"] for r in rows] == ["exact_match"] and 0 <= rows[0]["value"] <= 1
    assert len(results["samples"]["tiny_generate"]) == 3


def test_results_are_saved_in_lm_evals_format_beside_the_recipe(task_dir, tmp_path):
    c, tok = compressed(bits=2)
    results = run(c, tok, task_dir, limit=3)
    folder = save_task_results(results, tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.json", "results.json", "samples_tiny_choice.jsonl"]
    assert eigenkv.Recipe.load(folder / "recipe.json") == c.recipe
    again = load_task_results(folder)
    for key in ("results", "configs", "versions", "n-shot", "n-samples"):
        assert key in again
    assert again["results"]["tiny_choice"]["acc,none"] == results["results"]["tiny_choice"]["acc,none"]
    (folder / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="not an eigenkv task result"):
        load_task_results(folder)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tasks=()), "is empty"),
        (dict(tasks=("a",), include_path="/nonexistent/tasks"), "not a folder"),
        (dict(tasks=("a",), limit=0), "limit must be >= 1"),
        (dict(tasks=("a",), batch_size=1.5), "batch_size must be an integer"),
        (dict(tasks=("a",), version=2), "version 2 is not supported"),
    ],
)
def test_task_config_refuses_bad_values(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        TaskConfig(**kwargs)


def test_task_config_round_trips_and_splits_comma_lists(task_dir):
    config = TaskConfig(tasks=("a,b", "c"), include_path=str(task_dir), limit=5)
    assert config.tasks == ("a", "b", "c")
    assert TaskConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TaskConfig fields"):
        TaskConfig.from_dict({**config.to_dict(), "shots": 3})


def test_an_unknown_task_is_named(task_dir):
    c, tok = compressed()
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task"):
        evaluate_tasks(c, tok, TaskConfig(tasks=("no_such_task",), include_path=str(task_dir)), progress=False)


def test_cli_tasks_writes_a_run_folder_and_reuses_it(model_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "run"

    def argv(limit):
        return ["tasks", "--model", str(model_dir), "--tasks", "tiny_choice", "--include-path", str(task_dir),
                "--limit", str(limit), "--kv-bits", "2", "--kv-group", "16", "--out", str(out), "--quiet"]  # fmt: skip

    assert main(argv(4)) == 0
    printed = capsys.readouterr().out
    assert "tiny_choice" in printed and "recipe=2b-g16" in printed
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["task_config"]["limit"] == 4 and record["rows"][0]["metric"] == "acc"
    assert json.loads((out / "results.json").read_text())["n-samples"]["tiny_choice"]["effective"] == 4
    assert main(argv(4)) == 0 and "already computed" in capsys.readouterr().out
    assert main(argv(5)) == 2 and "another configuration" in capsys.readouterr().err


def test_offline_wikitext_tasks_are_well_formed(tmp_path):
    text = (
        " = Alpha = \n"
        " The first article has a paragraph that is long enough to be kept . "
        + " ".join(f"Its sentence number {i} goes on ." for i in range(8))
        + " Finally it ends with zebra .\n"
        " = Beta = \n"
        " Another article talks about boats and the sea . "
        + " ".join(f"Boat number {i} floats on water ." for i in range(8))
        + " Its last word is harbour .\n"
    )  # fmt: skip
    last = lastword_documents(text, documents=10)
    assert [d["target"] for d in last] == ["zebra", "harbour"]
    assert last[0]["context"].endswith("ends with") and "zebra" not in last[0]["context"]
    endings = ending_documents(text, documents=10, seed=0)
    for doc, article_text in zip(endings, ("The first article", "Another article"), strict=True):
        assert doc["context"].startswith(article_text) and len(doc["endings"]) == 4 and 0 <= doc["label"] < 4
        true = doc["endings"][doc["label"]]
        assert all(e not in doc["context"] for e in doc["endings"]) and true.strip() in text
    assert ending_documents(text, documents=10, seed=0) == endings


def test_offline_wikitext_task_files_load_in_lm_eval(tmp_path):
    from eigenkv.eval.tasks import task_manager

    names = write_text_tasks(tmp_path, documents=5)
    assert names == ("wikitext2_lastword", "wikitext2_ending")
    rows = [json.loads(x) for x in (tmp_path / "wikitext2_ending.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["endings"]) == 4 for r in rows)
    manager = task_manager(TaskConfig(tasks=names, include_path=str(tmp_path)))
    assert set(names) <= set(manager.all_tasks)
