"""Compile every kernel for sm_80 and sm_90 without a GPU, at every config its launcher uses.

``python -m eigenkv.kernels.compile_check`` prints one JSON line per (kernel
config, target) with shared memory, registers and spill bytes (read with the
``cuobjdump`` shipped in the Triton wheel). It must run with
``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from eigenkv.kernels.backend import interpreting
from eigenkv.kernels.utils import KernelSpec

# Kernel modules whose compile_specs() the compile check walks.
KERNEL_MODULES = (
    "eigenkv.kernels.group_minmax",
    "eigenkv.kernels.quant_pack",
    "eigenkv.kernels.lowrank_decode",
    "eigenkv.kernels.lowrank_prefill",
)

# Shared memory per block (bytes) a kernel may use on each target.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_spec(spec: KernelSpec, capability: int) -> dict:
    """Compile ``spec`` for ``sm_<capability>``; return shared bytes, registers and spill bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    src = ASTSource(
        fn=spec.fn,
        signature={**spec.signature, **{k: "constexpr" for k in spec.constexprs}},
        constexprs=spec.constexprs,
    )
    compiled = compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    registers = re.search(r"REG:(\d+)", usage)
    spills = re.search(r"LOCAL:(\d+)", usage)
    if registers is None or spills is None:
        raise RuntimeError(f"cannot read resource usage of {spec.name}: {usage!r}")
    return {
        "kernel": spec.name,
        "target": f"sm_{capability}",
        "shared": int(compiled.metadata.shared),
        "shared_limit": SHARED_LIMIT[capability],
        "registers": int(registers.group(1)),
        "spill_bytes": int(spills.group(1)),
    }


def all_specs() -> list[KernelSpec]:
    return [spec for module in KERNEL_MODULES for spec in importlib.import_module(module).compile_specs()]


_SPECS: list[KernelSpec] = []


def _compile_one(job: tuple[int, int]) -> dict:
    index, capability = job
    spec = _SPECS[index]
    try:
        return compile_spec(spec, capability)
    except Exception as err:  # reported, and the run fails, after every other config is tried
        return {"kernel": spec.name, "target": f"sm_{capability}", "error": f"{type(err).__name__}: {err}"}


def main() -> int:
    if interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU", file=sys.stderr)
        return 2
    _SPECS[:] = all_specs()
    jobs = [(i, capability) for i in range(len(_SPECS)) for capability in (80, 90)]
    # fork: workers inherit the spec list (jitted functions do not pickle); compiling is CPU-bound
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        reports = pool.imap(_compile_one, jobs, chunksize=4)
        failed = 0
        for report in reports:
            failed += "error" in report
            print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
