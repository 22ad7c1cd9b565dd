"""Starts the sm_80/sm_90 compile check as soon as the tests are collected.

The check (``python -m eigenkv.kernels.compile_check``, hundreds of compiles) is the longest step of the suite, and
the interpreter tests keep one core busy: run side by side, the suite takes minutes less. The check takes every
core but one, so that the tests, the longer of the two, never wait for a core (the suite on 2 cores: 17.2 -> 13.2
min, with the SmolLM2 smoke test a decode step shorter).
Its tests are moved to the end, so they wait for the check only when it has had the whole suite's time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO

import pytest

COMPILE_TESTS = "test_compile_for_gpu.py"


@dataclass
class CompileCheck:
    """A compile check running in a child process; its output goes to files (a pipe would fill and stall it)."""

    proc: subprocess.Popen
    stdout: IO[str]
    stderr: IO[str]

    @classmethod
    def start(cls) -> CompileCheck:
        # TRITON_INTERPRET unset: interpreted kernels cannot be compiled for a GPU
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # the files outlive this call: the check writes them while the tests run, and wait() closes them
        stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
        jobs = max(1, (os.cpu_count() or 1) - 1)
        cmd = [sys.executable, "-m", "eigenkv.kernels.compile_check", "--jobs", str(jobs)]
        return cls(subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True), stdout, stderr)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once the check ends; kills it after ``timeout`` seconds more."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        outputs = []
        for file in (self.stdout, self.stderr):
            file.seek(0)
            outputs.append(file.read())
            file.close()
        return code, *outputs


_CHECK = pytest.StashKey[CompileCheck]()


@pytest.hookimpl(trylast=True)  # after deselection (-k, -m) and the slow-test skips
def pytest_collection_modifyitems(config, items):
    compile_tests = [item for item in items if item.path.name == COMPILE_TESTS]
    items[:] = [item for item in items if item.path.name != COMPILE_TESTS] + compile_tests
    if compile_tests and not config.option.collectonly:
        config.stash[_CHECK] = CompileCheck.start()


def pytest_unconfigure(config):
    check = config.stash.get(_CHECK, None)
    if check is not None and check.proc.poll() is None:  # the run was interrupted before its tests
        check.proc.kill()


@pytest.fixture(scope="session")
def compile_check(pytestconfig) -> CompileCheck:
    """The compile check started at collection (or now, when its tests were not collected by this conftest)."""
    check = pytestconfig.stash.get(_CHECK, None)
    if check is None:
        check = pytestconfig.stash[_CHECK] = CompileCheck.start()
    return check
