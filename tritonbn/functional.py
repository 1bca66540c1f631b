"""``tritonbn.batch_norm``: the signature and semantics of torch.nn.functional.batch_norm,
computed by the Triton kernels when the input lives where they can run."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.launch import INTERPRETED
from .ops import batch_norm as _ops  # noqa: F401  (registers torch.ops.tritonbn.*)

# dtypes the kernels serve; anything else (float64, ...) is left to torch, which is exact.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def runs_on_triton(input: Tensor) -> bool:
    """True when ``input`` is computed by the Triton kernels: CUDA tensors, and CPU tensors
    when the Triton interpreter is on (TRITON_INTERPRET=1 before import). Other inputs
    (CPU without the interpreter, float64, ...) fall back to torch's own BatchNorm."""
    if input.dtype not in KERNEL_DTYPES:
        return False
    return input.device.type == "cuda" or (input.device.type == "cpu" and INTERPRETED)


def _check_args(input, running_mean, running_var, weight, bias, training):
    """The checks torch makes, with its exception types and messages."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    C = input.size(1)  # IndexError for 1-D input, as torch
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {name} on "
                f"{t.device} and input on {input.device}")
        if t.dtype not in (input.dtype, torch.float32):
            raise RuntimeError(
                f"mixed dtype: expect {name} to have scalar type of Float or {input.dtype}, "
                f"got {t.dtype}")
    if training:
        size_prods = input.numel() // C if C else 0
        if size_prods == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}")


def _batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                momentum: Optional[float], eps: float,
                num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """Kernel path. ``momentum=None`` with ``num_batches_tracked`` = cumulative average,
    its factor read on the device (no host synchronisation, graph-capturable)."""
    _check_args(input, running_mean, running_var, weight, bias, training)
    if momentum is None and num_batches_tracked is None:
        momentum = 0.0
    if training:
        # detach: the gradient through the statistics is in batch_norm_apply's backward.
        mean, stat = torch.ops.tritonbn.batch_norm_stats(
            input.detach(), running_mean, running_var,
            num_batches_tracked if momentum is None else None, momentum, eps)
    else:
        mean, stat = running_mean, running_var
    return torch.ops.tritonbn.batch_norm_apply(input, weight, bias, mean, stat, training, eps)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.batch_norm` (differentiable)."""
    if not runs_on_triton(input):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training,
                            momentum, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
