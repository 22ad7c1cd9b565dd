"""Generation with a captured decode step (eigenkv.graphs) and what makes the step capturable.

On CPU no graph is captured; what a capture needs is checked on the step itself: two consecutive steps
issue the same torch ops and kernel launches, with the same shapes, scalars and addresses of what persists
(so one captured step replays as every later one), and no op reads a device value back on the host.
The CUDA test captures for real (the GPU script runs it).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eigenkv.compress import EigenConfig, compress_model
from eigenkv.graphs import DecodeStep, generate_static
from eigenkv.quant import KVQuantConfig, QuantizedKV
from tests.helpers import DEVICE, random_tokens, random_windows, tiny_llama

NEW = 12


def prompt(model, length=21):
    ids = random_tokens(model, batch=2, length=length).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize(
    ("mode", "dtype", "backend"),
    [(None, torch.float32, "torch"), ("pre", torch.float16, "triton")],
    ids=["plain-fp32-reference", "pre-fp16-kernels"],
)
def test_same_tokens_as_generate(mode, dtype, backend, monkeypatch):
    monkeypatch.setenv("EIGENKV_BACKEND", backend)
    model = tiny_llama()
    if mode:
        compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    model = model.to(DEVICE, dtype)
    ids, mask = prompt(model)
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16, residual=2)) as kv, torch.no_grad():
        expected = model.generate(
            ids, attention_mask=mask, past_key_values=kv.new_cache(), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False,
        )  # fmt: skip
        cache = kv.new_cache(max_tokens=ids.shape[1] + NEW, capturable=True)
        out = generate_static(model, ids, cache, NEW, attention_mask=mask)
    assert torch.equal(out.sequences, expected)
    assert out.graphed == (DEVICE == "cuda") and out.decode_steps == (NEW - 2 if out.graphed else NEW - 1)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1  # the host's counts follow the device's
    assert [int(c) for c in cache.layers[0].key_stream.counts] == [
        cache.layers[0].key_stream.quantized_tokens,
        ids.shape[1] + NEW - 1,
    ]


class _Trace(TorchDispatchMode):
    """Every aten op: its name, and per argument what a replay depends on (tensors: shape, strides, dtype,
    and the address when it is one of ``persistent``'s)."""

    def __init__(self, persistent: set[int]):
        super().__init__()
        self.persistent, self.ops = persistent, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), describe(args, self.persistent), describe(kwargs, self.persistent)))
        return func(*args, **kwargs)


def describe(x, persistent):
    if isinstance(x, torch.Tensor):
        ptr = x.untyped_storage().data_ptr() if x.device.type != "meta" else 0
        return ("tensor", tuple(x.shape), x.stride(), str(x.dtype), ptr if ptr in persistent else None)
    if isinstance(x, (list, tuple)):
        return tuple(describe(v, persistent) for v in x)
    if isinstance(x, dict):
        return tuple((k, describe(v, persistent)) for k, v in sorted(x.items()))
    return x if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device)) else type(x).__name__


