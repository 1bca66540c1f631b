"""perf/_network.py: the ResNet training step of GPU mode's end-to-end table, on a small
ResNet (one bottleneck per stage, width 8, 32x32 images) through the kernels (the
interpreter on CPU). The network and its variants must compute what torch's does before
their step times mean anything. (run()'s rows and timing: tests/perf/test_report.py's GPU
pipeline test.)"""
import os

import pytest
import torch

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "perf")


@pytest.fixture
def network(monkeypatch):
    monkeypatch.syspath_prepend(PERF)
    import _network
    return _network


def test_resnet50_has_torchvisions_layers(network):
    """53 BatchNorm layers and 25,557,032 parameters, torchvision's resnet50 counts."""
    model = network.ResNet()
    assert network.batchnorm_layers(model) == 53
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_variants_are_converted_and_fused(network):
    """The variants hold tritonbn's layers; in the fused one every ReLU and shortcut add
    went into a BatchNorm (the stem's ReLU, and in each block bn1's, bn2's and bn3's with
    the add)."""
    base = network.ResNet(**network.SMALL)
    for name in ("tritonbn", "tritonbn_fused"):
        model = network.variant(name, base)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(bns) == 17 and all(type(m).__module__ == "tritonbn.modules" for m in bns)
    calls = [str(n.target) for n in model.graph.nodes if n.op in ("call_module", "call_function")]
    assert not [t for t in calls if "relu" in t or "add" in t], calls
    assert sum(m.fused_relu for m in bns) == 13


def test_variants_train_like_torch(network, device):
    """One fp32 training step of each variant against float64 (network.step_errors: an
    ill-conditioned step, torch's own fp32 gradients 1e-5 to 5e-5 off). Bars, from
    torch's error on the same step (seeds 0-3 measured: the kernels' error over torch's):
    * all gradients together: 2x torch's (measured 0.4x to 1.2x);
    * each parameter's gradient: 4x torch's or 1e-6 (some are 8 values, whose two errors
      are a few roundings each: up to 2.7x measured; the floor, about 8 fp32 ulps, for a
      vector whose torch error happens to be tiny, as the loss's below);
    * the loss, one number, whose torch error can be lucky (3e-8, half an ulp): 2x
      torch's or 1e-6 (about 14 ulps of fp32 at ~6.7).
    A wrong BatchNorm is off by orders of magnitude more (an eps of 2e-5 instead of 1e-5
    in one layer already fails the second bar)."""
    torch_row, *rows = network.step_errors(device)
    assert torch_row["variant"] == "torch" and len(rows) == 2
    for r in rows:
        assert r["loss_rel_err"] <= max(2 * torch_row["loss_rel_err"], 1e-6), r["variant"]
        assert r["grads_rel_err"] <= 2 * torch_row["grads_rel_err"], r["variant"]
        for p, e in r["param_rel_err"].items():
            assert e <= max(4 * torch_row["param_rel_err"][p], 1e-6), (r["variant"], p)
