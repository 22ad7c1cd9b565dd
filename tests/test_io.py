import json

import pytest

from eigenkv.io import atomic_directory, atomic_write_json


def test_json_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert path.stat().st_mode & 0o044  # readable by others, unlike a raw mkstemp file


def test_failed_json_write_keeps_old_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_directory_appears_only_when_complete(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError), atomic_directory(final) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(final) as staging:
        (staging / "done.bin").write_bytes(b"x")
        assert not final.exists()
    assert (final / "done.bin").read_bytes() == b"x" and len(list(tmp_path.iterdir())) == 1
