"""A quantized KV cache for Hugging Face models, and the switch that makes attention read it causally.

``QuantizedKVCache`` is a transformers ``Cache``: each layer keeps its keys and
values in a :class:`~eigenkv.quant.store.QuantizedStream` (packed codes, scales,
zero points and a full-precision window; each stream with its own quantizer,
``stream_config``) or, for a stream a ``LayerwiseKVQuantConfig`` leaves
unquantized, a :class:`~eigenkv.quant.store.DenseStream`, and hands attention
what it holds, dequantized. It works with ``model.generate`` and, one fresh cache per window,
with :func:`eigenkv.eval.perplexity`.

Causal reads in a multi-token forward. When one forward appends many tokens
(a prompt, or a perplexity window), the token at position ``p`` must see the
past as the cache would hold it after ``p + 1`` tokens: key ``j`` quantized if
``j < T_q(p + 1)``, in full precision otherwise. (Attending to the unquantized
states, as transformers' own QuantizedCache does in prefill, measures nothing.)
The cache tags the tensors it returns with their unquantized twins and the
per-query boundaries ``T_q(p + 1)`` (per stream, from its quantizer; an
unquantized stream is not tagged: every query reads it exact); the attention function registered as
``"eigenkv_quant"`` (``eigenkv.quant.attention``) builds the scores from both. Inside ``QuantizedKV(model,
config)`` the model uses that attention function; a token-by-token decode
through the same cache gives the same logits (a test).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, DynamicLayer

from eigenkv.quant.attention import ATTN_NAME, register
from eigenkv.quant.config import (
    AnyKVQuantConfig,
    KVQuantConfig,
    LayerwiseKVQuantConfig,
    MixedKVQuantConfig,
    check_layers,
    layer_segments,
    layer_windows,
    quantized_prefix,
    sliding_dropped,
    sliding_streams,
    stream_config,
)
from eigenkv.quant.reference import NON_FINITE_MESSAGE, hadamard
from eigenkv.quant.routing import stream_handle, tag_twin
from eigenkv.quant.store import CapturableStream, DenseStream, QuantizedStream, SegmentedStream

Stream = QuantizedStream | SegmentedStream | DenseStream


class QuantizedKVLayer(DynamicLayer):
    """One layer of a :class:`QuantizedKVCache`."""

    def __init__(
        self,
        config: AnyKVQuantConfig,
        rotation_source: QuantizedKVCache,
        index: int,
        read_packed: bool = False,
        window: int | None = None,
    ):
        super().__init__()
        self.read_packed = read_packed
        self.window = window  # a sliding-window layer: the tokens its attention sees
        self.is_sliding = window is not None
        self.quant = config
        # each stream's quantizer (None: unquantized); the segments of a MixedKVQuantConfig share its grouping,
        # group size and window
        self.key_config = stream_config(config, index, "key")
        self.value_config = stream_config(config, index, "value")
        self.index = index
        self._cache = rotation_source
        self.key_stream: Stream | None = None
        self.value_stream: Stream | None = None

    def configs(self) -> tuple[KVQuantConfig | None, KVQuantConfig | None]:
        """The quantizers of the keys and the values (None: unquantized), in the order of :meth:`streams`."""
        return self.key_config, self.value_config

    def _stream(self, kind: str, width: int, device) -> Stream:
        config = self.key_config if kind == "key" else self.value_config
        if config is None:
            return DenseStream()
        axis = config.axis(kind)
        if isinstance(self.quant, MixedKVQuantConfig):
            return SegmentedStream(layer_segments(self.quant, self.index, kind, width), axis)
        rotation = self._cache.rotation(width, device) if config.rotate else None
        if self._cache.capturable:
            # the same room for keys and values, in whole groups of both (the decode kernel reads one span)
            unit = math.lcm(self.key_config.group_size, self.value_config.group_size)
            capacity = -(-self._cache.max_tokens // unit) * unit
            return CapturableStream(config, axis, rotation, capacity)
        return QuantizedStream(config, axis, rotation)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_stream = self._stream("key", key_states.shape[-1], key_states.device)
        self.value_stream = self._stream("value", value_states.shape[-1], value_states.device)
        if self._cache.max_tokens:
            for stream in self.streams():
                stream.reserve(self._cache.max_tokens)
        self.is_initialized = True

    def check(self) -> None:
        """Raise if NaN/Inf was appended to this layer, or a decode mask was not one range of keys per row
        (the flags a decode step sets on the device; a device-to-host read each)."""
        for name, stream in zip(("keys", "values"), self.streams(), strict=False):
            flag = stream.non_finite  # None for an unquantized stream
            if flag is not None and bool(flag):
                raise ValueError(f"layer {self.index} {name}: {NON_FINITE_MESSAGE}")
            if getattr(stream, "mask_ok", None) is not None and not bool(stream.mask_ok):
                raise ValueError(
                    f"layer {self.index}: a decode step's attention mask was not one range of keys per sequence "
                    "after the first step passed that check; masks in a generation may only grow by visible keys"
                )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, H_kv, s, D)`` keys and values; return all held keys and values ``(B, H_kv, m, D)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:  # a decode step: NaN/Inf flagged on the device, read every few steps
            self._cache.step_checked(self.index)
        if self.read_packed and key_states.shape[-2] == 1 and self._kernels_read(key_states):
            self.key_stream.push(key_states)
            self.value_stream.push(value_states)
            if not self.is_sliding:
                return stream_handle(self.key_stream, key_states), stream_handle(self.value_stream, value_states)
            # attention reads what is held now; the oldest tokens go after (their rows stay until a later push)
            handles = [
                stream_handle(s, x, s.packed()) for s, x in zip(self.streams(), (key_states, value_states), strict=True)
            ]
            self._slide()
            return tuple(handles)
        start, dropped = self.key_stream.tokens, self.key_stream.dropped
        keys, keys_fp = self.key_stream.append(key_states)
        values, values_fp = self.value_stream.append(value_states)
        new = key_states.shape[-2]
        if new > 1:
            self.check()  # a prompt: this forward syncs anyway (the tags below)
            positions = torch.arange(start + 1, start + new + 1)
            streams = ((keys, keys_fp, self.key_config, "key"), (values, values_fp, self.value_config, "value"))
            for held, twin, cfg, kind in streams:
                if cfg is None:  # unquantized: every query reads the exact values, no twin
                    continue
                axis = cfg.axis(kind)
                # quantized_prefix(m) for every m in positions, at once
                old = (positions - cfg.residual).clamp(min=0)
                bounds = old if axis == "token" else old // cfg.group_size * cfg.group_size
                flushed_from = quantized_prefix(start, axis, cfg.group_size, cfg.residual)
                # Query p (holding m = p + 1 tokens) reads the twin of token j in [bound, m) that this
                # call quantized (j < bounds[-1]); tag only when that happens for some query.
                if bool((bounds.clamp(min=flushed_from) < positions.clamp(max=int(bounds[-1]))).any()):
                    tag_twin(held, twin, (bounds - dropped).to(held.device))  # in the held tokens' indices
        self._slide()
        return keys, values

    def _slide(self) -> None:
        """A sliding layer: stop holding the tokens before the next query's window (whole quantized units of
        every sliding layer's streams: :meth:`QuantizedKVCache.sliding_dropped`)."""
        if self.is_sliding:
            gone = self._cache.sliding_dropped(self.key_stream.tokens, self.window)
            for stream in self.streams():
                stream.drop_to(max(gone, stream.dropped))

    def _kernels_read(self, key_states: torch.Tensor) -> bool:
        """Whether the decode kernel reads this layer's store for states like ``key_states``: only when both
        streams are quantized in a form it reads (each its own group size and symmetry). A layer with an
        unquantized stream takes the PyTorch path: the cache returns what it holds, dequantized."""
        from eigenkv.kernels.backend import use_triton
        from eigenkv.kernels.lowrank_decode import GROUP_SIZES, KERNEL_DTYPES

        return (
            use_triton(key_states)
            and key_states.dtype in KERNEL_DTYPES
            and all(
                cfg is not None and cfg.group_size in GROUP_SIZES and cfg.scale_dtype == "float16" and not cfg.rotate
                for cfg in self.configs()
            )
        )

    def get_seq_length(self) -> int:
        """Tokens appended so far (a sliding layer's dropped ones included): the next token's position."""
        return 0 if self.key_stream is None else self.key_stream.tokens

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        """``(keys attention reads, position of the first)`` for ``query_length`` new tokens (or their
        ``cache_position`` tensor, as older transformers pass): a sliding layer reads from its first held token."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        dropped = 0 if self.key_stream is None else self.key_stream.dropped
        return self.get_seq_length() - dropped + query_length, dropped

    def reset(self) -> None:
        self.key_stream = self.value_stream = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers passes it; a positive
        value is the older form, the length to keep; 0 does nothing). Tokens that leave a quantized block come
        back to the window dequantized (``QuantizedStream.crop``)."""
        if self.key_stream is None or tokens_to_remove == 0:
            return
        tokens = self.key_stream.tokens
        keep = tokens + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, tokens)
        for stream in self.streams():
            stream.crop(max(keep, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (sequence ``i`` becomes sequence ``beam_idx[i]``)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for stream in self.streams():
            stream.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.key_stream is not None:
            index = torch.arange(self.key_stream.batch, device=self.device).repeat_interleave(repeats)
            self.batch_select_indices(index)

    def streams(self) -> tuple[Stream, ...]:
        return () if self.key_stream is None else (self.key_stream, self.value_stream)


class QuantizedKVCache(Cache):
    """transformers ``Cache`` holding packed quantized keys and values (see the module doc).

    Args:
        config: the quantization settings (one precision, two per layer, or a quantizer per layer and kind;
            a ``LayerwiseKVQuantConfig`` may leave streams unquantized).
        model_config: the model's config (number of layers).
        read_packed: decode steps (one new token) on the kernel path (``eigenkv.quant.routing``)
            return empty handles to the packed store instead of its dequantized contents, for the
            attention kernels to read; only eigenkv's attention (``QuantizedKV``, compressed models)
            understands them. ``QuantizedKV.new_cache`` sets it. Only layers whose keys and values are both
            quantized are read so; a layer with an unquantized stream returns what it holds (the PyTorch path).
        max_tokens: tokens to reserve room for up front (prompt + new tokens), so that no buffer grows
            during generation; 0 grows them as needed (doubling).
        check_every: decode steps between reads of the NaN/Inf flags (a step itself reads nothing back from
            the device); a prompt is checked at once.
        capturable: a decode step can be captured in a CUDA graph and replayed (``eigenkv.graphs``): buffers
            for ``max_tokens`` tokens (required) are allocated at the first push, the window is a ring, and the
            counts live on the device (:class:`~eigenkv.quant.store.CapturableStream`); every stream must be
            quantized (one precision, no rotation, full-attention layers). The batch is then fixed
            (beam reordering works in place; batch repetition does not) and ``crop`` stays within the window.

    Beam search, batch selection and repetition, and ``crop`` (assisted decoding) work as in
    ``DynamicCache``: they act on every sequence's codes, scales, zeros and window.
    """

    def __init__(
        self,
        config: AnyKVQuantConfig,
        model_config,
        read_packed: bool = False,
        *,
        max_tokens: int = 0,
        check_every: int = 256,
        capturable: bool = False,
    ):
        windows = layer_windows(model_config)
        layers = len(windows)
        check_layers(config, layers)
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0 (0: grow as needed); got {max_tokens!r}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int (decode steps); got {check_every!r}")
        if capturable and not max_tokens:
            raise ValueError("a capturable cache has a fixed size: pass max_tokens (prompt + new tokens)")
        if capturable and isinstance(config, MixedKVQuantConfig):
            raise ValueError(
                "a capturable cache stores one precision per stream; MixedKVQuantConfig needs capturable=False"
            )
        configs = [stream_config(config, i, kind) for i in range(layers) for kind in ("key", "value")]
        if capturable and None in configs:
            layer, kind = divmod(configs.index(None), 2)
            raise ValueError(
                f"a capturable cache is read by the decode kernel, which reads quantized streams only; layer {layer}'s "
                f"{('keys', 'values')[kind]} are unquantized: quantize every stream, or use capturable=False"
            )
        if capturable and any(c.rotate for c in configs):
            raise ValueError(
                "a capturable cache is read by the decode kernel, which does not read Hadamard-rotated caches; "
                "use rotate=False, or capturable=False"
            )
        if capturable and any(windows):
            raise ValueError("a capturable cache has full-attention layers only; this model has sliding-window layers")
        self.config = config
        self.capturable = capturable
        self.max_tokens = max_tokens
        self.check_every = check_every
        self._steps = 0
        self._rotations: dict[torch.device, torch.Tensor] = {}  # one per device that layers compute on
        self._sliding_streams = sliding_streams(config, windows)
        self._dropped = (-1, 0)  # (tokens, sliding_dropped at that length), for the next sliding layer
        super().__init__(
            layers=[QuantizedKVLayer(config, self, i, read_packed, window) for i, window in enumerate(windows)]
        )

    def rotation(self, head_dim: int, device) -> torch.Tensor | None:
        """The Hadamard matrix shared by the layers that ``rotate`` on ``device`` (created on first use: one copy
        per device, for a model whose layers are spread over devices)."""
        device = torch.device(device)
        if device not in self._rotations:
            self._rotations[device] = hadamard(head_dim, torch.float32, device)
        return self._rotations[device]

    def sliding_dropped(self, tokens: int, window: int) -> int:
        """First tokens every sliding-window layer stops holding once it holds ``tokens``: one count for all of
        them, since transformers builds one mask for the sliding layers from the first one's sizes
        (:func:`~eigenkv.quant.config.sliding_dropped` over the streams of all sliding layers)."""
        if self._dropped[0] != tokens:
            self._dropped = (tokens, sliding_dropped(tokens, window, self._sliding_streams))
        return self._dropped[1]

    def step_checked(self, layer: int) -> None:
        """Count decode steps (at layer 0); every ``check_every`` steps, read the device flags (:meth:`check`)."""
        if layer == 0:
            self._steps += 1
            # not while a CUDA graph is captured: the reads would fail (the caller checks between replays)
            capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
            if self._steps % self.check_every == 0 and not capturing:
                self.check()

    def check(self) -> None:
        """Raise ValueError naming the layer if NaN/Inf was appended anywhere, or a decode step's mask was not
        one range of keys per sequence (flags set on the device; one device-to-host read a stream). Decode
        steps check every ``check_every`` steps; call it after a generation to check the last steps."""
        for layer in self.layers:
            layer.check()

    def nbytes(self) -> dict[str, int]:
        """Bytes held right now, by component: codes, scales, zeros, window (and ``data``, the unquantized
        streams', when there are some; the rotation matrix when a stream rotates, once per device)."""
        total = {"codes": 0, "scales": 0, "zeros": 0, "window": 0}
        for layer in self.layers:
            for stream in layer.streams():
                for name, n in stream.nbytes().items():
                    total[name] = total.get(name, 0) + n
        if self._rotations:
            total["rotation"] = sum(r.numel() * r.element_size() for r in self._rotations.values())
        return total

    def reserved_bytes(self) -> int:
        """Bytes allocated beyond :meth:`nbytes`: room reserved for the tokens to come (module doc)."""
        return sum(stream.reserved_bytes() for layer in self.layers for stream in layer.streams())

    def set_length(self, tokens: int) -> None:
        """A capturable cache: set the host's token counts of every stream (after replaying a captured step,
        which advances only the device's, or to undo the host's advance during a capture)."""
        if not self.capturable:
            raise ValueError("set_length applies to a capturable cache (QuantizedKVCache(capturable=True))")
        for layer in self.layers:
            for stream in layer.streams():
                stream.set_length(tokens)


class QuantizedKV:
    """Reversible switch of a model to quantized-KV attention, and a factory of caches.

    Example::

        with QuantizedKV(model, KVQuantConfig(bits=4, group_size=64)) as kv:
            ppl = perplexity(model, windows, make_cache=kv.new_cache)
            out = model.generate(ids, past_key_values=kv.new_cache(), max_new_tokens=20)
    """

    def __init__(self, model, config: AnyKVQuantConfig):
        if not isinstance(config, (KVQuantConfig, MixedKVQuantConfig, LayerwiseKVQuantConfig)):
            raise TypeError(
                "config must be a KVQuantConfig, MixedKVQuantConfig or LayerwiseKVQuantConfig; "
                f"got {type(config).__name__}"
            )
        self.model = model
        self.config = config
        self._previous: str | None = None

    def new_cache(self, max_tokens: int = 0, capturable: bool = False) -> QuantizedKVCache:
        """A cache for this model; decode steps read it with the attention kernels when they apply.
        ``max_tokens``: room reserved up front (prompt + new tokens; 0: grow as needed); ``capturable``: decode
        steps can be captured in a CUDA graph (see :class:`QuantizedKVCache`)."""
        return QuantizedKVCache(
            self.config, self.model.config, read_packed=True, max_tokens=max_tokens, capturable=capturable
        )

    def __enter__(self) -> QuantizedKV:
        if not getattr(self.model, "_supports_attention_backend", False):
            raise ValueError(
                f"{type(self.model).__name__} computes attention itself instead of through transformers' "
                "AttentionInterface, so a multi-token forward cannot read the quantized cache causally; "
                "QuantizedKVCache still works there for token-by-token decoding (model.generate)"
            )
        register()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_NAME)
        return self

    def __exit__(self, *exc) -> None:
        self.model.set_attn_implementation(self._previous)
