"""tritonbn.SyncBatchNorm: statistics over every rank's batch (ops/sync_batch_norm.py).

Each case starts one process per rank (tests/ops/sync_worker.py: Gloo, CPU tensors, Triton
interpreter, also on a GPU machine) on uneven slices of one batch, two training steps and
an eval forward. What the ranks computed together must be what one BatchNorm computes on
the whole batch: checked against torch's BatchNorm in float64 on the concatenated batch
(outputs, grad_input, running statistics), and grad_weight / grad_bias of each rank
against the float64 sums over its own slice (local, as torch's SyncBatchNorm leaves them
for DDP to reduce). Double backward raises. Single-process behaviour (no process group)
is a BatchNorm.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tests.ops.ranks import run_ranks
from tests.reference import assert_close_to_reference, make_params


CASES = {
    # fp32, two ranks with different batch sizes, exponential running average
    "fp32_2ranks": dict(rows=[3, 5], sample=(4, 5, 6), dtype=torch.float32,
                        channels_last=False, momentum=0.1),
    # AMP-style bf16 input with fp32 parameters, channels_last, cumulative average, and a
    # rank with an empty batch, which must still join the collectives
    "bf16_cl_3ranks_one_empty": dict(rows=[4, 0, 3], sample=(4, 5, 6), dtype=torch.bfloat16,
                                     channels_last=True, momentum=None),
    # every rank's batch empty: the collectives still run, num_batches_tracked counts the
    # step (as torch's layer counts an empty batch), and the running statistics are left
    # alone (no batch variance exists to average in)
    "fp32_2ranks_all_empty": dict(rows=[0, 0], sample=(4, 5, 6), dtype=torch.float32,
                                  channels_last=False, momentum=None),
    # BatchNorm1d-style (N, C) input, as in the projection heads of contrastive learning
    "fp16_2d_2ranks": dict(rows=[6, 9], sample=(24,), dtype=torch.float16,
                           channels_last=False, momentum=0.1),
    # a ResNet block's end, relu(bn(x) + z), from the same kernels (the mask in both
    # backward launches, the residual's gradient written by the first)
    "fp32_cl_2ranks_add_relu": dict(rows=[3, 4], sample=(4, 5, 6), dtype=torch.float32,
                                    channels_last=True, momentum=0.1, residual=True,
                                    relu=True),
}


def _run_ranks(tmp_path, case: dict) -> tuple[dict, list[dict]]:
    shape = (sum(case["rows"]), *case["sample"])
    weight, bias, _, _ = make_params(shape[1], device="cpu")
    # mean far from 0 (the statistics must be shifted / merged stably), dy not centred
    data = dict(case, x=torch.randn(shape) * 2 + 5, dy=torch.randn(shape) + 0.5,
                weight=weight, bias=bias, z=torch.randn(shape) if case.get("residual") else None)
    return data, run_ranks("sync_worker.py", data, tmp_path)


def _reduced_dims(x):
    return (0, *range(2, x.dim()))


def _reference(data):
    """float64 BatchNorm [+ residual] [then ReLU] on the whole batch, two training steps
    then eval."""
    x = data["x"].to(data["dtype"]).double().requires_grad_()
    dy = data["dy"].to(data["dtype"]).double()
    z = None if data["z"] is None else data["z"].to(data["dtype"]).double().requires_grad_()

    def epilogue(y):
        y = y if z is None else y + z
        return F.relu(y) if data.get("relu") else y

    w = data["weight"].double().requires_grad_()
    b = data["bias"].double().requires_grad_()
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    steps = []
    for step in (1, 2):
        momentum = 1.0 / step if data["momentum"] is None else data["momentum"]
        y = epilogue(F.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5))
        gx, *gz = torch.autograd.grad((y * dy).sum(), [x] + ([] if z is None else [z]))
        x64, dims = x.detach(), _reduced_dims(x)
        with warnings.catch_warnings():  # an all-empty batch: NaN statistics, unused
            warnings.simplefilter("ignore", UserWarning)
            invstd = torch.rsqrt(x64.var(dims, unbiased=False, keepdim=True) + 1e-5)
        xhat = (x64 - x64.mean(dims, keepdim=True)) * invstd
        # the gradient that reaches BatchNorm's output: dy, masked by the ReLU
        dy_bn = dy * (y.detach() > 0) if data.get("relu") else dy
        steps.append(dict(output=y.detach(), grad_input=gx, xhat=xhat, invstd=invstd,
                          dy=dy_bn, grad_residual=gz[0] if gz else None))
    with torch.no_grad():
        evaluated = epilogue(F.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5))
    return steps, rm, rv, evaluated


@pytest.mark.parametrize("name", CASES)
def test_ranks_together_equal_one_batch_norm(tmp_path, name):
    data, ranks = _run_ranks(tmp_path, CASES[name])
    steps, rm, rv, evaluated = _reference(data)
    rows = data["rows"]
    bounds = [sum(rows[:r]) for r in range(len(rows) + 1)]
    dims = _reduced_dims(data["x"])
    channel = (1, -1) + (1,) * (data["x"].dim() - 2)
    w = data["weight"].double().view(channel).abs()
    b = data["bias"].double().view(channel).abs()
    if data["z"] is not None:
        b = b + data["z"].to(data["dtype"]).double().abs()
    for s, ref in enumerate(steps):
        xhat, dy = ref["xhat"], ref["dy"]
        # magnitudes of the terms: |xhat w| + |b| for y; for dx = w invstd (dy - mean(dy)
        # - xhat mean(dy xhat)), w invstd (|dy| + |mean(dy)| + |xhat| |mean(dy xhat)|)
        scales = dict(output=xhat.abs() * w + b,
                      grad_input=w * ref["invstd"] * (
                          dy.abs() + dy.mean(dims, keepdim=True).abs()
                          + xhat.abs() * (dy * xhat).mean(dims, keepdim=True).abs()))
        if ref["grad_residual"] is not None:  # the masked dy, written by the kernel
            scales["grad_residual"] = dy.abs()
        for key, scale in scales.items():
            got = torch.cat([rank["steps"][s][key] for rank in ranks])
            assert_close_to_reference(f"step {s} {key}", got, ref[key], scale)
        for r, rank in enumerate(ranks):
            got = rank["steps"][s]
            if rows[r]:
                assert got["channels_last"] == data["channels_last"]
            part = slice(bounds[r], bounds[r + 1])
            local_dy, local_xhat = dy[part], xhat[part]
            assert got["grad_weight"].dtype == got["grad_bias"].dtype == torch.float32
            assert_close_to_reference(f"rank {r} step {s} grad_bias", got["grad_bias"],
                                      local_dy.sum(dims), local_dy.abs().sum(dims))
            assert_close_to_reference(f"rank {r} step {s} grad_weight", got["grad_weight"],
                                      (local_dy * local_xhat).sum(dims),
                                      (local_dy * local_xhat).abs().sum(dims))
    for r, rank in enumerate(ranks):
        assert "double backward" in rank["double_backward"], rank["double_backward"]
        assert int(rank["num_batches_tracked"]) == 2
        assert_close_to_reference(f"rank {r} running_mean", rank["running_mean"], rm,
                                  rm.abs() + 1)
        assert_close_to_reference(f"rank {r} running_var", rank["running_var"], rv,
                                  rv.abs() + 1)
    got = torch.cat([rank["eval_output"] for rank in ranks])
    assert_close_to_reference("eval output", got, evaluated, evaluated.abs() + 1)


def test_single_process_is_a_batch_norm(device):
    """No process group: tritonbn.SyncBatchNorm computes what tritonbn.BatchNorm2d does
    (torch's SyncBatchNorm falls back to F.batch_norm the same way), with the fused ReLU
    and a residual too."""
    x, z = torch.randn(4, 3, 5, 5, device=device), torch.randn(4, 3, 5, 5, device=device)
    sync, plain = tritonbn.SyncBatchNorm(3, device=device), tritonbn.BatchNorm2d(3, device=device)
    assert torch.equal(sync(x), plain(x))
    sync.fused_relu = plain.fused_relu = True
    assert torch.equal(sync(x, z), plain(x, z))
    assert torch.equal(sync.running_var, plain.running_var)


def test_rank_outside_its_group_is_a_batch_norm(device, monkeypatch):
    """A process that is not a member of the layer's process_group (get_world_size gives
    -1 there) normalises its own batch, as torch's SyncBatchNorm does (need_sync is
    world_size > 1), instead of calling collectives of a group it is not in."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: -1)
    x = torch.randn(4, 3, 5, 5, device=device)
    sync = tritonbn.SyncBatchNorm(3, process_group=object(), device=device)
    plain = tritonbn.BatchNorm2d(3, device=device)
    assert torch.equal(sync(x), plain(x))
    assert torch.equal(sync.running_mean, plain.running_mean)


def test_convert_sync_batchnorm():
    """torch's conversion, then tritonbn's class: same parameter objects."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    weight = model[1].weight
    model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is tritonbn.SyncBatchNorm
    assert model[1].weight is weight
    torch_sync = torch.nn.Sequential(torch.nn.SyncBatchNorm(4))
    assert type(tritonbn.convert_model(torch_sync)[0]) is tritonbn.SyncBatchNorm
