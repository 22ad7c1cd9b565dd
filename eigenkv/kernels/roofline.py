"""Static roofline of the attention kernels on sm_90, read from their SASS without a GPU.

``python -m eigenkv.kernels.roofline [--out DIR] [--cases SUBSTRING]`` compiles every
:class:`~eigenkv.kernels.utils.RooflineCase` of the attention kernels (their ``roofline_cases()``: the
benchmark workloads) for sm_90, finds the hot loop in the SASS, counts what one iteration issues, and
estimates the launch time on an H100 SXM and an H200 from the bytes the launch reads, the
instructions it issues per byte and its tensor-core work, next to fp16 SDPA on uncompressed K and V. It writes
``roofline_sm90.csv`` and ``roofline_sm90.md`` and prints the tables.
``--sass NAME`` prints the hot-loop SASS of one case instead (for optimizing a kernel).

:func:`analyze` gives the report row of one case; the pure pieces (:func:`parse_sass`, :func:`hot_loop`,
:func:`opcode_mix`, :func:`ctas_per_sm`, :func:`estimate`) are tested on hand-written inputs.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from eigenkv.io import atomic_write_text
from eigenkv.kernels.backend import interpreting
from eigenkv.kernels.compile_check import CompiledSpec, compile_kernel, cuobjdump, fork_map
from eigenkv.kernels.utils import RooflineCase

# Kernel modules whose roofline_cases() the report walks.
ROOFLINE_MODULES = ("eigenkv.kernels.lowrank_decode", "eigenkv.kernels.lowrank_prefill")
CAPABILITY = 90
CSV_NAME = "roofline_sm90.csv"
MD_NAME = "roofline_sm90.md"
DEFAULT_OUT = Path("benchmarks") / "results"  # under the working directory (the repository root)


# --- devices -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """One sm_90 GPU as the roofline models it: SM count, clock (Hz), bandwidths (bytes/s), per-SM limits.

    Sources: the per-SM limits are those of compute capability 9.0 in the CUDA C++ Programming Guide
    (65536 registers, allocated per warp in units of 256 with per-thread counts rounded up to 8; 228 KB of
    shared memory per SM, at most 227 KB per block, and 1 KB the driver reserves per block; 32 blocks and
    64 warps per SM) and NVIDIA's Hopper whitepaper (4 SM sub-partitions, each with a warp scheduler that
    issues one warp-instruction per clock). SMs and nominal bandwidths are NVIDIA's datasheets (H100 SXM5:
    132 SMs, 3.35 TB/s HBM3; H200: the same 132-SM GH100 with 4.8 TB/s HBM3e). The copy bandwidths are
    device-to-device copies measured here (2,940 GB/s on an H100 80GB HBM3, 4,102 GB/s on an H200: the
    "device copy" column of the quantize/pack benchmarks in docs/kernels.md), rounded. The tensor-core rate
    is the datasheets' dense fp16/bf16 peak with fp32 accumulation (989 TFLOP/s on both; attention kernels
    reach 50-75% of it), which bounds compute-heavy work such as prefill. The clock is a
    sustained boost clock assumed for both (the SXM parts may clock up to 1.98 GHz), so the issue bound
    errs on the slow side.
    """

    key: str
    name: str
    sms: int
    clock_hz: float
    nominal_bandwidth: float
    copy_bandwidth: float
    tensor_flops: float = 989.4e12
    schedulers_per_sm: int = 4
    registers_per_sm: int = 65536
    register_granularity: int = 8  # per thread, rounded up to a multiple of this
    warp_register_unit: int = 256  # registers are allocated per warp in units of this
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024
    shared_reserved_per_block: int = 1024
    blocks_per_sm: int = 32
    warps_per_sm: int = 64

    @property
    def issue_rate(self) -> float:
        """Warp-instructions the whole GPU issues per second (one per scheduler per clock)."""
        return self.sms * self.schedulers_per_sm * self.clock_hz


H100_SXM = DeviceSpec("h100", "H100 SXM", sms=132, clock_hz=1.755e9, nominal_bandwidth=3.35e12, copy_bandwidth=3.0e12)
H200 = DeviceSpec("h200", "H200", sms=132, clock_hz=1.755e9, nominal_bandwidth=4.8e12, copy_bandwidth=4.1e12)
DEVICES = (H100_SXM, H200)


# --- SASS --------------------------------------------------------------------------------------

# "/*0c80*/   @!P0 BRA 0xd70 ;   /* 0x0000... */": address, optional predicate, opcode with modifiers, operands
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)\s*([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_HEX = re.compile(r"0x([0-9a-f]+)")


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: its function, byte address, opcode with modifiers (``LDG.E.128``), operands."""

    function: str
    address: int
    opcode: str
    operands: str
    predicate: str = ""

    @property
    def base(self) -> str:
        """The opcode without modifiers (``LDG``)."""
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> int | None:
        """Address a ``BRA`` jumps to (its last hex operand); None for other opcodes and indirect branches."""
        if self.base != "BRA":
            return None
        targets = _HEX.findall(self.operands)
        return int(targets[-1], 16) if targets else None

    def __str__(self) -> str:
        predicate = f"{self.predicate} " if self.predicate else ""
        return f"/*{self.address:04x}*/ {predicate}{self.opcode} {self.operands}".rstrip() + " ;"


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` output, in order (encoding lines and headers skipped)."""
    function = ""
    instructions = []
    for line in text.splitlines():
        if header := _FUNCTION.match(line):
            function = header.group(1)
        elif match := _INSTRUCTION.match(line):
            address, predicate, opcode, operands = match.groups()
            instructions.append(Instruction(function, int(address, 16), opcode, operands.strip(), predicate or ""))
    return instructions


@dataclass(frozen=True)
class Loop:
    """The region from ``start`` to the backward ``BRA`` at ``end`` (both included), and its instructions."""

    start: int
    end: int
    body: tuple[Instruction, ...]


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every region closed by a backward branch: a ``BRA`` to an earlier address of its own function.

    A ``BRA`` to itself is not a loop: cuobjdump ends every function with one (a trap after ``EXIT``)."""
    found = []
    for branch in instructions:
        target = branch.branch_target
        if target is None or target >= branch.address:
            continue
        body = tuple(i for i in instructions if i.function == branch.function and target <= i.address <= branch.address)
        found.append(Loop(target, branch.address, body))
    return found


MIN_LOOP = 64  # instructions: smaller loops are libdevice slow paths (sin/cos range reduction), not tiles


def hot_loop(instructions: list[Instruction], index: int | None = None) -> Loop | None:
    """The loop region with the most instructions (the first such), or None without a backward branch.

    ``index``: instead, the ``index``-th outermost loop of at least ``MIN_LOOP`` instructions in address
    order (a kernel whose hot loop is not its largest, e.g. decode, whose tail loop reads the last tiles
    element by element but runs a few times per program).

    Nested loops: the outermost region contains its inner loops, so it is the one chosen, and an inner body
    counts once per outer iteration. The count is static: both sides of a forward branch inside the region
    count, as if every iteration executed every instruction of the region once.
    """
    found = loops(instructions)
    if index is None:
        return max(found, key=lambda loop: len(loop.body), default=None)
    big = [loop for loop in found if len(loop.body) >= MIN_LOOP]
    outer = sorted(
        (loop for loop in big if not any(o is not loop and o.start <= loop.start and loop.end <= o.end for o in big)),
        key=lambda loop: loop.start,
    )
    return outer[index] if index < len(outer) else None


# Opcode groups of the mix, by opcode without modifiers; the uniform-datapath twin of an integer op
# (UIMAD, ULEA, ...) counts as an integer op too. Everything else (moves, branches, barriers, shuffles,
# predicate ops, stores to global) is "other".
INT_OPS = frozenset({
    "IMAD", "IADD3", "LEA", "SHF", "LOP3", "PRMT", "ISETP", "SEL", "VIADD", "IABS", "IMNMX", "VIMNMX", "VIADDMNMX",
    "SGXT", "BMSK", "FLO", "POPC", "UIMAD", "UIADD3", "ULEA", "USHF", "ULOP3", "UPRMT", "UISETP", "USEL", "USGXT",
})  # fmt: skip
CONVERSIONS = frozenset({"I2F", "I2FP", "F2F", "F2FP", "F2I"})
FLOAT_OPS = frozenset({
    "FFMA", "FMUL", "FADD", "MUFU", "FMNMX", "FSETP", "FSEL", "FCHK", "HFMA2", "HADD2", "HMUL2", "HMNMX2",
})  # fmt: skip
SINGLE_COLUMNS = {"LDGSTS": "ldgsts", "UTMALDG": "tma", "UBLKCP": "tma", "LDGDEPBAR": "ldgdepbar"} | {
    "LDS": "lds", "LDSM": "ldsm", "STS": "sts", "STSM": "sts", "HMMA": "hmma", "HGMMA": "hgmma",
}  # fmt: skip
MIX_COLUMNS = (
    "ldg", "ldg_u8", "ldg_u16", "ldg_32", "ldg_64", "ldg_128", "ldgsts", "tma", "ldgdepbar",
    "lds", "ldsm", "sts", "hmma", "hgmma", "int_ops", "conversions", "float_ops", "other",
)  # fmt: skip


def ldg_width(opcode: str) -> str:
    """Width column of a global load: ``ldg_u8`` (U8/S8), ``ldg_u16``, ``ldg_64``, ``ldg_128``, else ``ldg_32``."""
    modifiers = set(opcode.split(".")[1:])
    for names, column in (({"U8", "S8"}, "ldg_u8"), ({"U16", "S16"}, "ldg_u16"), ({"64"}, "ldg_64")):
        if modifiers & names:
            return column
    return "ldg_128" if "128" in modifiers else "ldg_32"


def mix_column(instruction: Instruction) -> str:
    """The opcode-mix column one instruction counts in (global loads: ``ldg``, plus a width column)."""
    base = instruction.base
    if base == "LDG":
        return "ldg"
    if base in SINGLE_COLUMNS:
        return SINGLE_COLUMNS[base]
    # HADD2.F32 Rd, -RZ, Rs.H0_H0 is how sm_90 widens an fp16 to fp32: a conversion, not an addition
    if base in CONVERSIONS or instruction.opcode.startswith("HADD2.F32"):
        return "conversions"
    if base in INT_OPS:
        return "int_ops"
    if base in FLOAT_OPS:
        return "float_ops"
    return "other"


def opcode_mix(body: tuple[Instruction, ...] | list[Instruction]) -> dict[str, int]:
    """Instruction counts per :data:`MIX_COLUMNS` column; all but the ``ldg_*`` widths sum to ``len(body)``."""
    mix = dict.fromkeys(MIX_COLUMNS, 0)
    for instruction in body:
        column = mix_column(instruction)
        mix[column] += 1
        if column == "ldg":
            mix[ldg_width(instruction.opcode)] += 1
    return mix


def opcode_histogram(body: tuple[Instruction, ...] | list[Instruction]) -> str:
    """``"IMAD:770 ISETP:291 ..."``: opcodes without modifiers, most frequent first."""
    return " ".join(f"{op}:{n}" for op, n in Counter(i.base for i in body).most_common())


# TTGIR ops of asynchronous global-to-shared copies: cp.async (Ampere) and TMA loads (Hopper)
_ASYNC_COPY = re.compile(
    r"\b(ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local|ttng\.async_tma_gather)\b"
)


def has_async_copies(ttgir: str) -> bool:
    """Whether the kernel's TTGIR loads global memory with asynchronous copies (cp.async or TMA)."""
    return _ASYNC_COPY.search(ttgir) is not None


# --- occupancy and time ------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ctas_per_sm(registers: int, num_warps: int, shared: int, device: DeviceSpec = H100_SXM) -> tuple[int, str]:
    """(blocks resident per SM, what limits them: ``regs``, ``smem``, ``blocks`` or ``warps``, ``/``-joined on ties).

    ``registers`` per thread, ``shared`` bytes per block (without the reserved KB, which is added here)."""
    per_warp = _round_up(_round_up(registers, device.register_granularity) * 32, device.warp_register_unit)
    fits = shared <= device.shared_per_block
    limits = {
        "regs": device.registers_per_sm // (per_warp * num_warps),
        "smem": device.shared_per_sm // (shared + device.shared_reserved_per_block) if fits else 0,
        "blocks": device.blocks_per_sm,
        "warps": device.warps_per_sm // num_warps,
    }
    ctas = min(limits.values())
    return ctas, "/".join(name for name, limit in limits.items() if limit == ctas)


def wave_factor(programs: int | None, slots: int) -> float:
    """``ceil(waves) / waves`` with ``waves = programs / slots`` (resident blocks on the whole GPU): the time
    the last, partial wave adds, assuming equal work per program; 1 when ``programs`` is unknown."""
    if not programs:
        return 1.0
    waves = programs / slots
    return math.ceil(waves) / waves


def warp_instructions_per_byte(loop_instructions: int, num_warps: int, tokens: int, bytes_per_token: float) -> float:
    """Warp-instructions the loop issues per byte it reads: ``instr/thread x warps / (tokens x bytes/token)``."""
    return loop_instructions * num_warps / (tokens * bytes_per_token)


def bytes_in_flight(ctas: int, tokens: int, bytes_per_token: float, num_stages: int, async_copies: bool) -> float:
    """Bytes one SM has requested at once: a loop iteration's reads per resident block, times the stages
    in flight when the loads are asynchronous copies (``num_stages - 1``; else one iteration's)."""
    return ctas * tokens * bytes_per_token * (num_stages - 1 if async_copies else 1)


def estimate(
    total_bytes: float,
    sdpa_bytes: float,
    wipb: float,
    programs: int | None,
    ctas: int,
    device: DeviceSpec,
    flops: float = 0.0,
    sdpa_flops: float = 0.0,
) -> dict:
    """Time estimate on ``device``: the kernel takes the longest of ``bytes / copy bandwidth``,
    ``wipb x bytes / issue rate`` and ``flops / tensor rate``, times the wave factor; SDPA in fp16 takes the
    longer of ``sdpa_bytes / copy bandwidth`` and ``sdpa_flops / tensor rate``. Times in microseconds; None
    when no block fits on an SM."""
    bounds = {
        "memory": total_bytes / device.copy_bandwidth,
        "issue": wipb * total_bytes / device.issue_rate,
        "tensor": flops / device.tensor_flops,
    }
    sdpa_s = max(sdpa_bytes / device.copy_bandwidth, sdpa_flops / device.tensor_flops)
    if ctas < 1:
        return {"bound": "no fit", "wave_factor": None, "kernel_us": None, "sdpa_us": sdpa_s * 1e6, "speedup": None}
    factor = wave_factor(programs, device.sms * ctas)
    bound = max(bounds, key=bounds.get)  # the first of equals: memory
    kernel_s = bounds[bound] * factor
    return {
        "bound": bound,
        "wave_factor": factor,
        "kernel_us": kernel_s * 1e6,
        "sdpa_us": sdpa_s * 1e6,
        "speedup": sdpa_s / kernel_s,
    }


# --- one case ----------------------------------------------------------------------------------

ESTIMATE_FIELDS = ("bound", "wave_factor", "kernel_us", "sdpa_us", "speedup")


def report(case: RooflineCase, sass: str, ttgir: str, registers: int, spill_bytes: int, shared: int) -> dict:
    """The report row of ``case`` from its compiled kernel's SASS, TTGIR and resource usage (see ``COLUMNS``)."""
    loop = hot_loop(parse_sass(sass), case.loop)
    if loop is None:
        raise ValueError(f"{case.name}: no backward branch in the SASS, so no loop to analyze")
    spec = case.spec
    async_copies = has_async_copies(ttgir)
    # one occupancy for every device: they are all sm_90, with the same per-SM limits
    ctas, limiter = ctas_per_sm(registers, spec.num_warps, shared, DEVICES[0])
    wipb = warp_instructions_per_byte(len(loop.body), spec.num_warps, case.tokens_per_iteration, case.bytes_per_token)
    row = {
        "kernel": case.name.split("[")[0],
        "case": case.name,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "registers": registers,
        "spill_bytes": spill_bytes,
        "loop_spills": sum(i.base in ("LDL", "STL") for i in loop.body),
        "shared_bytes": shared,
        "ctas_per_sm": ctas,
        "cta_limit": limiter,
        "async_copies": async_copies,
        "loop_start": f"0x{loop.start:04x}",
        "loop_end": f"0x{loop.end:04x}",
        "loop_instructions": len(loop.body),
        **opcode_mix(loop.body),
        "tokens_per_iteration": case.tokens_per_iteration,
        "bytes_per_token": case.bytes_per_token,
        "total_bytes": case.total_bytes,
        "sdpa_bytes": case.sdpa_bytes,
        "flops": case.flops,
        "sdpa_flops": case.sdpa_flops,
        "programs": case.programs,
        "warp_instr_per_byte": wipb,
        "bytes_in_flight_per_sm": bytes_in_flight(
            ctas, case.tokens_per_iteration, case.bytes_per_token, spec.num_stages, async_copies
        ),
    }
    for device in DEVICES:
        times = estimate(
            case.total_bytes, case.sdpa_bytes, wipb, case.programs, ctas, device, case.flops, case.sdpa_flops
        )
        row |= {f"{device.key}_{field}": times[field] for field in ESTIMATE_FIELDS}
    row["opcodes"] = opcode_histogram(loop.body)
    return row


def _compile(case: RooflineCase) -> tuple[CompiledSpec, str]:
    compiled = compile_kernel(case.spec, CAPABILITY)
    return compiled, cuobjdump(compiled.kernel.asm["cubin"], "-sass")


def analyze(case: RooflineCase) -> dict:
    """Compile ``case`` for sm_90 (``TRITON_INTERPRET`` must be unset) and return its report row."""
    compiled, sass = _compile(case)
    ttgir = compiled.kernel.asm["ttgir"]
    return report(case, sass, ttgir, compiled.registers, compiled.spill_bytes, compiled.shared)


def _analyze_or_error(case: RooflineCase) -> dict:
    try:
        return analyze(case)
    except Exception as err:  # reported, and the run fails, after every other case is tried
        return {"kernel": case.name.split("[")[0], "case": case.name, "error": f"{type(err).__name__}: {err}"}


def roofline_cases(substring: str | None = None) -> list[RooflineCase]:
    """The cases of :data:`ROOFLINE_MODULES`, in order; only those whose name holds ``substring`` if given."""
    cases = [case for module in ROOFLINE_MODULES for case in importlib.import_module(module).roofline_cases()]
    return [case for case in cases if substring is None or substring in case.name]


# --- report files ------------------------------------------------------------------------------

COLUMNS = {
    "kernel": "kernel function (the case name up to '[')",
    "case": "RooflineCase.name: kernel[workload, config]",
    "num_warps": "warps per program",
    "num_stages": "software-pipelining stages the compile asked for",
    "registers": "registers per thread (cuobjdump)",
    "spill_bytes": "stack frame bytes per thread, where ptxas spills registers (cuobjdump's STACK)",
    "loop_spills": "local loads and stores (LDL, STL: spill traffic) in one iteration of the hot loop",
    "shared_bytes": "dynamic shared memory bytes per block (Triton's metadata)",
    "ctas_per_sm": "blocks resident per SM on sm_90",
    "cta_limit": "what bounds ctas_per_sm: regs, smem, blocks or warps",
    "async_copies": "whether the TTGIR loads global memory with cp.async or TMA copies",
    "loop_start": "address of the hot loop's first instruction",
    "loop_end": "address of its backward branch",
    "loop_instructions": "instructions per thread in one iteration of the hot loop (static count)",
    "ldg": "global loads (LDG) in the loop",
    "ldg_u8": "of which 8-bit (.U8/.S8)",
    "ldg_u16": "of which 16-bit (.U16/.S16)",
    "ldg_32": "of which 32-bit (no width modifier)",
    "ldg_64": "of which 64-bit",
    "ldg_128": "of which 128-bit",
    "ldgsts": "cp.async copies (LDGSTS)",
    "tma": "TMA loads (UTMALDG, UBLKCP)",
    "ldgdepbar": "cp.async group commits (LDGDEPBAR)",
    "lds": "shared loads (LDS)",
    "ldsm": "shared matrix loads (LDSM)",
    "sts": "shared stores (STS, STSM)",
    "hmma": "tensor-core MMAs (HMMA, sm_80 style)",
    "hgmma": "warpgroup MMAs (HGMMA)",
    "int_ops": "integer and address ops (IMAD IADD3 LEA SHF LOP3 PRMT ISETP SEL VIADD ... and uniform twins)",
    "conversions": "conversions (I2F I2FP F2F F2FP F2I, and HADD2.F32 fp16 widening)",
    "float_ops": "float ops (FFMA FMUL FADD MUFU FMNMX FSETP FSEL and half2 HFMA2 HADD2 HMUL2)",
    "other": "every other instruction (moves, branches, barriers, shuffles, predicates, stores)",
    "tokens_per_iteration": "key tokens one program reads per loop iteration",
    "bytes_per_token": "bytes one program reads per key token in the loop",
    "total_bytes": "bytes the launch reads",
    "sdpa_bytes": "bytes fp16 SDPA reads for the same attention",
    "flops": "tensor-core FLOPs the launch does (its MMAs at their padded tile sizes)",
    "sdpa_flops": "FLOPs of fp16 SDPA for the same attention (causal: the half it computes)",
    "programs": "programs the launch starts",
    "warp_instr_per_byte": "loop_instructions x num_warps / (tokens_per_iteration x bytes_per_token)",
    "bytes_in_flight_per_sm": "ctas_per_sm x tokens_per_iteration x bytes_per_token x (num_stages - 1 if "
    "async_copies else 1)",
}
COLUMNS |= {
    f"{device.key}_{field}": f"{device.name}: {doc}"
    for device in DEVICES
    for field, doc in (
        ("bound", "what the kernel time is bound by: memory, issue or tensor"),
        ("wave_factor", "ceil(waves) / waves, waves = programs / (SMs x ctas_per_sm)"),
        ("kernel_us", "estimated kernel time (us)"),
        ("sdpa_us", "estimated fp16 SDPA time (us)"),
        ("speedup", "sdpa_us / kernel_us"),
    )
}
COLUMNS |= {
    "opcodes": "the loop's opcodes without modifiers, most frequent first (OP:count)",
    "error": "why the case could not be analyzed (other columns empty)",
}


def to_csv(rows: list[dict]) -> str:
    """One row per case, the columns of ``COLUMNS`` (floats at full precision, empty where not applicable)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _markdown_row(row: dict) -> list[str]:
    mix = "/".join(str(row[k]) for k in ("ldg_u8", "ldg_u16", "ldg_32", "ldg_64", "ldg_128"))
    cells = [
        row["case"][len(row["kernel"]) :],
        f"{row['num_warps']}x{row['num_stages']}",
        str(row["registers"]),
        f"{row['spill_bytes']} ({row['loop_spills']})",
        _number(row["shared_bytes"] / 1024),
        f"{row['ctas_per_sm']} ({row['cta_limit']})",
        "yes" if row["async_copies"] else "no",
        str(row["loop_instructions"]),
        f"{row['ldg']} ({mix})",
        "/".join(str(row[k]) for k in ("ldgsts", "tma", "ldgdepbar")),
        "/".join(str(row[k]) for k in ("lds", "ldsm", "sts")),
        "/".join(str(row[k]) for k in ("hmma", "hgmma")),
        *(str(row[k]) for k in ("int_ops", "conversions", "float_ops", "other")),
        f"{row['tokens_per_iteration']} x {row['bytes_per_token']:g}",
        _number(row["warp_instr_per_byte"], 3),
        _number(row["bytes_in_flight_per_sm"] / 1024),
        _number(row[f"{DEVICES[0].key}_wave_factor"], 2),
    ]
    for device in DEVICES:
        speedup = row[f"{device.key}_speedup"]
        cells += [
            f"{_number(row[f'{device.key}_kernel_us'])} ({row[f'{device.key}_bound']})",
            _number(row[f"{device.key}_sdpa_us"]),
            "-" if speedup is None else f"{speedup:.3g}x",
        ]
    return cells


def _markdown_header() -> list[str]:
    header = [
        "case", "warps x stages", "regs", "spill B (loop LDL/STL)", "smem KB", "CTAs/SM", "async", "loop instr",
        "LDG (u8/u16/32/64/128)", "LDGSTS/TMA/DEPBAR", "LDS/LDSM/STS", "HMMA/HGMMA", "int", "cvt", "float", "other",
        "tokens x B/token", "wipb", "KB in flight/SM", "wave x",
    ]  # fmt: skip
    for device in DEVICES:
        header += [f"{device.name} kernel us", f"{device.name} SDPA us", f"{device.name} speed-up"]
    return header


def markdown_tables(rows: list[dict]) -> str:
    """One Markdown table per kernel (rows in case order), then the cases that failed."""
    header = _markdown_header()
    parts = []
    for kernel in dict.fromkeys(row["kernel"] for row in rows):
        done = [row for row in rows if row["kernel"] == kernel and "error" not in row]
        if not done:
            continue
        lines = [f"### {kernel}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_markdown_row(row)) + " |" for row in done]
        parts.append("\n".join(lines))
    failed = [row for row in rows if "error" in row]
    if failed:
        parts.append("\n".join(["### Failed", ""] + [f"- `{row['case']}`: {row['error']}" for row in failed]))
    return "\n\n".join(parts) + "\n"


def _device_lines() -> list[str]:
    return [
        f"- {d.name}: {d.sms} SMs at {d.clock_hz / 1e9:.3f} GHz, issue rate {d.sms} x {d.schedulers_per_sm} x "
        f"{d.clock_hz / 1e9:.3f}e9 = {d.issue_rate:.3e} warp-instructions/s; {d.nominal_bandwidth / 1e12:.2f} TB/s "
        f"nominal, {d.copy_bandwidth / 1e12:.2f} TB/s used (measured copy); {d.tensor_flops / 1e12:.0f} TFLOP/s "
        "dense fp16 tensor-core peak."
        for d in DEVICES
    ]


def markdown(rows: list[dict], command: str) -> str:
    """The whole Markdown report: how it was made, what the columns mean, the formula, the tables."""
    import triton

    d = DEVICES[0]
    lines = [
        "# Static roofline of the attention kernels on sm_90",
        "",
        f"Made by `{command}` with Triton {triton.__version__}: each `RooflineCase` (the benchmark workloads of "
        "the kernels' `roofline_cases()`) compiled for sm_90 without a GPU, its SASS read with cuobjdump. Nothing "
        "here ran on a GPU: the times are estimates. Every column is in the CSV beside this file "
        f"(`{CSV_NAME}`, one row per case, full precision, with the loop's opcode histogram).",
        "",
        "- **warps x stages**: `num_warps` x `num_stages` of the compile. **regs**, **spill B**: registers and "
        "the stack bytes per thread ptxas spills into (in parentheses: local loads and stores in the loop). "
        "**smem KB**: dynamic shared memory per block.",
        f"- **CTAs/SM** (limit): blocks resident per SM, the least of {d.registers_per_sm} registers / (registers "
        f"per thread rounded up to {d.register_granularity} x 32 x warps), {d.shared_per_sm // 1024} KB / (shared "
        f"+ {d.shared_reserved_per_block // 1024} KB reserved per block; none above "
        f"{d.shared_per_block // 1024} KB), {d.blocks_per_sm} blocks, {d.warps_per_sm} warps / warps per block.",
        "- **async**: whether the TTGIR loads global memory with asynchronous copies (cp.async or TMA).",
        "- **loop instr**: instructions per thread in one iteration of the hot loop: the region closed by a "
        "backward `BRA` with the most instructions (the outermost of nested loops: an inner body counts once; "
        "both sides of forward branches count).",
        "- Opcode mix of the loop: **LDG** global loads (by width), **LDGSTS/TMA/DEPBAR** async copies, "
        "**LDS/LDSM/STS** shared memory, **HMMA/HGMMA** tensor cores, **int** integer and address ops, **cvt** "
        "conversions, **float** float ops, **other** the rest (moves, branches, barriers, shuffles).",
        "- **tokens x B/token**: key tokens a program reads per iteration x bytes it reads per token.",
        "- **wipb**: warp-instructions per stored byte = loop instr x warps / (tokens x B/token).",
        "- **KB in flight/SM**: CTAs/SM x tokens x B/token x (stages - 1 with async copies, else 1).",
        "- **wave x**: ceil(waves) / waves, waves = programs / (SMs x CTAs/SM) (the same SM count on both GPUs).",
        "- **kernel us** = max(total bytes / bandwidth, wipb x total bytes / issue rate, tensor FLOPs / tensor "
        "rate) x wave x, bound by memory, issue or tensor; **SDPA us** = max(fp16 SDPA bytes (uncompressed K and "
        "V) / bandwidth, SDPA FLOPs / tensor rate); **speed-up** = SDPA us / kernel us. Prefill is bound by its "
        "FLOPs: there SDPA's estimate is its causal FLOPs at the tensor-core peak, which real kernels reach "
        "50-75% of, so the speed-ups of rows bound otherwise are low by as much.",
        "- A model, not a measurement: it ignores latency (beyond showing bytes in flight), the MMAs' operand "
        "moves and the split-merge kernel.",
        "",
        *_device_lines(),
        "",
        markdown_tables(rows),
    ]
    return "\n".join(lines)


def command_line(out: Path | None, cases: str | None) -> str:
    """The command that makes the report with these options."""
    command = "python -m eigenkv.kernels.roofline"
    if cases is not None:
        command += f" --cases '{cases}'"
    return command + (f" --out {out}" if out is not None else "")


def run(out: Path | None = None, cases: str | None = None) -> int:
    """Analyze the cases (in a fork pool), write the CSV and Markdown reports to ``out``, print the tables.

    Returns the exit status: 0, 1 when a case failed (its row says why), 2 when no case matches ``cases``."""
    selected = roofline_cases(cases)
    if not selected:
        print(f"no roofline case name holds {cases!r}", file=sys.stderr)
        return 2
    rows = list(fork_map(_analyze_or_error, selected))
    folder = DEFAULT_OUT if out is None else Path(out)
    csv_path = atomic_write_text(folder / CSV_NAME, to_csv(rows))
    md_path = atomic_write_text(folder / MD_NAME, markdown(rows, command_line(out, cases)))
    print(markdown_tables(rows), end="")
    print(f"\nwrote {csv_path} and {md_path}")
    return 1 if any("error" in row for row in rows) else 0


def print_hot_loop(name: str) -> int:
    """Print the hot-loop SASS of the case named ``name`` (or the only one whose name holds it)."""
    cases = roofline_cases()
    matches = [case for case in cases if case.name == name] or [case for case in cases if name in case.name]
    if len(matches) != 1:
        names = "\n  ".join(case.name for case in matches or cases)
        print(f"{len(matches)} roofline cases match {name!r}; name one of:\n  {names}", file=sys.stderr)
        return 2
    case = matches[0]
    _, sass = _compile(case)
    loop = hot_loop(parse_sass(sass), case.loop)
    if loop is None:
        print(f"{case.name}: no backward branch in the SASS", file=sys.stderr)
        return 1
    print(f"# {case.name}: hot loop 0x{loop.start:04x}-0x{loop.end:04x}, {len(loop.body)} instructions per thread")
    print("\n".join(str(instruction) for instruction in loop.body))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eigenkv.kernels.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder of the CSV and Markdown reports "
                        "(default benchmarks/results)")  # fmt: skip
    parser.add_argument("--cases", default=None, metavar="SUBSTRING", help="only cases whose name holds it")
    parser.add_argument("--sass", default=None, metavar="NAME", help="print the hot-loop SASS of the one case "
                        "whose name is NAME (or holds it), write nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU", file=sys.stderr)
        return 2
    if args.sass is not None:
        return print_hot_loop(args.sass)
    return run(out=args.out, cases=args.cases)


if __name__ == "__main__":
    sys.exit(main())
