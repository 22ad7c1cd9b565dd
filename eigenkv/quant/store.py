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

- codes (either grouping): ``(B, H, T_q, packed_length(D', b))`` uint8, a row per token
  packed along features in the paired order (``pack_aligned(..., paired=True)``: code ``j``
  of two bytes is two adjacent features, the pair a matrix operand register of a decode tile
  holds);
- per token:   scales / zeros ``(B, H, T_q, ceil(D / G))``;
- per channel: scales / zeros ``(B, H, T_q / G, D')`` (the padding features' zero);
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

Growth in place. The tensors above are views of preallocated buffers: codes,
scales and zeros grow along their row axis into reserved capacity (doubled when
full, or reserved up front with :meth:`QuantizedStream.reserve`), and the window
is a sliding buffer (new tokens written after the live ones, flushed tokens
dropped from the front, the live ones moved back to the front only when the end
is reached). A decode step writes its new token, and the rows of the tokens it
quantizes: what it writes does not grow with the context (``traffic`` counts
it). ``nbytes`` counts the bytes held (the views); ``reserved_bytes`` the slack.
Nothing in a push reads a device value back on the host: NaN/Inf in the
appended states set a device flag (``non_finite``) that the owner checks when
it chooses (``QuantizedKVCache`` every few hundred steps and on demand).

A stream that a ``LayerwiseKVQuantConfig`` leaves unquantized is a
:class:`DenseStream`: the same interface, its tokens as they came in one growing
buffer (``nbytes`` reports them as ``data``).
"""

from __future__ import annotations

import torch

from eigenkv.quant.config import KVQuantConfig, quantized_prefix
from eigenkv.quant.packing import (
    PackedStream,
    Segment,
    aligned_width,
    pack_aligned,
    unpack_aligned,
)
from eigenkv.quant.reference import QuantizedGroups, dequantize, quantize


class GrowingRows:
    """A tensor ``(B, H, n, C)`` that grows along its row axis in place: rows are written into reserved
    capacity (doubled when full), so an append copies only what it adds, and ``view()`` is the ``n``
    rows held (a view: no copy)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None  # (B, H, capacity, C)
        self.start = 0  # rows before it were dropped (a sliding layer's oldest tokens)
        self.rows = 0  # the buffer's rows in use end here
        self.written = 0  # bytes written by appends
        self.grown = 0  # bytes moved by growth

    def view(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer[:, :, self.start : self.rows]

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows held in all (a no-op before the first append, which sets the shape); the
        rows held move to the front of the new buffer."""
        if self.buffer is not None and self.start + rows > self.buffer.shape[2]:
            held = self.rows - self.start
            grown = self.buffer.new_empty((*self.buffer.shape[:2], max(rows, held), self.buffer.shape[-1]))
            grown[:, :, :held] = self.buffer[:, :, self.start : self.rows]
            self.grown += self.rows_bytes(held)
            self.buffer, self.start, self.rows = grown, 0, held

    def drop_front(self, rows: int) -> None:
        """Stop holding the first ``rows`` rows held (their room is reused when the buffer is full)."""
        self.start += rows

    def append(self, x: torch.Tensor, capacity_hint: int = 0) -> None:
        """Write ``x`` (B, H, k, C) after the rows held."""
        k = x.shape[2]
        if self.buffer is None:
            self.buffer = x.new_empty((*x.shape[:2], max(k, capacity_hint), x.shape[-1]))
        elif self.rows + k > self.buffer.shape[2]:
            held = self.rows - self.start
            if self.start >= held + k:  # most of the buffer was dropped: move the rows held to the front
                self.buffer[:, :, :held] = self.buffer[:, :, self.start : self.rows].clone()
                self.grown += self.rows_bytes(held)
                self.start, self.rows = 0, held
            else:
                self.reserve(max(held + k, 2 * self.buffer.shape[2]))
        self.buffer[:, :, self.rows : self.rows + k] = x
        self.rows += k
        self.written += x.numel() * x.element_size()

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows held."""
        self.rows = min(self.rows, self.start + rows)

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (a new buffer of ``len(index)`` sequences)."""
        if self.buffer is not None:
            self.buffer = self.buffer.index_select(0, index.to(self.buffer.device))

    def rows_bytes(self, rows: int) -> int:
        b = self.buffer
        return 0 if b is None else b.shape[0] * b.shape[1] * rows * b.shape[-1] * b.element_size()

    def held_bytes(self) -> int:
        return self.rows_bytes(self.rows - self.start)

    def reserved_bytes(self) -> int:
        return 0 if self.buffer is None else self.rows_bytes(self.buffer.shape[2] - self.rows + self.start)


class SlidingWindow:
    """The full-precision window ``(B, H, W, D)``: tokens written after the live ones in a buffer, flushed
    tokens dropped from the front by moving the start; the live tokens move back to the front only when
    the end of the buffer is reached (at most the window's length, once per buffer's worth of tokens)."""

    def __init__(self, capacity: int):
        self.capacity = capacity  # initial tokens of room (the window's usual length, doubled)
        self.buffer: torch.Tensor | None = None
        self.start = self.end = 0
        self.written = 0  # bytes written by appends
        self.moved = 0  # bytes moved to the front, or by growth

    def view(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer[:, :, self.start : self.end]

    @property
    def length(self) -> int:
        return self.end - self.start

    def append(self, x: torch.Tensor) -> None:
        """Write ``x`` (B, H, k, D) after the live tokens (in the buffer's dtype, set by the first append)."""
        k = x.shape[2]
        if self.buffer is None:
            self.buffer = x.new_empty((*x.shape[:2], max(k, self.capacity), x.shape[-1]))
        if self.end + k > self.buffer.shape[2]:
            live = self.buffer[:, :, self.start : self.end]
            size = self.buffer.shape[2]
            if self.length + k > size:  # a long push: room for it and as much again
                size = 2 * (self.length + k)
            target = (
                self.buffer
                if size == self.buffer.shape[2]
                else self.buffer.new_empty((*x.shape[:2], size, x.shape[-1]))
            )
            target[:, :, : self.length] = live.clone() if target is self.buffer else live  # the ranges may overlap
            self.moved += live.numel() * live.element_size()
            self.buffer, self.start, self.end = target, 0, self.length
        self.buffer[:, :, self.end : self.end + k] = x
        self.end += k
        self.written += x.numel() * x.element_size()

    def drop_front(self, k: int) -> None:
        self.start += k

    def truncate(self, length: int) -> None:
        self.end = self.start + min(self.length, length)

    def select(self, index: torch.Tensor) -> None:
        if self.buffer is not None:
            live = self.buffer[:, :, self.start : self.end].index_select(0, index.to(self.buffer.device))
            self.buffer = self.buffer.new_empty((live.shape[0], *self.buffer.shape[1:]))
            self.buffer[:, :, : live.shape[2]] = live
            self.start, self.end = 0, live.shape[2]

    def held_bytes(self) -> int:
        v = self.view()
        return 0 if v is None else v.numel() * v.element_size()

    def reserved_bytes(self) -> int:
        b = self.buffer
        return 0 if b is None else b.numel() * b.element_size() - self.held_bytes()


def _pad_features(params: torch.Tensor, width: int) -> torch.Tensor:
    """Per-channel scales or zeros ``(..., D)`` -> contiguous ``(..., width)``, the added features zero."""
    pad = width - params.shape[-1]
    return (torch.nn.functional.pad(params, (0, pad)) if pad else params).contiguous()


class QuantizedStream:
    """Keys or values of one layer: packed quantized blocks plus a full-precision window (module doc)."""

    def __init__(self, config: KVQuantConfig, axis: str, rotation: torch.Tensor | None):
        self.config = config
        self.axis = axis
        self.rotation = rotation  # (D, D) or None; shared by all streams of a cache
        self._codes, self._scale, self._zero = GrowingRows(), GrowingRows(), GrowingRows()
        # the window holds at most `residual` tokens (per token) or `residual + G - 1` (per channel) between pushes
        self._window = SlidingWindow(2 * (config.residual + config.group_size))
        self.quantized_tokens = 0  # tokens quantized so far (those dropped included)
        self.dropped = 0  # the first tokens, no longer held (a sliding-window layer's; whole quantized units)
        self.head_dim = 0
        self.non_finite: torch.Tensor | None = None  # () bool on the states' device: NaN/Inf was appended
        self.mask_ok: torch.Tensor | None = None  # () bool: decode masks were one range per row (routing)
        self._reserved_tokens = 0

    @property
    def held_quantized(self) -> int:
        """Quantized tokens held (the quantized tokens not dropped)."""
        return self.quantized_tokens - self.dropped

    @property
    def codes(self) -> torch.Tensor | None:
        return self._codes.view() if self.held_quantized else None

    @property
    def scale(self) -> torch.Tensor | None:
        return self._scale.view() if self.held_quantized else None

    @property
    def zero(self) -> torch.Tensor | None:
        return self._zero.view() if self.held_quantized and self._zero.rows else None

    @property
    def window(self) -> torch.Tensor | None:
        return self._window.view()

    @property
    def tokens(self) -> int:
        """Tokens appended so far (those dropped included): the next token's position."""
        return self.quantized_tokens + self._window.length

    @property
    def batch(self) -> int:
        """Sequences held (0 before the first push)."""
        return 0 if self._window.buffer is None else self._window.buffer.shape[0]

    def drop_to(self, dropped: int) -> None:
        """Stop holding the first ``dropped`` tokens (a sliding-window layer's): quantized whole units
        (:func:`~eigenkv.quant.config.sliding_dropped` says how many); their rows' room is reused."""
        whole = self.axis == "token" or dropped % self.config.group_size == 0
        if not (self.dropped <= dropped <= self.quantized_tokens and whole):
            raise ValueError(f"cannot drop {dropped} tokens of a stream that dropped {self.dropped}")
        (c0, p0), (c1, p1) = self._rows(self.dropped), self._rows(dropped)
        self._codes.drop_front(c1 - c0)
        self._scale.drop_front(p1 - p0)
        if self._zero.buffer is not None:
            self._zero.drop_front(p1 - p0)
        self.dropped = dropped

    def _rows(self, tokens: int) -> tuple[int, int]:
        """Rows of codes and of scales/zeros that ``tokens`` quantized tokens take."""
        return tokens, tokens if self.axis == "token" else tokens // self.config.group_size

    def reserve(self, tokens: int) -> None:
        """Reserve room for ``tokens`` tokens (codes, scales, zeros), so that appends up to that length
        never grow a buffer; takes effect at the first push if none happened yet."""
        self._reserved_tokens = max(self._reserved_tokens, tokens)
        code_rows, param_rows = self._rows(quantized_prefix(tokens, self.axis, self.config.group_size, 0))
        self._codes.reserve(code_rows)
        self._scale.reserve(param_rows)
        self._zero.reserve(param_rows)

    @property
    def traffic(self) -> dict[str, int]:
        """Bytes this stream wrote since it was created: ``written`` by appends (new window tokens, new
        codes, scales and zeros), ``moved`` (window tokens moved back to the front of their buffer, and
        what buffer growth copied)."""
        parts = (self._codes, self._scale, self._zero)
        return {
            "written": self._window.written + sum(p.written for p in parts),
            "moved": self._window.moved + sum(p.grown for p in parts),
        }

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

            # rows = tokens, groups along them (per channel: t is a multiple of G, and blocks never straddle
            # two (batch, head) rows); the rows cover aligned_width(d) features
            codes, scale, zero = quantize_pack(
                x.reshape(-1, d), cfg.bits, cfg.group_size, symmetric=cfg.symmetric, check_finite=False,
                paired=True, axis=self.axis,
            )  # fmt: skip
            shape = (b, h, t if self.axis == "token" else t // cfg.group_size, -1)
            return codes.view(b, h, t, -1), scale.view(shape), None if zero is None else zero.view(shape)
        dim = -1 if self.axis == "token" else -2
        # NaN/Inf are flagged by the caller on the device, and codes come in range: nothing checked on the host
        q = quantize(
            x, cfg.bits, cfg.group_size, dim, symmetric=cfg.symmetric, scale_dtype=cfg.torch_scale_dtype,
            check_finite=False,
        )  # fmt: skip
        codes = pack_aligned(q.codes, cfg.bits, dim=-1, check=False, paired=True)
        if self.axis == "token":
            return codes, q.scale, q.zero
        return codes, _pad_features(q.scale, padded), None if q.zero is None else _pad_features(q.zero, padded)

    def _decode(self, codes, scale, zero, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """Packed blocks holding ``tokens`` tokens (the padded layout) -> dequantized (B, H, tokens, D)."""
        cfg = self.config
        d = self.head_dim
        row_length = d if self.axis == "token" else cfg.group_size
        b, h = codes.shape[:2]
        if self._kernels(scale, row_length, dtype):
            from eigenkv.kernels.quant_pack import unpack_dequantize

            params = scale.shape[2] * b * h
            rows = unpack_dequantize(
                codes.reshape(b * h * tokens, -1),
                scale.reshape(params, -1),
                None if zero is None else zero.reshape(params, -1),
                cfg.bits,
                cfg.group_size,
                d,
                dtype,
                paired=True,
                axis=self.axis,
            )
            return self._unrotate(rows.view(b, h, tokens, d))
        codes = unpack_aligned(codes, cfg.bits, d, dim=-1, paired=True)
        if self.axis == "channel":  # drop the padding features' parameters
            scale = scale[..., :d]
            zero = None if zero is None else zero[..., :d]
        dim = 3 if self.axis == "token" else 2
        q = QuantizedGroups(codes, scale, zero, cfg.bits, cfg.group_size, dim, cfg.symmetric)
        return self._unrotate(dequantize(q, dtype))

    # --- public -------------------------------------------------------------------------------

    def _push(self, x: torch.Tensor) -> tuple[torch.Tensor | None, int, tuple | None]:
        """Store ``x`` (B, H, s, D); return ``(flushed, flush, encoded)``: the states this call quantized
        (B, H, flush, D) (the oldest of the window before the call, then of ``x``), how many, and their packed
        blocks (None, 0, None when it quantized none)."""
        window = self._window.view()
        if window is None:
            self.head_dim = x.shape[-1]
            self.non_finite = torch.zeros((), dtype=torch.bool, device=x.device)
        elif x.shape[:2] != window.shape[:2] or x.shape[-1] != self.head_dim:
            raise ValueError(f"appending states of shape {tuple(x.shape)} to a stream of shape {tuple(window.shape)}")
        # flagged on the device, read by the owner when it chooses: no host sync in a step
        self.non_finite |= ~torch.isfinite(x).all()
        before, held = self.quantized_tokens, self._window.length
        target = quantized_prefix(before + held + x.shape[-2], self.axis, self.config.group_size, self.config.residual)
        flush = target - before
        if flush <= 0:
            self._window.append(x)
            return None, 0, None
        from_window = min(flush, held)
        if from_window == 0:
            flushed = x[:, :, :flush]
        else:
            old = window[:, :, :from_window].to(x.dtype)
            flushed = old if flush == from_window else torch.cat([old, x[:, :, : flush - from_window]], dim=2)
        encoded = codes, scale, zero = self._encode(flushed)
        capacity = self._rows(quantized_prefix(self._reserved_tokens, self.axis, self.config.group_size, 0))
        self._codes.append(codes, capacity[0])
        self._scale.append(scale, capacity[1])
        if zero is not None:
            self._zero.append(zero, capacity[1])
        self.quantized_tokens = target
        self._window.drop_front(from_window)
        self._window.append(x[:, :, flush - from_window :])
        return flushed, flush, encoded

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
        flushed, flush, encoded = self._push(x)
        window = self.window.to(x.dtype)
        if encoded is None:
            held = torch.cat([old, window], dim=-2)
            return held, held
        new = self._decode(*encoded, flush, x.dtype)
        return torch.cat([old, new, window], dim=-2), torch.cat([old, flushed, window], dim=-2)

    def packed(self) -> PackedStream:
        """What the stream holds, as the attention kernels read it (no copy)."""
        if self.rotation is not None:
            raise ValueError("the attention kernels do not read Hadamard-rotated caches (KVQuantConfig.rotate)")
        segments = ()
        if self.held_quantized:
            segments = (Segment(self.codes, self.scale, self.zero, self.config.bits, self.head_dim),)
        return PackedStream(
            segments, self.window, self.held_quantized, self.axis, self.config.group_size, self.config.symmetric
        )

    def read_quantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized tokens held, dequantized: (B, H, T_q - dropped, D) (empty before any flush)."""
        if not self.held_quantized:
            return self.window[..., :0, :].to(dtype)
        return self._decode(self.codes, self.scale, self.zero, self.held_quantized, dtype)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by component (the views the attention reads; the reserved slack apart)."""
        return {
            "codes": self._codes.held_bytes(),
            "scales": self._scale.held_bytes(),
            "zeros": self._zero.held_bytes(),
            "window": self._window.held_bytes(),
        }

    def reserved_bytes(self) -> int:
        """Bytes allocated but not held: room reserved for the tokens to come (and the 1-byte device flags)."""
        flags = sum(f.element_size() for f in (self.non_finite, self.mask_ok) if f is not None)
        return flags + sum(p.reserved_bytes() for p in (self._codes, self._scale, self._zero, self._window))

    # --- what a Hugging Face cache asks of its layers ------------------------------------------------

    def crop(self, tokens: int) -> None:
        """Keep the first ``tokens`` tokens. Tokens that stay but must return to the window (the rule puts
        fewer tokens in quantized blocks at the shorter length) come back dequantized: the stream then holds
        exactly the first ``tokens`` of what it held (later pushes quantize them again from those values)."""
        if not 0 <= tokens <= self.tokens:
            raise ValueError(f"cannot crop a stream of {self.tokens} tokens to {tokens}")
        if tokens >= self.quantized_tokens:
            self._window.truncate(tokens - self.quantized_tokens)
            return
        if self.dropped:
            raise ValueError(
                f"cannot crop a sliding-window stream below its {self.quantized_tokens} quantized tokens: it no longer "
                "holds its first tokens"
            )
        keep = quantized_prefix(tokens, self.axis, self.config.group_size, self.config.residual)
        code_rows, param_rows = self._rows(keep)
        zero = None if self.zero is None else self.zero[:, :, param_rows:]
        tail = self._decode(
            self.codes[:, :, code_rows:], self.scale[:, :, param_rows:], zero, self.quantized_tokens - keep,
            self._window.buffer.dtype,
        )  # fmt: skip
        returning = tail[:, :, : tokens - keep]  # (B, H, tokens - keep, D)
        self._codes.truncate(code_rows)
        self._scale.truncate(param_rows)
        self._zero.truncate(param_rows)
        self.quantized_tokens = keep
        self._window.truncate(0)
        self._window.append(returning)

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the sequences ``index`` (int64, on any device) of the batch."""
        for part in (self._codes, self._scale, self._zero, self._window):
            part.select(index)


class RingWindow:
    """The full-precision tokens of a :class:`CapturableStream`: token ``j`` in slot ``j % slots`` of a
    ``(B, H, slots, D)`` buffer, the live window being tokens ``[first, end)`` (positions, on the host).
    Slots before ``first`` still hold older tokens (those of a unit the next token may complete)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.buffer: torch.Tensor | None = None
        self.first = self.end = 0
        self.written = 0
        self.moved = 0  # a ring never moves what it holds

    @property
    def length(self) -> int:
        return self.end - self.first

    def view(self) -> torch.Tensor | None:
        """The live tokens in order, ``(B, H, length, D)`` (a copy: for the PyTorch paths)."""
        if self.buffer is None:
            return None
        slots = torch.arange(self.first, self.end, device=self.buffer.device) % self.slots
        return self.buffer.index_select(2, slots)

    def write(self, x: torch.Tensor, first: int) -> None:
        """Write ``x`` (B, H, k, D), the tokens at positions ``[first, first + k)`` (the last ``slots`` of them)."""
        k = min(x.shape[2], self.slots)
        slots = torch.arange(first + x.shape[2] - k, first + x.shape[2], device=x.device) % self.slots
        self.buffer.index_copy_(2, slots, x[:, :, x.shape[2] - k :].to(self.buffer.dtype))
        self.written += k * x[:, :, :1].numel() * self.buffer.element_size()

    def row_bytes(self) -> int:
        b = self.buffer
        return 0 if b is None else b.shape[0] * b.shape[1] * b.shape[-1] * b.element_size()

    def held_bytes(self) -> int:
        return self.length * self.row_bytes()

    def reserved_bytes(self) -> int:
        return (self.slots - self.length) * self.row_bytes()


class CapturableStream(QuantizedStream):
    """A :class:`QuantizedStream` whose one-token appends can be captured in a CUDA graph and replayed.

    Everything a step touches has a fixed shape and address: codes, scales and zeros are allocated for
    ``capacity`` tokens at the first push, the window is a :class:`RingWindow`, and how many tokens are
    held lives on the device in ``counts`` (int32 ``(2,)``: ``[T_q, S]``), which the decode kernel reads.
    A one-token push is one launch (:func:`~eigenkv.kernels.quant_pack.ring_append`; its torch reference off
    the kernels' path) that reads its positions from ``counts``: it writes the token to its ring slot and,
    when the token completes a quantization unit (the token ``S - residual`` per token, a block of ``G``
    tokens per channel; a predicate on the device, so that every step is the same launch), quantizes the
    unit from the ring and writes its packed rows in place, then advances ``counts``.

    The host keeps the same counts (no device read): :meth:`set_length` sets them alone, for a caller that
    replays a captured step (the replay advances only the device's). Multi-token pushes (a prompt) and the
    PyTorch paths work as in :class:`QuantizedStream`; ``crop`` works within the window, ``select`` in place.
    """

    def __init__(self, config: KVQuantConfig, axis: str, rotation: torch.Tensor | None, capacity: int):
        if rotation is not None or config.rotate:
            raise ValueError(
                "a capturable stream is read by the decode kernel, which does not read Hadamard-rotated caches; "
                "use rotate=False, or a cache made without capturable=True"
            )
        super().__init__(config, axis, rotation)
        self.unit = config.group_size if axis == "channel" else 1  # tokens quantized together
        # whole groups of G tokens (both groupings: the keys and values of a layer hold the same room)
        self.capacity = -(-capacity // config.group_size) * config.group_size
        # the window (at most residual + unit - 1 tokens) and the token that completes a unit
        self._window = RingWindow(config.residual + self.unit)
        self.counts: torch.Tensor | None = None
        self._next: torch.Tensor | None = None  # (2,) int32: the fused step's counts, copied into counts
        self._pushing = False

    def reserve(self, tokens: int) -> None:
        if tokens > self.capacity:
            raise ValueError(
                f"a capturable stream has room for {self.capacity} tokens, fixed when the cache was made; "
                f"make the cache with max_tokens >= {tokens}"
            )

    def _allocate(self, x: torch.Tensor) -> None:
        """Buffers for ``capacity`` tokens, shaped by encoding one unit of zeros like ``x`` (B, H, s, D)."""
        b, h, _, d = x.shape
        self.head_dim = d
        codes, scale, zero = self._encode(x.new_zeros((b, h, self.unit, d)))
        code_rows, param_rows = self._rows(self.capacity)
        for part, t, rows in ((self._codes, codes, code_rows), (self._scale, scale, param_rows),
                              (self._zero, zero, param_rows)):  # fmt: skip
            if t is not None:
                part.buffer = t.new_zeros((b, h, rows, t.shape[-1]))
        self._window.buffer = x.new_zeros((b, h, self._window.slots, d))
        self.counts = torch.zeros(2, dtype=torch.int32, device=x.device)
        self._next = torch.zeros_like(self.counts)
        self.non_finite = torch.zeros((), dtype=torch.bool, device=x.device)

    def set_length(self, tokens: int) -> None:
        """Set the host's counts to ``tokens`` held (the device's ``counts`` are not touched)."""
        quantized = quantized_prefix(tokens, self.axis, self.config.group_size, self.config.residual)
        code_rows, param_rows = self._rows(quantized)
        self._codes.rows, self._scale.rows = code_rows, param_rows
        self._zero.rows = param_rows if self._zero.buffer is not None else 0
        self.quantized_tokens = quantized
        self._window.first, self._window.end = quantized, tokens

    def _push(self, x: torch.Tensor) -> tuple[torch.Tensor | None, int, tuple | None]:
        if self.counts is None:
            self._allocate(x)
        elif x.shape[:2] != self._window.buffer.shape[:2] or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"appending states of shape {tuple(x.shape)} to a stream of shape {tuple(self._window.buffer.shape)}"
            )
        held, new = self.tokens, x.shape[-2]
        if held + new > self.capacity:
            raise ValueError(
                f"a capturable stream has room for {self.capacity} tokens and holds {held}; cannot append {new} "
                "(make the cache with a larger max_tokens)"
            )
        cfg = self.config
        before = self.quantized_tokens
        target = quantized_prefix(held + new, self.axis, cfg.group_size, cfg.residual)
        if new == 1:
            self._step(x, target > before)
            self.set_length(held + 1)
            if target == before or self._pushing:  # push() returns nothing: no host-positioned read
                return None, 0, None
            (c0, p0), (c1, p1) = self._rows(before), self._rows(target)
            zero = None if self._zero.buffer is None else self._zero.buffer[:, :, p0:p1]
            encoded = self._codes.buffer[:, :, c0:c1], self._scale.buffer[:, :, p0:p1], zero
            return self._window_tokens(before, target), target - before, encoded
        # a prompt: positions from the host (this forward is not captured)
        self.non_finite |= ~torch.isfinite(x).all()
        flushed, encoded = None, None
        if target > before:
            old = self._window_tokens(before, held)
            flushed = torch.cat([old.to(x.dtype), x], dim=2)[:, :, : target - before]
            encoded = self._encode(flushed)
            (c0, p0), (c1, p1) = self._rows(before), self._rows(target)
            for part, t, a, e in ((self._codes, encoded[0], c0, c1), (self._scale, encoded[1], p0, p1),
                                  (self._zero, encoded[2], p0, p1)):  # fmt: skip
                if t is not None:
                    part.buffer[:, :, a:e] = t
                    part.written += t.numel() * t.element_size()
        self._window.write(x, held)
        self.counts.copy_(torch.tensor([target, held + new], dtype=torch.int32))
        self.set_length(held + new)
        return flushed, target - before, encoded

    def push(self, x: torch.Tensor) -> None:
        """As :meth:`QuantizedStream.push`; a one-token push does only what a captured step replays."""
        self._pushing = True
        try:
            self._push(x)
        finally:
            self._pushing = False

    def _window_tokens(self, first: int, end: int) -> torch.Tensor:
        """Tokens ``[first, end)`` from the ring (B, H, end - first, D) (host positions)."""
        ring = self._window.buffer
        return ring.index_select(2, torch.arange(first, end, device=ring.device) % self._window.slots)

    def _step(self, x: torch.Tensor, completes: bool) -> None:
        """Append one token at the positions ``counts`` holds (device positions only): the fused kernel
        (:func:`~eigenkv.kernels.quant_pack.ring_append`) where it applies, else its torch reference.
        ``completes``: the host's count says this token completes a unit (for ``traffic`` only)."""
        from eigenkv.kernels.quant_pack import RingBuffers, ring_append, ring_append_reference

        cfg = self.config
        kernel = x.dtype in (torch.float16, torch.bfloat16) and self._kernels(
            x, x.shape[-1] if self.axis == "token" else cfg.group_size, x.dtype
        )
        buffers = RingBuffers(
            self._window.buffer, self._codes.buffer, self._scale.buffer, self._zero.buffer, self.counts,
            self.non_finite, self._next,
        )  # fmt: skip
        (ring_append if kernel else ring_append_reference)(x, buffers, cfg, self.axis)
        self._window.written += x.numel() * x.element_size()
        if completes:
            code_rows, param_rows = self._rows(self.unit)
            self._codes.written += self._codes.rows_bytes(code_rows)
            self._scale.written += self._scale.rows_bytes(param_rows)
            self._zero.written += self._zero.rows_bytes(param_rows)

    def packed(self) -> PackedStream:
        """The stream in device form (``PackedStream.counts``): whole buffers, the ring, the device counts."""
        if self.rotation is not None:
            raise ValueError("the attention kernels do not read Hadamard-rotated caches (KVQuantConfig.rotate)")
        zero = self._zero.buffer
        segment = Segment(self._codes.buffer, self._scale.buffer, zero, self.config.bits, self.head_dim)
        return PackedStream(
            (segment,), self._window.buffer, 0, self.axis, self.config.group_size, self.config.symmetric,
            counts=self.counts, ring=self._window.slots,
        )  # fmt: skip

    def reserved_bytes(self) -> int:
        """As :meth:`QuantizedStream.reserved_bytes`, with the ring's free slots and the device counts."""
        extra = (self.counts, self._next)
        return sum(t.numel() * t.element_size() for t in extra if t is not None) + super().reserved_bytes()

    def crop(self, tokens: int) -> None:
        """Keep the first ``tokens`` tokens, when the rule quantizes as many at that length as are quantized now
        (only window tokens are dropped: the ring holds no older ones to bring back)."""
        cfg = self.config
        same = quantized_prefix(tokens, self.axis, cfg.group_size, cfg.residual) == self.quantized_tokens
        if not (same and tokens <= self.tokens):
            raise ValueError(
                f"a capturable stream can crop only within its full-precision window, keeping its "
                f"{self.quantized_tokens} quantized tokens; cannot crop {self.tokens} tokens to {tokens}. "
                "Use a cache made without capturable=True for assisted decoding"
            )
        self.set_length(tokens)
        self.counts.copy_(torch.tensor([self.quantized_tokens, tokens], dtype=torch.int32))

    def select(self, index: torch.Tensor) -> None:
        """Reorder the batch in place (the addresses a captured step uses stay): ``index`` keeps its length."""
        if self.counts is None:
            return
        if index.numel() != self._window.buffer.shape[0]:
            raise ValueError(
                f"a capturable cache has a fixed batch of {self._window.buffer.shape[0]}; cannot select "
                f"{index.numel()} sequences (batch repetition needs a cache made without capturable=True)"
            )
        for buffer in (self._codes.buffer, self._scale.buffer, self._zero.buffer, self._window.buffer):
            if buffer is not None:
                buffer.copy_(buffer.index_select(0, index.to(buffer.device)))


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
        self.mask_ok: torch.Tensor | None = None  # as QuantizedStream.mask_ok

    @property
    def tokens(self) -> int:
        return self.parts[0].tokens

    @property
    def dropped(self) -> int:
        return self.parts[0].dropped

    @property
    def batch(self) -> int:
        return self.parts[0].batch

    def drop_to(self, dropped: int) -> None:
        for part in self.parts:
            part.drop_to(dropped)

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
        return _sum_dicts(part.nbytes() for part in self.parts)

    def reserved_bytes(self) -> int:
        flag = 0 if self.mask_ok is None else self.mask_ok.element_size()
        return flag + sum(part.reserved_bytes() for part in self.parts)

    @property
    def traffic(self) -> dict[str, int]:
        return _sum_dicts(part.traffic for part in self.parts)

    @property
    def non_finite(self) -> torch.Tensor | None:
        flags = [part.non_finite for part in self.parts if part.non_finite is not None]
        return torch.stack(flags).any() if flags else None

    def reserve(self, tokens: int) -> None:
        for part in self.parts:
            part.reserve(tokens)

    def crop(self, tokens: int) -> None:
        for part in self.parts:
            part.crop(tokens)

    def select(self, index: torch.Tensor) -> None:
        for part in self.parts:
            part.select(index)


class DenseStream:
    """Keys or values of one layer stored unquantized in a quantized cache (a stream whose quantizer is None,
    ``LayerwiseKVQuantConfig``): every token as it came, in the dtype of the first push, as a dense cache holds
    it. The interface of :class:`QuantizedStream` that the cache uses.

    The tokens are rows of a :class:`GrowingRows`: a push writes only its new rows (the buffer doubles when full,
    or is reserved up front), and reads return a view of the rows held, not a copy. A sliding-window layer's
    dropped tokens leave the front; their room is reused. ``nbytes`` counts the rows held (``{"data": ...}``, as
    ``eigenkv.memory.DenseStorage`` does), ``reserved_bytes`` the room beyond them. Nothing is flagged on the
    device: an unquantized token corrupts no other token's storage (NaN/Inf pass through as in a dense cache).
    """

    def __init__(self):
        self._rows = GrowingRows()
        self.dropped = 0  # the first tokens, no longer held (a sliding-window layer's)
        self.non_finite: torch.Tensor | None = None  # never set: nothing to flag (class doc)
        self._reserved_tokens = 0

    @property
    def tokens(self) -> int:
        """Tokens appended so far (those dropped included): the next token's position."""
        return self.dropped + self._rows.rows - self._rows.start

    @property
    def batch(self) -> int:
        return 0 if self._rows.buffer is None else self._rows.buffer.shape[0]

    def view(self) -> torch.Tensor | None:
        """The tokens held ``(B, H, tokens - dropped, D)`` (a view of the buffer), or None before any push."""
        return self._rows.view()

    def drop_to(self, dropped: int) -> None:
        """Stop holding the first ``dropped`` tokens (a sliding-window layer's); their rows' room is reused."""
        if not self.dropped <= dropped <= self.tokens:
            raise ValueError(f"cannot drop {dropped} tokens of a stream of {self.tokens} that dropped {self.dropped}")
        self._rows.drop_front(dropped - self.dropped)
        self.dropped = dropped

    def reserve(self, tokens: int) -> None:
        """Reserve room for ``tokens`` tokens (those dropped included), so that pushes up to that length never
        grow the buffer; takes effect at the first push if none happened yet."""
        self._reserved_tokens = max(self._reserved_tokens, tokens)
        self._rows.reserve(tokens - self.dropped)

    def push(self, x: torch.Tensor) -> None:
        """Store ``x`` (B, H, s, D) after the tokens held."""
        held = self._rows.buffer
        if held is not None and (x.shape[:2] != held.shape[:2] or x.shape[-1] != held.shape[-1]):
            raise ValueError(f"appending states of shape {tuple(x.shape)} to a stream of shape {tuple(held.shape)}")
        self._rows.append(x, self._reserved_tokens - self.dropped)

    def append(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``x`` (B, H, s, D); return ``(held, held)``: every token held (B, H, m, D) in ``x.dtype`` (a view
        when the dtypes agree). Nothing is quantized, so no query needs an unquantized twin."""
        self.push(x)
        held = self.view().to(x.dtype)
        return held, held

    def packed(self) -> PackedStream:
        """What the stream holds as a stream that is all window (no copy)."""
        return PackedStream.full_precision(self.view())

    def nbytes(self) -> dict[str, int]:
        return {"data": self._rows.held_bytes()}

    def reserved_bytes(self) -> int:
        return self._rows.reserved_bytes()

    @property
    def traffic(self) -> dict[str, int]:
        """As :attr:`QuantizedStream.traffic`: bytes ``written`` by pushes, ``moved`` by growth or reuse of room."""
        return {"written": self._rows.written, "moved": self._rows.grown}

    def crop(self, tokens: int) -> None:
        """Keep the first ``tokens`` tokens (not below those a sliding layer dropped)."""
        if not self.dropped <= tokens <= self.tokens:
            raise ValueError(
                f"cannot crop a stream of {self.tokens} tokens to {tokens}"
                + (f": it no longer holds its first {self.dropped}" if tokens < self.dropped else "")
            )
        self._rows.truncate(tokens - self.dropped)

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the sequences ``index`` of the batch."""
        self._rows.select(index)


def _sum_dicts(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for name, n in d.items():
            total[name] = total.get(name, 0) + n
    return total
