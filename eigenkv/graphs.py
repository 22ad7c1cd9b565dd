"""Greedy generation whose decode step is captured once in a CUDA graph and replayed.

A decode step of a Hugging Face model through a capturable
:class:`~eigenkv.quant.cache.QuantizedKVCache` has fixed shapes and addresses: the
cache's buffers are allocated for ``max_tokens`` at the first push, how many tokens it
holds lives on the device, the decode kernel's launch depends on the capacity only, and
the step's other inputs (the new token, its position, the 4-D mask over the capacity)
are static tensors that the step itself advances. So the step is captured once and
replayed for every new token: no Python, no launches, no host syncs between tokens.

    cache = kv.new_cache(max_tokens=prompt + new, capturable=True)
    out = generate_static(model, input_ids, cache, max_new_tokens=new)   # out.sequences (B, T + new)

Where a graph cannot be used (CPU, ``cuda_graph=False``, a model spread over several devices or with weights
offloaded by accelerate, or a capture that fails, for example a model whose forward reads a device value
back) the same step runs eagerly
(``out.graphed`` False, ``out.reason`` says why); the tokens are the same. Greedy only:
every sequence runs ``max_new_tokens`` steps (the tokens after an ``eos_token_id`` are
replaced by ``pad_token_id``, as ``generate`` pads finished sequences).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from eigenkv.devices import is_offloaded, layer_devices
from eigenkv.quant.cache import QuantizedKVCache


@dataclass
class StaticGeneration:
    """What :func:`generate_static` returns.

    Attributes:
        sequences: ``(B, T + max_new_tokens)`` int64, the prompt then the new tokens.
        cache: the cache, holding the prompt and every new token but the last.
        graphed: whether the decode steps were replays of a captured CUDA graph.
        reason: why they were not (None when graphed).
        seconds: wall time of ``prefill`` (the prompt's forward and first token), ``capture`` (the first
            step, eager, and the capture; 0 without a graph) and ``decode`` (the other steps), the device
            synchronized at each boundary only.
        decode_steps: the steps ``seconds["decode"]`` covers (``max_new_tokens - 2`` graphed, else
            ``max_new_tokens - 1``).
    """

    sequences: torch.Tensor
    cache: QuantizedKVCache
    graphed: bool
    reason: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    decode_steps: int = 0


class DecodeStep:
    """One greedy decode step and the static tensors it reads and advances (all on the model's device): calling
    it appends ``ids`` (B, 1) at ``cache_position``, writes the argmax into ``ids`` and ``tokens[:, index]``,
    and moves ``positions``, ``cache_position``, ``index`` and the mask on by one. What a graph captures."""

    def __init__(self, model, cache, first: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, new: int):
        batch, length = mask.shape
        device = first.device
        self.model, self.cache = model, cache
        self.ids = first.clone()  # (B, 1) int64: the token this step appends
        self.positions = positions[:, -1:] + 1  # (B, 1) int64: its position ids
        self.cache_position = torch.full((1,), length, dtype=torch.int64, device=device)  # its cache slot
        self.mask = torch.zeros((batch, 1, 1, cache.max_tokens), dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :length] = mask.bool()
        self.mask[:, 0, 0, length] = True
        self.tokens = torch.empty((batch, new), dtype=torch.int64, device=device)  # the new tokens
        self.tokens[:, :1] = first
        self.index = torch.ones(1, dtype=torch.int64, device=device)  # where the next new token goes
        self.last = torch.full((1,), new - 1, dtype=torch.int64, device=device)
        self.room = torch.full((1,), cache.max_tokens - 1, dtype=torch.int64, device=device)

    def __call__(self) -> None:
        logits = self.model(
            self.ids,
            attention_mask=self.mask.view_as(self.mask),  # a new view each call: nothing cached on it is stale
            position_ids=self.positions,
            cache_position=self.cache_position,
            past_key_values=self.cache,
            use_cache=True,
        ).logits
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.tokens.index_copy_(1, torch.minimum(self.index, self.last), self.ids)
        self.index += 1
        self.positions += 1
        self.cache_position += 1
        self.mask.index_fill_(-1, torch.minimum(self.cache_position, self.room), True)


def generate_static(
    model,
    input_ids: torch.Tensor,
    cache: QuantizedKVCache,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    cuda_graph: bool | str = "auto",
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> StaticGeneration:
    """Greedy decoding of ``max_new_tokens`` tokens with one captured decode step (module doc).

    Args:
        model: a Hugging Face causal LM whose attention goes through transformers' AttentionInterface
            (Llama family; compressed or in ``QuantizedKV``), inside the context its cache needs.
        input_ids: ``(B, T)`` int64 prompt; attention_mask: ``(B, T)`` (0 = left padding), default all ones.
        cache: an empty ``QuantizedKVCache(capturable=True)`` with ``max_tokens >= T + max_new_tokens``.
        cuda_graph: True (capture; an error if it cannot), False (eager steps), or "auto" (capture on CUDA,
            falling back to eager steps with a warning when capture fails).
        eos_token_id, pad_token_id: tokens after a sequence's first ``eos_token_id`` become ``pad_token_id``
            (default: ``eos_token_id``).
    """
    if not isinstance(cache, QuantizedKVCache) or not cache.capturable:
        raise ValueError("generate_static needs a QuantizedKVCache made with capturable=True (new_cache(..., True))")
    if cache.get_seq_length() != 0:
        raise ValueError("generate_static needs an empty cache (a new one per generation)")
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) int64 with T >= 1; got {input_ids.dtype} {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    batch, length = input_ids.shape
    if cache.max_tokens < length + max_new_tokens:
        raise ValueError(
            f"the cache has room for {cache.max_tokens} tokens; the prompt ({length}) and {max_new_tokens} new tokens "
            f"need {length + max_new_tokens}: make it with max_tokens={length + max_new_tokens}"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} builds its attention mask itself; its decode step cannot take the static "
            "4-D mask a captured step needs: use model.generate with the cache"
        )
    if cuda_graph not in (True, False, "auto"):
        raise ValueError(f"cuda_graph must be True, False or 'auto'; got {cuda_graph!r}")
    device = input_ids.device
    if cuda_graph is True and device.type != "cuda":
        raise ValueError(f"cuda_graph=True captures a CUDA graph; the inputs are on {device} (use 'auto' or False)")
    obstacle = _graph_obstacle(model)
    if cuda_graph is True and obstacle is not None:
        raise ValueError(f"cuda_graph=True cannot capture this model's decode step: {obstacle} (use 'auto' or False)")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be {tuple(input_ids.shape)}; got {tuple(mask.shape)}")
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded prompts

    clock = _Clock(device)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        cache.check()  # the prompt's states are finite
        step = DecodeStep(model, cache, logits[:, -1].argmax(-1, keepdim=True), positions, mask, max_new_tokens)
        clock.lap("prefill")
        graphed, reason = _decode(step, max_new_tokens - 1, length, cuda_graph, device, clock, obstacle)
        clock.lap("decode")
        cache.check()  # the decode steps' flags: finite states, one range of keys per row
    new = step.tokens
    if eos_token_id is not None:
        ended = (new == eos_token_id).long().cumsum(-1) - (new == eos_token_id).long() > 0  # after the first eos
        new = new.masked_fill(ended, eos_token_id if pad_token_id is None else pad_token_id)
    decode_steps = max(max_new_tokens - 2, 0) if graphed else max_new_tokens - 1
    return StaticGeneration(torch.cat([input_ids, new], dim=-1), cache, graphed, reason, clock.seconds, decode_steps)


class _Clock:
    """Wall time between laps, the device synchronized at each lap (never inside the decode loop)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {"capture": 0.0}
        self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name], self.start = now - self.start, now


