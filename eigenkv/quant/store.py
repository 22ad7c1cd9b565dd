"""Packed storage of one tensor stream (the keys, or the values, of one layer).

``QuantizedStream`` holds, for ``(batch, kv_heads)`` rows, the tokens appended
so far as

- quantized blocks: packed codes, scales and (asymmetric) zero points, and
- a full-precision window of the most recent tokens,

following this rule (``R`` = ``residual``, ``G`` = group size, ``m`` tokens held):

- per-token grouping: ``T_q(m) = max(0, m - R)`` tokens are quantized, each token
  on its own (groups of ``G`` features along the head dimension);
- per-channel grouping: ``T_q(m) = G * floor(max(0, m - R) / G)``: whole groups of
  ``G`` consecutive tokens, aligned at position 0, are quantized once they are
  complete and older than the window; the rest stays in full precision.

Storage layouts, per stream (``B`` batch, ``H`` KV heads, ``D`` head size, ``b`` bits,
``D' = aligned_width(D)``: ``D`` rounded up to a multiple of 8):

- per token:   codes ``(B, H, T_q, packed_length(D', b))`` uint8 packed along features,
  scales / zeros ``(B, H, T_q, ceil(D / G))``;
- per channel: codes ``(B, H, T_q / G * packed_length(G, b), D')`` uint8, each block of
  ``G`` tokens packed along tokens (the axis a decode tile reads), scales / zeros
  ``(B, H, T_q / G, D')`` (the padding features' zero);
- window:      ``(B, H, m - T_q, D)`` in the model's dtype.

Codes (and per-channel scales and zeros) cover ``D'`` features so that a kernel
reads whole rows with vector loads and asynchronous copies; the ``D' - D`` padding
codes and parameters are zero (per token at 3 bits each plane is padded: ``D' / 4``
bytes of the low plane, then ``D' / 8`` of the high plane; see
:mod:`eigenkv.quant.packing`). The ``D`` real features are quantized as they are;
the window is not padded; the padding is counted in ``nbytes`` (and in
``eigenkv.memory``). A :class:`SegmentedStream` pads each segment to its own aligned width.

With ``rotate``, what is stored is ``x @ Hd`` (``Hd`` the normalised Hadamard
matrix of size ``D``) and reads return ``x^ @ Hd^T``.
"""

from __future__ import annotations

import torch

from eigenkv.quant.config import KVQuantConfig, quantized_prefix
from eigenkv.quant.packing import (
    PackedStream,
    Segment,
    aligned_width,
    pack,
    pack_aligned,
    packed_length,
    pad_packed,
    unpack,
    unpack_aligned,
)
from eigenkv.quant.reference import QuantizedGroups, dequantize, quantize


