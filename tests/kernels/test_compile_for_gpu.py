"""Every kernel compiles for sm_80 and sm_90 at its launch configs, without spills or excess shared memory.

Runs ``python -m eigenkv.kernels.compile_check`` in a child process with
TRITON_INTERPRET unset (interpreted kernels cannot be compiled), no GPU needed.
"""

import json
import os
import subprocess
import sys

import pytest

from eigenkv.kernels import compile_check


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "eigenkv.kernels.compile_check"], env=env, capture_output=True, text=True, timeout=900
    )
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in reports if "error" in r]
    assert proc.returncode == 0 and not errors, f"compile check failed: {errors[:5]}\n{proc.stderr[-4000:]}"
    return reports


def test_every_spec_compiled_for_both_targets(reports):
    expected = {spec.name for spec in compile_check.all_specs()}
    assert expected, "no kernel declares compile specs"
    for target in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in reports if r["target"] == target} == expected


def test_no_spills_and_shared_memory_within_limits(reports):
    for r in reports:
        assert r["spill_bytes"] == 0, r
        assert r["shared"] <= r["shared_limit"], r
        assert 0 < r["registers"] <= 255, r
