"""Numeric tolerances from a dtype's resolution, never from what one CPU happened to compute.

Two float computations of the same quantity in another order (another kernel, another ISA, another
summation order) differ by a few rounding steps of the result's magnitude. A tolerance is therefore
``steps * eps(dtype) * scale``: ``eps`` the dtype's resolution (``torch.finfo(dtype).eps``: float32
2^-23, bfloat16 2^-7, float16 2^-10), ``scale`` the magnitude of the compared values (their maximum
absolute value), and ``steps`` a number each caller states with its reason. The steps in this suite
were set at 4x or more the largest difference measured on this machine with AVX-512/AMX and with
oneDNN and ATen restricted to AVX2 and to the default ISA (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2|default``), and each bound is far below the difference a real bug makes.
"""

from __future__ import annotations

import numpy as np
import torch


def tolerance(dtype, scale, steps: float) -> float:
    """``steps`` rounding steps of ``dtype`` at magnitude ``scale`` (an absolute tolerance).

    Args:
        dtype: a torch or numpy float dtype.
        scale: a number, or an array/tensor whose largest absolute value is used.
        steps: how many rounding steps the comparison allows (the caller says why).
    """
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else float(np.finfo(dtype).eps)
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().abs().max().item()
    elif not isinstance(scale, (int, float)):
        scale = float(np.max(np.abs(np.asarray(scale))))
    return steps * eps * max(float(scale), np.finfo(np.float32).tiny)


def assert_close(actual, expected, *, dtype=torch.float32, steps: float, scale=None, msg=None) -> None:
    """``actual`` equals ``expected`` within ``steps`` rounding steps of ``dtype`` at the values' scale
    (``scale``, default the largest absolute expected value)."""
    atol = tolerance(dtype, expected if scale is None else scale, steps)
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), atol=atol, rtol=0, msg=msg)
