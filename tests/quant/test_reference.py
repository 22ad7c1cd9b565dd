import pytest
import torch

from eigenkv.quant.reference import dequantize, fake_quantize, hadamard, num_groups, quantize


def test_hand_computed_asymmetric_example():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 10.0]])
    q = quantize(x, bits=2, group_size=4)
    assert q.codes.tolist() == [[0, 1, 2, 3, 0, 0, 0, 0]]
    assert q.scale.tolist() == [[1.0, 0.0]] and q.zero.tolist() == [[0.0, 10.0]]
    assert torch.equal(dequantize(q), x)  # constant group reconstructs exactly


def test_symmetric_two_bit_has_three_levels():
    x = torch.tensor([[-4.0, -1.0, 0.5, 4.0]])
    q = quantize(x, bits=2, group_size=4, symmetric=True)
    assert q.zero is None and q.scale.item() == 4.0
    assert dequantize(q).tolist() == [[-4.0, 0.0, 0.0, 4.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_error_is_at_most_half_a_step(bits, symmetric, dtype):
    x = (torch.randn(6, 5, 96) * 3).to(dtype)
    q = quantize(x, bits, 32, symmetric=symmetric)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**bits
    assert q.scale.shape == (6, 5, 3) and q.scale.dtype == torch.float16
    xh = dequantize(q, dtype)
    assert xh.dtype == dtype and xh.shape == x.shape
    step = q.scale.float().repeat_interleave(32, dim=-1)
    # half a step, plus the rounding of the stored fp16 zero and of the output dtype
    slack = 0.02 * step + x.float().abs() * (2e-2 if dtype == torch.bfloat16 else 2e-3) + 1e-3
    assert ((xh.float() - x.float()).abs() <= step / 2 + slack).all()


def test_more_bits_means_less_error():
    x = torch.randn(64, 128)
    errors = [(fake_quantize(x, b, 32) - x).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4


def test_per_channel_axis_equals_per_token_on_the_transpose():
    x = torch.randn(3, 64, 16)  # (heads, tokens, features): groups of 32 tokens per feature
    a = fake_quantize(x, 4, 32, dim=1)
    b = fake_quantize(x.transpose(1, 2), 4, 32, dim=-1).transpose(1, 2)
    assert torch.equal(a, b)
    assert quantize(x, 4, 32, dim=1).scale.shape == (3, 2, 16)


def test_remainder_group_has_its_own_scale():
    x = torch.cat([torch.zeros(1, 8), torch.full((1, 2), 100.0)], dim=1)
    x[0, :8] = torch.linspace(0, 1, 8)
    q = quantize(x, 4, 8)
    assert num_groups(10, 8) == 2 and q.scale.shape == (1, 2)
    assert q.scale[0, 1] == 0 and torch.equal(dequantize(q)[0, 8:], x[0, 8:])
    assert quantize(x, 4, 64).scale.shape == (1, 1)  # group larger than the axis: one group


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(bits=5, group_size=8), ValueError, r"bits=5 is not supported; use one of \(2, 3, 4, 8\)"),
        (dict(bits=4, group_size=0), ValueError, "positive int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(torch.randn(2, 8), **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), 4, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[1.0, float("inf")]]), 4, 2)
    with pytest.raises(TypeError, match="cannot quantize dtype torch.int64"):
        quantize(torch.ones(2, 2, dtype=torch.long), 4, 2)


def test_hadamard_is_orthonormal_and_symmetric():
    h = hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    with pytest.raises(ValueError, match="power-of-two size; got 96"):
        hadamard(96)