def launches(monkeypatch, persistent) -> list:
    """Record every Triton kernel launch (the interpreter's, or the compiled one's): kernel, grid, arguments."""
    import triton

    calls = []
    cls = triton.runtime.interpreter.InterpretedFunction if DEVICE == "cpu" else triton.runtime.jit.JITFunction
    run = cls.run

    def recording(self, *args, grid, warmup=False, **kwargs):
        name = getattr(getattr(self, "fn", None), "__name__", repr(self))
        calls.append((name, grid, describe(args, persistent), describe(kwargs, persistent)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(cls, "run", recording)
    return calls


def test_every_step_issues_the_same_work_and_reads_nothing_back(monkeypatch):
    """The property a CUDA graph needs, checked without one: steps 2 and 3 (after the first, which checks the
    mask once) are the same ops and launches on the same persistent tensors, with no device-to-host read
    (``_local_scalar_dense`` is what ``item``/``bool``/``int`` on a tensor run) anywhere in the forward."""
    monkeypatch.setenv("EIGENKV_BACKEND", "triton")
    model = tiny_llama()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode="pre"), progress=False)
    model = model.to(DEVICE, torch.float16)
    ids, mask = prompt(model, length=31)  # step 3 completes a block of per-channel keys (group 16, residual 2)
    with QuantizedKV(model, KVQuantConfig(bits=3, group_size=16, residual=2)) as kv, torch.no_grad():
        cache = kv.new_cache(max_tokens=64, capturable=True)
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits
        step = DecodeStep(model, cache, logits[:, -1].argmax(-1, keepdim=True), mask.cumsum(-1) - 1, mask, 8)
        step()
        tensors = [p for p in model.parameters()] + [t for t in vars(step).values() if isinstance(t, torch.Tensor)]
        for layer in cache.layers:
            for stream in layer.streams():
                packed = stream.packed()
                tensors += [packed.window, packed.counts, stream.non_finite, stream.mask_ok]
                tensors += [t for s in packed.segments for t in (s.codes, s.scale, s.zero) if t is not None]
        persistent = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
        kernels = launches(monkeypatch, persistent)
        traces = []
        for _ in range(2):
            kernels.clear()
            with _Trace(persistent) as trace:
                step()
            traces.append((trace.ops, list(kernels)))
    (ops_a, kernels_a), (ops_b, kernels_b) = traces
    assert [op[0] for op in ops_a] == [op[0] for op in ops_b]
    assert ops_a == ops_b
    assert kernels_a == kernels_b and any(k[0] == "_decode_kernel" for k in kernels_a)
    assert not [op for op in ops_a if "_local_scalar_dense" in op[0]]
    # the step wrote through the persistent buffers: the decode kernel read the device counts
    assert sum(1 for k in kernels_a if k[0] == "_decode_kernel") == model.config.num_hidden_layers


def test_bad_input_is_refused_with_the_fix():
    model = tiny_llama()
    ids, _ = prompt(model)
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16)) as kv:
        with pytest.raises(ValueError, match="capturable=True"):
            generate_static(model, ids, kv.new_cache(max_tokens=64), 4)
        with pytest.raises(ValueError, match="max_tokens=25"):
            generate_static(model, ids, kv.new_cache(max_tokens=24, capturable=True), 4)
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate_static(model, ids, kv.new_cache(max_tokens=64, capturable=True), 0)
        with pytest.raises(ValueError, match="cuda_graph"):
            generate_static(model, ids, kv.new_cache(max_tokens=64, capturable=True), 4, cuda_graph="yes")
        if DEVICE == "cpu":
            with pytest.raises(ValueError, match="use 'auto' or False"):
                generate_static(model, ids, kv.new_cache(max_tokens=64, capturable=True), 4, cuda_graph=True)
        used = kv.new_cache(max_tokens=64, capturable=True)
        generate_static(model, ids, used, 2)
        with pytest.raises(ValueError, match="empty cache"):
            generate_static(model, ids, used, 2)
    with pytest.raises(ValueError, match="max_tokens"):
        kv.new_cache(capturable=True)


def test_tokens_after_eos_are_padded():
    model = tiny_llama()
    ids, mask = prompt(model)
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16)) as kv, torch.no_grad():
        plain = generate_static(model, ids, kv.new_cache(max_tokens=64, capturable=True), NEW, attention_mask=mask)
        new = plain.sequences[:, ids.shape[1] :]
        eos = int(new[0, 3])  # a token the first sequence generates
        out = generate_static(
            model, ids, kv.new_cache(max_tokens=64, capturable=True), NEW, attention_mask=mask, eos_token_id=eos,
            pad_token_id=-1,
        )  # fmt: skip
    got = out.sequences[:, ids.shape[1] :]
    for row, expected in zip(got, new, strict=True):
        hits = (expected == eos).nonzero()
        cut = int(hits[0]) + 1 if len(hits) else NEW
        assert torch.equal(row[:cut], expected[:cut]) and bool((row[cut:] == -1).all())


@pytest.mark.skipif(DEVICE != "cuda", reason="captures a CUDA graph")
def test_a_captured_step_replays_as_eager_steps():
    model = tiny_llama()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode="pre"), progress=False)
    model = model.to(DEVICE, torch.float16)
    ids, mask = prompt(model)
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16, residual=2)) as kv:
        runs = {
            graph: generate_static(
                model, ids, kv.new_cache(max_tokens=80, capturable=True), 40, attention_mask=mask, cuda_graph=graph
            )
            for graph in (True, False)
        }
    assert runs[True].graphed and not runs[False].graphed
    assert torch.equal(runs[True].sequences, runs[False].sequences)
