"""A ResNet-50 training step end to end: the same network and batch with torch's BatchNorm
and with tritonbn's, timed step after step as a training loop runs them.

The per-layer tables say where tritonbn's kernels are faster; a whole network says whether
a user's step is. It adds what they leave out: the host time of 53 BatchNorm calls per
forward in eager mode (a step is host-bound when the CPU issues its work more slowly than
the GPU runs it), the convolutions, which BatchNorm does not change, and the ReLUs and
shortcut adds that only a network has for fuse_relu_traced to fuse.

Variants, from one set of initial weights (copies) on one batch:
  torch           torchvision's ResNet-50 (v1.5) architecture, torch.nn.BatchNorm2d
  tritonbn        tritonbn.convert_model(model)
  tritonbn_fused  tritonbn.fuse_relu_traced(convert_model(model)): in each bottleneck bn1
                  and bn2 take their ReLU and bn3 the shortcut add and the ReLU
A step: forward (under torch.autocast for bf16), cross-entropy loss, backward, gradients
set to None; no optimizer step, the same for every variant. channels_last, the layout of
fast convolutions.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from _providers import environ

VARIANTS = ("torch", "tritonbn", "tritonbn_fused")
# (batch, dtype): bf16 is autocast's mixed precision (convolutions in bf16, BatchNorm on
# bf16 activations with fp32 parameters), fp32 everything in fp32 with torch's defaults
# (cuDNN convolutions may use TF32: torch.backends.cudnn.allow_tf32)
CONFIGS = ((32, "bf16"), (128, "bf16"), (32, "fp32"))
QUICK_CONFIGS = ((32, "bf16"),)
RESNET50_BLOCKS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1, 3x3 (with the stride), 1x1 to 4x the width,
    ``out += identity`` and one ReLU module used three times."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with bottleneck blocks (torchvision is not on the GPU image);
    ``width`` 64 and ``blocks`` (3, 4, 6, 3) make ResNet-50, smaller ones the tests'
    network."""

    def __init__(self, blocks=RESNET50_BLOCKS, width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], width
        for k, n in enumerate(blocks):
            planes = width * 2 ** k
            stage = []
            for b in range(n):
                stage.append(Bottleneck(inplanes, planes, 2 if b == 0 and k > 0 else 1))
                inplanes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def batchnorm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def variant(name: str, base: nn.Module) -> nn.Module:
    """A copy of ``base`` as variant ``name`` (see the module docstring)."""
    model = copy.deepcopy(base)
    if name == "torch":
        return model
    model = tritonbn.convert_model(model)
    return tritonbn.fuse_relu_traced(model) if name == "tritonbn_fused" else model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_busy_ms(step) -> float:
    """Sum of the CUDA kernel times of one ``step()`` (torch.profiler; one stream, so the
    GPU's busy time)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.time_range.elapsed_us() for e in prof.events()
               if getattr(e, "device_type", None) == cuda) / 1e3


def measure(model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: str,
            warmup: int, steps: int, repeats: int) -> dict:
    """Step times of ``model`` on (x, target): wall time of ``steps`` consecutive steps
    (the host runs ahead of the GPU as in training; synchronised at both ends) over
    ``repeats`` repeats, after ``warmup`` steps (the first compiles the kernels: its wall
    time is ``first_step_s``). On a GPU also ``gpu_busy_ms``, the kernel time of one step:
    a step_ms well above it is time the GPU waited for the host (Python). Also the first
    step's loss and conv1's weight gradient."""
    device = x.device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        return loss

    _sync(device)
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    out = dict(first_step_s=round(time.perf_counter() - t0, 2), loss=float(loss.detach()),
               conv1_grad=model.conv1.weight.grad.detach().double().clone())
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3 / steps)
    out.update(step_ms=statistics.median(times), step_ms_min=min(times))
    if device.type == "cuda":
        out["gpu_busy_ms"] = _gpu_busy_ms(step)
    return out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


SMALL = dict(blocks=(1, 1, 1, 1), width=8)  # 17 BatchNorms: through the interpreter


def _loss_and_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


def float64_step(base: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """The first training step in float64 with torch's BatchNorm, which every variant is
    measured against: (loss, {parameter name: gradient})."""
    return _loss_and_grads(copy.deepcopy(base).double(), x.double(), target)


def _problem(device: torch.device, batch: int, image: int, seed: int = 0, **net):
    """(network, images, labels) from ``seed``: ResNet(**net) and a batch, channels_last."""
    torch.manual_seed(seed)
    base = ResNet(**net).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image, image, device=device).to(
        memory_format=torch.channels_last)
    return base, x, torch.randint(0, 1000, (batch,), device=device)


def step_errors(device: str, batch: int = 4, image: int = 32, seed: int = 0,
                **net) -> list[dict]:
    """One fp32 training step of a small ResNet (``net``: ResNet's arguments, SMALL by
    default) for each variant against the same step in float64 (torch's BatchNorm): one
    row per variant with loss_rel_err, grads_rel_err (every parameter's gradient together,
    each scaled by its float64 norm) and param_rel_err (each parameter's, by name). With a
    batch of 4 at 32x32 the last stage's BatchNorms see 4 values per channel: an
    ill-conditioned step, where torch's own fp32 gradients are 1e-5 to 5e-5 off float64;
    torch's row is the bar. On a GPU the convolutions run in fp32 (no TF32), so that
    their error does not drown BatchNorm's."""
    base, x, target = _problem(torch.device(device), batch, image, seed, **(net or SMALL))
    ref_loss, ref = float64_step(base, x, target)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        rows = []
        for name in VARIANTS:
            loss, grads = _loss_and_grads(variant(name, base), x, target)
            scaled = [torch.cat([g[p].flatten() / ref[p].norm() for p in ref])
                      for g in (grads, ref)]
            rows.append(dict(variant=name, batch=batch, image=image, seed=seed,
                             batchnorm_layers=batchnorm_layers(base),
                             loss_rel_err=_rel(loss, ref_loss),
                             grads_rel_err=_rel(*scaled),
                             param_rel_err={p: _rel(grads[p], ref[p]) for p in ref}))
        return rows
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def run(device: str = "cuda", configs=CONFIGS, image: int = 224, blocks=RESNET50_BLOCKS,
        width: int = 64, warmup: int = 3, steps: int = 10, repeats: int = 3,
        autotune: bool = False, log=lambda m: None, rows: list | None = None) -> list[dict]:
    """One row per (config, variant), appended to ``rows`` as it is measured (a caller that
    stops the run keeps them): step_ms (median of ``repeats``), gpu_busy_ms (see
    measure), images_per_s, first_step_s, speedup_vs_torch, and the first step's loss
    and conv1 weight gradient as relative errors against the same step in float64
    (loss_rel_err, conv1_grad_rel_err: torch's row gives the scale of its own rounding,
    bf16 autocast's included, for tritonbn's rows to be read against); or an error.
    tritonbn runs its fixed default configs unless ``autotune`` (first-call autotuning of
    every layer shape would take minutes)."""
    rows = [] if rows is None else rows
    dev = torch.device(device)
    model_name = ("resnet50" if (tuple(blocks), width) == (RESNET50_BLOCKS, 64)
                  else f"resnet{3 * sum(blocks) + 2}_width{width}")
    with environ({"TRITONBN_AUTOTUNE": "1" if autotune else "0"}):
        for batch, dtype in configs:
            base, x, target = _problem(dev, batch, image, blocks=blocks, width=width)
            ref_loss, ref = float64_step(base, x, target)
            torch_ms = None
            for name in VARIANTS:
                row = dict(model=model_name, batch=batch, image=image, dtype=dtype,
                           layout="channels_last", variant=name,
                           batchnorm_layers=batchnorm_layers(base), autotune=autotune)
                try:
                    m = measure(variant(name, base), x, target, dtype, warmup, steps, repeats)
                    grad = m.pop("conv1_grad")
                    row.update(m, images_per_s=batch / m["step_ms"] * 1e3,
                               loss_rel_err=abs(m["loss"] - float(ref_loss)) / abs(float(ref_loss)),
                               conv1_grad_rel_err=_rel(grad, ref["conv1.weight"]))
                    if name == "torch":
                        torch_ms = m["step_ms"]
                    elif torch_ms:
                        row["speedup_vs_torch"] = torch_ms / m["step_ms"]
                except Exception as e:  # out of memory, a failed trace ...: recorded
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                finally:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                log(f"network {model_name} batch {batch} {dtype} {name}: "
                    + (f"{row['step_ms']:.2f} ms/step" if "step_ms" in row else row["error"]))
    return rows
