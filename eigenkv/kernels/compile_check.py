"""Compile every kernel for sm_80 and sm_90 without a GPU, at every config its launcher uses.

``python -m eigenkv.kernels.compile_check [--jobs N]`` prints one JSON line per
(kernel config, target) with shared memory, registers and register spills (read
with the ``cuobjdump`` shipped in the Triton wheel: the stack frame ptxas spills
into, and the local loads and stores in the SASS), compiling in N processes (one
per CPU by default). ``python -m eigenkv.kernels.roofline`` writes the static
roofline of the attention kernels. Both must run with ``TRITON_INTERPRET``
unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

# Local loads and stores in SASS: register spills (the kernels declare no local arrays).
SPILL_OPCODES = re.compile(r"\b(?:LDL|STL)(?:\.[\w.]+)?\s")

# Shared memory per block (bytes) a kernel may use on each target.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class CompiledSpec:
    """A spec compiled for ``sm_<capability>``, with the resource usage of its cubin.

    Attributes:
        kernel: Triton's compiled kernel (``kernel.asm`` holds ``"ttgir"``, ``"ptx"``, ``"cubin"``).
        shared: shared memory bytes per block Triton launches it with.
        registers: registers per thread.
        spill_bytes: stack frame bytes per thread (cuobjdump's ``STACK``): where ptxas puts the registers it
            spills (its ``LOCAL`` counts only local arrays, which these kernels never declare, and stays 0).
        spill_instructions: local loads and stores (``LDL``, ``STL``) in the SASS: the spill traffic's code.
    """

    spec: KernelSpec
    capability: int
    kernel: object
    shared: int
    registers: int
    spill_bytes: int
    spill_instructions: int


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """What the Triton wheel's ``cuobjdump <flags>`` prints for ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_cuobjdump()), *flags, f.name], capture_output=True, text=True, check=True).stdout


def compile_kernel(spec: KernelSpec, capability: int) -> CompiledSpec:
    """Compile ``spec`` for ``sm_<capability>`` (no GPU needed) and read its registers and spills."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    src = ASTSource(
        fn=spec.fn,
        signature={**spec.signature, **{k: "constexpr" for k in spec.constexprs}},
        constexprs=spec.constexprs,
        attrs=spec.attrs(),  # the arguments a launch passes divisible by 16, as Triton specializes them
    )
    compiled = compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, "maxnreg": spec.maxnreg},
    )
    usage = cuobjdump(compiled.asm["cubin"], "--dump-resource-usage")
    registers = re.search(r"REG:(\d+)", usage)
    spills = re.search(r"STACK:(\d+)", usage)
    if registers is None or spills is None:
        raise RuntimeError(f"cannot read resource usage of {spec.name}: {usage!r}")
    # cuobjdump's SHARED is static shared memory only (on sm_90 the 1 KB the driver reserves per block):
    # Triton's kernels take all theirs dynamically, as metadata.shared
    return CompiledSpec(
        spec=spec,
        capability=capability,
        kernel=compiled,
        shared=int(compiled.metadata.shared),
        registers=int(registers.group(1)),
        spill_bytes=int(spills.group(1)),
        spill_instructions=_spill_instructions(compiled.asm["cubin"]) if int(spills.group(1)) else 0,
    )


def _spill_instructions(cubin: bytes) -> int:
    """``LDL``/``STL`` in the SASS of ``cubin`` (only disassembled when it has a stack frame: without one there is
    nowhere to spill to, and disassembling every compile would double the check's time)."""
    return len(SPILL_OPCODES.findall(cuobjdump(cubin, "-sass")))


def compile_spec(spec: KernelSpec, capability: int) -> dict:
    """Compile ``spec`` for ``sm_<capability>``; return shared bytes, registers and spill bytes."""
    compiled = compile_kernel(spec, capability)
    return {
        "kernel": spec.name,
        "target": f"sm_{capability}",
        "shared": compiled.shared,
        "shared_limit": SHARED_LIMIT[capability],
        "registers": compiled.registers,
        "spill_bytes": compiled.spill_bytes,
        "spill_instructions": compiled.spill_instructions,
    }


def all_specs() -> list[KernelSpec]:
    return [spec for module in KERNEL_MODULES for spec in importlib.import_module(module).compile_specs()]


# What fork_map's workers call, set before the pool forks: jitted functions do not pickle.
_FORK_JOB: tuple[Callable, Sequence] | None = None


def _call_forked(index: int):
    fn, items = _FORK_JOB
    return fn(items[index])


def fork_map(fn: Callable, items: Sequence, chunksize: int = 1, processes: int | None = None) -> Iterator:
    """``fn(item)`` for each item, in order, computed by a fork pool of ``processes`` workers (one per CPU).

    Workers inherit ``fn`` and ``items`` by forking (specs hold jitted functions, which do not pickle);
    only the results travel back, so they must pickle. Compiling is CPU-bound: processes, not threads.
    """
    global _FORK_JOB
    _FORK_JOB = (fn, items)
    try:
        workers = min(processes or os.cpu_count() or 1, max(len(items), 1))
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_call_forked, range(len(items)), chunksize=chunksize)
    finally:
        _FORK_JOB = None


def _compile_one(job: tuple[KernelSpec, int]) -> dict:
    spec, capability = job
    try:
        return compile_spec(spec, capability)
    except Exception as err:  # reported, and the run fails, after every other config is tried
        return {"kernel": spec.name, "target": f"sm_{capability}", "error": f"{type(err).__name__}: {err}"}


def check_all(processes: int | None = None) -> int:
    """Compile every spec for sm_80 and sm_90 in ``processes`` workers (one per CPU), print one JSON line each;
    1 when any failed."""
    jobs = [(spec, capability) for spec in all_specs() for capability in (80, 90)]
    failed = 0
    for report in fork_map(_compile_one, jobs, chunksize=4, processes=processes):
        failed += "error" in report
        print(json.dumps(report), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eigenkv.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=None, metavar="N", help="compile processes (default one per CPU)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    if interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU", file=sys.stderr)
        return 2
    return check_all(args.jobs)


if __name__ == "__main__":
    sys.exit(main())
