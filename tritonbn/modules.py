"""``tritonbn.BatchNorm1d/2d/3d`` and ``tritonbn.SyncBatchNorm``: subclasses of torch's
classes (same constructor, parameters, buffers and state_dict) whose forward runs the
Triton kernels, and ``convert_model`` to switch an existing model over in place."""
from __future__ import annotations

import collections
import operator

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules import module as _module_hooks
from torch.nn.utils import parametrize

from .functional import _batch_norm, _check_tensors, _traced, residual_fits, runs_on_triton
from .ops.sync_batch_norm import SyncBatchNormFunction


class _TritonBatchNorm:
    """Mixin holding the forward of torch's ``_BatchNorm`` with one change: for
    momentum=None the factor 1/num_batches_tracked is read on the device instead of
    ``float(num_batches_tracked)`` on the host.

    ``fused_relu`` (set by ``convert_model(..., fuse_relu=True)``): the layer returns
    relu(BatchNorm(x)) from the same kernels, standing in for a ReLU that followed it.

    ``forward(input, residual)``, a second argument torch's layers do not take (passed by
    ``fuse_relu_traced``): BatchNorm(input) + residual [then the ReLU], the residual read by
    the kernel that writes the output. A residual the kernels cannot add (another shape,
    to broadcast, or another dtype) is added afterwards by torch, with its rules."""

    fused_relu = False
    _count_required = False  # torch's SyncBatchNorm asserts num_batches_tracked in training

    def forward(self, input: Tensor, residual=None) -> Tensor:
        if isinstance(input, fx.Proxy):
            return _fx_call(self, (input,) if residual is None else (input, residual))
        if not self._runs_on_kernels(input):
            output = super().forward(input)
        else:
            self._check_input_dim(input)
            if residual is None or residual_fits(input, residual):
                return self._kernel_forward(input, self.fused_relu, residual)
            output = self._kernel_forward(input, False, None)
        output = output if residual is None else output + residual
        return F.relu(output) if self.fused_relu else output

    def _runs_on_kernels(self, input: Tensor) -> bool:
        return runs_on_triton(input)

    def _kernel_forward(self, input: Tensor, relu: bool, residual) -> Tensor:
        """BatchNorm(input) [+ residual] [then ReLU], computed by the kernels."""
        return _batch_norm(input, *self._arguments(), relu=relu, residual=residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused_relu=True" if self.fused_relu else "")

    def _arguments(self) -> tuple:
        """(running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked) for _batch_norm, as torch's forward derives them; counts the
        batch in num_batches_tracked when training."""
        # Registered parameters and buffers are read from their tables, as
        # nn.Module.__getattr__ reads them, without a Python call each (host time per
        # call, perf/host_overhead.py). A name that is not registered (a parametrization's
        # property, a tensor set as a plain attribute) is read as an attribute.
        p, b = self._parameters, self._buffers
        weight = p["weight"] if "weight" in p else self.weight
        bias = p["bias"] if "bias" in p else self.bias
        running_mean = b["running_mean"] if "running_mean" in b else self.running_mean
        running_var = b["running_var"] if "running_var" in b else self.running_var
        momentum = self.momentum
        num_batches_tracked = None
        if self.training and self.track_running_stats:
            num_batches_tracked = (b["num_batches_tracked"] if "num_batches_tracked" in b
                                   else self.num_batches_tracked)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            elif self._count_required:
                raise AssertionError("num_batches_tracked must not be None")
            elif momentum is None:  # torch uses a factor of 0.0 here
                momentum = 0.0
        bn_training = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        return (running_mean, running_var, weight, bias, bn_training, momentum, self.eps,
                num_batches_tracked)


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """Triton drop-in for :class:`torch.nn.BatchNorm1d`, input (N, C) or (N, C, L)."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """Triton drop-in for :class:`torch.nn.BatchNorm2d`, input (N, C, H, W)."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """Triton drop-in for :class:`torch.nn.BatchNorm3d`, input (N, C, D, H, W)."""


class SyncBatchNorm(_TritonBatchNorm, nn.SyncBatchNorm):
    """Triton drop-in for :class:`torch.nn.SyncBatchNorm`: in training, with a process
    group of more than one process, statistics over the whole group's batch
    (ops/sync_batch_norm.py); otherwise a BatchNorm, as torch's."""

    _count_required = True

    def _runs_on_kernels(self, input: Tensor) -> bool:
        # under torch.compile, torch's SyncBatchNorm code, whose collectives it traces
        return runs_on_triton(input) and not _traced()

    def _kernel_forward(self, input: Tensor, relu: bool, residual) -> Tensor:
        self._check_non_zero_input_channels(input)
        args = self._arguments()
        world_size = 1
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size < 2:  # alone, or (-1) not a member of the group: local, as torch
            return _batch_norm(input, *args, relu=relu, residual=residual)
        running_mean, running_var, weight, bias, _, momentum, eps, nbt = args
        _check_tensors(input, running_mean, running_var, weight, bias)
        return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, nbt,
                                           momentum, eps, group, world_size, relu, residual)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch's conversion of every BatchNorm*D into a SyncBatchNorm, then to tritonbn's.
        torch's builds new layers, copying parameters and buffers only: the fused ReLUs
        and residuals (convert_model(fuse_relu=True), fuse_relu_traced) are carried over
        here by the layer's name, the tree keeping its names. (Calling torch's own
        nn.SyncBatchNorm.convert_sync_batchnorm on a fused model would lose them.)"""
        fused = {name: {k: m.__dict__[k] for k in _FUSION_FLAGS if k in m.__dict__}
                 for name, m in module.named_modules(remove_duplicate=False)
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        module = convert_model(nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group))
        for name, flags in fused.items():
            module.get_submodule(name).__dict__.update(flags)
        return module


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def _hooked(module: nn.Module, backward: bool = True) -> bool:
    """Whether hooks would see ``module``'s call, its own or every module's (``backward``:
    backward hooks too). A lazy layer's own pre-hook, which builds it on its first input,
    does not count."""
    pre = dict(module._forward_pre_hooks)
    lazy = getattr(module, "_initialize_hook", None)
    if lazy is not None:
        pre.pop(lazy.id, None)
    own = [module._forward_hooks, pre]
    if backward:
        own += [module._backward_hooks, module._backward_pre_hooks]
    names = _GLOBAL_HOOKS if backward else _GLOBAL_HOOKS[:2]
    return any(own) or any(getattr(_module_hooks, name) for name in names)


def _fx_call(layer: nn.Module, args: tuple) -> fx.Proxy:
    """Under torch.fx tracing (symbolic_trace and the tools built on it): one call of
    ``layer`` in the graph, as fx records torch's own BatchNorm, rather than the layer's
    branches on a Proxy (which fx cannot trace). fx steps into layers outside torch.nn
    through __call__, so forward hooks would be traced too and then run again by the
    call: refused."""
    if _hooked(layer, backward=False):
        raise RuntimeError(
            "torch.fx tracing a tritonbn layer with forward hooks: they would be recorded in "
            "the graph and run again by the layer's call; trace tritonbn.revert_model(model), "
            "or with a Tracer whose is_leaf_module is True for tritonbn's layers")
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(layer), args, {})


class _LazyTritonBatchNorm:
    """Mixin of the lazy layers: their first call runs the class they become."""

    def _call_impl(self, *args, **kwargs):
        # torch.fx tracing: a Proxy has no shape for the lazy pre-hook to infer from. The
        # layer stays lazy and is recorded as one call, as fx records torch's lazy layers,
        # and the traced model initialises it on its first real input. Here, not in a
        # method the pre-hook calls (a converted layer's hook is torch's, bound when the
        # layer was built); and nn.Module._call_impl by name, not super(): Module.compile
        # keeps this bound method, which outlives the class switch to cls_to_become.
        input = args[0] if args else kwargs.get("input")
        if isinstance(input, fx.Proxy):
            return _fx_call(self, (input,))
        return nn.Module._call_impl(self, *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        # nn.Module.__call__ binds forward before the pre-hook that sets num_features and
        # switches the class to cls_to_become: without this the first call would run
        # torch's BatchNorm, off the kernels and without a fused ReLU.
        if isinstance(self, _TritonBatchNorm):
            return type(self).forward(self, input)
        return super().forward(input)  # not initialised yet: torch's error


class LazyBatchNorm1d(_LazyTritonBatchNorm, nn.LazyBatchNorm1d):
    """:class:`torch.nn.LazyBatchNorm1d` that becomes a tritonbn.BatchNorm1d (not torch's)
    once its first input has set num_features."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyTritonBatchNorm, nn.LazyBatchNorm2d):
    """:class:`torch.nn.LazyBatchNorm2d` that becomes a tritonbn.BatchNorm2d."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyTritonBatchNorm, nn.LazyBatchNorm3d):
    """:class:`torch.nn.LazyBatchNorm3d` that becomes a tritonbn.BatchNorm3d."""

    cls_to_become = BatchNorm3d


# What convert_model(fuse_relu=True) and fuse_relu_traced set on a layer (instance
# attributes).
_FUSION_FLAGS = ("fused_relu", "residual_in_graph")

# Layers that can carry a fused ReLU.
_FUSABLE = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, LazyBatchNorm1d,
            LazyBatchNorm2d, LazyBatchNorm3d)


def _take_relu(bn: nn.Module) -> bool:
    """Give ``bn`` the ReLU that follows it when it can carry one (a tritonbn BatchNorm,
    lazy and sync ones included, without one yet, and without hooks, which would see the
    ReLU'd output); True when it took it. Shared by convert_model(fuse_relu=True) and
    fx.fuse_relu_traced."""
    if (_layer_class(bn) in _FUSABLE and not getattr(bn, "fused_relu", False)
            and not _hooked(bn)):
        bn.fused_relu = True
        return True
    return False


def _fusable_relu_module(relu: nn.Module) -> bool:
    """A ReLU module a BatchNorm may take over: not one with hooks, which would no longer
    run."""
    return type(relu) is nn.ReLU and not _hooked(relu)


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d, nn.SyncBatchNorm: SyncBatchNorm,
                 nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
                 nn.LazyBatchNorm3d: LazyBatchNorm3d}


def convert_model(module: nn.Module, fuse_relu: bool = False) -> nn.Module:
    """Turn every torch BatchNorm1d/2d/3d, SyncBatchNorm and LazyBatchNorm1d/2d/3d in
    ``module`` (itself included) into its tritonbn counterpart, in place, and return
    ``module``. A lazy layer becomes a tritonbn BatchNorm when its first input arrives
    (torch's would become torch's BatchNorm and quietly leave the kernels out).

    The class of each layer is switched, so the very same parameter and buffer objects stay
    (optimizers holding them keep working), with their device, dtype, requires_grad, the
    training flag and hooks. Only exact torch classes are converted: a user subclass may
    override forward and is left alone.

    ``fuse_relu``: where an ``nn.Sequential`` runs a tritonbn BatchNorm (sync and lazy
    ones included) and then an ``nn.ReLU``, the BatchNorm also applies the ReLU
    (``fused_relu``) and the ReLU is replaced by ``nn.Identity``: one kernel instead of
    two, forward and backward. Only
    Sequential containers that run their children in a chain are searched (not a subclass
    with a forward of its own): a ReLU called from a ``forward`` method cannot be seen
    from here. A BatchNorm that appears more than once in ``module`` (one layer
    shared by two places) is left alone: its other use may not be followed by a ReLU. So
    is a pair where either module has hooks, or any while global module hooks are
    registered: they would see the ReLU'd output, or not run. Code that slices or
    iterates the Sequential (``features[:2](x)`` for the activations before a ReLU) gets
    the fused layer's ReLU'd output."""
    for m in module.modules():
        replacement = _REPLACEMENTS.get(_layer_class(m))
        if replacement is not None:
            _switch_class(m, replacement)
    if fuse_relu:
        places = collections.Counter(
            id(m) for _, m in module.named_modules(remove_duplicate=False))
        for seq, bn, second in _sequential_pairs(module):
            relu = seq._modules[second]
            # a subclass with a forward of its own may not run its children in a chain
            in_chain = type(seq).forward is nn.Sequential.forward
            if (in_chain and _fusable_relu_module(relu) and places[id(bn)] == 1
                    and _take_relu(bn)):
                identity = nn.Identity().train(relu.training)
                # the ReLU it stands for, for revert_model (an attribute, not a child)
                identity.__dict__["replaced_relu"] = relu
                seq._modules[second] = identity
    return module


def _sequential_pairs(module: nn.Module):
    """(Sequential, a child, the name of the child after it) for every adjacent pair in
    every nn.Sequential of ``module``: where convert_model fuses a ReLU into the layer
    before it, and revert_model puts it back."""
    for seq in module.modules():
        if isinstance(seq, nn.Sequential):
            names = list(seq._modules)
            for first, second in zip(names, names[1:]):
                yield seq, seq._modules[first], second


def revert_model(module: nn.Module) -> nn.Module:
    """The inverse of ``convert_model``, in place: every tritonbn layer in ``module``
    (itself included) becomes torch's class again, same parameter and buffer objects, and
    returns ``module``. For tools keyed on torch's exact classes: conv + BatchNorm fusion
    (``torch.ao.quantization.fuse_modules``, ``fuse_conv_bn_eval``), quantization,
    ``torch.jit.script``.

    Fused epilogues come back as torch operations, so the model computes the same thing:
    the ``nn.Identity`` that ``convert_model(fuse_relu=True)`` put in place of a ReLU gets
    that very ReLU back; in a GraphModule of ``fuse_relu_traced``, a call ``bn(x, z)``
    becomes ``bn(x) + z`` and a fused ReLU a ``relu`` call after it. A fused ReLU or
    residual whose Sequential or graph is not inside ``module`` (a part of a traced model,
    a flag set by hand) cannot be undone from here: ValueError, before anything changes."""
    relus_back = [(seq, name, layer) for seq, layer, name in _sequential_pairs(module)
                  if "replaced_relu" in seq._modules[name].__dict__
                  and getattr(layer, "fused_relu", False)]
    in_sequences = {id(layer) for _, _, layer in relus_back}
    graphs = [m for m in module.modules() if isinstance(m, fx.GraphModule)]
    in_graphs = {id(gm.get_submodule(n.target)) for gm in graphs for n in gm.graph.nodes
                 if n.op == "call_module"}
    for name, m in module.named_modules():
        fused = [what for what, flag in (("ReLU", "fused_relu"),
                                         ("residual", "residual_in_graph"))
                 if getattr(m, flag, False)]
        if fused and id(m) not in in_sequences | in_graphs:
            raise ValueError(
                f"revert_model: {name or 'the module'} has a fused {' and '.join(fused)} "
                "whose nn.Sequential or fuse_relu_traced graph is not inside the module "
                "given; revert the whole model")
    for seq, name, _ in relus_back:
        identity = seq._modules[name]
        seq._modules[name] = identity.__dict__["replaced_relu"].train(identity.training)
    for gm in graphs:
        _unfuse_graph(gm, relu_restored=in_sequences)
    for m in module.modules():
        original = _ORIGINALS.get(_layer_class(m))
        if original is not None:
            for flag in _FUSION_FLAGS:
                m.__dict__.pop(flag, None)
            _switch_class(m, original)
    return module


_ORIGINALS = {new: old for old, new in _REPLACEMENTS.items()}


def _layer_class(m: nn.Module) -> type:
    """What ``m`` is: its class or, for a layer with a parametrization (for which
    torch.nn.utils.parametrize makes a subclass per layer, Parametrized<name>, holding the
    parametrized tensors' properties), the class under that one."""
    cls = type(m)
    if "parametrizations" in m._modules and cls.__module__ == parametrize.__name__:
        return cls.__bases__[0]
    return cls


def _switch_class(m: nn.Module, target: type) -> None:
    """Make ``m`` a ``target`` in place, a parametrization's subclass staying on top."""
    cls = type(m)
    if cls is not _layer_class(m):
        namespace = {k: v for k, v in cls.__dict__.items()
                     if k not in ("__dict__", "__weakref__")}
        target = type(cls.__name__, (target,), namespace)
    m.__class__ = target


def _unfuse_graph(gm: fx.GraphModule, relu_restored: set) -> None:
    """Each call of a tritonbn layer with a residual or a fused ReLU becomes the layer's
    plain call followed by ``+ z`` and ``relu`` (not for a layer in ``relu_restored``,
    whose ReLU module is back after it in its Sequential)."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, (_TritonBatchNorm, _LazyTritonBatchNorm)):
            continue
        relu = layer.fused_relu and id(layer) not in relu_restored
        if len(node.args) < 2 and not relu:
            continue
        with graph.inserting_after(node):
            result = graph.call_module(node.target, node.args[:1])
        result.meta = dict(node.meta)
        if len(node.args) > 1:
            with graph.inserting_after(result):
                result = graph.call_function(operator.add, (result, node.args[1]))
        if relu:
            with graph.inserting_after(result):
                result = graph.call_function(F.relu, (result,))
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
