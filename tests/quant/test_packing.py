import pytest
import torch

from eigenkv.quant.packing import (
    FEATURE_ALIGN,
    aligned_width,
    pack,
    pack_aligned,
    packed_length,
    pair_runs,
    paired_run,
    unpack,
    unpack_aligned,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 19, 64, 129])
@pytest.mark.parametrize("dim", [-1, 1])
def test_round_trip_is_exact(bits, n, dim):
    shape = [3, n, 5] if dim == 1 else [3, 5, n]
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack(codes, bits, dim=dim)
    assert packed.dtype == torch.uint8 and packed.shape[dim] == packed_length(n, bits)
    assert torch.equal(unpack(packed, bits, n, dim=dim), codes)


def test_layout_is_little_endian_within_a_byte():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3 bits: low 2-bit plane (4 codes per byte), then high-bit plane (8 per byte)
    codes = torch.tensor([5, 6, 7, 0, 1, 2, 3, 4], dtype=torch.uint8)
    low = [c & 3 for c in codes.tolist()]
    high = [c >> 2 for c in codes.tolist()]
    expected = [
        low[0] | low[1] << 2 | low[2] << 4 | low[3] << 6,
        low[4] | low[5] << 2 | low[6] << 4 | low[7] << 6,
        sum(h << i for i, h in enumerate(high)),
    ]
    assert pack(codes, 3).tolist() == expected


def test_paired_rows_hold_adjacent_features_in_code_j_of_two_bytes():
    """Paired rows: in each run of two bytes, the first holds the even features and the second the odd ones, so
    code j of the two bytes is features 2j and 2j + 1 (3 bits: runs of 8, in both planes)."""
    assert [paired_run(b) for b in (2, 3, 4, 8)] == [8, 8, 4, 1]
    features = torch.arange(8, dtype=torch.uint8)  # code = feature index (< 8: fits 3 and 4 bits)
    assert pair_runs(features, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    four = pack_aligned(features, 4, paired=True).tolist()
    assert four == [0 | 2 << 4, 1 | 3 << 4, 4 | 6 << 4, 5 | 7 << 4]
    two = pack_aligned(features % 4, 2, paired=True).tolist()  # features 0..7: codes 0 1 2 3 0 1 2 3
    assert two == [0 | 2 << 2 | 0 << 4 | 2 << 6, 1 | 3 << 2 | 1 << 4 | 3 << 6]
    three = pack_aligned(features, 3, paired=True).tolist()  # low plane as at 2 bits, then the high bits
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    assert three[:2] == two and three[2] == sum((f >> 2) << i for i, f in enumerate(order))
    assert torch.equal(pack_aligned(features, 8, paired=True), features)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 16, 38, 77])
def test_paired_rows_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (3, 5, n), dtype=torch.uint8)
    packed = pack_aligned(codes, bits, paired=True)
    assert packed.shape[-1] == packed_length(aligned_width(n), bits)
    assert torch.equal(unpack_aligned(packed, bits, n, paired=True), codes)
    padded = torch.nn.functional.pad(codes, (0, aligned_width(n) - n))
    assert torch.equal(pair_runs(pair_runs(padded, bits), bits, inverse=True), padded)
    with pytest.raises(ValueError, match="runs of 8 features at 2 bits; got 12 features"):
        pair_runs(torch.zeros(12, dtype=torch.uint8), 2)


def test_exact_bits_per_code():
    assert [packed_length(64, b) * 8 / 64 for b in (2, 3, 4, 8)] == [2, 3, 4, 8]


def test_aligned_width_rounds_up_to_8_features():
    assert FEATURE_ALIGN == 8
    assert [aligned_width(n) for n in (0, 1, 7, 8, 9, 38, 64, 77)] == [0, 8, 8, 8, 16, 40, 64, 80]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 16, 38, 77])
@pytest.mark.parametrize("dim", [-1, 1])
def test_aligned_packing_pads_with_zero_codes(bits, n, dim):
    shape = [3, n, 5] if dim == 1 else [3, 5, n]
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    padded = pack_aligned(codes, bits, dim=dim)
    assert padded.shape[dim] == packed_length(aligned_width(n), bits)
    assert padded.shape[dim] * 8 == aligned_width(n) * bits  # whole bytes: no partial byte at the end of a row
    assert torch.equal(unpack_aligned(padded, bits, n, dim=dim), codes)
    everything = unpack(padded, bits, aligned_width(n), dim=dim)
    assert not everything.narrow(dim, n, aligned_width(n) - n).any()  # the padding codes are zero


def test_three_bit_padding_pads_each_plane():
    codes = torch.full((33,), 7, dtype=torch.uint8)
    padded = pack_aligned(codes, 3)
    # low plane of 40 codes (10 bytes), then the high plane of 40 codes (5 bytes): not the dense row + zeros
    assert padded.shape == (15,)
    assert padded[:10].tolist() == [0xFF] * 8 + [0b11, 0]  # code 32 real in byte 8
    assert padded[10:].tolist() == [0xFF] * 4 + [0b1]  # code 32 real in byte 4
    dense = pack(codes, 3)  # 9 + 5 bytes
    assert not torch.equal(padded, torch.nn.functional.pad(dense, (0, 1)))


def test_bad_input():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.tensor([1]), 4)
    with pytest.raises(ValueError, match="bits=5"):
        pack(torch.tensor([1], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="cannot hold 64 codes of 4 bits"):
        unpack(torch.zeros(31, dtype=torch.uint8), 4, 64)
