"""The float64 reference, the error bounds and the input makers shared by the parity tests.

How a result is judged (two bounds, both must hold):

1. Against the float64 reference (torch's own BatchNorm run in float64 on the same inputs,
   upcast exactly): ``|got - ref| <= COMPUTE_RTOL * scale + STORAGE[dtype].rtol * |ref| +
   STORAGE[dtype].atol`` elementwise. ``scale`` is the magnitude of the terms the value is
   made of (its condition: e.g. sum(|dy|) for grad_bias, (|x| + |mean|) * invstd * |w| + |b|
   for the output), so a cancellation never turns a fine result into a failure and a large
   offset (mean 1e4) is charged to the data, not the kernel.
2. Against torch's own result in the same dtype (flash-attention style):
   ``max|got - ref| <= TORCH_FACTOR * max|torch - ref| + floor``: the kernels may not be
   much less accurate than what users get from torch today.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tritonbn.kernels.launch import INTERPRETED

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)

# -------------------------------------------------------------------------------------------
# Tolerance table
# -------------------------------------------------------------------------------------------

# Every kernel computes in fp32 whatever the storage dtype (statistics, invstd, the affine
# transform, the gradient sums), so one relative error, applied to the magnitude of the
# terms (``scale``), covers the arithmetic for all dtypes. 1e-5 is ~170 fp32 ulps (2^-24 =
# 6e-8 each): a split Welford / blocked sum over up to ~1e5 values per channel stays well
# below it (error grows like log2(M) ulps for the tree part and sqrt(#sequential steps)
# for the per-lane part), and it is still 100x tighter than anything fp16 could hide.
COMPUTE_RTOL = 1e-5


# The Triton interpreter (the CPU runs) converts fp32 -> bf16 by truncation, not round to
# nearest even (triton/runtime/interpreter.py, cast_impl passes no rounding mode), so a bf16
# store there is off by up to a full ulp (2u) instead of half an ulp (u). Compiled kernels
# round to nearest even. This is the interpreter's doing, not the kernels'.
BF16_TRUNCATES = INTERPRETED


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p, p = significant bits: the worst relative error of rounding to nearest."""
    return {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
            torch.float64: 2.0**-53}[dtype]


def store_rounding(dtype: torch.dtype) -> float:
    """Worst relative error of one fp32 -> ``dtype`` store by the kernels."""
    u = unit_roundoff(dtype)
    return 2 * u if dtype == torch.bfloat16 and BF16_TRUNCATES else u


@dataclass(frozen=True)
class StorageTol:
    """Error added by storing an fp32 result in ``dtype``."""

    rtol: float  # relative: one rounding to the dtype's precision, plus u of slack
    atol: float  # absolute: rounding of values near 0 (half the subnormal spacing)


# One store costs store_rounding(dtype) * |value|; one more u of slack covers a result that
# lands next to a rounding midpoint and, off by an fp32 hair, rounds the other way than the
# float64 value would (an fp32 hair is far below fp16/bf16 spacing, so one u is plenty).
STORAGE = {
    # p = 24: u = 6.0e-8; 2u = 1.2e-7. The fp32 arithmetic (COMPUTE_RTOL) dominates anyway.
    torch.float32: StorageTol(rtol=store_rounding(torch.float32) + 2.0**-24, atol=2.0**-150),
    # p = 11: u = 4.9e-4; 2u = 9.8e-4. Subnormal spacing 2^-24.
    torch.float16: StorageTol(rtol=store_rounding(torch.float16) + 2.0**-11, atol=2.0**-25),
    # p = 8: u = 3.9e-3; 2u = 7.8e-3 compiled, 3u = 1.2e-2 in the interpreter (truncation).
    # Same exponent range as fp32.
    torch.bfloat16: StorageTol(rtol=store_rounding(torch.bfloat16) + 2.0**-8, atol=2.0**-134),
}

# Bound 2: the kernel's max error may be at most this many times torch's own max error
# (same dtype, same device), plus a floor. 2x is the flash-attention convention. The floor
# is what "2 x torch" cannot express when torch is lucky or exact:
# - FLOOR_ROUNDINGS fp32 roundings of the largest term: torch's CPU kernels accumulate fp32
#   sums in double, so on CPU its reductions can be exact to the last bit;
# - one store rounding of the largest value: on a handful of values (grad_weight of 3
#   channels) torch's rounded results can all sit by chance next to the float64 value, and
#   an fp32 value that differs by a hair rounds to the neighbour (and in the interpreter
#   bf16 stores truncate).
TORCH_FACTOR = 2.0
FLOOR_ROUNDINGS = 4


