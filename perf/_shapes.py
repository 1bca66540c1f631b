"""Shapes, layouts and dtypes measured by perf/report.py.

A case is one BatchNorm input: family, a readable name, the shape, the memory layout and
the dtype. Layout names say where the channel sits in memory: NCHW / NCDHW are contiguous,
NHWC / NDHWC are torch.channels_last / channels_last_3d, NC and NCL are BatchNorm1d.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PHASES = ("train_fwd", "bwd", "fwd_bwd", "eval_fwd")
# Full N*C*L passes: read x + write y (forward); read x, dy + write dx (backward).
MIN_PASSES = {"train_fwd": 2, "eval_fwd": 2, "bwd": 3, "fwd_bwd": 5}
# PyTorch's native CUDA kernels (aten/src/ATen/native/cuda/Normalization.cuh): statistics
# read x, the transform reads x and writes y; backward reads x and dy twice and writes dx.
# Eval forward is one elementwise pass.
TORCH_NATIVE_PASSES = {"train_fwd": 3, "eval_fwd": 2, "bwd": 5, "fwd_bwd": 8}

# ResNet-50 (torchvision, 224x224 input): the 12 distinct BatchNorm2d shapes (C, H=W) and
# how many of the network's 53 BatchNorm layers have each.
RESNET50_BN = (
    ("stem", 64, 112, 1), ("l1.a", 64, 56, 6), ("l1.b", 256, 56, 4),
    ("l2.a0", 128, 56, 1), ("l2.a", 128, 28, 7), ("l2.b", 512, 28, 5),
    ("l3.a0", 256, 28, 1), ("l3.a", 256, 14, 11), ("l3.b", 1024, 14, 7),
    ("l4.a0", 512, 14, 1), ("l4.a", 512, 7, 5), ("l4.b", 2048, 7, 4),
)
# Layers used where only a few ResNet-50 shapes fit the time budget (large to small HW).
RESNET50_FEW = ("stem", "l1.b", "l3.b", "l4.b")


# BatchNorm followed by ReLU: tritonbn with the ReLU fused in (convert_model fuse_relu),
# torch's BatchNorm then nn.ReLU, and that pair through torch.compile. Compared with one
# another only; their cases have a family ending in "+relu".
RELU_PROVIDERS = ("tritonbn_relu", "torch_relu", "torch_compile_relu")
# ResNet's block ending, relu(bn3(x) + identity): tritonbn with the add and the ReLU fused
# in (``bn(x, z)``, fuse_relu_traced), torch's BatchNorm then ``out += z`` and an in-place
# ReLU (torchvision's code), and that through torch.compile. Compared with one another
# only; their cases have a family ending in "+add_relu".
ADD_RELU_PROVIDERS = ("tritonbn_add_relu", "torch_add_relu", "torch_compile_add_relu")
# Minimal passes with the residual: z read in the forward, dz written in the backward.
MIN_PASSES_ADD = {"train_fwd": 3, "eval_fwd": 3, "bwd": 4, "fwd_bwd": 7}


def peers(provider: str) -> tuple:
    """The providers ``provider`` is compared with: same computation, BatchNorm alone or
    with the ReLU, or with the residual add and the ReLU."""
    for group in (RELU_PROVIDERS, ADD_RELU_PROVIDERS):
        if provider in group:
            return group
    return ()


def min_passes(family: str, phase: str) -> int:
    return (MIN_PASSES_ADD if family.endswith("+add_relu") else MIN_PASSES)[phase]


@dataclass(frozen=True)
class Case:
    family: str          # resnet50_b256, resnet50_b32, bn1d, bn3d, small_c, cpu
    name: str
    shape: tuple
    layout: str
    dtype: str
    count: int = 1       # occurrences in the model (ResNet-50), for whole-network sums
    providers: tuple = field(default=("tritonbn", "torch"))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def elem_size(self) -> int:
        return torch.empty(0, dtype=DTYPES[self.dtype]).element_size()

    @property
    def label(self) -> str:
        return f"{self.family}/{self.name} {'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NHWC":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "NDHWC":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


def empty(shape, layout: str, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised tensor of ``shape`` laid out as ``layout`` (meta tensors too)."""
    fmt = {"NHWC": torch.channels_last, "NDHWC": torch.channels_last_3d}.get(layout)
    if fmt is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def resnet50_cases(batch: int, dtype: str, layers=None, layouts=("NCHW", "NHWC"),
                   providers=("tritonbn", "torch")) -> list[Case]:
    out = []
    for layout in layouts:
        for name, c, hw, count in RESNET50_BN:
            if layers is None or name in layers:
                out.append(Case(f"resnet50_b{batch}", name, (batch, c, hw, hw), layout, dtype,
                                count, tuple(providers)))
    return out


