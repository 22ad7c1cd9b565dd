"""Every kernel compiles for sm_80 and sm_90 at its launch configs, within its spill budget and shared memory.

The check (``python -m eigenkv.kernels.compile_check``, no GPU needed) runs in a child process that this folder's
conftest starts at collection, beside the other tests.
"""

import json

import pytest

from eigenkv.kernels import compile_check as check_module


@pytest.fixture(scope="module")
def reports(compile_check):
    code, stdout, stderr = compile_check.wait(timeout=850)  # within the suite's 900 s a test
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    errors = [r for r in reports if "error" in r]
    assert code == 0 and not errors, f"compile check failed: {errors[:5]}\n{stderr[-4000:]}"
    return reports


def test_every_spec_compiled_for_both_targets(reports):
    expected = {spec.name for spec in check_module.all_specs()}
    assert expected, "no kernel declares compile specs"
    for target in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in reports if r["target"] == target} == expected


# The stack frames the compiles hold today: the largest (bytes per thread) of any config of each kernel, on sm_80
# or sm_90, keyed by (kernel, head size 256). A kernel not listed must not spill at all, and no config may spill
# more than its kernel does today. The decode kernel in rank mode (capped at 128 registers: four programs per SM)
# spills up to 136 bytes below head size 256 and 352 at 256; in pre mode its 32-280 bytes are libdevice's sin/cos
# reduction array (angles beyond 1e5 radians), not spilled registers. The prefill kernel spills at head size 256
# only. (The decode kernel's frames went from 3656 and 5888 bytes to 2560 and 4544 when per-channel codes became a
# row per token, and to 280 and 352 when its tail loop took tiles of 16 tokens.)
SPILL_BUDGET = {
    ("lowrank_decode", False): 280,
    ("lowrank_decode", True): 352,
    ("lowrank_prefill", True): 304,
    ("quantize_pack", False): 8,
    ("group_minmax", False): 8,
}


def budget_key(name: str) -> tuple[str, bool]:
    return name.split("[")[0], any(size in name for size in ("d256", "rk256"))


def test_spills_within_their_budget_and_shared_memory_within_limits(reports):
    for r in reports:
        budget = SPILL_BUDGET.get(budget_key(r["kernel"]), 0)
        assert r["spill_bytes"] <= budget, r
        assert (r["spill_instructions"] == 0) == (r["spill_bytes"] == 0), r  # a stack frame is spill traffic
        assert r["shared"] <= r["shared_limit"], r
        assert 0 < r["registers"] <= 255, r
    spilled = {budget_key(r["kernel"]) for r in reports if r["spill_bytes"]}
    assert spilled <= set(SPILL_BUDGET), spilled


def test_jobs_below_one_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_module.main(["--jobs", "0"])
    assert exit_info.value.code == 2
    assert "--jobs must be at least 1; got 0" in capsys.readouterr().err
