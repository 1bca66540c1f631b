"""``fuse_relu_traced``: BatchNorm + ReLU fusion, and BatchNorm + residual add (+ ReLU)
fusion, for models whose ReLUs and additions are written in ``forward`` (torchvision's
ResNet: ``out = self.relu(self.bn1(out))`` and ``out = self.bn3(...); out += identity;
out = self.relu(out)``), which ``convert_model(..., fuse_relu=True)`` cannot see. The
model is traced with torch.fx."""
from __future__ import annotations

import collections
import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import (_FUSABLE, BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm,
                      _fusable_relu_module, _hooked, _TritonBatchNorm, _take_relu,
                      convert_model)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, torch.add)
_INPLACE_ADDS = ((operator.iadd, "call_function"), ("add_", "call_method"))
# Functions that write into an argument (besides torch's trailing-underscore ones).
_WRITES = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
           operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
           operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
# Layers whose forward takes a residual. Not the lazy ones: their first call hands every
# argument to initialize_parameters, which takes the input alone.
_TAKES_RESIDUAL = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


def _fusable_relu(node: fx.Node, modules: dict) -> bool:
    """A ReLU call that a BatchNorm may take over (a module: _fusable_relu_module)."""
    if node.op == "call_module":
        return _fusable_relu_module(modules[node.target])
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _writes(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` may write into a tensor: an in-place method or function (trailing
    underscore, ``+=``, item assignment, ``inplace=True``) or a module built in place."""
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return (node.target in _WRITES or _inplace_argument(node)
                or getattr(node.target, "__name__", "").endswith("_"))
    return node.op == "call_module" and getattr(modules[node.target], "inplace", False) is True


def _inplace_argument(node: fx.Node) -> bool:
    """A call with ``inplace=True``, given by keyword or by position (``F.relu(x, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, arguments it refuses
        return False
    return bound.arguments.get("inplace") is True


def _safe_to_delay(bn_node: fx.Node, add_node: fx.Node, modules: dict) -> bool:
    """Whether the BatchNorm call ``bn_node`` may move down to ``add_node``: nothing in
    between may write into a tensor (its input, or a view of it) or read the layer's own
    parameters and buffers, which its training call updates (fx reads a buffer through
    its own name or, when the tracer met the tensor itself, a ``_tensor_constant``)."""
    root = bn_node.graph.owning_module
    state = {t.untyped_storage().data_ptr()
             for t in modules[bn_node.target].state_dict(keep_vars=True).values()}
    node = bn_node.next
    while node is not add_node:
        if _writes(node, modules):
            return False
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(root)
            if not isinstance(value, torch.Tensor) or (
                    value.untyped_storage().data_ptr() in state):
                return False
        node = node.next
    return True


def _add_operands(node: fx.Node) -> list:
    """The operands a BatchNorm output may take in ``node`` when it is a plain addition of
    two values (no alpha): both for ``a + b``, only the first for the in-place ``a += b``
    and ``a.add_(b)`` (the tensor they update; fusing ``b`` would leave ``a`` unchanged)."""
    if node.kwargs or len(node.args) != 2:
        return []
    if (node.target, node.op) in _INPLACE_ADDS:
        return [0]
    if ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target == "add")):
        return [0, 1]
    return []


class _Tracer(fx.Tracer):
    """Keeps tritonbn's layers as leaves, as torch.fx does torch.nn's own."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return (isinstance(m, (_TritonBatchNorm, *_FUSABLE))
                or super().is_leaf_module(m, qualified_name))


def fuse_relu_traced(model: nn.Module, add: bool = True) -> fx.GraphModule:
    """Convert ``model`` in place (convert_model), trace it with torch.fx, and fuse:

    * every BatchNorm whose output goes to a ReLU and nowhere else: the layer gets
      ``fused_relu`` and the ReLU leaves the graph;
    * with ``add``, every BatchNorm whose output goes to an addition and nowhere else
      (``bn(x) + z``, ``z + bn(x)``, ``out += z``): the layer is called as ``bn(x, z)``
      and adds z in the kernel that writes its output; when the sum goes to a ReLU and
      nowhere else, that ReLU is fused too (ResNet's ``relu(bn3(out) + identity)``). At run
      time a z of another shape or dtype (a broadcast, say) is added by torch instead.

    Returns the traced GraphModule, which holds the very same submodules and parameters
    (same state_dict keys); call it, not ``model``, from then on: the shared layers now
    apply the fused ReLUs and adds, which ``model``'s own forward applies again. A
    BatchNorm module called more than once in the graph is left alone, as is one whose
    output is also used elsewhere, a BatchNorm or ReLU module with hooks (or any, while
    global module hooks are registered), and an addition before which something writes
    into a tensor or reads the layer's parameters or buffers after its call (the fused
    call happens at the addition). Models that torch.fx cannot trace raise its error."""
    convert_model(model)
    traced = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    gm = _adopt_model_state(traced, model)
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def sole_call(node) -> bool:
        """A call of a BatchNorm module called once, whose output has this one user."""
        return (isinstance(node, fx.Node) and node.op == "call_module"
                and calls[node.target] == 1 and len(node.users) == 1)

    erased: set = set()
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        if _fusable_relu(node, modules) and node.args:
            source = node.args[0]
            if sole_call(source) and _take_relu(modules[source.target]):
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
        elif add:
            erased.update(_fuse_add(gm.graph, node, modules, sole_call))
    gm.graph.lint()
    gm.recompile()
    return gm


def _adopt_model_state(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """``gm`` holding ``model``'s own children, parameters and buffers, in their order:
    GraphModule keeps only what the traced forward uses (in new containers), which would
    drop an auxiliary head or a buffer read elsewhere from the state_dict, so that the
    model's checkpoints would no longer load."""
    for table in ("_modules", "_parameters", "_buffers"):
        own = getattr(gm, table)
        merged = dict(getattr(model, table))
        merged.update((k, v) for k, v in own.items() if k not in merged)
        own.clear()
        own.update(merged)
    gm._non_persistent_buffers_set |= model._non_persistent_buffers_set
    return gm


def _fuse_add(graph: fx.Graph, node: fx.Node, modules: dict, sole_call) -> tuple:
    """Fold the addition ``node`` (and a ReLU after it) into the BatchNorm call that feeds
    it, when there is one that can take it; returns the nodes it erased. The new call goes
    where the addition was, the first place where both operands exist."""
    for pos in _add_operands(node):
        bn_node, other = node.args[pos], node.args[1 - pos]
        if not (sole_call(bn_node) and isinstance(other, fx.Node) and other is not bn_node
                and len(bn_node.args) == 1 and not bn_node.kwargs):
            continue
        bn = modules[bn_node.target]
        if type(bn) not in _TAKES_RESIDUAL or bn.fused_relu:
            continue  # relu(bn(x)) + z is not relu(bn(x) + z)
        if _hooked(bn) or not _safe_to_delay(bn_node, node, modules):
            continue
        with graph.inserting_before(node):
            fused = graph.call_module(bn_node.target, (bn_node.args[0], other))
        bn.residual_in_graph = True  # revert_model must find the graph to undo this
        result = node
        relu = next(iter(node.users)) if len(node.users) == 1 else None
        if (relu is not None and _fusable_relu(relu, modules) and relu.args[0] is node
                and _take_relu(bn)):
            result = relu
        result.replace_all_uses_with(fused)
        dead = tuple(dict.fromkeys((result, node, bn_node)))
        for n in dead:
            graph.erase_node(n)
        return dead
    return ()