# -------------------------------------------------------------------------------------------
# Inputs
# -------------------------------------------------------------------------------------------

# Memory layouts of a BatchNorm input of shape (N, C, *spatial):
#   contiguous       torch's default (N, C, *spatial) row-major
#   channels_last    C has stride 1 (torch.channels_last for 4-D, channels_last_3d for 5-D,
#                    the same idea for 2-D / 3-D: (N, L, C) storage)
#   sliced           x[..., 1::2] of a longer odd last dim: strided, not dense, offset
#   permuted         dense but in reversed order: N has stride 1
#   permuted_sliced  transposed and not dense: reversed order, then every other N
#   expanded         a size-1 dimension broadcast with stride 0 (rows overlap in memory)
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "permuted_sliced", "expanded")


def make_tensor(shape, dtype=torch.float32, layout="contiguous", device=DEVICE,
                *, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """A normal(mean, std) tensor of ``shape`` with the requested strides. Values are drawn in
    fp32 and rounded once to ``dtype``, and the strides are made in ``dtype`` so no copy
    loses them."""
    shape = tuple(shape)
    rank = len(shape)

    def draw(alloc_shape):
        return (torch.randn(alloc_shape, device=device) * std + mean).to(dtype)

    if layout == "contiguous":
        return draw(shape)
    if layout == "channels_last":
        order = (0,) + tuple(range(2, rank)) + (1,)  # storage order: N, spatial..., C
        stored = draw(tuple(shape[d] for d in order))
        return stored.permute(*[order.index(d) for d in range(rank)])
    if layout == "sliced":
        # Odd row length, so the rows are not 2 x (row) apart and cannot merge with the
        # dim above; starting at 1 gives a storage offset too.
        big = draw(shape[:-1] + (2 * shape[-1] + 1,))
        return big[..., 1::2]
    if layout == "permuted":
        return draw(shape[::-1]).permute(*range(rank - 1, -1, -1))
    if layout == "permuted_sliced":
        big = draw(shape[:0:-1] + (2 * shape[0],)).permute(*range(rank - 1, -1, -1))
        return big[::2]
    if layout == "expanded":
        # The last dim (or N for 2-D input, whose last dim is C) is broadcast.
        dim = rank - 1 if rank > 2 else 0
        one = list(shape)
        one[dim] = 1
        return draw(tuple(one)).expand(*shape)
    raise ValueError(layout)


def make_params(C: int, dtype=torch.float32, device=DEVICE):
    """(weight, bias, running_mean, running_var) with values away from the defaults, so a
    kernel that ignores one of them (or uses 1/0) is caught."""
    weight = (1.0 + 0.5 * torch.randn(C, device=device)).to(dtype)
    bias = (0.5 * torch.randn(C, device=device)).to(dtype)
    running_mean = (0.3 * torch.randn(C, device=device)).to(dtype)
    running_var = (0.5 + torch.rand(C, device=device)).to(dtype)
    return weight, bias, running_mean, running_var


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the strides are a permutation of a contiguous tensor's."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def memory_format_of(t: Tensor) -> Optional[torch.memory_format]:
    """The named memory format ``t`` is in, when it is in one (None for other layouts)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) \
            and not t.is_contiguous():
        return torch.channels_last_3d
    if t.is_contiguous():
        return torch.contiguous_format
    return None


# -------------------------------------------------------------------------------------------
# Running a BatchNorm call: output, gradients, running statistics
# -------------------------------------------------------------------------------------------

@dataclass
class Call:
    """The arguments of one functional batch_norm call plus the incoming gradient."""

    x: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    training: bool
    momentum: float = 0.1
    eps: float = 1e-5
    grad_output: Optional[Tensor] = None
    # Which of (x, weight, bias) require grad; None = all that exist.
    requires_grad: Optional[tuple[bool, bool, bool]] = None

    def needs(self) -> tuple[bool, bool, bool]:
        if self.requires_grad is not None:
            return self.requires_grad
        return True, self.weight is not None, self.bias is not None


RESULT_NAMES = ("output", "grad_input", "grad_weight", "grad_bias", "running_mean",
                "running_var")


def run_batch_norm(fn: Callable, call: Call, dtype: Optional[torch.dtype] = None) -> dict:
    """Runs ``fn`` (a functional batch_norm) on fresh copies of the running statistics and
    differentiates it by ``call.grad_output``. ``dtype=torch.float64`` upcasts every tensor
    (the reference). Returns {name: tensor} over RESULT_NAMES (absent ones left out)."""

    def prep(t, grad=False):
        if t is None:
            return None
        t = t.detach()
        t = t.to(dtype) if dtype is not None else t
        return t.requires_grad_(grad)

    need_x, need_w, need_b = call.needs()
    x = prep(call.x, need_x)
    weight = prep(call.weight, need_w)
    bias = prep(call.bias, need_b)
    rm = None if call.running_mean is None else prep(call.running_mean).clone()
    rv = None if call.running_var is None else prep(call.running_var).clone()
    out = fn(x, rm, rv, weight, bias, call.training, call.momentum, call.eps)
    results = {"output": out.detach()}
    if rm is not None:
        results["running_mean"], results["running_var"] = rm, rv
    wrt = [(n, t) for n, t, need in (("grad_input", x, need_x), ("grad_weight", weight, need_w),
                                     ("grad_bias", bias, need_b)) if need and t is not None]
    if call.grad_output is not None and wrt:
        grads = torch.autograd.grad(out, [t for _, t in wrt], prep(call.grad_output))
        results.update({n: g for (n, _), g in zip(wrt, grads)})
    return results


def reference_scales(call: Call) -> dict:
    """Float64 magnitude of the terms each result is made of (see the module docstring)."""
    x = call.x.double()
    C = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    bshape = [1, C] + [1] * (x.dim() - 2)
    M = x.numel() // C
    use_batch = call.training or call.running_mean is None
    if use_batch:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
    else:
        mean, var = call.running_mean.double(), call.running_var.double()
    invstd = (var + call.eps).rsqrt()
    w = call.weight.double().abs() if call.weight is not None else torch.ones_like(mean)
    b = call.bias.double().abs() if call.bias is not None else torch.zeros_like(mean)
    # |x - mean| as the kernel sees it: both operands carry their own rounding.
    spread = (x.abs() + mean.abs().view(bshape)) * invstd.view(bshape)
    scales = {"output": spread * w.view(bshape) + b.view(bshape)}
    if call.grad_output is not None:
        dy = call.grad_output.double().abs()
        l1_dy = dy.sum(dims)
        l1_dy_xhat = (dy * spread).sum(dims)
        scales["grad_bias"] = l1_dy
        scales["grad_weight"] = l1_dy_xhat
        if use_batch:
            terms = dy + (l1_dy / M).view(bshape) + spread * (l1_dy_xhat / M).view(bshape)
        else:
            terms = dy
        scales["grad_input"] = (w * invstd).view(bshape) * terms
    if call.running_mean is not None and call.training:
        f = call.momentum
        rm, rv = call.running_mean.double().abs(), call.running_var.double().abs()
        scales["running_mean"] = (1 - f) * rm + f * x.abs().mean(dims)
        # var = mean((x - mean)^2): a relative change u of each x moves it by at most
        # u * 2 * mean(|x - mean| * |x|) (first order). That is ~2 var for centred data
        # and ~2 std |mean| for shifted data, where fp32 cannot do better.
        var_terms = 2 * ((x - mean.view(bshape)).abs() * x.abs()).mean(dims)
        scales["running_var"] = (1 - f) * rv + f * var_terms * M / max(M - 1, 1)
    elif call.running_mean is not None:  # eval: untouched, must be bit-exact anyway
        scales["running_mean"] = call.running_mean.double().abs()
        scales["running_var"] = call.running_var.double().abs()
    return scales


def torch_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


# -------------------------------------------------------------------------------------------
# The two bounds
# -------------------------------------------------------------------------------------------

def error_bound(ref: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    tol = STORAGE[dtype]
    return COMPUTE_RTOL * scale + tol.rtol * ref.abs() + tol.atol


def assert_close_to_reference(name: str, got: Tensor, ref: Tensor, scale: Tensor) -> None:
    """Bound 1: elementwise against the float64 reference."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    if got.numel() == 0:
        return
    err = (got.double() - ref).abs()
    bound = error_bound(ref, scale.expand_as(ref), got.dtype)
    ratio = err / bound
    worst = int(torch.nan_to_num(ratio, nan=math.inf).argmax())
    assert bool((err <= bound).all()), (
        f"{name} ({got.dtype}): error {err.flatten()[worst].item():.3g} exceeds bound "
        f"{bound.flatten()[worst].item():.3g} at flat index {worst} (got "
        f"{got.flatten()[worst].item()!r}, reference {ref.flatten()[worst].item()!r}); "
        f"worst error/bound ratio {ratio.flatten()[worst].item():.3g}")


def assert_not_worse_than_torch(name: str, got: Tensor, torch_got: Tensor, ref: Tensor,
                                scale: Tensor) -> None:
    """Bound 2: max error at most TORCH_FACTOR x torch's own same-dtype max error + floor."""
    if got.numel() == 0:
        return
    err = (got.double() - ref).abs().max().item()
    err_torch = (torch_got.double() - ref).abs().max().item()
    floor = (FLOOR_ROUNDINGS * unit_roundoff(torch.float32) * scale.max().item()
             + store_rounding(got.dtype) * ref.abs().max().item())
    assert err <= TORCH_FACTOR * err_torch + floor, (
        f"{name} ({got.dtype}): max error {err:.3g} vs torch's {err_torch:.3g} "
        f"(allowed {TORCH_FACTOR} x torch + {floor:.3g})")


def check_call(fn: Callable, call: Call, *, compare_torch: bool = True) -> dict:
    """Runs ``fn`` and torch on ``call`` and checks every result against the float64
    reference (bound 1) and against torch's same-dtype error (bound 2). Also checks what is
    exact: dtypes, shapes, the output's memory format. Returns the kernel's results."""
    got = run_batch_norm(fn, call)
    ref = run_batch_norm(torch_batch_norm, call, dtype=torch.float64)
    same = run_batch_norm(torch_batch_norm, call) if compare_torch else None
    scales = reference_scales(call)
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    x = call.x
    assert got["output"].dtype == x.dtype
    assert got["output"].shape == x.shape
    check_layout(x, got["output"], "output")
    if "grad_input" in got:
        assert got["grad_input"].dtype == x.dtype
        check_layout(x, got["grad_input"], "grad_input")
    for name in ("grad_weight", "grad_bias"):
        if name in got:
            param = call.weight if name == "grad_weight" else call.bias
            assert got[name].dtype == param.dtype, (name, got[name].dtype, param.dtype)
    for name in ("running_mean", "running_var"):
        if name in got:
            assert got[name].dtype == getattr(call, name).dtype
    for name in got:
        assert_close_to_reference(name, got[name], ref[name], scales[name])
        if same is not None:
            assert_not_worse_than_torch(name, got[name], same[name], ref[name], scales[name])
    return got


def check_layout(x: Tensor, out: Tensor, what: str) -> None:
    """The output (and grad_input) keeps a named memory format of the input, and is never
    an overlapping or gappy tensor."""
    assert is_dense(out), (what, out.stride())
    fmt = memory_format_of(x)
    if fmt is not None:
        assert out.is_contiguous(memory_format=fmt), (what, fmt, x.stride(), out.stride())


def eager_and_compiled(model, x: Tensor) -> tuple[list, list]:
    """One training step (output, then every parameter's gradient of output.sum()) of a
    copy of ``model`` in eager mode and of ``model`` through torch.compile (aot_eager, one
    graph): the custom ops' arguments must survive tracing."""
    import copy

    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for m, params in ((eager, eager), (compiled, model)):
        y = m(x)
        y.sum().backward()
        results.append([y.detach()] + [p.grad for p in params.parameters()])
    torch._dynamo.reset()
    return results[0], results[1]


def assert_within_largest(got: Tensor, ref: Tensor, what) -> None:
    """Max error at most 1e-5 of the largest reference value: fp32 values made of terms up
    to |ref| (sums of a few hundred, gradients of gradients) against float64, a few fp32
    ulps of the largest. The 1e-3 keeps an all-zero reference from demanding exact zeros."""
    bound = 1e-5 * (ref.abs().max() + 1e-3)
    err = (got.double() - ref).abs().max()
    assert err <= bound, (what, err.item(), bound.item())


def penalty_gradients(forward, leaves: list, grad_output: Tensor) -> list:
    """First- and second-order gradients, with respect to ``leaves``, of a gradient penalty:
    g = d(sum(forward(*leaves) * grad_output)) / d leaves (create_graph=True), then
    d(sum(g^2)) / d leaves; a leaf the second order does not reach gets zeros. Detached, in
    float64."""
    y = forward(*leaves)
    first = torch.autograd.grad((y * grad_output).sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum((g ** 2).sum() for g in first), leaves, allow_unused=True)
    second = [torch.zeros_like(t) if s is None else s for s, t in zip(second, leaves)]
    return [t.detach().double() for t in (*first, *second)]

