"""``fuse_relu_traced``: BatchNorm + ReLU fusion for models whose ReLUs are called from
``forward`` (torchvision's ResNet: ``out = self.relu(self.bn1(out))``), which
``convert_model(..., fuse_relu=True)`` cannot see. The model is traced with torch.fx."""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import _FUSABLE, _TritonBatchNorm, _take_relu, convert_model

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


class _Tracer(fx.Tracer):
    """Keeps tritonbn's layers as leaves, as torch.fx does torch.nn's own."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return (isinstance(m, (_TritonBatchNorm, *_FUSABLE))
                or super().is_leaf_module(m, qualified_name))


def fuse_relu_traced(model: nn.Module) -> fx.GraphModule:
    """Convert ``model`` in place (convert_model), trace it with torch.fx, and fuse every
    BatchNorm whose output goes to a ReLU and nowhere else: the layer gets ``fused_relu``
    and the ReLU leaves the graph. Returns the traced GraphModule, which holds the very
    same submodules and parameters (same state_dict keys). A BatchNorm module called more
    than once in the graph is left alone, as is one whose output is also used elsewhere
    (a residual branch, say). Models that torch.fx cannot trace raise its error."""
    convert_model(model)
    gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules) or not node.args:
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        if (calls[source.target] == 1 and len(source.users) == 1
                and _take_relu(modules[source.target])):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm

