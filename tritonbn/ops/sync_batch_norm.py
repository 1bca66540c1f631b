"""SyncBatchNorm: training-mode BatchNorm whose statistics span every process of a group,
on the Triton kernels, with torch.nn.SyncBatchNorm's semantics.

Forward, per rank r with n_r values per channel (r's N * L):
    local  (mean_r, var_r)             bn_stats_kernel, WRITE_VAR (biased variance), 1 launch
    all_gather [mean_r, var_r, n_r]    float64, so counts stay exact past 2^24
    n = sum n_r,  mean = sum n_r mean_r / n,
    var = sum n_r (var_r + (mean_r - mean)^2) / n          (Chan's merge, float64, [C])
    invstd = 1 / sqrt(var + eps); running stats from (mean, var * n / (n - 1))
    y = (x - mean) * invstd * weight + bias             bn_apply_kernel, 1 launch
    [y + residual] [then max(., 0)]: the epilogues of ops/batch_norm.py, same kernel
Backward:
    local  sum(dy), sum(dy * xhat)     bn_grad_stats_kernel, 1 launch
    all_reduce (sum) of both, then  dx = (dy - k1 - (x - mean) * k2) * weight * invstd,
    k1 = sum(dy) / n, k2 = sum(dy * xhat) * invstd / n   bn_apply_kernel, 1 launch
    With ReLU, dy is masked where the output is 0 in both launches (the mask recomputed
    from x, weight, bias [and the residual]); with a residual too, the statistics launch
    writes the masked dy, which is the residual's gradient and what the second launch reads.
grad_weight and grad_bias are the local sums, as torch's: data parallelism (DDP) reduces
parameter gradients itself. A rank with an empty batch still joins both collectives.
No host synchronisation: counts, the cumulative-average factor and the "empty group" case
stay on the device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels.geometry import make_geometry
from ..kernels.launch import launch_apply, launch_grad_input, launch_grad_stats, launch_stats


def _all_gather(local: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[world_size, *local.shape]; Gloo has no all_gather_into_tensor."""
    if dist.get_backend(group) == "gloo":
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local, group)
        return torch.stack(parts)
    out = local.new_empty((world_size, *local.shape))
    dist.all_gather_into_tensor(out, local, group)
    return out


def _global_stats(input, group, world_size):
    """(count [1], mean [C], biased var [C]) over the whole group, float64."""
    C = input.shape[1]
    local = input.new_zeros((2 * C + 1,), dtype=torch.float64)
    if input.numel() != 0:
        mean, var = launch_stats(input, make_geometry(input), None, None, None, 0.0, 0.0,
                                 write_var=True)
        local[:C] = mean
        local[C:2 * C] = var
        local[2 * C] = input.numel() // C
    gathered = _all_gather(local, group, world_size)
    means, variances, counts = gathered[:, :C], gathered[:, C:2 * C], gathered[:, 2 * C:]
    n = counts.sum(0)
    weights = counts / n.clamp(min=1.0)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean) ** 2)).sum(0)
    return n, mean, var


def _update_running(running_mean, running_var, num_batches_tracked, momentum, n, mean, var):
    """running <- (1 - f) running + f batch (unbiased variance), f = momentum or
    1 / num_batches_tracked, computed on the device; left alone when the group's batch is
    empty."""
    f = (1.0 / num_batches_tracked.double()) if momentum is None else momentum
    unbiased = var * n / (n - 1.0)
    for buf, batch in ((running_mean, mean), (running_var, unbiased)):
        new = buf.double() * (1.0 - f) + batch * f
        buf.copy_(torch.where(n > 0, new, buf.double()))


class SyncBatchNormFunction(torch.autograd.Function):
    """Training forward and backward of SyncBatchNorm (module docstring)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, group, world_size, relu=False, residual=None):
        n, mean64, var64 = _global_stats(input, group, world_size)
        if running_mean is not None:
            _update_running(running_mean, running_var, num_batches_tracked, momentum, n,
                            mean64, var64)
        mean = mean64.float()
        invstd = torch.rsqrt(var64 + eps).float()
        output = torch.empty_like(input)
        if input.numel() != 0:
            launch_apply(input, None, output, mean, invstd, weight, bias, None, eps,
                         stat_is_var=False, backward=False, relu=relu, residual=residual)
        # bias and the residual only matter to the backward through ReLU's recomputed mask
        ctx.save_for_backward(input, weight, mean, invstd, n, bias if relu else None,
                              residual if relu else None)
        ctx.group, ctx.eps, ctx.relu = group, eps, relu
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.has_residual = residual is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # The kernels' gradients carry no graph: a second-order term through them would
            # silently be zero (torch's SyncBatchNorm raises at the second backward).
            raise RuntimeError("tritonbn.SyncBatchNorm does not support double backward "
                               "(backward with create_graph=True)")
        input, weight, mean, invstd, n, bias, residual = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        relu = ctx.relu
        C = input.shape[1]
        # with ReLU and a residual: the masked dy, the residual's gradient (see the docstring)
        masked = torch.empty_like(residual) if residual is not None else None
        # fp32 [2, C]: local sum(dy) and sum(dy * xhat)
        sums = torch.zeros((2, C), dtype=torch.float32, device=input.device)
        if input.numel() != 0:
            launch_grad_stats(input, grad_output, mean, invstd, ctx.eps, stat_is_var=False,
                              grad_weight=sums[1], grad_bias=sums[0], want_coef=False,
                              relu=relu, weight=weight if relu else None, bias=bias,
                              residual=residual, grad_residual=masked)
        grad_input = grad_weight = grad_bias = None
        if weight is not None and need_weight:
            grad_weight = sums[1].to(weight.dtype)
        if ctx.bias_dtype is not None and need_bias:
            grad_bias = sums[0].to(ctx.bias_dtype)
        if need_input:
            total = sums.clone()
            dist.all_reduce(total, dist.ReduceOp.SUM, ctx.group)
            grad_input = torch.empty_like(input)
            if input.numel() != 0:
                inv_n = 1.0 / n.float()
                coef = torch.stack((total[0] * inv_n, total[1] * invstd * inv_n))
                launch_grad_input(input, grad_output, masked, grad_input, mean, invstd,
                                  weight, bias, coef, ctx.eps, stat_is_var=False, relu=relu)
        grad_residual = None
        if ctx.has_residual:  # y + residual: dy itself, or with ReLU the masked dy
            grad_residual = grad_output if masked is None else masked
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None,
                None, grad_residual)
