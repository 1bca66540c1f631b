"""``tritonbn.batch_norm``: the signature and semantics of torch.nn.functional.batch_norm,
computed by the Triton kernels when the input lives where they can run."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode as _get_dispatch_mode

from .kernels.launch import INTERPRETED
from .ops import batch_norm as _ops  # noqa: F401  (registers torch.ops.tritonbn.*)

# dtypes the kernels serve; anything else (float64, ...) is left to torch, which is exact.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# torch 2.10 and 2.11 reject eps <= 0 in both modes; 2.12 (pytorch#175508) accepts eps = 0
# in evaluation, where the running variance alone can keep the division finite.
_EPS_ZERO_ALLOWED_IN_EVAL = tuple(
    int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)


_STRIDED = torch.strided


def runs_on_triton(input: Tensor) -> bool:
    """True when ``input`` is computed by the Triton kernels: CUDA tensors, and CPU tensors
    when the Triton interpreter is on (TRITON_INTERPRET=1 before import). Other inputs
    (CPU without the interpreter, float64, sparse, ...) fall back to torch's own
    BatchNorm, as do calls recorded by torch.jit.trace (and so
    torch.onnx.export(dynamo=False)), whose graph can then hold aten::batch_norm instead of
    kernel launches, and tensor subclasses with behaviour of their own (_subclass)."""
    if input.dtype not in KERNEL_DTYPES or torch.jit.is_tracing():
        return False
    if (type(input) not in _PLAIN_TYPES and _subclass(input)) or input.layout is not _STRIDED:
        return False
    return input.is_cuda or (INTERPRETED and input.is_cpu)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
# what a class that does not override __torch_function__ has: Tensor's (a classmethod) or
# the disabled one (Parameter, and most __torch_dispatch__ wrappers)
_NO_TORCH_FUNCTION = (Tensor.__torch_function__.__func__, torch._C._disabled_torch_function_impl)


def _subclass(*tensors: Optional[Tensor]) -> bool:
    """Whether one of ``tensors`` is a subclass that overrides __torch_function__ (torch's
    BatchNorm hands it the call, and returns what it makes of it) or __torch_dispatch__ (a
    wrapper such as DTensor or a jagged nested tensor, whose data the kernels cannot
    read): torch's path gives it exactly the calls it expects. Plain tensors and
    Parameters cost a type lookup each. Under a trace (torch.compile's fake tensors) the
    custom ops are the path. The class's own __torch_function__ is looked at, not
    has_torch_function, which any torch function mode (make_fx sets one) makes true."""
    for t in tensors:
        if type(t) in _PLAIN_TYPES or not isinstance(t, Tensor) or _traced():
            continue  # None and non-tensors too (the residual's check reports them)
        handler = getattr(type(t), "__torch_function__", None)
        if (getattr(handler, "__func__", handler) not in _NO_TORCH_FUNCTION
                or torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)):
            return True
    return False


def _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """The checks torch makes, in torch's order, with its exception types and messages.
    ``momentum`` None: the layers' cumulative average (the functional refused None in
    _check_types)."""
    size = input.size()
    if training:
        size_prods = size[0]
        for d in size[2:]:
            size_prods *= d
        if size_prods == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}")
    if not _EPS_ZERO_ALLOWED_IN_EVAL:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    elif training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    # torch's argument parser, after those Python-level checks (the layers pass their
    # momentum and eps attributes straight here)
    if momentum is not None and type(momentum) is not float and not _float_like(momentum):
        raise _argument_error("momentum", 7, "float", momentum)
    if type(eps) is not float and not _float_like(eps):
        raise _argument_error("eps", 8, "float", eps)
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if (running_mean is not None and (running_mean.requires_grad or running_var.requires_grad)
            and torch.is_grad_enabled()):  # autograd's check, before the kernel's own
        name = "running_mean" if running_mean.requires_grad else "running_var"
        raise RuntimeError(f"The function 'native_batch_norm' is not differentiable with "
                           f"respect to argument '{name}'. This input cannot have "
                           f"requires_grad True.")
    _check_tensors(input, running_mean, running_var, weight, bias)


def _check_tensors(input, running_mean, running_var, weight, bias):
    """Per-channel tensors: sizes, devices and dtypes the kernels can take, with torch's
    first error (every size, then every device, then the dtypes)."""
    C = input.size(1) if input.dim() > 1 else 0
    device, dtype = input.device, input.dtype
    for t in (running_mean, running_var, weight, bias):
        if t is not None and (t.numel() != C or t.device != device or t.dtype != dtype):
            break
    else:  # the common case, checked in one pass: nothing to report
        input.size(1)  # 1-D input: IndexError, as torch
        return
    params = [(name, t) for name, t in (("running_mean", running_mean), ("running_var", running_var),
                                        ("weight", weight), ("bias", bias)) if t is not None]
    for name, t in params:
        if t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    for name, t in params:
        if t.device != device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {name} on "
                f"{t.device} and input on {device}")
    # Parameters and buffers all in the input's dtype, or (mixed precision) all fp32.
    if any(t.dtype != dtype for _, t in params):
        if any(t.dtype != torch.float32 for _, t in params):
            raise RuntimeError(f"mixed dtype ({device.type.upper()}): expect parameter "
                               "to have scalar type of Float")
    input.size(1)  # 1-D input: IndexError, as torch


def residual_fits(input: Tensor, residual) -> bool:
    """Whether the kernels can add ``residual`` to the output of BatchNorm(``input``): a
    tensor of the input's shape, dtype and device (any strides). Anything else (a
    broadcast, another dtype) would change the result's shape or dtype under torch's
    rules for ``+``."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape
            and residual.dtype == input.dtype and residual.device == input.device)