def _pad_features(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Per-channel codes, scales or zeros ``(..., D)`` -> contiguous ``(..., width)``, the added features zero."""
    pad = width - codes.shape[-1]
    return (torch.nn.functional.pad(codes, (0, pad)) if pad else codes).contiguous()


class QuantizedStream:
    """Keys or values of one layer: packed quantized blocks plus a full-precision window."""

    def __init__(self, config: KVQuantConfig, axis: str, rotation: torch.Tensor | None):
        self.config = config
        self.axis = axis
        self.rotation = rotation  # (D, D) or None; shared by all streams of a cache
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.window: torch.Tensor | None = None  # (B, H, m - T_q, D)
        self.quantized_tokens = 0
        self.head_dim = 0

    @property
    def tokens(self) -> int:
        return self.quantized_tokens + (0 if self.window is None else self.window.shape[-2])

    # --- quantize / dequantize one block of tokens ------------------------------------------

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None:
            return x
        wide = torch.promote_types(x.dtype, torch.float32)
        return (x.to(wide) @ self.rotation.to(wide)).to(x.dtype)

    def _unrotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None:
            return x
        wide = torch.promote_types(x.dtype, torch.float32)
        return (x.to(wide) @ self.rotation.T.to(wide)).to(x.dtype)

    def _kernels(self, on: torch.Tensor, row_length: int, dtype: torch.dtype) -> bool:
        """Whether to use the Triton kernels for rows of ``row_length`` in ``dtype`` on ``on``'s device."""
        from eigenkv.kernels.backend import use_triton
        from eigenkv.kernels.quant_pack import KERNEL_DTYPES, kernel_supports

        return (
            use_triton(on)
            and dtype in KERNEL_DTYPES
            and kernel_supports(row_length, self.config.group_size, self.config.torch_scale_dtype)
        )

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x`` (B, H, t, D) -> packed codes (padded to ``aligned_width(D)`` features), scales, zeros."""
        cfg = self.config
        x = self._rotate(x)
        b, h, t, d = x.shape
        padded = aligned_width(d)
        row_length = d if self.axis == "token" else cfg.group_size
        if self._kernels(x, row_length, x.dtype):
            from eigenkv.kernels.quant_pack import quantize_pack

            if self.axis == "token":  # rows = tokens
                codes, scale, zero = quantize_pack(x.reshape(-1, d), cfg.bits, cfg.group_size, symmetric=cfg.symmetric)
                # the kernels take d a multiple of G >= 16, so this is already aligned (kept for any other case)
                codes = pad_packed(codes, cfg.bits, d, padded)
                shape = (b, h, t, -1)
                return codes.view(shape), scale.view(shape), None if zero is None else zero.view(shape)
            # rows = (block, feature): G tokens of one feature, packed along tokens
            blocks = x.view(b, h, t // cfg.group_size, cfg.group_size, d).transpose(-1, -2).reshape(-1, cfg.group_size)
            codes, scale, zero = quantize_pack(blocks, cfg.bits, cfg.group_size, symmetric=cfg.symmetric)
            codes = codes.view(b, h, t // cfg.group_size, d, -1).transpose(-1, -2).reshape(b, h, -1, d)
            codes = _pad_features(codes, padded)
            scale = _pad_features(scale.view(b, h, t // cfg.group_size, d), padded)
            return (
                codes,
                scale,
                None if zero is None else _pad_features(zero.view(b, h, t // cfg.group_size, d), padded),
            )
        dim = -1 if self.axis == "token" else -2
        q = quantize(x, cfg.bits, cfg.group_size, dim, symmetric=cfg.symmetric, scale_dtype=cfg.torch_scale_dtype)
        if self.axis == "token":
            return pack_aligned(q.codes, cfg.bits, dim=-1), q.scale, q.zero
        # per channel: t is a multiple of G; pack each block of G tokens along tokens
        blocks = q.codes.view(b, h, t // cfg.group_size, cfg.group_size, d)
        codes = _pad_features(pack(blocks, cfg.bits, dim=-2).flatten(2, 3), padded)
        return codes, _pad_features(q.scale, padded), None if q.zero is None else _pad_features(q.zero, padded)

    def _decode(self, codes, scale, zero, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """Packed blocks holding ``tokens`` tokens (the padded layout) -> dequantized (B, H, tokens, D)."""
        cfg = self.config
        d = self.head_dim
        row_length = d if self.axis == "token" else cfg.group_size
        if self.axis == "channel":  # drop the padding features: the dense per-channel layout
            codes, scale = codes[..., :d], scale[..., :d]
            zero = None if zero is None else zero[..., :d]
        if self._kernels(scale, row_length, dtype):
            from eigenkv.kernels.quant_pack import unpack_dequantize

            b, h = codes.shape[:2]
            if self.axis == "token":
                # the kernels take d a multiple of G >= 16: the padded row is the dense row
                rows = unpack_dequantize(
                    codes.reshape(b * h * tokens, -1),
                    scale.reshape(b * h * tokens, -1),
                    None if zero is None else zero.reshape(b * h * tokens, -1),
                    cfg.bits,
                    cfg.group_size,
                    d,
                    dtype,
                )
                return self._unrotate(rows.view(b, h, tokens, d))
            nblocks = tokens // cfg.group_size
            packed = codes.reshape(b, h, nblocks, -1, d).transpose(-1, -2).reshape(b * h * nblocks * d, -1)
            rows = unpack_dequantize(
                packed,
                scale.reshape(-1, 1),
                None if zero is None else zero.reshape(-1, 1),
                cfg.bits,
                cfg.group_size,
                cfg.group_size,
                dtype,
            )
            return self._unrotate(
                rows.view(b, h, nblocks, d, cfg.group_size).transpose(-1, -2).reshape(b, h, tokens, d)
            )
        if self.axis == "token":
            codes = unpack_aligned(codes, cfg.bits, d, dim=-1)
            dim = 3
        else:
            b, h = codes.shape[:2]
            blocks = codes.reshape(b, h, tokens // cfg.group_size, packed_length(cfg.group_size, cfg.bits), d)
            codes = unpack(blocks, cfg.bits, cfg.group_size, dim=-2).flatten(2, 3)
            dim = 2
        q = QuantizedGroups(codes, scale, zero, cfg.bits, cfg.group_size, dim, cfg.symmetric)
        return self._unrotate(dequantize(q, dtype))

    # --- public -------------------------------------------------------------------------------

    def _push(self, x: torch.Tensor) -> tuple[torch.Tensor, int, tuple | None]:
        """Store ``x`` (B, H, s, D); return ``(pending, flush, encoded)``: the window before the call
        followed by ``x``, how many of those tokens this call quantized, and their packed blocks."""
        if self.window is None:
            self.window = x[..., :0, :]
            self.head_dim = x.shape[-1]
        elif x.shape[:2] != self.window.shape[:2] or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"appending states of shape {tuple(x.shape)} to a stream of shape {tuple(self.window.shape)}"
            )
        before = self.quantized_tokens
        pending = torch.cat([self.window.to(x.dtype), x], dim=-2)
        target = quantized_prefix(before + pending.shape[-2], self.axis, self.config.group_size, self.config.residual)
        flush = target - before
        encoded = None
        if flush > 0:
            encoded = codes, scale, zero = self._encode(pending[..., :flush, :])
            self.codes = codes if self.codes is None else torch.cat([self.codes, codes], dim=2)
            self.scale = scale if self.scale is None else torch.cat([self.scale, scale], dim=2)
            if zero is not None:
                self.zero = zero if self.zero is None else torch.cat([self.zero, zero], dim=2)
            self.quantized_tokens = target
        self.window = pending[..., flush:, :].contiguous()
        return pending, flush, encoded

    def push(self, x: torch.Tensor) -> None:
        """Store ``x`` (B, H, s, D) without reading anything back (the attention kernels read the packed store)."""
        self._push(x)

    def append(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``x`` (B, H, s, D); return ``(held, unquantized)``, each (B, H, m, D) in ``x.dtype``.

        ``held`` is what the stream now holds (dequantized blocks, then the window);
        ``unquantized`` is the same with the tokens quantized by *this* call still
        in full precision, for the causal mixed view of a multi-token update.
        """
        old = x[..., :0, :] if self.window is None else self.read_quantized(x.dtype)
        pending, flush, encoded = self._push(x)
        new = pending[..., :0, :] if encoded is None else self._decode(*encoded, flush, x.dtype)
        held = torch.cat([old, new, self.window], dim=-2)
        unquantized = torch.cat([old, pending], dim=-2)
        return held, unquantized

    def packed(self) -> PackedStream:
        """What the stream holds, as the attention kernels read it (no copy)."""
        if self.rotation is not None:
            raise ValueError("the attention kernels do not read Hadamard-rotated caches (KVQuantConfig.rotate)")
        segments = ()
        if self.quantized_tokens:
            segments = (Segment(self.codes, self.scale, self.zero, self.config.bits, self.head_dim),)
        return PackedStream(
            segments, self.window, self.quantized_tokens, self.axis, self.config.group_size, self.config.symmetric
        )

    def read_quantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized tokens, dequantized: (B, H, T_q, D) (empty before any flush)."""
        if not self.quantized_tokens:
            return self.window[..., :0, :].to(dtype)
        return self._decode(self.codes, self.scale, self.zero, self.quantized_tokens, dtype)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by component."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return {
            "codes": size(self.codes),
            "scales": size(self.scale),
            "zeros": size(self.zero),
            "window": size(self.window),
        }


class SegmentedStream:
    """A stream stored as consecutive feature segments, each a :class:`QuantizedStream` of its own precision.

    Args:
        segments: ``[(features, config)]`` in feature order (``MixedKVQuantConfig.segments``);
            the configs differ only in bits, so every segment quantizes the same tokens.
        axis: grouping of this stream (``"token"``/``"channel"``).
    """

    def __init__(self, segments: list[tuple[int, KVQuantConfig]], axis: str):
        self.widths = [width for width, _ in segments]
        self.parts = [QuantizedStream(config, axis, None) for _, config in segments]

    @property
    def tokens(self) -> int:
        return self.parts[0].tokens

    def append(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`QuantizedStream.append`; ``x`` (B, H, s, sum of the segment widths)."""
        if x.shape[-1] != sum(self.widths):
            raise ValueError(f"appending {x.shape[-1]} features to a stream of segments {self.widths}")
        held, unquantized = zip(
            *(part.append(piece) for part, piece in zip(self.parts, x.split(self.widths, dim=-1), strict=True)),
            strict=True,
        )
        return torch.cat(held, dim=-1), torch.cat(unquantized, dim=-1)

    def push(self, x: torch.Tensor) -> None:
        if x.shape[-1] != sum(self.widths):
            raise ValueError(f"appending {x.shape[-1]} features to a stream of segments {self.widths}")
        for part, piece in zip(self.parts, x.split(self.widths, dim=-1), strict=True):
            part.push(piece)

    def read_quantized(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([part.read_quantized(dtype) for part in self.parts], dim=-1)

    def packed(self) -> PackedStream:
        """As :meth:`QuantizedStream.packed`; the windows are joined along features (a copy of the window only)."""
        views = [part.packed() for part in self.parts]
        first = views[0]
        return PackedStream(
            tuple(segment for view in views for segment in view.segments),
            torch.cat([view.window for view in views], dim=-1),
            first.quantized_tokens,
            first.axis,
            first.group_size,
            first.symmetric,
        )

    def nbytes(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for part in self.parts:
            for name, n in part.nbytes().items():
                total[name] = total.get(name, 0) + n
        return total
