"""The decode kernel against its PyTorch reference over odd shapes, and the wiring of both kernels into the models.

Error criterion (as FlashAttention's tests): the kernel's error against the
float64 reference is at most twice the error of the same-dtype reference, plus
a small atol.
"""

import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch

from eigenkv.compress import EigenConfig, compress_model
from eigenkv.kernels import lowrank_decode as decode_module
from eigenkv.kernels import lowrank_prefill as prefill_module
from eigenkv.kernels.backend import interpreting
from eigenkv.kernels.lowrank_decode import lowrank_decode, lowrank_decode_reference, unpacks_pairs
from eigenkv.kernels.scoring import Scoring
from eigenkv.quant import KVQuantConfig, QuantizedKV, QuantizedKVCache, routing
from eigenkv.quant.config import MixedKVQuantConfig
from eigenkv.quant.packing import PackedStream, Segment
from eigenkv.quant.store import CapturableStream, QuantizedStream, SegmentedStream
from tests.helpers import (
    DEVICE,
    random_tokens,
    random_windows,
    tiny_gemma2,
    tiny_gemma3,
    tiny_llama,
    tiny_llama3_scaled,
    tiny_mistral,
    tiny_mpt,
    tiny_olmo2,
    tiny_opt,
    tiny_phi3,
    tiny_qwen3,
)

ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_stream(x, config, axis, high=0):
    """Store ``x`` (B, H, S, r) as a cache stream would (optionally ``high`` leading features at 8 bits)."""
    if high:
        mixed = MixedKVQuantConfig(config, 8, (high,), (high,))
        stream = SegmentedStream(mixed.segments(0, "key", x.shape[-1]), axis)
    else:
        stream = QuantizedStream(config, axis, None)
    stream.push(x[..., : x.shape[-2] // 2, :])  # two appends: the store grows as in decoding
    stream.push(x[..., x.shape[-2] // 2 :, :])
    return stream.packed()


def check_against_reference(query, keys, values, scoring, **kwargs):
    out = lowrank_decode(query, keys, values, scoring, **kwargs)
    same_dtype = lowrank_decode_reference(query, keys, values, scoring, **kwargs)
    exact = lowrank_decode_reference(query.double(), keys, values, scoring.exact(), **kwargs)
    assert out.shape == exact.shape and out.dtype == query.dtype
    error = (out.double() - exact).abs().max().item()
    bound = 2 * (same_dtype.double() - exact).abs().max().item() + ATOL[query.dtype]
    assert error <= bound, f"kernel error {error:.3g} > {bound:.3g}"
    return out


def pre_rope(scaling, d, kv_heads, key_rank, dtype, shared=False):
    """A pre-RoPE scoring with random orthonormal decoders (one shared, or one per KV head)."""
    decoder = torch.linalg.qr(torch.randn(1 if shared else kv_heads, d, d))[0][..., :key_rank]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return Scoring(scaling, "pre", decoder.to(DEVICE, dtype), inv_freq.to(DEVICE))


CASES = [
    # mode, head size d, groups g, key rank, value rank, tokens, bits, group, axes (k, v), residual, high, dtype
    ("rank", 64, 1, 20, 13, 77, 4, 16, ("channel", "token"), 5, 0, torch.float16),
    ("rank", 64, 3, 37, 24, 77, 2, 32, ("channel", "token"), 0, 0, torch.float16),
    ("rank", 64, 4, 16, 40, 100, 3, 16, ("token", "token"), 3, 0, torch.bfloat16),
    ("rank", 128, 8, 77, 64, 130, 8, 64, ("channel", "channel"), 7, 0, torch.float16),
    ("rank", 64, 3, 38, 38, 100, 2, 16, ("channel", "token"), 4, 9, torch.float16),
    ("pre", 64, 3, 38, 38, 77, 4, 16, ("channel", "token"), 5, 0, torch.float16),
    ("pre", 128, 4, 77, 50, 70, 3, 32, ("channel", "token"), 0, 0, torch.bfloat16),
    ("pre", 64, 1, 20, 13, 61, 2, 16, ("token", "token"), 2, 0, torch.float16),
    ("pre", 128, 8, 64, 77, 66, 4, 16, ("channel", "token"), 3, 10, torch.float16),
    # head sizes 80 / 96 / 256 (pre mode: up to 128, PRE_MAX_HEAD), GQA 16, ranks whose second chunk is masked
    # (112 -> 64 + 64, 100 -> 64 + 64), the main loop at several tiles per split (group 16), 8-bit and
    # symmetric-free 2-bit codes
    ("rank", 80, 16, 80, 48, 70, 2, 16, ("channel", "token"), 2, 0, torch.float16),
    ("pre", 96, 2, 57, 96, 64, 8, 32, ("channel", "token"), 0, 0, torch.bfloat16),
    ("rank", 256, 2, 112, 100, 40, 4, 16, ("token", "channel"), 1, 0, torch.float16),
    ("pre", 128, 4, 100, 110, 40, 3, 16, ("channel", "token"), 5, 0, torch.float16),
    # 64-token tiles holding several blocks of per-channel codes (groups of 16 and 32; 3 bits: two planes a block)
    ("rank", 64, 2, 24, 20, 150, 3, 16, ("channel", "channel"), 4, 0, torch.float16),
    ("pre", 64, 4, 40, 33, 140, 2, 32, ("channel", "channel"), 3, 0, torch.bfloat16),
]


@pytest.fixture
def checked_alignment(monkeypatch):
    """Under the interpreter, each ``tl.multiple_of`` claim checked on the values it is made about (the
    compiler trusts it: on the GPU a false claim is a misaligned-address fault, or wrong loads). A claim of
    ``v`` along axis ``a`` holds when the first element of every run along ``a`` is a multiple of ``v``; the
    kernel's runs start at index 0. Returns the claims seen (None on a GPU, where nothing is checked)."""
    if not interpreting():
        return None
    from triton.runtime.interpreter import TensorHandle

    claims = []
    set_attr = TensorHandle.set_attr

    def checking_set_attr(self, key, values):
        if key == "tt.divisibility":
            data = np.asarray(self.data)
            for axis, v in enumerate(values):
                first = data if data.ndim == 0 else np.take(data, 0, axis=axis)
                assert np.all(first % v == 0), f"multiple_of claims {v} along axis {axis}: {first.ravel()[:8]}"
            claims.append(tuple(values))
        return set_attr(self, key, values)

    monkeypatch.setattr(TensorHandle, "set_attr", checking_set_attr)
    return claims


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-d{c[1]}-g{c[2]}-r{c[3]}x{c[4]}-b{c[6]}-{c[-1]}" for c in CASES])
def test_matches_reference_over_odd_shapes(case, checked_alignment):
    mode, d, groups, key_rank, value_rank, tokens, bits, group, (axis_k, axis_v), residual, high, dtype = case
    batch, kv_heads = 2, 2
    config = KVQuantConfig(bits=bits, group_size=group, axis_k=axis_k, axis_v=axis_v, residual=residual)
    keys = make_stream(torch.randn(batch, kv_heads, tokens, key_rank, device=DEVICE, dtype=dtype), config, axis_k, high)
    values = make_stream(
        torch.randn(batch, kv_heads, tokens, value_rank, device=DEVICE, dtype=dtype), config, axis_v, high
    )
    assert keys.quantized_tokens > 0 and keys.window.shape[-2] > 0 or residual == 0
    width = d if mode == "pre" else key_rank
    query = torch.randn(batch, kv_heads * groups, width, device=DEVICE, dtype=dtype)
    scoring = pre_rope(d**-0.5, d, kv_heads, key_rank, dtype, groups == 1) if mode == "pre" else Scoring(d**-0.5)
    # unequal lengths: the second sequence is left-padded by 5 and ends 3 tokens early
    starts = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    ends = torch.tensor([tokens, tokens - 3], dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        check_against_reference(query, keys, values, scoring, starts=starts, ends=ends, splits=splits)
    if checked_alignment is not None and min(keys.quantized_tokens, values.quantized_tokens) >= 64:
        assert checked_alignment, "the main loop ran without its alignment claims being checked"


# Per-token chunks of at least 8 x (query heads padded) features inside one group take the folded path (scales and
# offsets out of the elements): GQA 4 pads to 8, so ranks 77 (chunks 64 + 16) and 128 with groups of 64 / 128
FOLDED = [
    # key rank, value rank, bits, group, key axis, symmetric, dtype
    (77, 77, 4, 64, "token", False, torch.float16),
    (77, 64, 8, 64, "channel", False, torch.bfloat16),
    (128, 100, 2, 128, "token", True, torch.float16),
    (70, 128, 4, 128, "token", False, torch.bfloat16),
]


@pytest.mark.parametrize("case", FOLDED, ids=[f"r{c[0]}x{c[1]}-b{c[2]}-g{c[3]}-k{c[4]}-s{int(c[5])}" for c in FOLDED])
def test_folded_scales_match_the_reference(case, monkeypatch):
    """The folded path: the MMAs weigh the codes as converted (1024 or 128 above the code), the scales go into the
    probabilities (values) or multiply the scores (per-token keys), the offsets and that bias come off in fp32."""
    key_rank, value_rank, bits, group, axis_k, symmetric, dtype = case
    torch.manual_seed(1)
    config = KVQuantConfig(bits=bits, group_size=group, axis_k=axis_k, axis_v="token", residual=3, symmetric=symmetric)
    tokens = 2 * group + 40  # two full tiles of 64 tokens at least, then partly quantized tiles and the window
    keys = make_stream(torch.randn(2, 2, tokens, key_rank, device=DEVICE, dtype=dtype) * 3, config, axis_k)
    values = make_stream(torch.randn(2, 2, tokens, value_rank, device=DEVICE, dtype=dtype), config, "token")
    query = torch.randn(2, 8, key_rank, device=DEVICE, dtype=dtype)
    folded = []
    if interpreting():  # count the folded calls (on a GPU the compile holds them)
        for name in ("_score_folded", "_weigh_folded"):
            original = getattr(decode_module, name)
            monkeypatch.setattr(decode_module, name, lambda *a, _f=original, _n=name: folded.append(_n) or _f(*a))
    starts = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        check_against_reference(query, keys, values, Scoring(key_rank**-0.5), starts=starts, splits=splits)
    if interpreting():
        assert "_weigh_folded" in folded and ("_score_folded" in folded) == (axis_k == "token"), set(folded)


def run_ptx(ptx: str, words: list[np.ndarray], outputs: int) -> np.ndarray:
    """Runs the ``prmt`` / ``shr`` / ``shl`` / ``lop3`` PTX of ``unpack_ptx`` (``unpack_ptx3``) on its uint32
    inputs ``words`` (n,) each (``$outputs``, ``$outputs + 1``): (outputs, n) uint32."""
    regs = {f"${outputs + i}": w.astype(np.uint64) for i, w in enumerate(words)}

    def value(token: str) -> np.ndarray:
        return regs[token] if token in regs else np.full_like(words[0], int(token, 0), dtype=np.uint64)

    body = ptx.strip("{} ").split(";")
    assert body[0].strip().startswith(".reg .b32 lo, hi"), body[0]
    for line in filter(str.strip, body[1:]):
        op, args = line.split(None, 1)
        d, *src = (a.strip() for a in args.split(","))
        if op == "prmt.b32":  # bytes 0-3 of a, 4-7 of b; selector nibble i picks byte i of the result
            a, b, sel = value(src[0]), value(src[1]), int(src[2], 0)
            pool = a | (b << 32)
            out = np.zeros_like(pool)
            for i in range(4):
                pick = (sel >> 4 * i) & 0xF
                assert pick < 8, "sign replication is not used"
                out |= ((pool >> (8 * pick)) & 0xFF) << (8 * i)
            regs[d] = out
        elif op == "shr.b32":
            regs[d] = value(src[0]) >> int(src[1])
        elif op == "shl.b32":
            regs[d] = (value(src[0]) << int(src[1])) & 0xFFFFFFFF
        elif op == "lop3.b32":  # result bit = bit (4a + 2b + c) of the table
            a, b, c, lut = value(src[0]), value(src[1]), value(src[2]), int(src[3], 0)
            out = np.zeros_like(a)
            for index in range(8):
                if lut >> index & 1:
                    term = np.full_like(a, 0xFFFFFFFF)
                    for bit, x in zip((4, 2, 1), (a, b, c), strict=True):
                        term &= x if index & bit else ~x & 0xFFFFFFFF
                    out |= term
            regs[d] = out
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return np.stack([regs[f"${k}"] for k in range(outputs)]).astype(np.uint32)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpack_ptx_gives_every_code_of_every_byte(bits, dtype):
    # what the GPU runs in place of the interpreter's conversion: element i of four packed bytes -> code k of
    # that byte as magic + code, in half i % 2 of output register (2k + i // 2)
    magic = 0x6400 if dtype == torch.float16 else 0x4300
    values = np.arange(256, dtype=np.uint64)
    words = values | ((values * 7 + 3) % 256) << 8 | (255 - values) << 16 | ((values * 13 + 5) % 256) << 24
    codes = 8 // bits
    regs = run_ptx(decode_module.unpack_ptx(bits, magic), [words], 2 * codes)  # (2 codes, 256)
    halves = np.stack([regs & 0xFFFF, regs >> 16], axis=-1).reshape(codes, 2, 256, 2)  # (k, i // 2, word, i % 2)
    got = torch.from_numpy(halves.astype(np.int16)).view(dtype).float()
    for i in range(4):
        byte = (words >> (8 * i)) & 0xFF
        for k in range(codes):
            code = torch.from_numpy(((byte >> (bits * k)) & ((1 << bits) - 1)).astype(np.float32))
            torch.testing.assert_close(got[k, i // 2, :, i % 2], code + (1024.0 if magic == 0x6400 else 128.0))
    with pytest.raises(ValueError, match="2- or 4-bit"):
        decode_module.unpack_ptx(3, magic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpack_ptx3_merges_the_planes_of_every_byte(dtype):
    # 3 bits: element i of four bytes of the 2-bit plane and of their high nibbles -> code k of element i, its
    # two low bits (2k, 2k + 1) of the byte and its third bit (bit k of the nibble), as magic + code
    magic = 0x6400 if dtype == torch.float16 else 0x4300
    low = np.repeat(np.arange(256, dtype=np.uint64), 16)  # every byte with every nibble
    nibble = np.tile(np.arange(16, dtype=np.uint64), 256)
    words = low | ((low * 7 + 3) % 256) << 8 | (255 - low) << 16 | ((low * 13 + 5) % 256) << 24
    highs = nibble | ((nibble * 5 + 1) % 16) << 8 | (15 - nibble) << 16 | ((nibble * 3 + 7) % 16) << 24
    regs = run_ptx(decode_module.unpack_ptx3(magic), [words, highs], 8)  # (8, n)
    n = low.size
    halves = np.stack([regs & 0xFFFF, regs >> 16], axis=-1).reshape(4, 2, n, 2)  # (k, i // 2, word, i % 2)
    got = torch.from_numpy(halves.astype(np.int16)).view(dtype).float()
    for i in range(4):
        byte, high = (words >> (8 * i)) & 0xFF, (highs >> (8 * i)) & 0xF
        for k in range(4):
            code = ((byte >> (2 * k)) & 3) | (((high >> k) & 1) << 2)
            want = torch.from_numpy(code.astype(np.float32)) + (1024.0 if magic == 0x6400 else 128.0)
            torch.testing.assert_close(got[k, i // 2, :, i % 2], want)


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_8bit_codes_off_word_alignment_are_read_byte_by_byte(axis, checked_alignment):
    """8-bit codes are read as uint32 words when they start and stride on multiples of 8 bytes (the store's
    always do); codes moved one byte off (a view a caller might build) take the byte path. Both match the
    reference, and each other to fp32 rounding (the word path's codes carry a bias a fold takes off in fp32)."""
    torch.manual_seed(0)
    config = KVQuantConfig(bits=8, group_size=64, axis_k=axis, axis_v=axis, residual=0)
    keys = make_stream(torch.randn(1, 2, 128, 40, device=DEVICE, dtype=torch.float16), config, axis)
    values = make_stream(torch.randn(1, 2, 128, 24, device=DEVICE, dtype=torch.float16), config, axis)
    query = torch.randn(1, 4, 40, device=DEVICE, dtype=torch.float16)
    aligned = check_against_reference(query, keys, values, Scoring(0.125))

    def off_by_one(stream):
        segment = stream.segments[0]
        buffer = torch.zeros(segment.codes.numel() + 1, dtype=torch.uint8, device=DEVICE)
        codes = buffer[1:].view(segment.codes.shape)
        codes.copy_(segment.codes)
        return dataclasses.replace(stream, segments=(dataclasses.replace(segment, codes=codes),))

    moved_keys, moved_values = off_by_one(keys), off_by_one(values)
    assert unpacks_pairs(8, keys.segments[0].codes) and unpacks_pairs(8, values.segments[0].codes)
    assert not unpacks_pairs(8, moved_keys.segments[0].codes) and not unpacks_pairs(8, moved_values.segments[0].codes)
    moved = check_against_reference(query, moved_keys, moved_values, Scoring(0.125))
    torch.testing.assert_close(moved, aligned, rtol=0, atol=2e-3)


def test_slices_claim_the_alignment_they_have_and_fit_32_bit_offsets():
    """The main loop tells the compiler that each (batch, head) slice and row of codes starts on a multiple of
    codes_alignment bytes: the launcher claims it only where the address and the strides bear it out (a false
    claim faults on the GPU), and refuses slices past what its 32-bit offsets reach."""
    # rank 77, stored 80: 4-bit rows of 40 bytes take 8-byte copies, 2-bit rows of 20 bytes 4-byte ones, 3-bit
    # rows of 30 bytes 2-byte ones
    assert [decode_module.codes_alignment(b, True, 77) for b in (2, 3, 4, 8)] == [4, 2, 8, 8]
    # 72 features: rows of 18, 27 and 36 bytes; 128 features: 32, 48 and 64 (3 bits: at most 4)
    assert [decode_module.codes_alignment(b, True, 72) for b in (2, 3, 4, 8)] == [2, 1, 4, 8]
    assert [decode_module.codes_alignment(b, True, 128) for b in (2, 3, 4, 8)] == [4, 4, 8, 8]
    assert decode_module.codes_alignment(8, False, 77) == 1
    codes = torch.zeros(2, 3, 64, 40, dtype=torch.uint8)
    assert decode_module.slice_alignment(8, codes) == 8
    assert decode_module.slice_alignment(8, torch.zeros(64 * 40 * 6 + 1, dtype=torch.uint8)[1:].view(2, 3, 64, 40)) == 1
    assert decode_module.slice_alignment(8, torch.zeros(2, 3, 65, 20, dtype=torch.uint8)[:, :, :64]) == 4  # 1300 B
    assert decode_module.slice_alignment(2, torch.zeros(2, 3, 65, 20, dtype=torch.uint8)[:, :, :64]) == 2
    assert decode_module.slice_alignment(8, torch.zeros(2, 3, 64, 44, dtype=torch.uint8)[..., :40]) == 4  # rows
    assert decode_module.slice_alignment(8, torch.zeros(2, 3, 64, 42, dtype=torch.uint8)[..., :40]) == 2
    decode_module.check_slice_extent("keys codes", torch.empty(1, 1, 2**20, 40, dtype=torch.uint8, device="meta"))
    huge = torch.empty(1, 1, 2**26, 40, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match=r"keys codes: one \(batch, head\) slice spans 2684354560 elements.*fewer"):
        decode_module.check_slice_extent("keys codes", huge)


@pytest.mark.parametrize(
    "case", CASES[:9:2], ids=[f"{c[0]}-d{c[1]}-r{c[3]}x{c[4]}-b{c[6]}-{c[-1]}" for c in CASES[:9:2]]
)
def test_device_form_streams_match_the_reference(case, checked_alignment):
    """A capturable cache's streams (counts on the device, a ring window, buffers for the capacity): one
    launch for any length, keys past what is held never read even when ``ends`` says so."""
    mode, d, groups, key_rank, value_rank, tokens, bits, group, (axis_k, axis_v), residual, _, dtype = case
    batch, kv_heads, capacity = 2, 2, tokens + 70
    config = KVQuantConfig(bits=bits, group_size=group, axis_k=axis_k, axis_v=axis_v, residual=residual)
    streams = []
    for width, axis in ((key_rank, axis_k), (value_rank, axis_v)):
        stream = CapturableStream(config, axis, None, capacity)
        x = torch.randn(batch, kv_heads, tokens, width, device=DEVICE, dtype=dtype)
        stream.push(x[:, :, : tokens - 5])
        for t in range(tokens - 5, tokens):  # decode steps: the ring and the device counts advance
            stream.push(x[:, :, t : t + 1])
        streams.append(stream.packed())
    keys, values = streams
    assert keys.counts is not None and keys.tokens >= capacity and keys.window.shape[2] == keys.ring
    query = torch.randn(batch, kv_heads * groups, d if mode == "pre" else key_rank, device=DEVICE, dtype=dtype)
    scoring = pre_rope(d**-0.5, d, kv_heads, key_rank, dtype, groups == 1) if mode == "pre" else Scoring(d**-0.5)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    ends = torch.tensor([keys.tokens, tokens - 3], dtype=torch.int32, device=DEVICE)  # past what is held
    for splits in (1, 3):
        check_against_reference(query, keys, values, scoring, starts=starts, ends=ends, splits=splits)
    out = check_against_reference(query, keys, values, scoring)
    held = lowrank_decode_reference(query, keys.host_form(), values.host_form(), scoring)
    torch.testing.assert_close(out, held, atol=ATOL[dtype], rtol=0)


# keys and values stored with their own configs (a cache whose keys and values are quantized differently):
# (bits, group, axis, symmetric) of each stream
MIXED_CASES = [
    # mode, head size d, groups g, key rank, value rank, tokens, keys, values, residual, dtype
    # per-channel keys in groups of 16 (tiles of four blocks), per-token values in one group of 128 features
    ("rank", 64, 2, 38, 24, 150, (4, 16, "channel", False), (2, 128, "token", True), 5, torch.float16),
    # per-channel keys in groups of 32, symmetric, at 3 bits; per-token values in groups of 64
    ("pre", 64, 3, 37, 77, 140, (3, 32, "channel", True), (4, 64, "token", False), 3, torch.bfloat16),
    # the reverse: per-token keys in groups of 64 and 128, per-channel values in groups of 16 and 32
    ("rank", 80, 4, 77, 33, 150, (2, 64, "token", False), (3, 16, "channel", True), 4, torch.float16),
    ("pre", 64, 1, 20, 40, 130, (8, 128, "token", True), (2, 32, "channel", False), 0, torch.float16),
    # both per channel: keys in blocks of 128 tokens (a 64-token tile reads half of one), values of 16
    ("rank", 64, 3, 24, 50, 150, (4, 128, "channel", False), (2, 16, "channel", True), 6, torch.bfloat16),
]


def mixed_configs(case):
    """The keys' and values' KVQuantConfigs of a MIXED_CASES case."""
    *_, key_cfg, value_cfg, residual, _ = case
    return tuple(
        KVQuantConfig(bits=b, group_size=g, axis_k=axis, axis_v=axis, residual=residual, symmetric=sym)
        for b, g, axis, sym in (key_cfg, value_cfg)
    )


@pytest.mark.parametrize(
    "case",
    MIXED_CASES,
    ids=[f"{c[0]}-k{c[6][2][0]}{c[6][1]}b{c[6][0]}-v{c[7][2][0]}{c[7][1]}b{c[7][0]}-{c[-1]}" for c in MIXED_CASES],
)
def test_keys_and_values_with_their_own_configs_match_the_reference(case, checked_alignment):
    """Keys and values of different group sizes, axes, bits and symmetry: each stream read with its own."""
    mode, d, groups, key_rank, value_rank, tokens, key_cfg, value_cfg, _, dtype = case
    batch, kv_heads = 2, 2
    streams = []
    for width, config in zip((key_rank, value_rank), mixed_configs(case), strict=True):
        x = torch.randn(batch, kv_heads, tokens, width, device=DEVICE, dtype=dtype)
        streams.append(make_stream(x, config, config.axis_k))
    keys, values = streams
    assert (keys.group_size, keys.symmetric) == (key_cfg[1], key_cfg[3])  # each stream carries its own
    assert (values.group_size, values.symmetric) == (value_cfg[1], value_cfg[3])
    assert min(keys.quantized_tokens, values.quantized_tokens) >= 128  # the main loop runs two tiles
    query = torch.randn(batch, kv_heads * groups, d if mode == "pre" else key_rank, device=DEVICE, dtype=dtype)
    scoring = pre_rope(d**-0.5, d, kv_heads, key_rank, dtype, groups == 1) if mode == "pre" else Scoring(d**-0.5)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    ends = torch.tensor([tokens, tokens - 3], dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        check_against_reference(query, keys, values, scoring, starts=starts, ends=ends, splits=splits)
    if checked_alignment is not None:
        assert checked_alignment, "the main loop ran without its alignment claims being checked"


def test_device_form_streams_with_their_own_configs_match_the_reference(checked_alignment):
    """A capturable cache whose keys and values are stored with their own configs (the main loop's extent read
    from both streams' device counts: keys quantize whole blocks of 128 tokens, values every token but 4)."""
    case = ("rank", 64, 2, 38, 24, 150, (4, 128, "channel", False), (2, 32, "token", True), 4, torch.float16)
    mode, d, groups, key_rank, value_rank, tokens, *_, dtype = case
    batch, kv_heads, capacity = 2, 2, 256  # a multiple of both groups: both streams have the same capacity
    streams = []
    for width, config in zip((key_rank, value_rank), mixed_configs(case), strict=True):
        stream = CapturableStream(config, config.axis_k, None, capacity)
        x = torch.randn(batch, kv_heads, tokens, width, device=DEVICE, dtype=dtype)
        stream.push(x[:, :, : tokens - 3])
        for t in range(tokens - 3, tokens):
            stream.push(x[:, :, t : t + 1])
        streams.append(stream.packed())
    keys, values = streams
    assert keys.counts.tolist() == [128, tokens] and values.counts.tolist() == [tokens - 4, tokens]
    query = torch.randn(batch, kv_heads * groups, key_rank, device=DEVICE, dtype=dtype)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    ends = torch.tensor([keys.tokens, tokens - 3], dtype=torch.int32, device=DEVICE)  # past what is held
    check_against_reference(query, keys, values, Scoring(d**-0.5), starts=starts, ends=ends, splits=2)
    if checked_alignment is not None:
        assert checked_alignment, "the main loop ran without its alignment claims being checked"


def test_the_compile_specs_hold_keys_and_values_with_their_own_configs():
    """One compile spec has keys and values at different groups, bits and symmetry, and it is the compile a
    launch on such streams makes: the streams' constexprs and the launch config of the group the tile meets."""
    mixed = [
        spec
        for spec in decode_module.compile_specs()
        if spec.fn is decode_module._decode_kernel
        and spec.constexprs["K_GROUP"] != spec.constexprs["V_GROUP"]
        and spec.constexprs["KA_BITS"] != spec.constexprs["VA_BITS"]
        and spec.constexprs["K_SYMMETRIC"] != spec.constexprs["V_SYMMETRIC"]
    ]
    assert len(mixed) == 1, [spec.name for spec in mixed]
    spec = mixed[0]
    # streams as that spec describes them (rank 77 both, keys 4 bits per channel g128, values 2 bits per token g32)
    key_cfg = KVQuantConfig(bits=4, group_size=128, axis_k="channel")
    value_cfg = KVQuantConfig(bits=2, group_size=32, axis_v="token", symmetric=True)
    x = torch.randn(1, 1, 130, 77, device=DEVICE, dtype=torch.float16)
    keys, values = make_stream(x, key_cfg, "channel"), make_stream(x, value_cfg, "token")
    for stream, prefix in ((keys, "K"), (values, "V")):
        _, constexprs = decode_module._stream_args(stream, prefix)
        assert constexprs.items() <= spec.constexprs.items(), (prefix, constexprs)
    # the launch config follows the per-channel group, the one a token tile meets
    assert decode_module.tile_group([(128, "channel"), (32, "token")]) == 128
    assert decode_module.tile_group([(64, "token"), (16, "channel")]) == 16
    assert decode_module.tile_group([(128, "channel"), (16, "channel")]) == 16
    assert decode_module.tile_group([(64, "token"), (32, "token")]) == 32
    cfg = decode_module.launch_config("rank", 128)
    assert (spec.num_warps, spec.num_stages, spec.maxnreg) == (cfg.num_warps, cfg.num_stages, cfg.maxnreg)
    assert cfg.constexprs.items() <= spec.constexprs.items()


@pytest.mark.parametrize(
    "widths, expected",
    [
        ([77], [(0, 0, 0, 64, False), (0, 64, 64, 16, False)]),  # stored 80: 64 + 16
        ([38], [(0, 0, 0, 32, False), (0, 32, 32, 16, True)]),  # stored 40: the second tile reaches past it
        ([13], [(0, 0, 0, 16, False)]),  # stored 16
        ([5], [(0, 0, 0, 16, True)]),  # stored 8: a tile is at least 16 features wide
        ([100], [(0, 0, 0, 64, False), (0, 64, 64, 64, True)]),  # stored 104
        ([128], [(0, 0, 0, 128, False)]),
        ([19, 58], [(0, 0, 0, 32, True), (1, 0, 19, 64, False)]),  # two precisions: one tile each (24, 64)
    ],
)
def test_feature_chunks_cover_the_stored_features(widths, expected):
    chunks = decode_module.feature_chunks(widths)
    assert [(c.segment, c.offset, c.feature, c.width, c.masked) for c in chunks] == expected
    for c in chunks:
        assert c.offset % 16 == 0 and c.width >= 16 and c.width & (c.width - 1) == 0


def test_alibi_symmetric_and_full_precision_streams():
    batch, heads, tokens = 3, 4, 50
    keys = PackedStream.full_precision(torch.randn(batch, heads, tokens, 24, device=DEVICE, dtype=torch.float16))
    config = KVQuantConfig(bits=4, group_size=16, symmetric=True)
    values = make_stream(torch.randn(batch, heads, tokens, 20, device=DEVICE, dtype=torch.float16), config, "token")
    query = torch.randn(batch, heads, 24, device=DEVICE, dtype=torch.float16)
    slopes = 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32, device=DEVICE)
    out = check_against_reference(query, keys, values, Scoring(0.2, alibi_slopes=slopes), splits=2)
    plain = lowrank_decode(query, keys, values, Scoring(0.2), splits=2)
    assert (out - plain).abs().max() > 1e-2  # the bias is applied


CAPPED_CASES = [
    # mode, head size d, groups g, key rank, value rank, tokens, bits, group, axes (k, v), residual, dtype
    ("rank", 64, 3, 37, 24, 77, 4, 32, ("channel", "token"), 5, torch.float16),
    ("pre", 64, 2, 38, 20, 70, 2, 16, ("channel", "token"), 3, torch.bfloat16),
]


@pytest.mark.parametrize("case", CAPPED_CASES, ids=[f"{c[0]}-r{c[3]}x{c[4]}-b{c[6]}-{c[-1]}" for c in CAPPED_CASES])
def test_capped_logits_match_the_reference(case):
    """Gemma-2's cap (``softcap * tanh(s / softcap)`` after the scale, before the mask) in the main loop and the
    tail: scores of a few units (scale 0.5), which a cap of 5 bends; the capped output differs from the plain one."""
    mode, d, groups, key_rank, value_rank, tokens, bits, group, (axis_k, axis_v), residual, dtype = case
    batch, kv_heads = 2, 2
    config = KVQuantConfig(bits=bits, group_size=group, axis_k=axis_k, axis_v=axis_v, residual=residual)
    keys = make_stream(torch.randn(batch, kv_heads, tokens, key_rank, device=DEVICE, dtype=dtype), config, axis_k)
    values = make_stream(torch.randn(batch, kv_heads, tokens, value_rank, device=DEVICE, dtype=dtype), config, axis_v)
    assert min(keys.quantized_tokens, values.quantized_tokens) >= 64 and keys.window.shape[-2] > 0  # both loops
    query = torch.randn(batch, kv_heads * groups, d if mode == "pre" else key_rank, device=DEVICE, dtype=dtype)
    plain = pre_rope(0.5, d, kv_heads, key_rank, dtype) if mode == "pre" else Scoring(0.5)
    capped = dataclasses.replace(plain, softcap=5.0)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    ends = torch.tensor([tokens, tokens - 3], dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        out = check_against_reference(query, keys, values, capped, starts=starts, ends=ends, splits=splits)
    uncapped = lowrank_decode(query, keys, values, plain, starts=starts, ends=ends, splits=3)
    assert (out - uncapped).abs().max() > 0.1  # the cap is applied


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's exp2 (numpy) to inf
def test_capped_logits_saturate_at_the_cap():
    """Scores far past the cap (hundreds: exp2 overflows to inf, or underflows to 0) give exactly +-softcap, as
    tanh does: the kernel matches the reference, no NaN; ALiBi's bias is added after the cap, in both."""
    x = torch.randn(2, 2, 40, 24, device=DEVICE, dtype=torch.float16)
    stream = PackedStream.full_precision(x)
    query = torch.randn(2, 4, 24, device=DEVICE, dtype=torch.float16)
    out = check_against_reference(query, stream, stream, Scoring(100.0, softcap=2.0), splits=2)
    assert torch.isfinite(out).all()
    slopes = 2.0 ** -torch.arange(3, 7, dtype=torch.float32, device=DEVICE)
    check_against_reference(query, stream, stream, Scoring(100.0, softcap=2.0, alibi_slopes=slopes), splits=2)


def test_scoring_refuses_a_cap_that_is_not_a_positive_number():
    assert Scoring(1.0, softcap=50).softcap == 50.0 and isinstance(Scoring(1.0, softcap=50).softcap, float)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "50"):
        with pytest.raises(ValueError, match="softcap must be a positive finite number"):
            Scoring(1.0, softcap=bad)
    capped = Scoring(1.0, softcap=2.0)
    assert capped.exact().softcap == 2.0
    scores = torch.tensor([-100.0, 0.5, 100.0])
    torch.testing.assert_close(capped.cap(scores), 2.0 * torch.tanh(scores / 2.0))
    assert Scoring(1.0).cap(scores) is scores


def test_a_sequence_without_valid_keys_gives_zeros():
    x = torch.randn(2, 1, 20, 16, device=DEVICE, dtype=torch.float16)
    stream = PackedStream.full_precision(x)
    starts = torch.tensor([0, 7], dtype=torch.int32, device=DEVICE)
    out = lowrank_decode(x[:, :, 0], stream, stream, Scoring(1.0), starts=starts, ends=starts)
    assert torch.count_nonzero(out) == 0


def test_bad_input_is_refused_with_the_fix():
    x = torch.randn(1, 2, 20, 16, device=DEVICE, dtype=torch.float16)
    stream = PackedStream.full_precision(x)
    query = torch.randn(1, 4, 16, device=DEVICE, dtype=torch.float16)
    one = Scoring(1.0)
    with pytest.raises(ValueError, match="lowrank_decode_reference"):
        lowrank_decode(query.float(), stream, stream, one)
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        lowrank_decode(query[:, :3], stream, stream, one)
    with pytest.raises(ValueError, match="query width 12 must equal the key rank 16"):
        lowrank_decode(query[..., :12], stream, stream, one)
    with pytest.raises(ValueError, match="pre mode needs key_decoder"):
        Scoring(1.0, "pre")
    with pytest.raises(ValueError, match="mode="):
        Scoring(1.0, "post")
    with pytest.raises(ValueError, match="key_decoder must be"):
        lowrank_decode(query, stream, stream, pre_rope(1.0, 16, 3, 16, torch.float16))
    with pytest.raises(ValueError, match="alibi_slopes must be"):
        lowrank_decode(query, stream, stream, Scoring(1.0, alibi_slopes=torch.ones(3)))
    with pytest.raises(ValueError, match="window must be torch.float16"):
        lowrank_decode(query, PackedStream.full_precision(x.bfloat16()), stream, one)
    with pytest.raises(ValueError, match="int32"):
        lowrank_decode(query, stream, stream, one, starts=torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"max_registers must be in \[64, 255\].*got 32"):
        lowrank_decode(query, stream, stream, one, max_registers=32)
    packed = make_stream(x, KVQuantConfig(bits=4, group_size=16), "channel")
    broken = PackedStream(packed.segments, packed.window, packed.quantized_tokens + 1, "channel", 16)
    with pytest.raises(ValueError, match="whole blocks of 16 tokens"):
        lowrank_decode(query, broken, stream, one)
    segment = packed.segments[0]
    relabelled = (Segment(segment.codes, segment.scale, segment.zero, 2, segment.width),)  # stored at 4 bits
    wrong = PackedStream(relabelled, packed.window, packed.quantized_tokens, "channel", 16)
    with pytest.raises(ValueError, match="codes must be uint8"):
        lowrank_decode(query, wrong, stream, one)
    capturable = CapturableStream(KVQuantConfig(bits=4, group_size=16), "channel", None, 32)
    capturable.push(x)
    device_form = capturable.packed()
    with pytest.raises(ValueError, match="both be in device form"):
        lowrank_decode(query, device_form, make_stream(x, KVQuantConfig(bits=4, group_size=16), "token"), one)
    bad_counts = PackedStream(
        device_form.segments,
        device_form.window,
        0,
        "channel",
        16,
        counts=device_form.counts.long(),
        ring=device_form.ring,
    )
    with pytest.raises(ValueError, match="counts must be int32"):
        lowrank_decode(query, bad_counts, bad_counts, one)


def test_key_bounds_accept_one_range_per_row_only():
    visible = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    starts, ends = routing.key_bounds(visible, 3, 5, "cpu")
    assert starts.tolist() == [2, 0, 0] and ends.tolist() == [5, 4, 0]
    holes = torch.tensor([[1, 0, 1, 1, 1]], dtype=torch.bool)
    assert routing.key_bounds(holes, 1, 5, "cpu") is None


# --- wiring: the models decode through the kernel ------------------------------------------------


class Launches(list):
    """``[("decode" | "prefill", mode)]`` of the kernel launches, and ``scorings``: each launch's Scoring."""

    def __init__(self):
        super().__init__()
        self.scorings = []


@pytest.fixture
def counted_kernel(monkeypatch):
    """Force nothing, count launches (:class:`Launches`)."""
    calls = Launches()
    for name, module, function in (
        ("decode", decode_module, "lowrank_decode"),
        ("prefill", prefill_module, "lowrank_prefill"),
    ):
        original = getattr(module, function)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, args[3].mode))
            calls.scorings.append(args[3])
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function, counting)
    return calls


def decode_logits(model, ids, new_cache, steps=3):
    """Logits of the whole prompt ``ids`` (B, T) and of ``steps`` greedy decode steps after it."""
    cache = new_cache()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        out = [logits]
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            out.append(logits)
    return torch.cat(out, dim=1).float()


MODELS = [(tiny_llama, "pre"), (tiny_llama, "post"), (tiny_opt, "pre"), (tiny_mpt, "pre"), (tiny_qwen3, "pre"),
          (tiny_olmo2, "post"), (tiny_phi3, "pre"), (tiny_llama3_scaled, "pre"),
          (lambda: tiny_llama3_scaled(rope_type="yarn"), "pre"),
          (lambda: tiny_llama3_scaled(rope_type="longrope"), "pre")]  # fmt: skip
MODEL_IDS = ["llama-pre", "llama-post", "opt", "mpt", "qwen3-pre", "olmo2-post", "phi3-pre", "llama3-rope-scaling-pre",
             "yarn-rope-scaling-pre", "longrope-pre"]  # fmt: skip
PRE_ROPE_KERNEL = {"llama-pre", "qwen3-pre", "phi3-pre", "llama3-rope-scaling-pre", "yarn-rope-scaling-pre",
                   "longrope-pre"}  # fmt: skip


@pytest.mark.parametrize(
    ("make", "mode", "name"), [(*m, i) for m, i in zip(MODELS, MODEL_IDS, strict=True)], ids=MODEL_IDS
)
@pytest.mark.parametrize("quantized", [False, True], ids=["plain-cache", "quantized-cache"])
def test_compressed_models_decode_through_the_kernel(make, mode, name, quantized, counted_kernel, monkeypatch):
    model = make()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    model = model.to(DEVICE, torch.float16)
    ids = random_tokens(model, batch=2, length=21)
    quant = KVQuantConfig(bits=4, group_size=16, residual=3)
    from transformers import DynamicCache

    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("EIGENKV_BACKEND", backend)
        if quantized and make is tiny_mpt:  # MPT attends itself: no QuantizedKV context, a cache that reads packed
            results[backend] = decode_logits(
                model, ids, lambda: QuantizedKVCache(quant, model.config, read_packed=True)
            )
        elif quantized:
            with QuantizedKV(model, quant) as kv:
                results[backend] = decode_logits(model, ids, kv.new_cache)
        else:
            results[backend] = decode_logits(model, ids, lambda: DynamicCache(config=model.config))
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layers
    expected_mode = "pre" if name in PRE_ROPE_KERNEL else "rank"
    # the prompt through the prefill kernel, every decode step of every layer through the decode kernel
    assert counted_kernel == [("prefill", expected_mode)] * layers + [("decode", expected_mode)] * 3 * layers
    torch.testing.assert_close(results["triton"], results["torch"], atol=2e-2, rtol=2e-2)


def test_plain_model_with_quantized_cache_decodes_through_the_kernel(counted_kernel, monkeypatch):
    model = tiny_llama().to(DEVICE, torch.float16)
    ids = random_tokens(model, batch=2, length=21)
    attention = torch.ones_like(ids)
    attention[1, :4] = 0  # left padding
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("EIGENKV_BACKEND", backend)
        with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16, residual=2)) as kv, torch.no_grad():
            results[backend] = model.generate(
                ids,
                attention_mask=attention,
                past_key_values=kv.new_cache(),
                max_new_tokens=5,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
    layers = model.config.num_hidden_layers
    assert counted_kernel == [("prefill", "rank")] * layers + [("decode", "rank")] * 4 * layers
    kernel, reference = torch.stack(results["triton"].scores), torch.stack(results["torch"].scores)
    torch.testing.assert_close(kernel, reference, atol=2e-3, rtol=0)
    # a random tiny model has exact fp16 ties between its top logits: compare tokens where the choice is clear
    top = reference.topk(2, dim=-1).values
    clear = (top[..., 0] - top[..., 1]) > 4e-3
    chosen = results["triton"].sequences[:, ids.shape[1] :].T, results["torch"].sequences[:, ids.shape[1] :].T
    assert clear.sum() >= 5 and torch.equal(chosen[0][clear], chosen[1][clear])


EIGENKV_DIR = os.path.dirname(os.path.dirname(decode_module.__file__))


def eigenkv_reads(monkeypatch) -> list[str]:
    """Record each read of a tensor's value on the host made from eigenkv's own code (on CPU, where a
    device-to-host read is such a call: ``item``, ``bool``, ``int``, ``tolist``...)."""
    import inspect

    reads = []

    def counted(original, name):
        def counting(*args, **kwargs):
            caller = inspect.currentframe().f_back
            if caller.f_code.co_filename.startswith(EIGENKV_DIR):
                reads.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return original(*args, **kwargs)

        return counting

    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), name))
    monkeypatch.setattr(torch, "equal", counted(torch.equal, "equal"))
    return reads


def test_a_decode_step_reads_nothing_back_from_the_device(monkeypatch):
    """After the first decode step (which checks the mask once), a step through the quantized cache and the
    decode kernel issues no host sync from eigenkv: store, routing, launcher."""
    monkeypatch.setenv("EIGENKV_BACKEND", "triton")
    model = tiny_llama().to(DEVICE, torch.float16)
    ids = random_tokens(model, batch=2, length=21)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16, residual=2)) as kv, torch.no_grad():
        cache = kv.new_cache(max_tokens=40)
        logits = model(ids.to(DEVICE), attention_mask=mask.to(DEVICE), past_key_values=cache).logits
        for step in range(3):
            token = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if step == 0:
                reads = []
            elif step == 1:
                reads = eigenkv_reads(monkeypatch)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if DEVICE == "cuda" and step == 2:
                    torch.cuda.set_sync_debug_mode("warn")  # every synchronizing CUDA call warns, from its line
                try:
                    logits = model(token, attention_mask=mask.to(DEVICE), past_key_values=cache).logits
                finally:
                    if DEVICE == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            if step == 2:  # on CUDA: the synchronizing calls made from eigenkv's code
                synced = [w for w in caught if "synchroniz" in str(w.message) and w.filename.startswith(EIGENKV_DIR)]
                reads += [f"{w.filename}:{w.lineno}" for w in synced]
        assert reads == [], reads
        cache.check()  # the flags the steps set: finite states, one range of keys per row


@pytest.mark.parametrize(
    ("make", "mode"),
    [(tiny_mistral, "pre"), (tiny_gemma3, "pre"), (tiny_gemma3, "post")],
    ids=["mistral-sliding-pre", "gemma3-mixed-pre", "gemma3-mixed-post"],
)
def test_sliding_layers_decode_through_the_kernel(make, mode, counted_kernel, monkeypatch):
    """A 20-token prompt through the prefill kernel (its sliding layers with their 16-token window), then decode
    steps past the window: a sliding layer's step reads its trimmed store through the kernel, the range of keys
    from the sliding mask (pre-RoPE: keys rotated at their index in the store, the query shifted alike). The same
    logits as the PyTorch path."""
    model = make()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    model = model.to(DEVICE, torch.float16)
    # then 16 given tokens one at a time (the same tokens on both paths: greedy choices could part on a near
    # tie); 16-token units drop from token 32 on
    ids = random_tokens(model, batch=2, length=36)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("EIGENKV_BACKEND", backend)
        with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16, residual=3)) as kv, torch.no_grad():
            cache = kv.new_cache()
            logits = [model(ids[:, :20], past_key_values=cache).logits]
            logits += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(20, 36)]
            results[backend] = torch.cat(logits, dim=1).float()
            assert cache.layers[0].key_stream.dropped == 16
    layers = model.config.num_hidden_layers
    kind = "rank" if mode == "post" else "pre"
    assert counted_kernel == [("prefill", kind)] * layers + [("decode", kind)] * 16 * layers
    torch.testing.assert_close(results["triton"], results["torch"], atol=2e-2, rtol=2e-2)


