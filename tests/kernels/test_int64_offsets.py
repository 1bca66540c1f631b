"""The 64-bit offset path (INT64 constexpr), exercised on small tensors.

Real >2^31-element inputs only fit on a GPU (tests/test_gpu_large.py); here the threshold
is lowered so that the same small inputs take the int64 code path, which must give the
same results as the int32 path, bit for bit."""
import torch

import tritonbn
from tritonbn.kernels import geometry


def _train_step(x, dy):
    bn = tritonbn.BatchNorm2d(x.shape[1]).to(x.device)
    x = x.clone().requires_grad_()
    y = bn(x)
    y.backward(dy)
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def test_int64_offsets_match_int32(device, monkeypatch, kernel_path):
    x = torch.randn(3, 5, 7, 9, device=device).to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    as_int32 = _train_step(x, dy)
    seen = []
    make = geometry.make_geometry

    def forced(*tensors):
        geom = make(*tensors)
        seen.append(geom.needs_int64)
        return geom

    monkeypatch.setattr(geometry, "INT32_LIMIT", 16)
    geometry._coalesce.cache_clear()  # geometries are cached per shape and strides
    monkeypatch.setattr(tritonbn.kernels.launch, "make_geometry", forced)
    monkeypatch.setattr(tritonbn.ops.batch_norm, "make_geometry", forced)
    try:
        as_int64 = _train_step(x, dy)
    finally:
        geometry._coalesce.cache_clear()
    assert seen and all(seen), "the int64 path was not taken"
    for a, b in zip(as_int32, as_int64):
        assert torch.equal(a, b)
