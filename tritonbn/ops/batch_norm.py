"""BatchNorm as PyTorch custom operators backed by the Triton kernels.

    tritonbn::batch_norm_train     training forward: output, batch mean/invstd and the
                                   running-stat update (1 single-pass launch where the
                                   shape fits, fused.py, else stats + apply: 2 launches)
    tritonbn::batch_norm_stats     batch mean/invstd + running-stat update (1 launch):
                                   batch_norm_train's first half, an op of its own for
                                   compositions and for programs exported before it
    tritonbn::batch_norm_apply     normalize + affine (1 launch), differentiable
    tritonbn::batch_norm_backward  gradient statistics + grad_input (2 launches, or 1
                                   single-pass launch where the shape fits)

Eval forward = apply alone (1 launch). Registered as torch.library operators with fake
implementations, so that torch.compile(fullgraph=True) and torch.export treat them as
opaque nodes: through ``torch.library.custom_op``, except batch_norm_train, which both
mutates its arguments and has an autograd formula, something custom_op refuses, and is
registered with torch.library's lower-level API (see there). batch_norm_stats is not
differentiable. The training forward's gradient is the backward of ``batch_norm_apply``
with ``batch_stats=True``, the full BatchNorm gradient including the path through mean and
invstd.

Not ``torch.library.triton_op``: its body is traced with FakeTensors, which the Triton
interpreter (CPU runs) cannot launch; and Inductor does not fuse into user-defined Triton
kernels anyway, so it would only save host overhead that CUDA graphs remove as well.
No autocast rule: like aten::batch_norm (in no autocast cast list), the ops run in their
input's dtype under torch.autocast, statistics in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.geometry import make_geometry
from ..kernels.launch import (backward_geometry, forward_geometry, launch_apply,
                              launch_fused_backward, launch_fused_forward, launch_grad_input,
                              launch_grad_stats, launch_stats, use_fused)

# The kernels take any strides and write outputs in the input's layout (empty_like), and
# the fake implementations say so. ``flexible_layout`` lets Inductor hand the ops the layout
# it chose (e.g. channels_last around convolutions) instead of copying every input to the
# strides seen in eager mode.
_TAGS = (torch.Tag.flexible_layout,)


def stats_impl(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Batch (mean, invstd), fp32 [C], and the in-place running-statistics update.
    ``momentum=None`` means the cumulative average, factor 1/num_batches_tracked read on the
    device. Not differentiable: the gradient through the statistics is part of
    batch_norm_apply's backward."""
    C = input.shape[1]
    if input.numel() == 0:  # torch leaves the running statistics as they are
        zeros = input.new_zeros(C, dtype=torch.float32)
        return zeros, zeros.clone()
    return launch_stats(input, make_geometry(input), running_mean, running_var,
                        num_batches_tracked, momentum, eps)


batch_norm_stats = torch.library.custom_op(
    "tritonbn::batch_norm_stats", mutates_args=("running_mean", "running_var"), tags=_TAGS
)(stats_impl)


