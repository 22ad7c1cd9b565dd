"""Helpers the kernels share: launch configs, compile specs, tile widths, and the scoring code
(``dot``, ``rotate_keys``, ``soft_cap``) that the attention kernels run."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# Activation dtypes the attention kernels take (fp32 models run the PyTorch references).
KERNEL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def on_input_device(launch):
    """Run ``launch`` (a function launching Triton kernels on its first argument's tensors) with that tensor's
    CUDA device current: Triton launches on the current device and its current stream, and a model spread over
    GPUs (accelerate's ``device_map``) runs layers on other ones than the current. A no-op on the current
    device (one GPU, CUDA graph captures included) and on CPU."""

    @functools.wraps(launch)
    def guarded(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launch(x, *args, **kwargs)
        return launch(x, *args, **kwargs)

    return guarded


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time block sizes, warps and register cap of one launch (``maxnreg``: registers per thread the
    compiler may use, None for its choice; a cap lets more programs share an SM when latency, not issue,
    bounds the kernel)."""

    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None


@dataclass(frozen=True)
class KernelSpec:
    """One compilation of a kernel: argument types and constexpr values, as a launcher uses it."""

    name: str
    fn: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None
    aligned: tuple[str, ...] = ()  # arguments a launch passes as multiples of 16 (Triton specializes them)

    def attrs(self) -> dict:
        """``ASTSource`` attributes declaring the ``aligned`` arguments divisible by 16."""
        return {(self.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in self.aligned}


@dataclass(frozen=True)
class RooflineCase:
    """One kernel compile at a benchmark workload, with what its main loop reads (for the static roofline).

    Attributes:
        name: ``kernel[shape, config]`` label of the report row.
        spec: the compile, as the launcher makes it for this workload.
        tokens_per_iteration: key tokens one program reads per iteration of its main loop.
        bytes_per_token: bytes one program reads from memory per key token in that loop (what is stored:
            codes with their padding, scales, zeros; fp16 states for the dense kernels).
        total_bytes: bytes the whole launch reads (every program), for the time estimate.
        sdpa_bytes: bytes fp16 SDPA reads for the same attention (uncompressed K and V), for comparison.
        programs: programs the launch starts.
        flops: tensor-core FLOPs of the whole launch (its MMAs at their padded tile sizes).
        sdpa_flops: FLOPs of fp16 SDPA for the same attention (causal: the half it computes).
        workload: the shape, for the report (batch, heads, kv_heads, head_dim, context, ranks, bits, ...).
        loop: which loop is the hot one (``eigenkv.kernels.roofline.hot_loop``); None: the largest.
    """

    name: str
    spec: KernelSpec
    tokens_per_iteration: int
    bytes_per_token: float
    total_bytes: float
    sdpa_bytes: float
    programs: int
    flops: float = 0.0
    sdpa_flops: float = 0.0
    workload: dict = field(default_factory=dict)
    loop: int | None = None


# Host arithmetic of the launchers in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions, whose calls cost microseconds each on the host (a decode step launches every layer).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pad_width(n: int) -> int:
    """Tile width of ``n`` features: a power of two, at least 16 (``tl.dot`` needs K >= 16 on NVIDIA GPUs)."""
    return max(16, next_power_of_2(n))


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr):
    # Triton's CPU interpreter computes bf16 dots wrongly: the launchers pass DOT_FP32 there.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def rotate_keys(a1, a2, tok, inv_freq, rope_scale, dtype: tl.constexpr):
    # rebuilt key halves a_i (BLOCK_N, HALF_PAD) fp32 -> rotated halves (k1, k2) in `dtype`, rounded as the
    # model rounds them (Hugging Face's rotate_half convention), each key at its own position `tok`
    a1 = a1.to(dtype).to(tl.float32)
    a2 = a2.to(dtype).to(tl.float32)
    angle = tok.to(tl.float32)[:, None] * inv_freq[None, :]
    cos = (tl.cos(angle) * rope_scale).to(dtype).to(tl.float32)
    sin = (tl.sin(angle) * rope_scale).to(dtype).to(tl.float32)
    return (a1 * cos - a2 * sin).to(dtype), (a2 * cos + a1 * sin).to(dtype)


@triton.jit
def soft_cap(scores, SOFTCAP: tl.constexpr):
    # Gemma-2's capped logits on fp32 scores in base 2 (s * log2 e): softcap * tanh(s / softcap), in base 2, is
    # CAP * tanh(scores / CAP) with CAP = SOFTCAP * log2 e. No tanh: the interpreter runs no libdevice call, so
    # tanh(x) = 1 - 2 / (exp(2x) + 1) with exp(2x) = exp2(scores * 2 / SOFTCAP) (every constant folded at compile
    # time: a multiply, an exp2, an add, a fast division, a subtract per score). Its limits are exact: for large
    # |x| exp2 overflows to inf (-> CAP) or underflows to 0 (-> -CAP), so capped scores lie in [-CAP, CAP]
    return SOFTCAP * 1.4426950408889634 - (2.0 * 1.4426950408889634 * SOFTCAP) / (
        tl.exp2(scores * (2.0 / SOFTCAP)) + 1.0
    )
