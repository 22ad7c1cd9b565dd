import pytest
import torch

from eigenkv.kernels.group_minmax import group_minmax, group_minmax_reference
from tests.helpers import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, group",
    [((5, 64), 32), ((3, 7, 96), 32), ((2, 38), 19), ((1, 1, 24), 24), ((129, 20), 5), ((4, 256), 128)],
)
def test_matches_reference_exactly(shape, group, dtype):
    x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    mins, maxs = group_minmax(x, group)
    ref_min, ref_max = group_minmax_reference(x, group)
    assert mins.shape == ref_min.shape == (*shape[:-1], shape[-1] // group) and mins.dtype == dtype
    # min and max are selections, not arithmetic: the kernel must be exact
    assert torch.equal(mins, ref_min) and torch.equal(maxs, ref_max)


def test_non_contiguous_input_and_nan_propagation():
    x = torch.randn(8, 64, device=DEVICE).t()  # (64, 8), not contiguous
    assert torch.equal(group_minmax(x, 4)[1], group_minmax_reference(x, 4)[1])
    y = torch.randn(2, 32, device=DEVICE)
    y[1, 5] = float("nan")
    mins, maxs = group_minmax(y, 16)
    ref_min, ref_max = group_minmax_reference(y, 16)
    assert torch.isnan(mins[1, 0]) and torch.isnan(maxs[1, 0])
    assert torch.equal(mins.isnan(), ref_min.isnan()) and torch.equal(maxs.nan_to_num(), ref_max.nan_to_num())


def test_bad_input():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"does not divide the last axis \(64\); use a divisor such as 64"):
        group_minmax(x, 48)
    with pytest.raises(TypeError, match="dtype torch.int32"):
        group_minmax(x.int(), 16)
    with pytest.raises(ValueError, match="positive int"):
        group_minmax(x, 0)
    with pytest.raises(ValueError, match="above the kernel's limit"):
        group_minmax(torch.randn(1, 2048, device=DEVICE), 2048)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors.*group_minmax_reference"):
        group_minmax(torch.randn(2, 32), 16)
