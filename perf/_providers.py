"""BatchNorm providers and the four measured phases.

Providers: ``tritonbn`` (fixed default config, TRITONBN_AUTOTUNE=0; the single-pass kernel
serves the shapes it fits, TRITONBN_FUSED=1), ``tritonbn_tuned`` (the same, autotuned,
TRITONBN_AUTOTUNE=1), ``tritonbn_split`` (fixed default config with the single-pass kernel
off, TRITONBN_FUSED=0: the split path, statistics then apply, on every shape, so that the
two paths can be compared on the shapes the single-pass kernel takes), ``torch`` (eager:
cuDNN or PyTorch's native kernels, as torch chooses), ``torch_compile`` (the same torch
module through torch.compile / Inductor), ``apex`` (apex.contrib.groupbn NHWC fp16, only
when importable); and BatchNorm + ReLU: ``tritonbn_relu`` (the ReLU fused into tritonbn's
kernels), ``torch_relu`` (torch's BatchNorm then nn.ReLU), ``torch_compile_relu`` (that
pair through torch.compile, which fuses the ReLU into its own normalize kernel); and
BatchNorm + residual add + ReLU: ``tritonbn_add_relu`` (``bn(x, z)`` with the ReLU fused),
``torch_add_relu`` (torchvision's ``out = bn(x); out += z; relu_(out)``),
``torch_compile_add_relu`` (that through torch.compile).
Every provider is a module with fp32 parameters and running statistics (the AMP set-up).
"""
from __future__ import annotations

import contextlib
import itertools
import os

import torch
from torch import nn

import _shapes as S
import tritonbn

TORCH_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


# Environment tritonbn reads at every call, per tritonbn provider.
TRITONBN_ENV = {
    "tritonbn": {"TRITONBN_AUTOTUNE": "0", "TRITONBN_FUSED": "1"},
    "tritonbn_tuned": {"TRITONBN_AUTOTUNE": "1", "TRITONBN_FUSED": "1"},
    "tritonbn_split": {"TRITONBN_AUTOTUNE": "0", "TRITONBN_FUSED": "0"},
    "tritonbn_relu": {"TRITONBN_AUTOTUNE": "0", "TRITONBN_FUSED": "1"},
    "tritonbn_add_relu": {"TRITONBN_AUTOTUNE": "0", "TRITONBN_FUSED": "1"},
}


def provider_env(provider: str):
    """Sets the environment of a tritonbn provider (TRITONBN_ENV) and restores the previous
    values on exit; other providers run in the environment as it is."""
    return environ(TRITONBN_ENV.get(provider, {}))


@contextlib.contextmanager
def environ(values: dict):
    """Sets the environment variables ``values`` and restores the previous values on exit."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_module(m: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    C = m.num_features
    with torch.no_grad():
        m.weight.copy_(torch.rand(C, generator=g) + 0.5)
        m.bias.copy_(torch.randn(C, generator=g))
        m.running_mean.copy_(torch.randn(C, generator=g))
        m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return m


def apex_available() -> bool:
    try:
        from apex.contrib.groupbn.batch_norm import BatchNorm2d_NHWC  # noqa: F401
        return True
    except Exception:
        return False


class _ApexNHWC(nn.Module):
    """apex groupbn (NHWC, fp16) behind the NCHW-shaped channels_last interface."""

    def __init__(self, C):
        super().__init__()
        from apex.contrib.groupbn.batch_norm import BatchNorm2d_NHWC
        self.bn = BatchNorm2d_NHWC(C)
        self.num_features = C

    def forward(self, x):
        return self.bn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _add_relu(bn: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The end of torchvision's bottleneck block, as torch runs it."""
    out = bn(x)
    out += z
    return torch.relu_(out)


def make(provider: str, ndim: int, C: int, device, dtype_name: str = "fp32", residual=None):
    """(module holding the state, callable forward) for ``provider``. ``residual``: for
    the ADD_RELU_PROVIDERS, a function from an input to the residual added to its
    BatchNorm (each rotated input has its own)."""
    if provider == "apex":
        if ndim != 4 or dtype_name != "fp16" or not apex_available():
            raise NotImplementedError("apex groupbn: fp16 NHWC 2d only, and apex importable")
        m = _ApexNHWC(C).to(device)
        return m, m
    cls = TORCH_CLASSES[ndim]
    if provider.startswith("tritonbn"):
        cls = getattr(tritonbn, cls.__name__)
    m = init_module(cls(C)).to(device)
    if provider == "tritonbn_relu":
        m.fused_relu = True
        return m, m
    if provider == "tritonbn_add_relu":
        m.fused_relu = True
        return m, lambda x: m(x, residual(x))
    if provider in S.ADD_RELU_PROVIDERS:
        body = torch.compile(_add_relu, dynamic=False) if "compile" in provider else _add_relu
        return m, lambda x: body(m, x, residual(x))
    fwd = nn.Sequential(m, nn.ReLU()) if provider in S.RELU_PROVIDERS else m
    if provider.startswith("torch_compile"):
        return m, torch.compile(fwd, dynamic=False)
    return m, fwd


def params(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def phase_callable(phase: str, m: nn.Module, fwd, xs: list, dys: list, zs=None):
    """A no-argument callable running ``phase`` once, on the next of the rotated inputs.

    train_fwd: forward in training mode with autograd recording (as in training);
    eval_fwd: forward in eval mode under no_grad; bwd: backward only, through the autograd
    graph of forwards made here (retained); fwd_bwd: forward then backward. ``zs``: the
    residuals of the rotated inputs, whose gradients the backward computes too."""
    order = itertools.cycle(range(len(xs)))
    ps = params(m)
    zs = zs or [None] * len(xs)

    def wrt(j):
        return [xs[j], *ps] + ([zs[j]] if zs[j] is not None else [])
    if phase == "train_fwd":
        m.train()
        return lambda: fwd(xs[next(order)])
    if phase == "eval_fwd":
        m.eval()

        def run():
            with torch.no_grad():
                return fwd(xs[next(order)])
        return run
    m.train()
    if phase == "bwd":
        ys = [fwd(x) for x in xs]

        def run():
            j = next(order)
            return torch.autograd.grad(ys[j], wrt(j), dys[j], retain_graph=True)
        return run
    if phase == "fwd_bwd":
        def run():
            j = next(order)
            y = fwd(xs[j])
            return torch.autograd.grad(y, wrt(j), dys[j])
        return run
    raise ValueError(phase)