def test_pre_rope_heads_over_128_features_rebuild_keys_in_pytorch(counted_kernel, monkeypatch):
    """Gemma's 256-feature heads compressed pre-RoPE: the pre-mode kernels take heads of up to 128 features, so
    the keys are rebuilt and rotated in PyTorch, and attention over them runs in the rank-mode kernels (the
    quantized cache's attention), as for a model compressed post-RoPE."""
    monkeypatch.setenv("EIGENKV_BACKEND", "triton")
    for mode in ("pre", "post"):
        model = tiny_gemma2(head_dim=256)
        config = EigenConfig(target_ratio=0.6, rope_mode=mode, basis="pca")  # 192 tokens: too few for output-aware
        compress_model(model, random_windows(model), config, progress=False)
        model = model.to(DEVICE, torch.float16)
        with QuantizedKV(model, KVQuantConfig(bits=4, group_size=16, residual=3)) as kv:
            logits = decode_logits(model, random_tokens(model, batch=2, length=12), kv.new_cache, steps=2)
        assert torch.isfinite(logits).all()
    assert counted_kernel == ([("prefill", "rank")] * 2 + [("decode", "rank")] * 2 * 2) * 2


def query_scaled_gemma2(softcap):
    """:func:`tiny_gemma2` with its queries 100x larger: attention scores of a few units, which a cap of 1 bends
    (at the helper's 0.01 every score is capped flat); sliding then global layer, a 16-token window."""
    model = tiny_gemma2(softcap=softcap)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(100.0)
    return model