def _graph_obstacle(model) -> str | None:
    """Why no CUDA graph can capture ``model``'s decode step whatever its inputs (None: nothing known)."""
    if is_offloaded(model):
        return "accelerate loads its offloaded weights onto the device in every forward, which a graph cannot replay"
    devices = sorted({str(d) for d in layer_devices(model).values()})
    if len(devices) > 1:
        return f"its layers compute on several devices ({', '.join(devices)}) and a graph captures one device's work"
    return None


def _decode(
    step: DecodeStep, steps: int, length: int, cuda_graph, device, clock: _Clock, obstacle: str | None = None
) -> tuple[bool, str | None]:
    """Run ``steps`` decode steps, replaying a captured graph where possible; return (graphed, reason)."""
    if steps == 0:
        return False, "no decode step"
    if cuda_graph is False or device.type != "cuda" or obstacle is not None:
        for _ in range(steps):
            step()
        if obstacle is not None and cuda_graph is not False and device.type == "cuda":
            return False, obstacle
        return False, "cuda_graph=False" if cuda_graph is False else f"no CUDA graphs on {device.type}"
    # the first step eagerly, on a side stream as capture wants: kernels compiled, the mask checked once
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    held = length + 1
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()  # recorded, not run: only the host's counts advanced
    except Exception as error:  # a forward that cannot be captured: the same steps, eagerly
        if cuda_graph is True:
            raise
        reason = f"capture failed: {type(error).__name__}: {error}"
        warnings.warn(f"generate_static: {reason}; decoding without a CUDA graph", stacklevel=3)
        step.cache.set_length(held)
        for _ in range(steps - 1):
            step()
        return False, reason
    step.cache.set_length(held)
    clock.lap("capture")
    for _ in range(steps - 1):
        graph.replay()
    step.cache.set_length(held + steps - 1)
    return True, None
