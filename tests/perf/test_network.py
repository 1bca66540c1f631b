"""perf/_network.py: the ResNet training step of GPU mode's end-to-end table, on a small
ResNet (one bottleneck per stage, width 8, 32x32 images) through the kernels (the
interpreter on CPU). The network and its variants must compute what torch's does before
their step times mean anything."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import tritonbn

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "perf")
SMALL = dict(blocks=(1, 1, 1, 1), width=8)


@pytest.fixture
def network(monkeypatch):
    monkeypatch.syspath_prepend(PERF)
    import _network
    return _network


def _loss_and_grads(model, x, target):
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


def test_resnet50_has_torchvisions_layers(network):
    """53 BatchNorm layers and 25,557,032 parameters, torchvision's resnet50 counts."""
    model = network.ResNet()
    assert network.batchnorm_layers(model) == 53
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_variants_train_like_torch(network, device, monkeypatch):
    """One training step of each variant against the same network in float64. The
    gradients pass through every BatchNorm backward, and with a batch of 4 the last
    stage's BatchNorms see 4 values per channel: ill-conditioned, torch's own fp32
    gradients are 1e-5 to 5e-5 off float64. Bars, from torch's fp32 error on the same
    step (seeds 0-3 measured: the kernels' error over torch's):
    * all gradients together (each parameter's scaled by its float64 norm): 2x torch's
      (measured 0.4x to 1.2x);
    * each parameter's gradient: 4x torch's or 1e-6 (some are 8 values, whose two errors
      are a few roundings each: up to 2.7x measured; the floor, about 8 fp32 ulps, for a
      vector whose torch error happens to be tiny, as the loss's below);
    * the loss, one number, whose torch error can be lucky (3e-8, half an ulp): 2x
      torch's or 1e-6 (about 14 ulps of fp32 at ~6.7).
    A wrong BatchNorm is off by orders of magnitude more. On a GPU the convolutions run
    in fp32 (no TF32), so that their error does not drown BatchNorm's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    base = network.ResNet(**SMALL).to(device, memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (4,), device=device)
    ref_loss, ref = _loss_and_grads(copy.deepcopy(base).double(), x.double(), target)
    torch_loss, torch_grads = _loss_and_grads(network.variant("torch", base), x, target)

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()

    def err_all(grads):
        return err(torch.cat([grads[p].flatten() / ref[p].norm() for p in ref]),
                   torch.cat([ref[p].flatten() / ref[p].norm() for p in ref]))

    for name in ("tritonbn", "tritonbn_fused"):
        model = network.variant(name, base)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(bns) == 17 and all(type(m).__module__ == "tritonbn.modules" for m in bns)
        if name == "tritonbn_fused":  # every ReLU and shortcut add went into a BatchNorm
            calls = [str(n.target) for n in model.graph.nodes
                     if n.op in ("call_module", "call_function")]
            assert not [t for t in calls if "relu" in t or "add" in t], calls
            assert sum(m.fused_relu for m in bns) == 13  # the stem's, 3 in each block
        loss, grads = _loss_and_grads(model, x, target)
        assert err(loss, ref_loss) <= max(2 * err(torch_loss, ref_loss), 1e-6), name
        assert err_all(grads) <= 2 * err_all(torch_grads), name
        for p in ref:
            assert err(grads[p], ref[p]) <= max(4 * err(torch_grads[p], ref[p]), 1e-6), (
                name, p)


def test_run_gives_a_row_per_variant(network, device):
    """run(): step times, errors against float64 and speedups for every variant, no error
    (the errors' values are test_variants_train_like_torch's subject: here the last
    stage's BatchNorms see 2 values per channel and the gradient is mostly rounding)."""
    rows = network.run(device, configs=((2, "fp32"),), image=32, warmup=1, steps=1,
                       repeats=1, **SMALL)
    assert [r["variant"] for r in rows] == list(network.VARIANTS)
    assert not [r for r in rows if "error" in r], rows
    assert all(r["step_ms"] > 0 and r["batchnorm_layers"] == 17 for r in rows)
    assert all(math.isfinite(r["loss_rel_err"]) and math.isfinite(r["conv1_grad_rel_err"])
               for r in rows)
    assert all("speedup_vs_torch" in r for r in rows[1:])
    assert ("gpu_busy_ms" in rows[0]) == (device == "cuda")
    assert os.environ.get("TRITONBN_AUTOTUNE") == "0"  # restored (conftest's setting)
