"""GPU-only: realistic large shapes, autotuned configs, and tensors past 2^31 elements
(64-bit offsets). Skipped on machines without CUDA (conftest skips the ``gpu`` marker).

Memory: the >2^31 cases hold four bf16/fp16 tensors of 4.3 GB (x, dy, y, dx) plus one
channel of float64 temporaries (~4 x 4.3 GB): ~35 GB, fine on an 141 GB H200."""
from __future__ import annotations

import pytest
import torch

import tritonbn
from tests.reference import (Call, assert_close_to_reference, check_call, error_bound,
                             make_params, make_tensor)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape,dtype,layout", [
    ((64, 256, 56, 56), torch.bfloat16, "channels_last"),   # ResNet-50 layer, AMP
    ((32, 128, 28, 28), torch.float32, "contiguous"),
    ((32, 64, 16384), torch.float16, "contiguous"),         # attorch's slow case, fp16
    ((8192, 1024), torch.float32, "contiguous"),            # BatchNorm1d, wide
    ((8, 64, 16, 32, 32), torch.bfloat16, "channels_last"), # channels_last_3d
    ((16, 3, 224, 224), torch.float32, "sliced"),
], ids=["resnet_bf16_cl", "fp32_nchw", "1d_long_fp16", "1d_wide", "3d_bf16_cl", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_large_shapes(shape, dtype, layout, training):
    w, b, rm, rv = make_params(shape[1])
    call = Call(make_tensor(shape, dtype, layout), w, b, rm, rv, training, 0.1, 1e-5,
                make_tensor(shape, dtype, layout))
    check_call(tritonbn.batch_norm, call)


@pytest.mark.parametrize("shape,dtype,layout", [
    ((32, 128, 28, 28), torch.bfloat16, "channels_last"),
    ((4096, 512), torch.float32, "contiguous"),
    ((2, 7, 1001, 13), torch.float16, "contiguous"),
])
def test_autotuned_configs_are_correct(monkeypatch, shape, dtype, layout):
    """With autotuning on, whatever config (tile, warps, split factor) wins must give the
    same results, and tuning trials must not advance the running statistics."""
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    w, b, rm, rv = make_params(shape[1])
    call = Call(make_tensor(shape, dtype, layout), w, b, rm, rv, True, 0.1, 1e-5,
                make_tensor(shape, dtype, layout))
    for _ in range(2):  # first call tunes, second uses the cached choice
        check_call(tritonbn.batch_norm, call)


@pytest.mark.parametrize("shape,dtype", [
    ((32, 2048, 7, 7), torch.bfloat16),   # ResNet-50 l4.b at batch 32: tile 32x64xBLOCK_C
    ((32, 256, 14, 14), torch.float32),   # 32 x 256 = 8192 lanes, the largest tile
    ((512, 1024), torch.float16),         # BatchNorm1d, channels contiguous
], ids=["l4b_bf16", "l3a_fp32_limit", "1d_fp16"])
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_single_pass_kernel_real_shapes(monkeypatch, kernel_launches, shape, dtype, autotune):
    """The single-pass kernel on the shapes it exists for, with the default and the autotuned
    configs: it must be the kernel that runs, and match the reference."""
    monkeypatch.setenv("TRITONBN_AUTOTUNE", autotune)
    w, b, rm, rv = make_params(shape[1])
    call = Call(make_tensor(shape, dtype), w, b, rm, rv, True, 0.1, 1e-5,
                make_tensor(shape, dtype))
    check_call(tritonbn.batch_norm, call)
    assert set(kernel_launches) == {"bn_fused_kernel"}, kernel_launches


def _check_per_channel(x, dy, w, b, rm0, rv0, y, grads, rm, rv, momentum, eps):
    """float64 reference computed one channel at a time (a whole float64 copy of a 2^31
    tensor would be 17 GB per temporary)."""
    C = x.shape[1]
    grad_input, grad_weight, grad_bias = grads
    for c in range(C):
        xc = x.select(1, c).double()
        dyc = dy.select(1, c).double()
        M = xc.numel()
        mean = xc.mean()
        var = (xc - mean).square().mean()
        invstd = (var + eps).rsqrt()
        xhat = (xc - mean) * invstd
        wc, bc = w[c].double(), b[c].double()
        spread = (xc.abs() + mean.abs()) * invstd
        assert_close_to_reference(f"output[:, {c}]", y.select(1, c), xhat * wc + bc,
                                  spread * wc.abs() + bc.abs())
        del spread
        gb = dyc.sum()
        gw = (dyc * xhat).sum()
        l1_dy = dyc.abs().sum()
        l1_dy_xhat = (dyc * xhat).abs().sum()
        assert_close_to_reference(f"grad_bias[{c}]", grad_bias[c:c + 1], gb.view(1),
                                  l1_dy.view(1))
        assert_close_to_reference(f"grad_weight[{c}]", grad_weight[c:c + 1], gw.view(1),
                                  l1_dy_xhat.view(1))
        dx = wc * invstd * (dyc - gb / M - xhat * gw / M)
        terms = wc.abs() * invstd * (dyc.abs() + l1_dy / M + xhat.abs() * l1_dy_xhat / M)
        assert_close_to_reference(f"grad_input[:, {c}]", grad_input.select(1, c), dx, terms)
        del dx, terms, xhat
        new_rm = (1 - momentum) * rm0[c].double() + momentum * mean
        new_rv = (1 - momentum) * rv0[c].double() + momentum * var * M / (M - 1)
        assert_close_to_reference(f"running_mean[{c}]", rm[c:c + 1], new_rm.view(1),
                                  (xc.abs().mean() + rm0[c].double().abs()).view(1))
        assert_close_to_reference(f"running_var[{c}]", rv[c:c + 1], new_rv.view(1),
                                  (2 * ((xc - mean).abs() * xc.abs()).mean()
                                   + rv0[c].double().abs()).view(1))
        del xc, dyc
    torch.cuda.empty_cache()


@pytest.mark.parametrize("shape,dtype,layout", [
    ((4, 4, 2**14, 2**13 + 1), torch.bfloat16, "contiguous"),
    ((4, 4, 2**14, 2**13 + 1), torch.float16, "channels_last"),
    ((2**21 + 3, 1024), torch.bfloat16, "contiguous"),
], ids=["bf16_nchw", "fp16_channels_last", "1d_bf16"])
def test_more_than_2_31_elements(shape, dtype, layout):
    """numel > 2^31: every offset past INT32_MAX must be computed in 64 bits."""
    x = make_tensor(shape, dtype, layout)
    assert x.numel() > 2**31
    dy = make_tensor(shape, dtype, layout)
    w, b, rm, rv = make_params(shape[1])
    rm0, rv0 = rm.clone(), rv.clone()
    xl, wl, bl = (t.detach().requires_grad_() for t in (x, w, b))
    y = tritonbn.batch_norm(xl, rm, rv, wl, bl, True, 0.1, 1e-5)
    grads = torch.autograd.grad(y, [xl, wl, bl], dy)
    del xl
    # The far end of the tensor was written: not left as uninitialised memory.
    assert torch.isfinite(y.flatten()[-1000:].float()).all()
    _check_per_channel(x, dy, w, b, rm0, rv0, y, grads, rm, rv, 0.1, 1e-5)


def test_view_with_offsets_past_2_31():
    """Fewer than 2^31 elements, but a strided view whose last element lies past 2^31."""
    big = torch.randn(2, 4, 2**14, 2**14 + 1, device="cuda", dtype=torch.bfloat16)
    x = big[..., ::2]
    assert x.numel() < 2**31 < x.storage_offset() + sum(
        (s - 1) * st for s, st in zip(x.shape, x.stride()))
    dy = torch.randn_like(x)
    w, b, rm, rv = make_params(4)
    rm0, rv0 = rm.clone(), rv.clone()
    xl, wl, bl = (t.detach().requires_grad_() for t in (x, w, b))
    y = tritonbn.batch_norm(xl, rm, rv, wl, bl, True, 0.1, 1e-5)
    grads = torch.autograd.grad(y, [xl, wl, bl], dy)
    _check_per_channel(x, dy, w, b, rm0, rv0, y, grads, rm, rv, 0.1, 1e-5)


def test_eval_more_than_2_31_elements():
    x = make_tensor((4, 2, 2**15, 2**13 + 1), torch.bfloat16)
    w, b, rm, rv = make_params(2)
    y = tritonbn.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    for c in range(2):
        invstd = (rv[c].double() + 1e-5).rsqrt()
        xc = x.select(1, c).double()
        ref = (xc - rm[c].double()) * invstd * w[c].double() + b[c].double()
        scale = (xc.abs() + rm[c].double().abs()) * invstd * w[c].double().abs() \
            + b[c].double().abs()
        assert bool(((y.select(1, c).double() - ref).abs()
                     <= error_bound(ref, scale, y.dtype)).all()), f"channel {c}"
        del xc, ref, scale


def test_concurrent_streams():
    """Two BatchNorms in flight at once on two CUDA streams (split path: their reductions
    use arrival counters): each must give the bits it gives alone, every time."""
    from tritonbn.kernels import launch

    xs = [make_tensor((64, 256, 28, 28), torch.bfloat16) for _ in range(2)]
    refs = [tritonbn.batch_norm(x, None, None, None, None, True) for x in xs]
    streams = [torch.cuda.Stream() for _ in xs]
    torch.cuda.synchronize()
    for _ in range(20):
        ys = []
        for x, stream in zip(xs, streams):
            with torch.cuda.stream(stream):
                ys.append(tritonbn.batch_norm(x, None, None, None, None, True))
        torch.cuda.synchronize()
        for y, ref in zip(ys, refs):
            assert torch.equal(y, ref)
    buffers = []
    for stream in streams:
        with torch.cuda.stream(stream):
            buffers.append(launch.counters.get(xs[0].device, 1))
    assert buffers[0].data_ptr() != buffers[1].data_ptr()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("fused", ["1", "0"], ids=["single_pass", "split"])
def test_input_on_a_device_that_is_not_current(monkeypatch, fused):
    """An input on cuda:1 while cuda:0 is current: forward and backward run on cuda:1 (on
    its current stream) and give the bits they give with cuda:1 current."""
    monkeypatch.setenv("TRITONBN_FUSED", fused)
    x = make_tensor((32, 256, 14, 14), torch.bfloat16, device="cuda:1").requires_grad_()
    bn = tritonbn.BatchNorm2d(256, device="cuda:1")
    dy = torch.randn_like(x)

    def run():
        y = bn(x)
        y.backward(dy)
        grads = (x.grad.clone(), bn.weight.grad.clone())
        x.grad = bn.weight.grad = bn.bias.grad = None
        return (y.detach(), *grads)

    with torch.cuda.device(1):
        expected = run()
    with torch.cuda.device(0):
        got = run()
    torch.cuda.synchronize(1)
    for g, e in zip(got, expected):
        assert g.device == torch.device("cuda:1") and torch.equal(g, e)
