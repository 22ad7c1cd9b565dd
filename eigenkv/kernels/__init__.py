"""Triton kernels, each beside its PyTorch reference.

On CPU they run only under ``TRITON_INTERPRET=1`` (set before this package is
imported); ``python -m eigenkv.kernels._launch`` compiles all of them for
sm_80 and sm_90 without a GPU.
"""

from eigenkv.kernels.group_minmax import group_minmax, group_minmax_reference

__all__ = ["group_minmax", "group_minmax_reference"]
