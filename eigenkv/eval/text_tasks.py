"""lm-eval tasks made from offline Wikitext-2 text, for machines that cannot download the hub's task data.

    names = write_text_tasks("tasks/")                  # tasks/wikitext2_lastword.yaml + .jsonl, ...
    evaluate_tasks(compressed, tokenizer, TaskConfig(tasks=names, include_path="tasks/"))

Two tasks, both on Wikitext-2's test articles (the text the perplexities are
measured on; eigenkv calibrates on other text):

- ``wikitext2_lastword`` (LAMBADA's format): a paragraph's text up to the last
  word of its last sentence; the model must produce that word. Metrics:
  ``acc`` (the greedy continuation is exactly the word) and ``perplexity`` of
  the word.
- ``wikitext2_ending`` (HellaSwag's format): the first sentences of a
  paragraph and four candidate next sentences, the true one and three drawn
  from other articles; the model picks the most likely. Metrics: ``acc`` and
  ``acc_norm`` (likelihood per character).

They measure what a compressed cache changes on a task's own terms (a
choice, an exact word) rather than on the average token; they are easy for
models far below the hub benchmarks. Files are deterministic for a text,
``documents`` and ``seed``, and written atomically.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from eigenkv.data import load_text
from eigenkv.io import atomic_write_text

TASKS = ("wikitext2_lastword", "wikitext2_ending")
WORD = re.compile(r"[A-Za-z]{3,}")

_YAML = {
    "wikitext2_lastword": """task: wikitext2_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
""",
    "wikitext2_ending": """task: wikitext2_ending
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
""",
}


def paragraphs(text: str, min_words: int = 40) -> list[tuple[int, str]]:
    """``(article, paragraph)`` of Wikitext's body lines with at least ``min_words`` words (headings skipped)."""
    out, article = [], -1
    for line in text.split("\n"):
        line = line.strip()
        if line.startswith("= ") and not line.startswith("= = "):
            article += 1
        elif line and not line.startswith("=") and len(line.split()) >= min_words:
            out.append((max(article, 0), line))
    return out


def sentences(paragraph: str) -> list[str]:
    """A Wikitext paragraph's sentences (its tokenizer spaces every ``.``)."""
    parts = [s.strip() for s in re.split(r"(?<= \.) ", paragraph)]
    return [s for s in parts if len(s.split()) >= 4]


def lastword_documents(text: str, documents: int, context_words: int = 120) -> list[dict]:
    """LAMBADA-style documents: the last ``context_words`` words before a paragraph's final word."""
    out = []
    for _, paragraph in paragraphs(text):
        words = paragraph.removesuffix(" .").split()
        if not WORD.fullmatch(words[-1]):
            continue
        out.append({"context": " ".join(words[-context_words - 1 : -1]), "target": words[-1]})
        if len(out) == documents:
            break
    return out


def ending_documents(text: str, documents: int, seed: int = 0, lead: int = 3) -> list[dict]:
    """HellaSwag-style documents: up to ``lead`` sentences, the true next one and 3 from other articles."""
    found = [(article, sentences(p)) for article, p in paragraphs(text)]
    found = [(article, s) for article, s in found if len(s) >= 2]
    pool = [(article, sentence) for article, s in found for sentence in s]
    rng = random.Random(seed)
    out = []
    for article, s in found:
        cut = min(lead, len(s) - 1)
        others = []
        while len(others) < 3:
            other_article, sentence = pool[rng.randrange(len(pool))]
            if other_article != article and sentence not in others:
                others.append(sentence)
        label = rng.randrange(4)
        endings = others[:label] + [s[cut]] + others[label:]
        out.append({"context": " ".join(s[:cut]), "endings": [" " + e for e in endings], "label": label})
        if len(out) == documents:
            break
    return out


def write_text_tasks(
    folder: str | os.PathLike,
    *,
    documents: int = 500,
    seed: int = 0,
    data_dir_path: str | os.PathLike | None = None,
) -> tuple[str, ...]:
    """Write the two tasks (a YAML and a JSON-lines data file each) into ``folder``; returns their names.

    Args:
        folder: where to write (created).
        documents: documents per task (fewer if the text has fewer paragraphs).
        seed: the draw of the ending task's wrong endings and of the true one's place.
        data_dir_path: the offline text folder (default ``$EIGENKV_DATA_DIR``; the hub when allowed).
    """
    if documents < 1:
        raise ValueError(f"documents must be >= 1; got {documents}")
    folder = Path(folder)
    text = load_text("wikitext2", "test", data_dir_path=data_dir_path)
    made = {
        "wikitext2_lastword": lastword_documents(text, documents),
        "wikitext2_ending": ending_documents(text, documents, seed),
    }
    for name, docs in made.items():
        data = folder / f"{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        source = f"Wikitext-2 test split, {len(docs)} documents, seed {seed}, made by eigenkv"
        atomic_write_text(
            folder / f"{name}.yaml", _YAML[name].format(data=json.dumps(str(data.resolve())), source=json.dumps(source))
        )
    return TASKS
