"""Offline evaluation and calibration text, and its tokenization into windows.

Sources (``load_text``):

- ``"wikitext2"``: Wikitext-2 raw. Offline, ``$EIGENKV_DATA_DIR/wikitext-2-raw/wiki.test.raw``
  (test split only; CRLF turned into LF). With network access (``HF_DATASETS_OFFLINE``
  unset), any split through ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``,
  rows joined with ``"\\n\\n"`` as the literature does.
- ``"brown"``: the Brown corpus, ``$EIGENKV_DATA_DIR/brown/brown.txt`` (one split, ``"all"``).
- any path to a UTF-8 text file.

The project's Makefile points ``EIGENKV_DATA_DIR`` at ``../shared/data``.

Windows (``tokenize_windows``): the whole text is tokenized once without special
tokens, then cut into consecutive, non-overlapping windows of ``seq_len`` tokens;
a tail shorter than ``seq_len`` is dropped. BOS policy:

- ``"none"`` (default, the protocol of the results in docs/results.md): no BOS anywhere.
- ``"window"``: every window is ``[BOS] + seq_len - 1`` text tokens; the BOS is
  context only (never a predicted token).
- ``"stream"``: one BOS before the whole token stream (what ``tokenizer(text)``
  does for Llama tokenizers), so only the first window starts with it.

Window ``i`` always covers the same tokens for a given text, tokenizer, ``seq_len``
and BOS policy, so evaluation and calibration ranges chosen by index
(``TokenWindows.select``) are disjoint exactly when their index ranges are.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eigenkv.env import env_flag

BOS_POLICIES = ("none", "window", "stream")

# name -> {split: path relative to the data folder}
OFFLINE_FILES = {
    "wikitext2": {"test": "wikitext-2-raw/wiki.test.raw"},
    "brown": {"all": "brown/brown.txt"},
}
DEFAULT_SPLIT = {"wikitext2": "test", "brown": "all"}


def data_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: ``path``, else ``$EIGENKV_DATA_DIR``, else None."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("EIGENKV_DATA_DIR")
    return Path(env).expanduser() if env else None


def _hub_allowed() -> bool:
    return not (env_flag("HF_DATASETS_OFFLINE") or env_flag("HF_HUB_OFFLINE"))


def _read_wikitext_from_hub(split: str) -> str:
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    return "\n\n".join(rows)


def load_text(name: str, split: str | None = None, *, data_dir_path: str | os.PathLike | None = None) -> str:
    """Return the raw text of a dataset split (``"wikitext2"``, ``"brown"``) or of a local text file.

    Raises:
        ValueError: unknown dataset name or split.
        FileNotFoundError: the offline file is missing and the hub is not allowed;
            the message names the file and the two ways to provide it.
    """
    key = str(name).lower()
    if key not in OFFLINE_FILES:
        local = Path(str(name)).expanduser()
        if local.is_file():
            if split is not None:
                raise ValueError(f"a text file has no splits; drop split={split!r} for {local}")
            return local.read_text(encoding="utf-8").replace("\r\n", "\n")
        if local.suffix or os.sep in str(name):
            raise FileNotFoundError(f"text file {local} does not exist")
        raise ValueError(f"unknown dataset {name!r}; use one of {sorted(OFFLINE_FILES)} or the path of a text file")
    split = split or DEFAULT_SPLIT[key]
    if key == "wikitext2" and split not in ("train", "validation", "test"):
        raise ValueError(f"wikitext2 has splits train, validation, test; got {split!r}")
    if key == "brown" and split != "all":
        raise ValueError(f"brown has a single split 'all'; got {split!r}")

    root = data_dir(data_dir_path)
    relative = OFFLINE_FILES[key].get(split)
    if root is not None and relative is not None and (root / relative).is_file():
        return (root / relative).read_text(encoding="utf-8").replace("\r\n", "\n")
    if key == "wikitext2" and _hub_allowed():
        return _read_wikitext_from_hub(split)

    if relative is None:
        problem = f"{key} split {split!r} is not available offline (offline files: {OFFLINE_FILES[key]})"
    elif root is None:
        problem = f"{key}:{split} needs the offline data folder, but EIGENKV_DATA_DIR is not set"
    elif not root.is_dir():
        problem = f"the data folder {root} (EIGENKV_DATA_DIR) does not exist"
    else:
        problem = f"{root / relative} does not exist"
    fix = f"set EIGENKV_DATA_DIR to a folder holding {relative or 'it'} (this project's ../shared/data)"
    if key == "wikitext2":
        fix += ", or allow hub access (unset HF_DATASETS_OFFLINE and HF_HUB_OFFLINE) to download it with `datasets`"
    raise FileNotFoundError(f"{problem}; {fix}")


@dataclass(frozen=True)
class TokenWindows:
    """Consecutive non-overlapping token windows of one text.

    Attributes:
        input_ids: ``(num_windows, seq_len)`` int64 token ids.
        source: where the text came from, e.g. ``"wikitext2:test"``.
        seq_len: tokens per window.
        bos: BOS policy (see the module docstring).
        first: index of the first window held here among all windows of the text.
        available: how many windows the whole text yields.
        text_sha256: digest of the text, so results name exactly what they saw.
    """

    input_ids: torch.Tensor
    source: str
    seq_len: int
    bos: str
    first: int
    available: int
    text_sha256: str = field(default="")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def indices(self) -> range:
        """Indices, among all windows of the text, of the windows held here."""
        return range(self.first, self.first + len(self))

    def select(self, start: int = 0, count: int | None = None) -> TokenWindows:
        """Windows ``[start, start + count)`` of this set (``count=None``: to the end)."""
        n = len(self)
        if start < 0 or start >= n:
            raise ValueError(f"start={start} is outside the {n} windows of {self.source} (seq_len {self.seq_len})")
        count = n - start if count is None else count
        if count < 1 or start + count > n:
            raise ValueError(
                f"asked for {count} windows from window {start}, but {self.source} holds only {n} windows of "
                f"{self.seq_len} tokens from there on ({n - start}); ask for fewer windows or a shorter seq_len"
            )
        return TokenWindows(
            input_ids=self.input_ids[start : start + count],
            source=self.source,
            seq_len=self.seq_len,
            bos=self.bos,
            first=self.first + start,
            available=self.available,
            text_sha256=self.text_sha256,
        )

    def disjoint_from(self, other: TokenWindows) -> bool:
        """True when the two sets share no text token (both cut from the same text by the same tokenizer)."""
        return not windows_overlap(self.describe(), other.describe())

    def text_token_range(self) -> tuple[int, int]:
        """``[begin, end)`` of the text tokens (BOS excluded) that these windows cover."""
        n, last = self.seq_len, self.first + len(self)
        if self.bos == "window":
            return self.first * (n - 1), last * (n - 1)
        if self.bos == "stream":  # the stream is [BOS] + text tokens
            return max(self.first * n - 1, 0), last * n - 1
        return self.first * n, last * n

    def describe(self) -> dict:
        """A JSON-ready record of which tokens these are."""
        return {
            "source": self.source,
            "seq_len": self.seq_len,
            "bos": self.bos,
            "windows": len(self),
            "first_window": self.first,
            "available_windows": self.available,
            "text_sha256": self.text_sha256,
        }


def windows_overlap(a: dict, b: dict) -> bool:
    """Whether two :meth:`TokenWindows.describe` records share a text token."""
    same_text = (a.get("source"), a.get("text_sha256")) == (b.get("source"), b.get("text_sha256"))
    if not same_text:
        return False

    def text_range(d: dict) -> tuple[int, int]:
        return TokenWindows(
            input_ids=torch.empty(d["windows"], 0, dtype=torch.long),
            source=d["source"],
            seq_len=d["seq_len"],
            bos=d["bos"],
            first=d["first_window"],
            available=d["available_windows"],
        ).text_token_range()

    (a0, a1), (b0, b1) = text_range(a), text_range(b)
    return a0 < b1 and b0 < a1


def tokenize_windows(
    tokenizer,
    text: str,
    seq_len: int = 2048,
    *,
    bos: str = "none",
    source: str = "text",
) -> TokenWindows:
    """Tokenize ``text`` and cut it into all its windows of ``seq_len`` tokens (BOS policy in the module doc)."""
    if int(seq_len) != seq_len or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (one token of context and one to predict); got {seq_len}")
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos must be one of {BOS_POLICIES}; got {bos!r}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos != "none" and bos_id is None:
        raise ValueError(f"bos={bos!r} needs a tokenizer with a BOS token; this one has none: use bos='none'")
    if bos == "stream":
        ids = torch.cat([torch.tensor([bos_id]), ids])
    step = seq_len - 1 if bos == "window" else seq_len
    available = ids.numel() // step
    if available < 1:
        raise ValueError(
            f"{source} has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a shorter seq_len or a longer text"
        )
    windows = ids[: available * step].view(available, step)
    if bos == "window":
        windows = torch.cat([torch.full((available, 1), bos_id, dtype=torch.long), windows], dim=1)
    return TokenWindows(
        input_ids=windows.contiguous(),
        source=source,
        seq_len=int(seq_len),
        bos=bos,
        first=0,
        available=available,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def load_windows(
    name: str,
    tokenizer,
    seq_len: int = 2048,
    *,
    split: str | None = None,
    start: int = 0,
    count: int | None = None,
    bos: str = "none",
    data_dir_path: str | os.PathLike | None = None,
) -> TokenWindows:
    """``load_text`` + ``tokenize_windows`` + ``select(start, count)`` in one call.

    Example: evaluation on windows 0-15 of Wikitext-2 test and calibration on
    windows 100-131 of the same text are disjoint by construction.
    """
    text = load_text(name, split, data_dir_path=data_dir_path)
    key = str(name).lower()
    source = f"{key}:{split or DEFAULT_SPLIT[key]}" if key in OFFLINE_FILES else str(Path(name).expanduser().resolve())
    return tokenize_windows(tokenizer, text, seq_len, bos=bos, source=source).select(start, count)