@batch_norm_stats.register_fake
def _(input, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = input.shape[1]
    return input.new_empty(C, dtype=torch.float32), input.new_empty(C, dtype=torch.float32)


def apply_impl(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    stat: Tensor,
    batch_stats: bool,
    eps: float,
    relu: bool = False,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, in the input's dtype and memory format;
    y + residual with a ``residual`` (the input's shape and dtype), and max(that, 0) with
    ``relu``: BatchNorm [+ residual] [+ ReLU] in one pass.

    ``batch_stats``: mean/stat are the batch mean/invstd (batch_norm_stats'), and the
    backward differentiates through them (full BatchNorm training gradient). Otherwise they
    are running_mean/running_var (eval) and invstd = 1/sqrt(running_var + eps)."""
    output = torch.empty_like(input)
    if input.numel() == 0:
        return output
    return launch_apply(input, None, output, mean, stat, weight, bias, None, eps,
                        stat_is_var=not batch_stats, backward=False, relu=relu,
                        residual=residual)


batch_norm_apply = torch.library.custom_op(
    "tritonbn::batch_norm_apply", mutates_args=(), tags=_TAGS)(apply_impl)


@batch_norm_apply.register_fake
def _(input, weight, bias, mean, stat, batch_stats, eps, relu=False, residual=None):
    return torch.empty_like(input)


def _grad_buffers(input: Tensor, weight: Optional[Tensor], grad_input_mask: list[bool],
                  residual: Optional[Tensor], relu: bool):
    """Uninitialised (grad_input, grad_weight, grad_bias, grad_residual), each empty where
    it is not computed: shared by the implementation and the fake, so their metadata cannot
    drift. grad_residual, the ReLU-masked grad_output, exists with a residual and a ReLU
    (without a ReLU the residual's gradient is grad_output itself)."""
    want_input, want_weight, want_bias = grad_input_mask
    dtype = weight.dtype if weight is not None else input.dtype
    # A separate empty tensor per absent output: custom-op outputs may not alias.
    return (torch.empty_like(input) if want_input else input.new_empty(0),
            torch.empty_like(weight) if want_weight else input.new_empty(0),
            input.new_empty(input.shape[1], dtype=dtype) if want_bias else input.new_empty(0),
            torch.empty_like(residual) if relu and residual is not None else input.new_empty(0))


def backward_impl(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    stat: Tensor,
    batch_stats: bool,
    eps: float,
    grad_input_mask: list[bool],
    bias: Optional[Tensor] = None,
    relu: bool = False,
    residual: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual); an entry whose mask is False is
    empty. ``relu``: the backward of BatchNorm [+ residual] + ReLU, its mask recomputed
    from x, weight, bias and ``residual``; grad_residual is then the masked grad_output
    (empty without a residual or without ReLU: a residual's gradient is grad_output).

    ``batch_stats``: mean/stat are the saved batch mean/invstd (training). Otherwise they
    are running_mean/running_var (eval), and invstd = 1/sqrt(running_var + eps)."""
    want_input, want_weight, want_bias = grad_input_mask
    grads = _grad_buffers(input, weight, grad_input_mask, residual, relu)
    grad_input, grad_weight, grad_bias, grad_residual = grads
    # the backward reads bias and the residual (and, in the statistics kernel, weight) only
    # for ReLU's mask
    bias, residual = (bias, residual) if relu else (None, None)
    if residual is None:
        grad_residual = None
    if input.numel() == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return grads
    grad_input_out = grad_input if want_input else None
    geom = backward_geometry(input, grad_output, grad_input_out, residual, grad_residual)
    if use_fused(geom):
        launch_fused_backward(input, grad_output, grad_input_out, geom, mean, stat, weight,
                              eps, stat_is_var=not batch_stats,
                              grad_weight=grad_weight if want_weight else None,
                              grad_bias=grad_bias if want_bias else None, relu=relu, bias=bias,
                              residual=residual, grad_residual=grad_residual)
        return grads
    coef = None
    if want_weight or want_bias or (want_input and batch_stats) or residual is not None:
        # With a residual this pass also writes the masked dy (grad_residual), which the
        # grad_input pass then reads in place of dy, with no mask left to apply.
        coef = launch_grad_stats(
            input, grad_output, mean, stat, eps, stat_is_var=not batch_stats,
            grad_weight=grad_weight if want_weight else None,
            grad_bias=grad_bias if want_bias else None,
            want_coef=want_input and batch_stats, relu=relu,
            weight=weight if relu else None, bias=bias, residual=residual,
            grad_residual=grad_residual)
    if want_input:
        launch_grad_input(input, grad_output, grad_residual, grad_input, mean, stat, weight,
                          bias, coef, eps, stat_is_var=not batch_stats, relu=relu)
    return grads


batch_norm_backward = torch.library.custom_op(
    "tritonbn::batch_norm_backward", mutates_args=(), tags=_TAGS)(backward_impl)


@batch_norm_backward.register_fake
def _(grad_output, input, weight, mean, stat, batch_stats, eps, grad_input_mask, bias=None,
      relu=False, residual=None):
    return _grad_buffers(input, weight, grad_input_mask, residual, relu)


def _setup_context(ctx, inputs, output):
    input, weight, bias, mean, stat, batch_stats, eps, relu, residual = inputs
    ctx.relu = relu
    # bias and the residual only matter to the backward through ReLU's recomputed mask
    ctx.save_for_backward(input, weight, bias if relu else None, mean, stat,
                          residual if relu else None)
    ctx.batch_stats = batch_stats
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def differentiable_backward(grad_output, input, weight, mean, stat, batch_stats, eps,
                            grad_input_mask, bias=None, relu=False, residual=None):
    """The backward of batch_norm_apply written with torch operations, so that autograd can
    differentiate it again (double backward: ``create_graph=True``, e.g. a gradient penalty).
    The kernels' gradients carry no graph: returned as they are, the second-order terms
    through BatchNorm would silently be missing. fp32 math as in the kernels; with batch
    statistics, mean and invstd are recomputed from ``input`` so that their own dependence
    on it is differentiated too.

        xhat = (x - mean) * invstd,  grad_bias = sum(dy),  grad_weight = sum(dy * xhat)
        training: dx = weight * invstd * (dy - grad_bias / M - xhat * grad_weight / M)
        eval:     dx = weight * invstd * dy
    With ``relu``, dy is first masked where y [+ residual] <= 0; the residual's gradient is
    that masked dy (returned with a residual and ReLU; see backward_impl)."""
    C = input.shape[1]
    dims = [0] + list(range(2, input.dim()))
    shape = [1, C] + [1] * (input.dim() - 2)
    x, dy = input.float(), grad_output.float()
    if batch_stats:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        mean = mean.float().view(shape)
        invstd = torch.rsqrt(stat.float().view(shape) + eps)
    xhat = (x - mean) * invstd
    if relu:  # max(y, 0): torch's own ReLU backward, which zeroes dy where y <= 0 and
        # whose derivative with respect to y is zero: the second order sees the mask as a
        # constant, and y's inputs (the bias too) are in the graph, as they are in torch's
        y = xhat if weight is None else xhat * weight.float().view(shape)
        y = y if bias is None else y + bias.float().view(shape)
        y = y if residual is None else y + residual.float()
        dy = torch.ops.aten.threshold_backward(dy, y, 0.0)
    grad_residual = dy.to(residual.dtype) if relu and residual is not None else None
    grad_bias = dy.sum(dims)
    grad_weight = (dy * xhat).sum(dims)
    scale = invstd if weight is None else invstd * weight.float().view(shape)
    if batch_stats:
        inv_m = 1.0 / (input.numel() // C)
        dy = dy - grad_bias.view(shape) * inv_m - xhat * (grad_weight.view(shape) * inv_m)
    param_dtype = input.dtype if weight is None else weight.dtype
    want_input, want_weight, want_bias = grad_input_mask
    return (dy.mul(scale).to(input.dtype) if want_input else None,
            grad_weight.to(param_dtype) if want_weight else None,
            grad_bias.to(param_dtype) if want_bias else None,
            grad_residual)


def _backward(ctx, grad_output, backward_fn=None):
    """Gradients of batch_norm_apply's inputs. The residual's, when there is one, is
    returned whether or not it is needed: it costs nothing (grad_output itself, or with
    ReLU the masked grad_output, which the backward computes anyway)."""
    input, weight, bias, mean, stat, residual = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], weight is not None and needs[1], ctx.has_bias and needs[2]]
    if input.numel() != 0 and (torch.is_grad_enabled()
                               or torch._C._functorch.is_legacy_batchedtensor(grad_output)):
        # create_graph=True (see differentiable_backward's docstring), or a backward run
        # under autograd's own vmap (autograd.grad's is_grads_batched,
        # jacobian(vectorize=True)): torch operations, which autograd can differentiate
        # and vmap can batch
        backward_fn = differentiable_backward
    backward_fn = backward_fn or torch.ops.tritonbn.batch_norm_backward
    grad_input, grad_weight, grad_bias, grad_residual = backward_fn(
        grad_output, input, weight, mean, stat, ctx.batch_stats, ctx.eps, mask, bias, ctx.relu,
        residual)
    if ctx.has_residual and not ctx.relu:
        grad_residual = grad_output  # y + residual: the gradient passes as it is
    return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
            grad_bias if mask[2] else None, None, None, None, None, None,
            grad_residual if ctx.has_residual else None)


batch_norm_apply.register_autograd(_backward, setup_context=_setup_context)


class EagerApply(torch.autograd.Function):
    """batch_norm_apply with its autograd formula, calling the implementations directly.

    The custom ops are what torch.compile and torch.export see; in plain eager execution
    their dispatcher round trips (schema defaults, autograd wrapper, one redispatch per
    key) cost more host time than the kernels' launches. Same implementations, same
    saved tensors, same backward as the custom op."""

    @staticmethod
    def forward(ctx, *inputs):
        output = apply_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output, backward_impl)


class FuncApply(EagerApply):
    """EagerApply for torch.func transforms (grad, vjp, ...), which need forward and
    setup_context apart; neither the custom ops' autograd wrapper nor EagerApply serve
    them. Not used outside transforms: with a setup_context, Function.apply binds its
    arguments through inspect, some 35 us per call."""

    @staticmethod
    def forward(*inputs):
        return apply_impl(*inputs)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, mean, stat, batch_stats, eps, relu=False,
             residual=None):
        """Under torch.func.vmap: every slice's channels side by side (_fold_input), one
        launch."""
        B, (x_d, w_d, b_d, m_d, s_d), z_d = info.batch_size, in_dims[:5], _dim(in_dims, 8)
        vectors = (_fold_channels(t, d, B) for t, d in
                   ((weight, w_d), (bias, b_d), (mean, m_d), (stat, s_d)))
        out = FuncApply.apply(_fold_input(input, x_d, B), *vectors, batch_stats, eps, relu,
                              _fold_input(residual, z_d, B))
        return _unfold_input(out, B), 0


def train_forward_impl(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    relu: bool = False,
    residual: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward (batch statistics): (output, mean, invstd). One single-pass launch
    where the shape fits it (kernels/fused.py), else batch_norm_stats' and
    batch_norm_apply's implementations (two launches). ``residual``: output + residual;
    ``relu``: max(output, 0), after the residual."""
    output = torch.empty_like(input)
    geom = forward_geometry(input, output, residual) if input.numel() != 0 else None
    if geom is not None and use_fused(geom):
        mean, invstd = launch_fused_forward(input, output, geom, weight, bias, running_mean,
                                            running_var, num_batches_tracked, momentum, eps,
                                            relu, residual)
        return output, mean, invstd
    mean, invstd = stats_impl(input, running_mean, running_var, num_batches_tracked,
                              momentum, eps)
    if input.numel() != 0:
        launch_apply(input, None, output, mean, invstd, weight, bias, None, eps,
                     stat_is_var=False, backward=False, relu=relu, residual=residual)
    return output, mean, invstd


# batch_norm_train both mutates its arguments and has an autograd formula, which
# torch.library.custom_op does not allow (its register_autograd wants a functional op), so
# it is defined with torch.library's lower-level API and given its own Autograd kernel.
# Being an op, differentiable, it stays one opaque node for Dynamo, and graphs that hold
# it (torch.export, make_fx) can be backpropagated; its backward is chosen when it runs
# (create_graph=True included), as for batch_norm_apply.
_LIB = torch.library.Library("tritonbn", "FRAGMENT")
_LIB.define(
    "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor? num_batches_tracked, float? momentum, float eps, "
    "bool relu=False, Tensor? residual=None) -> (Tensor, Tensor, Tensor)", tags=_TAGS)
_LIB.impl("batch_norm_train", train_forward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("tritonbn::batch_norm_train", lib=_LIB)
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
      relu=False, residual=None):
    C = input.shape[1]
    return (torch.empty_like(input), input.new_empty(C, dtype=torch.float32),
            input.new_empty(C, dtype=torch.float32))


def _save_train(ctx, inputs, output, mean, invstd):
    """Saved state of a training forward: batch_norm_apply's with batch_stats=True."""
    input, weight, bias, _, _, _, _, eps, relu, residual = inputs
    _setup_context(ctx, (input, weight, bias, mean, invstd, True, eps, relu, residual), output)


def _setup_train(ctx, inputs, outputs):
    """setup_context of the training forwards that return (output, mean, invstd): the
    statistics are outputs, not differentiable."""
    ctx.mark_non_differentiable(*outputs[1:])
    _save_train(ctx, inputs, *outputs)


def _train_grads(ctx, grad_output, backward_fn=None):
    """Gradients of the training forward's ten arguments: input, weight, bias and the
    residual's, from batch_norm_apply's backward."""
    grads = _backward(ctx, grad_output, backward_fn)
    return (*grads[:3], None, None, None, None, None, None, grads[-1])


class EagerTrain(torch.autograd.Function):
    """Training forward in plain eager mode: statistics, running-stat update and output in
    one autograd node, so shapes that fit the single-pass kernel take one launch. Saved
    tensors and backward are those of batch_norm_apply with batch_stats=True."""

    @staticmethod
    def forward(ctx, *inputs):
        output, mean, invstd = train_forward_impl(*inputs)
        _save_train(ctx, inputs, output, mean, invstd)
        return output

    @staticmethod
    def backward(ctx, grad_output, *_grad_stats):
        return _train_grads(ctx, grad_output, backward_impl)


class FuncTrain(EagerTrain):
    """EagerTrain for torch.func transforms (see FuncApply). Returns (output, mean,
    invstd): setup_context sees only outputs, so the statistics are outputs too, not
    differentiable."""

    @staticmethod
    def forward(*inputs):
        return train_forward_impl(*inputs)

    setup_context = staticmethod(_setup_train)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var,
             num_batches_tracked, momentum, eps, relu=False, residual=None):
        """Under torch.func.vmap, torch's batching semantics: each slice's own statistics,
        and running statistics batched like the input (each slice updates its own) or, for
        one input shared by every slice, unbatched (updated once)."""
        B, (x_d, w_d, b_d, rm_d, rv_d, nbt_d) = info.batch_size, in_dims[:6]
        z_d = _dim(in_dims, 9)
        if nbt_d is not None:
            raise RuntimeError(_BATCHED_NUM_BATCHES_TRACKED)
        if x_d is None and rm_d is None and rv_d is None:
            return _shared_input_train(input, weight, bias, running_mean, running_var,
                                       num_batches_tracked, momentum, eps, relu, residual,
                                       w_d, b_d, z_d)
        if running_mean is not None and (rm_d is None or rv_d is None):
            raise RuntimeError(_UNBATCHED_RUNNING_STATS)
        run_mean, run_var = (_fold_channels(running_mean, rm_d, B),
                             _fold_channels(running_var, rv_d, B))
        out, mean, invstd = FuncTrain.apply(
            _fold_input(input, x_d, B), _fold_channels(weight, w_d, B),
            _fold_channels(bias, b_d, B), run_mean, run_var, num_batches_tracked, momentum,
            eps, relu, _fold_input(residual, z_d, B))
        for buffer, d, folded in ((running_mean, rm_d, run_mean), (running_var, rv_d, run_var)):
            if buffer is not None:  # the update into the slices' buffers, when folding copied
                _copy_unless_same(folded.view(B, -1), buffer.movedim(d, 0))
        return (_unfold_input(out, B), mean.view(B, -1), invstd.view(B, -1)), (0, 0, 0)


class _TrainAutograd(torch.autograd.Function):
    """The Autograd kernel of batch_norm_train: the op below autograd, and EagerTrain's
    saved tensors and backward (batch_norm_backward, or differentiable_backward when a
    graph of the gradient is wanted)."""

    @staticmethod
    def forward(*inputs):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.tritonbn.batch_norm_train(*inputs)

    setup_context = staticmethod(_setup_train)

    @staticmethod
    def backward(ctx, grad_output, *_grad_stats):
        return _train_grads(ctx, grad_output)


def _train_autograd(input, weight, bias, running_mean, running_var, num_batches_tracked,
                    momentum, eps, relu=False, residual=None):
    # the dispatcher passes a Python kernel the arguments as called, without the schema's
    # defaults; _TrainAutograd saves all ten
    return _TrainAutograd.apply(input, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum, eps, relu, residual)


_LIB.impl("batch_norm_train", _train_autograd, "Autograd")


# --- torch.func.vmap -------------------------------------------------------------------------
# Under vmap each slice is a BatchNorm of its own. The rules fold the vmapped dimension into
# the channels: slice b's (N, C, *S) input becomes channels b*C .. b*C + C - 1 of one
# (N, B*C, *S) input, so one launch computes every slice. The fold copies the input where
# its strides cannot express it (under vmap only: plain calls never copy).

_BATCHED_NUM_BATCHES_TRACKED = (  # torch raises a RuntimeError here too (vmap over .item())
    "vmap: momentum=None with a batched num_batches_tracked (per-slice buffers): the "
    "cumulative average's factor 1 / num_batches_tracked is a Python number in torch's "
    "BatchNorm, and vmap does not support calling .item() on a batched tensor.")
_UNBATCHED_RUNNING_STATS = (  # torch's words for the same case
    "Batch norm got a batched tensor as input while the running_mean or running_var, which "
    "will be updated in place, were not batched.")


def _dim(in_dims: tuple, index: int):
    """The vmapped dimension of an optional trailing argument (None when not passed)."""
    return in_dims[index] if len(in_dims) > index else None


def _fold_input(t: Optional[Tensor], bdim, B: int) -> Optional[Tensor]:
    """(N, B*C, *S) holding slice b's channel c at b*C + c; an unbatched tensor (bdim None)
    is the same in every slice. None stays None."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(B, *t.shape) if bdim is None else t.movedim(bdim, 0)
    return t.movedim(0, 1).flatten(1, 2)


def _unfold_input(t: Tensor, B: int) -> Tensor:
    """_fold_input's inverse: (N, B*C, *S) -> (B, N, C, *S)."""
    return t.unflatten(1, (B, -1)).movedim(1, 0)


def _fold_channels(t: Optional[Tensor], bdim, B: int) -> Optional[Tensor]:
    """A per-channel vector of every slice as one [B*C] vector, in _fold_input's order."""
    if t is None:
        return None
    return t.repeat(B) if bdim is None else t.movedim(bdim, 0).reshape(-1)


def _copy_unless_same(src: Tensor, dst: Tensor) -> None:
    if src.data_ptr() != dst.data_ptr() or src.stride() != dst.stride():
        dst.copy_(src)


def _shared_input_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                        momentum, eps, relu, residual, w_d, b_d, z_d):
    """Training under vmap with one input and one set of running statistics (or none) for
    every slice (an ensemble: batched weight, bias or residual): normalise once, updating
    the running statistics once, then the slices' affine, residual and ReLU with torch
    operations in fp32. Returns vmap's (outputs, out_dims)."""
    xhat, mean, invstd = FuncTrain.apply(input, None, None, running_mean, running_var,
                                         num_batches_tracked, momentum, eps, False, None)
    trailing = [1] * (input.dim() - 2)

    def per_channel(t, d):  # broadcast against (B, N, C, *S), or (N, C, *S) when unbatched
        if d is None:
            return t.float().view(-1, *trailing)
        return t.float().movedim(d, 0).reshape(t.shape[d], 1, -1, *trailing)

    out = xhat.float()
    out = out if weight is None else out * per_channel(weight, w_d)
    out = out if bias is None else out + per_channel(bias, b_d)
    out = out if residual is None else out + (
        residual.float() if z_d is None else residual.float().movedim(z_d, 0))
    out = (torch.relu(out) if relu else out).to(input.dtype)
    return (out, mean, invstd), (0 if out.dim() > input.dim() else None, None, None)