def gpu_cases(quick: bool = False, autotune: str = "subset", compile_: bool = True):
    """GPU-mode cases in priority order (the time budget cuts from the end): first one case
    of each group below (family, dtype, layout and providers), so that a short budget still
    reaches every kind, then the rest in the order below.

    The whole of ResNet-50 at batch 256 in bf16 (the usual AMP dtype), ResNet-50 at batch 32
    in bf16 (also with the split path, tritonbn_split: the single-pass kernel takes its NCHW
    l3.* and l4.* layers, and the other layers, where both run the split path, complete the
    whole-network sums), fp32 and fp16 on four layers at batch 256, torch.compile on two layers
    (its compile time is large), BatchNorm1d with large batches, BatchNorm3d video shapes,
    small C with large spatial size, BatchNorm + ReLU and BatchNorm + residual + ReLU on two
    channels_last layers (RELU_PROVIDERS, ADD_RELU_PROVIDERS), and last the autotuned
    tritonbn on one layer (first-call tuning compiles and times every candidate config)."""
    if quick:
        cases = resnet50_cases(256, "bf16", layers=("l1.b", "l4.b"))
        cases += [Case("bn1d", "N=1M C=32", (1_000_000, 32), "NC", "bf16")]
        return cases
    cases = resnet50_cases(256, "bf16")
    cases += resnet50_cases(32, "bf16", providers=("tritonbn", "tritonbn_split", "torch"))
    for dt in ("fp32", "fp16"):
        cases += resnet50_cases(256, dt, layers=RESNET50_FEW)
    if compile_:
        cases += resnet50_cases(256, "bf16", layers=("l1.b", "l3.b"), providers=("torch_compile",))
    for n, c, dts in ((65_536, 256, ("bf16",)), (1_000_000, 32, ("bf16", "fp32")),
                      (1_000_000, 256, ("bf16",)), (262_144, 1024, ("bf16", "fp32")),
                      (1_000_000, 1024, ("bf16",))):
        for dt in dts:
            cases.append(Case("bn1d", f"N={n} C={c}", (n, c), "NC", dt))
    for shape in ((8, 64, 16, 56, 56), (8, 256, 8, 28, 28), (8, 512, 4, 14, 14)):
        for layout in ("NCDHW", "NDHWC"):
            cases.append(Case("bn3d", f"C={shape[1]}", shape, layout, "bf16"))
    for shape in ((16, 3, 256, 256), (8, 8, 512, 512)):
        for layout in ("NCHW", "NHWC"):
            cases.append(Case("small_c", f"C={shape[1]} L={shape[2] * shape[3]}", shape,
                              layout, "bf16"))
    cases.append(Case("small_c", "C=4 L=65536", (32, 4, 65536), "NCL", "bf16"))
    for group, suffix in ((RELU_PROVIDERS, "+relu"), (ADD_RELU_PROVIDERS, "+add_relu")):
        providers = group if compile_ else group[:2]  # [2]: the torch.compile one
        cases += [replace(c, family=c.family + suffix)
                  for c in resnet50_cases(256, "bf16", layers=("l1.b", "l3.b"),
                                          layouts=("NHWC",), providers=providers)]
    if autotune == "subset":
        cases += resnet50_cases(256, "bf16", layers=("l1.b",), providers=("tritonbn_tuned",))
    elif autotune == "all":
        cases = [Case(c.family, c.name, c.shape, c.layout, c.dtype, c.count,
                      c.providers + ("tritonbn_tuned",) if "tritonbn" in c.providers
                      else c.providers) for c in cases]
    return _one_of_each_first(cases)


def _one_of_each_first(cases: list) -> list:
    seen, first, rest = set(), [], []
    for c in cases:
        group = (c.family, c.dtype, c.layout, c.providers)
        (rest if group in seen else first).append(c)
        seen.add(group)
    return first + rest


def grid_model_cases() -> list[Case]:
    """Every GPU-mode shape, in every dtype width (fp32 and 16-bit), for the program-count
    model of CPU mode. A shape that GPU mode also times with a fused epilogue
    ("resnet50_b256+relu") is listed under its plain family: the BatchNorm kernels'
    grids are the same, and the ResNet-50 plots look layers up by the plain family."""
    seen, out = set(), []
    for c in gpu_cases(autotune="off", compile_=False):
        for dt in ("fp32", "bf16"):
            key = (c.shape, c.layout, dt)
            if key not in seen:
                seen.add(key)
                out.append(Case(c.family.split("+")[0], c.name, c.shape, c.layout, dt,
                                c.count))
    return out


# CPU mode: small shapes the interpreter runs in about a second; sizes not powers of two so
# that masked tails are exercised.
CPU_SHAPES = (
    ("bn2d", (4, 16, 14, 14), "NCHW"),
    ("bn2d", (4, 16, 14, 14), "NHWC"),
    ("bn1d", (640, 24), "NC"),
    ("bn1d", (8, 12, 100), "NCL"),
    ("bn3d", (2, 8, 4, 10, 10), "NCDHW"),
    ("bn3d", (2, 8, 4, 10, 10), "NDHWC"),
)
CPU_QUICK_LAYOUTS = ("NCHW", "NHWC")


def cpu_cases(quick: bool) -> list[Case]:
    dtypes = ("fp32", "bf16") if quick else ("fp32", "bf16", "fp16")
    out = []
    for family, shape, layout in CPU_SHAPES:
        if quick and layout not in CPU_QUICK_LAYOUTS:
            continue
        for dt in dtypes:
            out.append(Case(family, layout, shape, layout, dt))
    return out
