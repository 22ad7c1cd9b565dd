import os

import pytest
import torch

from eigenkv.data import TokenWindows, load_text, load_windows, tokenize_windows
from tests.helpers import char_tokenizer

needs_shared_data = pytest.mark.skipif(
    not os.environ.get("EIGENKV_DATA_DIR"), reason="../shared/data is not beside the checkout"
)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@needs_shared_data
def test_wikitext2_test_offline_is_lf_only_and_starts_with_first_article():
    text = load_text("wikitext2", "test")
    assert "\r" not in text
    assert text.lstrip().startswith("= Robert Boulter =")
    assert 1_200_000 < len(text) < 1_300_000


@needs_shared_data
def test_brown_offline():
    text = load_text("brown")
    assert len(text) > 5_000_000
    with pytest.raises(ValueError, match="single split"):
        load_text("brown", "test")


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown dataset 'ptb'.*brown.*wikitext2"):
        load_text("ptb")


def test_missing_data_dir_names_variable_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EIGENKV_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*EIGENKV_DATA_DIR"):
        load_text("wikitext2", "test")
    monkeypatch.delenv("EIGENKV_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="EIGENKV_DATA_DIR is not set"):
        load_text("brown")


def test_train_split_is_not_offline(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="not available offline"):
        load_text("wikitext2", "train")


def test_wikitext2_goes_to_the_hub_only_when_allowed(monkeypatch, tmp_path):
    from eigenkv import data

    monkeypatch.setenv("EIGENKV_DATA_DIR", str(tmp_path))  # no offline file there
    monkeypatch.setattr(data, "_read_wikitext_from_hub", lambda split: f"hub {split}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert load_text("wikitext2", "train") == "hub train"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="unset HF_DATASETS_OFFLINE"):
        load_text("wikitext2", "test")


def test_local_text_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"line one\r\nline two\r\n")
    assert load_text(str(path)) == "line one\nline two\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))


def test_windows_are_consecutive_slices_of_the_token_stream(tok):
    text = "abcdefghij" * 10  # 100 tokens
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    w = tokenize_windows(tok, text, seq_len=16, source="t")
    assert w.input_ids.shape == (6, 16) and w.available == 6
    assert torch.equal(w.input_ids.flatten(), ids[:96])


def test_bos_policies(tok):
    text = "abcdefghij" * 10
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    per_window = tokenize_windows(tok, text, seq_len=16, bos="window")
    assert (per_window.input_ids[:, 0] == tok.bos_token_id).all()
    assert torch.equal(per_window.input_ids[:, 1:].flatten(), ids[: 15 * per_window.available])
    stream = tokenize_windows(tok, text, seq_len=16, bos="stream")
    assert stream.input_ids[0, 0] == tok.bos_token_id
    assert (stream.input_ids[1:, 0] != tok.bos_token_id).all()
    assert torch.equal(stream.input_ids.flatten()[1:], ids[: 16 * stream.available - 1])
    with pytest.raises(ValueError, match="bos must be one of"):
        tokenize_windows(tok, text, seq_len=16, bos="yes")


def test_select_and_disjoint_ranges(tok):
    w = tokenize_windows(tok, "abcdefghij" * 20, seq_len=10, source="t")  # 20 windows
    evaluation, calibration = w.select(0, 8), w.select(8, 4)
    assert list(evaluation.indices) == list(range(8)) and list(calibration.indices) == [8, 9, 10, 11]
    assert torch.equal(calibration.input_ids, w.input_ids[8:12])
    assert evaluation.disjoint_from(calibration) and calibration.disjoint_from(evaluation)
    assert not evaluation.disjoint_from(w.select(7, 2))
    # selecting within a selection keeps absolute indices
    assert list(calibration.select(1, 2).indices) == [9, 10]
    # a different cut of the same text is compared by token ranges
    longer = tokenize_windows(tok, "abcdefghij" * 20, seq_len=20, source="t")
    assert not longer.select(4, 1).disjoint_from(calibration)  # tokens 80-99 vs 80-119
    assert longer.select(3, 1).disjoint_from(calibration)  # tokens 60-79


def test_bad_window_requests_have_clear_errors(tok):
    w = tokenize_windows(tok, "abcdefghij" * 3, seq_len=10, source="t")  # 3 windows
    with pytest.raises(ValueError, match=r"holds only 3 windows"):
        w.select(0, 5)
    with pytest.raises(ValueError, match="outside"):
        w.select(3)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        tokenize_windows(tok, "abc", seq_len=1)
    with pytest.raises(ValueError, match=r"fewer than one window of 2048.*shorter seq_len"):
        tokenize_windows(tok, "abc" * 10, seq_len=2048)


@needs_shared_data
def test_load_windows_records_source(tok):
    w = load_windows("wikitext2", tok, 512, start=3, count=2)
    assert isinstance(w, TokenWindows)
    assert w.describe()["source"] == "wikitext2:test"
    assert w.describe()["first_window"] == 3 and len(w) == 2 and w.seq_len == 512
    assert len(w.text_sha256) == 64
