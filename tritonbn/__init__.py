"""tritonbn: Batch Normalization for PyTorch in Triton kernels.

Architecture: modules (modules.py) -> functional API (functional.py) -> custom operators
with autograd (ops/batch_norm.py) -> launchers (kernels/launch.py) -> Triton kernels
(kernels/stats.py, kernels/grad_stats.py, kernels/apply.py, kernels/fused.py);
SyncBatchNorm: modules.py -> ops/sync_batch_norm.py -> the same launchers. Model
conversion: modules.convert_model, fx.fuse_relu_traced (BatchNorm + ReLU through torch.fx),
and back to torch's classes: modules.revert_model.
"""
from .functional import batch_norm, runs_on_triton
from .fx import fuse_relu_traced
from .kernels.launch import autotune_enabled, chosen_configs
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d,
                      LazyBatchNorm3d, SyncBatchNorm, convert_model, revert_model)

__all__ = ["batch_norm", "runs_on_triton", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "SyncBatchNorm",
           "convert_model", "revert_model", "fuse_relu_traced", "chosen_configs",
           "autotune_enabled"]
__version__ = "0.1.0"
