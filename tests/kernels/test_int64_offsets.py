"""The 64-bit offset path (INT64 constexpr), exercised on small tensors.

Real >2^31-element inputs only fit on a GPU (tests/test_gpu_large.py). Here: a few
elements placed more than 2^31 elements apart in one large allocation that is never
touched beyond them, against torch in float64; and the threshold lowered so that small
inputs take the int64 code path, which must give the int32 path's results bit for bit."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tests.reference import assert_close_to_reference
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


def test_offsets_past_int32_on_a_sparse_view(device, kernel_path):
    """An fp16 (2, C, 4) view whose rows are 2^31 - 1 elements apart, in an 8 GiB
    allocation of which only the pages the view touches are ever written (torch.empty does
    not touch memory; on CPU the rest is never committed). Row 1's offsets pass 2^31: in
    32-bit arithmetic they wrap to about -2^31, which the view's storage offset of 2^31 + 16
    keeps inside the allocation, so offsets computed in 32 bits read the allocation's first
    elements (set to 7) instead of faulting. A training step, forward and backward, against
    torch in float64."""
    C, row_stride, lead = 5, 2**31 - 1, 2**31 + 16
    try:
        storage = torch.empty(lead + row_stride + 4 * C, dtype=torch.float16, device=device)
    except RuntimeError as e:  # no room for 8 GiB of address space (or of GPU memory)
        pytest.skip(f"cannot allocate the 8 GiB storage: {e}")
    storage[:64] = 7.0
    x = storage.as_strided((2, C, 4), (row_stride, 4, 1), storage_offset=lead)
    x.copy_(torch.randn(2, C, 4))
    assert geometry.make_geometry(x).needs_int64
    dy = torch.randn(2, C, 4, device=device).half()

    def step(fn, x, dy):
        x = x.detach().requires_grad_()
        rm = torch.zeros(C, device=device, dtype=torch.float64 if x.dtype == torch.float64
                         else torch.float32)
        rv = torch.ones_like(rm)
        y = fn(x, rm, rv, None, None, True)
        y.backward(dy)
        return y.detach(), x.grad, rm, rv

    got = step(tritonbn.batch_norm, x, dy)
    ref = step(F.batch_norm, x.double(), dy.double())
    # magnitudes of the terms: y = xhat; dx = invstd (dy - mean(dy) - xhat mean(dy xhat));
    # the running statistics are O(1)
    x64, dy64 = x.double(), dy.double()
    invstd = x64.var((0, 2), unbiased=False, keepdim=True).add(1e-5).rsqrt()
    xhat = (x64 - x64.mean((0, 2), keepdim=True)) * invstd
    dx_scale = invstd * (dy64.abs() + dy64.mean((0, 2), keepdim=True).abs()
                         + xhat.abs() * (dy64 * xhat).mean((0, 2), keepdim=True).abs())
    scales = (xhat.abs(), dx_scale, ref[2].abs() + 1, ref[3].abs() + 1)
    for name, g, r, scale in zip(("output", "grad_input", "running_mean", "running_var"),
                                 got, ref, scales):
        assert_close_to_reference(name, g, r, scale)