def _check_residual(input: Tensor, residual: Optional[Tensor]) -> None:
    if residual is not None and not residual_fits(input, residual):
        got = (f"{type(residual).__name__}" if not isinstance(residual, Tensor) else
               f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
        raise RuntimeError(f"batch_norm: residual must be a tensor of the input's shape, dtype "
                           f"and device ({input.dtype} {tuple(input.shape)} on "
                           f"{input.device}), got {got}")


def _batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                momentum: Optional[float], eps: float,
                num_batches_tracked: Optional[Tensor] = None, relu: bool = False,
                residual: Optional[Tensor] = None) -> Tensor:
    """Kernel path. ``momentum=None`` with ``num_batches_tracked`` = cumulative average,
    its factor read on the device (no host synchronisation, graph-capturable)."""
    empty = input.numel() == 0
    if empty or _subclass(running_mean, running_var, weight, bias, residual):
        # torch's own path. For an empty input ATen returns input.clone() * weight[0] +
        # bias[0] before its per-channel checks, so it takes mis-sized or mixed-dtype
        # parameters there and raises IndexError for C = 0 with a weight; the running
        # statistics stay as they are (no momentum to read). A subclass operand: see
        # _subclass.
        if momentum is None:
            momentum = 0.0 if empty or num_batches_tracked is None else None
        return _by_torch(input, running_mean, running_var, weight, bias, training, momentum,
                         eps, num_batches_tracked, relu, residual)
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_residual(input, residual)
    if momentum is None and num_batches_tracked is None:
        momentum = 0.0
    nbt = num_batches_tracked if momentum is None else None
    transformed = torch._C._are_functorch_transforms_active()
    if ((transformed or forward_ad._current_level >= 0)
            and _forward_mode_ad(transformed, input, weight, bias, residual)):
        # also when traced (torch.func.linearize): the custom ops have no jvp formula either
        return _by_torch(input, running_mean, running_var, weight, bias, training, momentum,
                         eps, nbt, relu, residual)
    if not _traced():  # plain eager: same implementations, less host time per call
        # Without a gradient to record (inference, no_grad), skip the autograd node: its
        # host cost is about a third of the call's. Under a torch.func transform, always
        # an autograd Function of the transform-ready kind: it hands the kernels plain
        # tensors.
        if transformed:
            if training:
                return _ops.FuncTrain.apply(input, weight, bias, running_mean, running_var,
                                            nbt, momentum, eps, relu, residual)[0]
            return _ops.FuncApply.apply(input, weight, bias, running_mean, running_var,
                                        False, eps, relu, residual)
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, weight, bias, residual))
        if training:
            if grad:
                return _ops.EagerTrain.apply(input, weight, bias, running_mean, running_var,
                                             nbt, momentum, eps, relu, residual)
            return _ops.train_forward_impl(input, weight, bias, running_mean, running_var, nbt,
                                           momentum, eps, relu, residual)[0]
        if grad:
            return _ops.EagerApply.apply(input, weight, bias, running_mean, running_var, False,
                                         eps, relu, residual)
        return _ops.apply_impl(input, weight, bias, running_mean, running_var, False, eps, relu,
                               residual)
    if forward_ad._current_level >= 0:  # dual tensors under torch.compile: unseen there
        raise NotImplementedError(
            "tritonbn: forward-mode AD (torch.autograd.forward_ad) inside torch.compile: the "
            "custom ops have no forward-mode formula; call the model eagerly there")
    if training and not transformed:
        return torch.ops.tritonbn.batch_norm_train(input, weight, bias, running_mean,
                                                   running_var, nbt, momentum, eps, relu,
                                                   residual)[0]
    if transformed and torch.compiler.is_compiling():
        raise NotImplementedError(
            "tritonbn: torch.func transforms (grad, vjp, vmap, ...) inside torch.compile: "
            "Dynamo cannot trace the custom ops' autograd under a transform; run the "
            "transform eagerly")
    mean, stat = running_mean, running_var
    if training:  # make_fx of a transform: batch_norm_apply's own autograd formula
        # detach: the gradient through the statistics is in batch_norm_apply's backward.
        mean, stat = torch.ops.tritonbn.batch_norm_stats(input.detach(), running_mean,
                                                         running_var, nbt, momentum, eps)
    return torch.ops.tritonbn.batch_norm_apply(input, weight, bias, mean, stat, training, eps,
                                               relu, residual)


