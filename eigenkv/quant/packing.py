"""Dense bit packing of integer codes into bytes, along one axis.

Layout along the packed axis of length ``n`` (every other axis unchanged):

- 8 bits: one code per byte (``n`` bytes).
- 4 and 2 bits: ``k = 8 / bits`` consecutive codes per byte, the first code in
  the lowest bits: byte ``j`` holds codes ``j*k .. j*k + k - 1``, code ``i`` at bit
  offset ``(i mod k) * bits`` (``ceil(n / k)`` bytes).
- 3 bits, as two planes (no code straddles a byte, and unpacking is the same
  shift-and-mask as for the power-of-two widths): the low 2 bits of every code
  packed as 2-bit codes (``ceil(n / 4)`` bytes), followed by the high bit of
  every code packed 8 per byte (``ceil(n / 8)`` bytes). For ``n`` a multiple of 8
  that is exactly 3 bits per code.

When ``k`` (8 for the 3-bit high plane) does not divide ``n``, the last byte
is completed with zero codes; ``unpack`` takes ``n`` to drop them.

Feature alignment (what a cache stores): rows of features are stored as if they
had ``aligned_width(n)`` features (``n`` rounded up to a multiple of
``FEATURE_ALIGN = 8``), the padding codes zero, so that a kernel reads every
row with vector loads and asynchronous copies (``bits`` bytes per row at
2/4/8 bits). Eight, not sixteen:
a rank of 38 is stored as 40 features, not 48; the padding is real memory. ``pack_aligned`` /
``unpack_aligned`` go between ``n`` codes and that padded form (the fused
kernel ``eigenkv.kernels.quant_pack`` writes it directly). For 3 bits each plane is padded: the low plane
has ``aligned_width(n) / 4`` bytes, then the high plane ``aligned_width(n) / 8``.

Paired rows (``paired=True``; a cache's rows, one per token packed along features, whichever the grouping):
the codes of each run of ``2k`` features (``k`` codes a byte; 3 bits: runs of 8, the 2-bit plane's) are
stored even features first, so that the first byte of the run holds features ``0, 2, .., 2k - 2`` and the
second ``1, 3, .., 2k - 1``: code ``j`` of the two bytes is features ``2j`` and ``2j + 1``, the adjacent pair
a 16-bit matrix operand register holds (the decode kernel converts two bytes at once into such pairs, where
the plain order needs a byte permutation per register to regroup them). 8-bit rows are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eigenkv.quant.config import SUPPORTED_BITS
from eigenkv.quant.reference import QuantizedGroups, dequantize

FEATURE_ALIGN = 8


def aligned_width(n: int) -> int:
    """``n`` features rounded up to a multiple of ``FEATURE_ALIGN``: the features a stored row of codes covers."""
    return -(-n // FEATURE_ALIGN) * FEATURE_ALIGN


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the packed axis."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    if bits == 3:
        return -(-n // 4) + -(-n // 8)
    per_byte = 8 // bits
    return -(-n // per_byte)


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``(..., n)`` < 2^bits, bits in {1, 2, 4, 8} -> bytes ``(..., ceil(n * bits / 8))``."""
    per_byte = 8 // bits
    n = codes.shape[-1]
    pad = -n % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.view(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def _unpack_plane(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :n].to(torch.uint8)


def pack(codes: torch.Tensor, bits: int, dim: int = -1, *, check: bool = True) -> torch.Tensor:
    """Pack uint8 ``codes`` (values < 2^bits) along ``dim``; returns uint8 with that axis ``packed_length(n, bits)``.

    ``check=False`` skips the range check, a device-to-host read, for codes a quantizer just made."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8; got {codes.dtype}")
    n = codes.shape[dim]
    packed_length(n, bits)  # validates bits
    if check and codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code ({int(codes.max())}) does not fit in {bits} bits")
    c = codes.movedim(dim, -1)
    if bits == 8:
        out = c
    elif bits == 3:
        out = torch.cat([_pack_plane(c & 3, 2), _pack_plane(c >> 2, 1)], dim=-1)
    else:
        out = _pack_plane(c, bits)
    return out.movedim(-1, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``packed`` -> uint8 codes with ``n`` elements along ``dim``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8; got {packed.dtype}")
    if packed.shape[dim] != packed_length(n, bits):
        raise ValueError(
            f"{packed.shape[dim]} bytes along dim {dim} cannot hold {n} codes of {bits} bits "
            f"(expected {packed_length(n, bits)})"
        )
    p = packed.movedim(dim, -1)
    if bits == 8:
        out = p
    elif bits == 3:
        low_bytes = -(-n // 4)
        out = _unpack_plane(p[..., :low_bytes], 2, n) | (_unpack_plane(p[..., low_bytes:], 1, n) << 2)
    else:
        out = _unpack_plane(p, bits, n)
    return out.movedim(-1, dim).contiguous()


def _pad_codes(codes: torch.Tensor, n_to: int, dim: int) -> torch.Tensor:
    n = codes.shape[dim]
    if n_to < n:
        raise ValueError(f"cannot pad {n} codes to {n_to}")
    if n_to == n:
        return codes
    return torch.nn.functional.pad(codes.movedim(dim, -1), (0, n_to - n)).movedim(-1, dim)


def paired_run(bits: int) -> int:
    """Features a run of paired rows reorders (module doc): two bytes' worth, 8 at 3 bits, 1 at 8 bits."""
    packed_length(1, bits)  # validates bits
    return 8 if bits == 3 else 2 * (8 // bits) if bits < 8 else 1


def pair_runs(codes: torch.Tensor, bits: int, dim: int = -1, *, inverse: bool = False) -> torch.Tensor:
    """Codes in feature order -> the paired order along ``dim`` (its length a multiple of ``paired_run``): in
    each run, the even features, then the odd ones; ``inverse``: back to feature order."""
    run = paired_run(bits)
    if run == 1:  # 8 bits: a code a byte, nothing to pair
        return codes
    c = codes.movedim(dim, -1)
    n = c.shape[-1]
    if n % run:
        raise ValueError(f"paired rows hold runs of {run} features at {bits} bits; got {n} features")
    runs = (n // run, 2, run // 2) if inverse else (n // run, run // 2, 2)
    return c.reshape(*c.shape[:-1], *runs).transpose(-1, -2).reshape(c.shape).movedim(-1, dim)


def pack_aligned(
    codes: torch.Tensor, bits: int, dim: int = -1, *, check: bool = True, paired: bool = False
) -> torch.Tensor:
    """Pack ``n`` codes along ``dim`` padded with zero codes to ``aligned_width(n)``:
    that axis becomes ``packed_length(aligned_width(n), bits)`` bytes (``paired``: in the paired order)."""
    codes = _pad_codes(codes, aligned_width(codes.shape[dim]), dim)
    return pack(pair_runs(codes, bits, dim) if paired else codes, bits, dim=dim, check=check)


def unpack_aligned(packed: torch.Tensor, bits: int, n: int, dim: int = -1, *, paired: bool = False) -> torch.Tensor:
    """Inverse of ``pack_aligned``: the first ``n`` codes along ``dim`` (the padding dropped)."""
    codes = unpack(packed, bits, aligned_width(n), dim=dim)
    if paired:
        codes = pair_runs(codes, bits, dim, inverse=True)
    return codes.narrow(dim, 0, n).contiguous()


@dataclass(frozen=True)
class Segment:
    """Quantized features of a stream in the layout of ``eigenkv.quant.store`` (one precision).

    Attributes:
        codes: uint8 ``(B, H, T_q, packed_length(aligned_width(width), bits))``: a row per token, packed along
            features in the paired order (see ``pack_aligned``), the padding codes zero; the same rows for
            either grouping.
        scale, zero: ``(B, H, T_q, ceil(width / G))`` per token, ``(B, H, T_q / G, aligned_width(width))`` per
            channel (the padding features' zero, so a row of them loads as vectors too);
            ``zero`` None when symmetric.
        bits: code width; width: features in this segment (without the padding).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    width: int


@dataclass(frozen=True)
class PackedStream:
    """One stream as stored: ``segments`` (consecutive features) quantize tokens ``[0, quantized_tokens)``,
    ``window`` ``(B, H, S - quantized_tokens, D)`` holds the rest in full precision.

    Each segment's codes are padded to ``aligned_width`` of its own width (see :class:`Segment`);
    ``D`` is the sum of the unpadded widths.

    Device form (a capturable cache, ``counts`` set): the counts live on the device, so that one launch
    serves every decode step (a CUDA graph replays it). ``counts`` is int32 ``(2,)``: ``[T_q, S]``, the
    quantized tokens and all tokens held; the segments cover the buffers' whole capacity (rows past
    ``T_q`` are not read), and ``window`` is a ring ``(B, H, ring, D)``: token ``j`` (``T_q <= j < S``) in
    slot ``j % ring``. ``quantized_tokens`` is then unused (0).

    The attention kernels read this; :meth:`dequantize` is the reference reading.
    """

    segments: tuple[Segment, ...]
    window: torch.Tensor
    quantized_tokens: int
    axis: str = "token"
    group_size: int = 64
    symmetric: bool = False
    counts: torch.Tensor | None = None
    ring: int = 0

    @classmethod
    def full_precision(cls, x: torch.Tensor) -> PackedStream:
        """An unquantized ``(B, H, S, D)`` tensor (a plain cache) as a stream that is all window."""
        return cls((), x, 0)

    @property
    def tokens(self) -> int:
        """Tokens held (device form: the capacity, the span a launch covers; ``counts`` says how many are held)."""
        return self.capacity if self.counts is not None else self.quantized_tokens + self.window.shape[-2]

    @property
    def capacity(self) -> int:
        """Device form: tokens the segments' buffers hold room for."""
        return self.segments[0].codes.shape[2]

    @property
    def width(self) -> int:
        return self.window.shape[-1]

    def host_form(self) -> PackedStream:
        """The same stream with host counts (device form: one device-to-host read of ``counts``)."""
        if self.counts is None:
            return self
        quantized, tokens = (int(c) for c in self.counts.tolist())
        g = self.group_size
        segments = []
        for s in self.segments:
            param_rows = quantized if self.axis == "token" else quantized // g
            zero = None if s.zero is None else s.zero[:, :, :param_rows]
            segments.append(Segment(s.codes[:, :, :quantized], s.scale[:, :, :param_rows], zero, s.bits, s.width))
        slots = torch.arange(quantized, tokens, device=self.window.device) % self.ring
        window = self.window.index_select(2, slots)
        return PackedStream(tuple(segments), window, quantized, self.axis, g, self.symmetric)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """Everything held, in ``dtype``: ``(B, H, S, D)``."""
        if self.counts is not None:
            return self.host_form().dequantize(dtype)
        parts = []
        for segment in self.segments:
            codes = unpack_aligned(segment.codes, segment.bits, segment.width, dim=-1, paired=True)
            scale, zero = segment.scale, segment.zero
            if self.axis == "channel":  # parameters are stored for the aligned features too
                scale = scale[..., : segment.width]
                zero = None if zero is None else zero[..., : segment.width]
            dim = 3 if self.axis == "token" else 2
            q = QuantizedGroups(codes, scale, zero, segment.bits, self.group_size, dim, self.symmetric)
            parts.append(dequantize(q, dtype))
        window = self.window.to(dtype)
        if not parts:
            return window
        return torch.cat([torch.cat(parts, dim=-1), window], dim=-2)