@pytest.mark.parametrize("compressed", [False, True], ids=["quantized-cache", "compressed-post-quantized-cache"])
def test_capped_logits_run_through_the_kernels(compressed, counted_kernel, monkeypatch):
    """Gemma-2 with a quantized cache (plain, and compressed post-RoPE), the kernels forced: the prompt through the
    prefill kernel (its sliding layer with the window) and every decode step through the decode kernel, each
    launched with the model's cap; the logits are the PyTorch path's, and without the cap they would differ."""
    quant = KVQuantConfig(bits=4, group_size=16, residual=3)
    results = {}
    for softcap, backends in ((1.0, ("torch", "triton")), (None, ("torch",))):
        model = query_scaled_gemma2(softcap)
        if compressed:
            config = EigenConfig(target_ratio=0.6, rope_mode="post")
            compress_model(model, random_windows(model), config, progress=False)
        model = model.to(DEVICE, torch.float16)
        ids = random_tokens(model, batch=2, length=20)  # past the sliding layer's 16-token window
        for backend in backends:
            monkeypatch.setenv("EIGENKV_BACKEND", backend)
            with QuantizedKV(model, quant) as kv:
                results[softcap, backend] = decode_logits(model, ids, kv.new_cache, steps=6)
    layers = 2
    assert counted_kernel == [("prefill", "rank")] * layers + [("decode", "rank")] * 6 * layers
    assert [scoring.softcap for scoring in counted_kernel.scorings] == [1.0] * 7 * layers
    torch.testing.assert_close(results[1.0, "triton"], results[1.0, "torch"], atol=2e-2, rtol=2e-2)
    assert (results[None, "torch"] - results[1.0, "torch"]).abs().max() > 0.1  # the cap matters here