_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE


def _argument_error(name: str, position: int, expected: str, value) -> TypeError:
    """torch.batch_norm's argument parser's error (positions in its schema)."""
    kind = type(value)
    # CPython's tp_name: a class written in Python (Tensor, Fraction) or a builtin by its
    # name, one of an extension module (numpy.bool) with the module's name
    static = not kind.__flags__ & _HEAP_TYPE and kind.__module__ != "builtins"
    got = f"{kind.__module__}.{kind.__name__}" if static else kind.__name__
    return TypeError(f"batch_norm(): argument '{name}' (position {position}) must be "
                     f"{expected}, not {got}")


def _check_types(running_mean, running_var, weight, bias, training, momentum) -> None:
    """torch's TypeErrors for arguments the kernels would otherwise misread: a list as a
    tensor, None or 1 as training, a string or None as momentum."""
    for position, name, value in ((2, "weight", weight), (3, "bias", bias),
                                  (4, "running_mean", running_mean),
                                  (5, "running_var", running_var)):
        if value is not None and not isinstance(value, Tensor):
            raise _argument_error(name, position, "Tensor", value)
    if type(training) is not bool:
        raise _argument_error("training", 6, "bool", training)
    if type(momentum) is not float and not _float_like(momentum):
        raise _argument_error("momentum", 7, "float", momentum)


def _float_like(value) -> bool:
    """What torch's parser takes for a float: Python and numpy numbers, and 0-d tensors
    that do not require grad."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.requires_grad
    return isinstance(value, (int, float)) or (type(value).__module__ == "numpy"
                                               and isinstance(value, numbers.Real))


def _forward_mode_ad(transformed: bool, *tensors) -> bool:
    """Whether a tangent may flow through this call: a dual tensor of
    torch.autograd.forward_ad, or (``transformed``: torch.func transforms are active)
    torch.func.jvp (jacfwd, hessian) on the transform stack. The kernels' autograd
    Functions define no jvp. (The caller first checks that a forward-AD level or a
    transform is active at all: the common case costs no call.) Under torch.compile,
    where Dynamo cannot read the transform stack, dual tensors only."""
    if forward_ad._current_level >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return True
    return transformed and not torch.compiler.is_compiling() and any(
        i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def _by_torch(input, running_mean, running_var, weight, bias, training, momentum, eps,
              num_batches_tracked, relu, residual) -> Tensor:
    """The call computed by torch's BatchNorm (and +, ReLU): inputs the kernels do not
    take, and forward-mode AD, whose formulas torch has. The residual is checked first,
    so that a bad one raises before torch updates the running statistics.
    momentum=None: torch's module reads the count on the host too."""
    _check_residual(input, residual)
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked)
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    out = out if residual is None else out + residual
    return F.relu(out) if relu else out


def _traced() -> bool:
    """Under torch.compile / torch.export, or a dispatch mode (FakeTensor, ...): the custom
    ops must be used, so that tracing sees opaque nodes with fake implementations."""
    return torch.compiler.is_compiling() or _get_dispatch_mode() is not None


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.batch_norm` (differentiable). Two keywords
    that are not in torch's signature, both computed by the same kernels:

    * ``residual``: returns ``batch_norm(...) + residual`` (a tensor of the input's shape,
      dtype and device; RuntimeError otherwise), the residual read in the pass that writes
      the output: a ResNet block's shortcut, a MobileNetV2 block's skip connection.
    * ``relu=True``: returns ``relu(batch_norm(...) [+ residual])``, with no pass of its own
      over the tensor in the forward or the backward."""
    _check_types(running_mean, running_var, weight, bias, training, momentum)
    if not runs_on_triton(input):
        return _by_torch(input, running_mean, running_var, weight, bias, training, momentum,
                         eps, None, relu, residual)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       relu=relu, residual=residual)
