"""Files eigenkv writes: atomic writes, and seals that make any later edit detectable.

Every artifact and result that eigenkv writes goes through these helpers, so a
run killed half-way never leaves a truncated JSON or a half-converted model
that a later run would trust. Artifacts record the SHA-256 of their files and
of their own JSON content (:func:`seal`), so a file edited by hand is refused
on load with a clear message instead of being trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (see :func:`atomic_write_text`)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``final`` by one rename when the block ends.

    If the block raises, the staging folder is deleted and ``final`` is
    untouched. If another process created ``final`` meanwhile, its copy wins and
    ours is discarded (both were built from the same inputs).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


SEAL_KEY = "content_sha256"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_digest(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(obj: dict) -> dict:
    """``obj`` plus the SHA-256 of its canonical JSON under ``"content_sha256"`` (checked by :func:`check_seal`)."""
    return {**obj, SEAL_KEY: _content_digest(obj)}


def check_seal(obj: dict, path: str | os.PathLike) -> None:
    """Raise ``ValueError`` when ``obj`` (read from ``path``) was edited after :func:`seal`."""
    if obj.get(SEAL_KEY) != _content_digest(obj):
        raise ValueError(
            f"{path} was edited after it was written (its content no longer matches its {SEAL_KEY}); "
            "eigenkv does not trust edited artifacts: recompute it"
        )


def read_sealed(file: Path, fmt: str, artifact: str) -> dict:
    """The sealed JSON ``file`` of format ``fmt``, with the SHA-256 of every file its ``"files"`` lists (paths
    relative to its folder) checked; ``artifact`` names what it describes in errors ("model", "adapters")."""
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is corrupt ({err}); save the {artifact} again") from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{file} has format {found!r}; this version of eigenkv reads {fmt!r}")
    check_seal(record, file)
    for name, digest in record["files"].items():
        path = file.parent / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the saved {artifact}; save it again")
        if sha256_file(path) != digest:
            raise ValueError(
                f"{path} was modified after it was saved with the {artifact} (SHA-256 differs); save them again"
            )
    return record
