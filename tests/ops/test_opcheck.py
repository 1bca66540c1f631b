"""torch.library.opcheck on every tritonbn custom operator.

opcheck runs each op for real and checks: the schema (declared mutations and aliasing match
what the op does), the autograd registration, the fake (meta) implementation against the
real outputs (shapes, dtypes, strides), and tracing through AOTAutograd with dynamic shapes.
The inputs cover training (momentum float / None with num_batches_tracked / no running
statistics; batch_norm_train on both kernel paths), eval, no weight/bias, channels_last,
2-D input, reduced-precision input with fp32 parameters, and an empty batch.
"""
import pytest
import torch
from torch.library import opcheck

ops = torch.ops.tritonbn
EPS = 1e-5


def _input(device, shape, dtype=torch.float32, channels_last=False, requires_grad=False):
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _running(device, C):
    return (torch.randn(C, device=device), torch.rand(C, device=device) + 0.5)


# (id, shape, dtype, channels_last)
LAYOUTS = [
    ("ncl", (4, 3, 5), torch.float32, False),
    ("nc", (6, 3), torch.float32, False),
    ("nhwc", (2, 3, 4, 5), torch.float32, True),
    ("ncdhw-bf16", (2, 3, 2, 2, 3), torch.bfloat16, False),
]


def _saved_stats(x, training, device):
    """(mean, stat) as batch_norm_apply / batch_norm_backward receive them: the batch
    statistics in training, running statistics in eval."""
    if training:
        return ops.batch_norm_stats(x.detach(), None, None, None, 0.1, EPS)
    return _running(device, x.shape[1])


def _check(op, args):
    result = opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# Every layout in the momentum mode; the other modes on the first layout only (fast).
STATS_CASES = [(layout, "momentum") for layout in LAYOUTS] + [
    (LAYOUTS[0], "cumulative"), (LAYOUTS[0], "no_running"), (LAYOUTS[2], "cumulative")]


@pytest.mark.parametrize("layout,mode", STATS_CASES,
                         ids=[f"{c[0][0]}-{c[1]}" for c in STATS_CASES])
def test_opcheck_batch_norm_stats(device, layout, mode):
    _, shape, dtype, cl = layout
    x = _input(device, shape, dtype, cl)
    C = shape[1]
    rm, rv = _running(device, C)
    if mode == "momentum":
        args = (x, rm, rv, None, 0.1, EPS)
    elif mode == "cumulative":  # momentum=None: factor 1/num_batches_tracked, on device
        nbt = torch.tensor(3, dtype=torch.long, device=device)
        args = (x, rm, rv, nbt, None, EPS)
    else:  # track_running_stats=False
        args = (x, None, None, None, 0.1, EPS)
    _check(ops.batch_norm_stats.default, args)


def test_opcheck_batch_norm_stats_empty_batch(device):
    x = torch.randn(0, 3, 4, device=device)
    rm, rv = _running(device, 3)
    _check(ops.batch_norm_stats.default, (x, rm, rv, None, 0.1, EPS))


@pytest.mark.parametrize("kernel_path", ["single_pass", "split"], indirect=True)
@pytest.mark.parametrize("layout,mode", STATS_CASES,
                         ids=[f"{c[0][0]}-{c[1]}" for c in STATS_CASES])
def test_opcheck_batch_norm_train(device, layout, mode, kernel_path):
    """The whole training forward (output, statistics, running-stat update) on either
    kernel path: one single-pass launch, or statistics then apply; differentiable."""
    _, shape, dtype, cl = layout
    x = _input(device, shape, dtype, cl, requires_grad=True)
    C = shape[1]
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    rm, rv = _running(device, C)
    if mode == "momentum":
        running = (rm, rv, None, 0.1)
    elif mode == "cumulative":
        running = (rm, rv, torch.tensor(3, dtype=torch.long, device=device), None)
    else:
        running = (None, None, None, 0.1)
    _check(ops.batch_norm_train.default, (x, w, b, *running, EPS))


@pytest.mark.parametrize("kernel_path", ["single_pass", "split"], indirect=True)
def test_opcheck_batch_norm_train_epilogues(device, kernel_path):
    """ReLU and a contiguous residual with a channels_last input; no weight and bias."""
    _, shape, dtype, cl = LAYOUTS[2]
    x = _input(device, shape, dtype, cl, requires_grad=True)
    z = _input(device, shape, dtype, requires_grad=True)
    rm, rv = _running(device, shape[1])
    _check(ops.batch_norm_train.default, (x, None, None, rm, rv, None, 0.1, EPS, True, z))


def test_opcheck_batch_norm_train_empty_batch(device):
    x = torch.randn(0, 3, 4, device=device)
    rm, rv = _running(device, 3)
    _check(ops.batch_norm_train.default, (x, None, None, rm, rv, None, 0.1, EPS))


# (layout, training, affine): every layout with weight and bias; no weight/bias on one.
APPLY_CASES = [(layout, training, True) for layout in LAYOUTS for training in (True, False)]
APPLY_CASES += [(LAYOUTS[0], True, False), (LAYOUTS[2], False, False)]


@pytest.mark.parametrize(
    "layout,training,affine", APPLY_CASES,
    ids=[f"{c[0][0]}-{'train' if c[1] else 'eval'}-{'affine' if c[2] else 'plain'}"
         for c in APPLY_CASES])
def test_opcheck_batch_norm_apply(device, layout, training, affine):
    _, shape, dtype, cl = layout
    C = shape[1]
    x = _input(device, shape, dtype, cl, requires_grad=True)
    w = torch.randn(C, device=device, requires_grad=True) if affine else None
    b = torch.randn(C, device=device, requires_grad=True) if affine else None
    mean, stat = _saved_stats(x, training, device)
    _check(ops.batch_norm_apply.default, (x, w, b, mean, stat, training, EPS))


def test_opcheck_batch_norm_apply_empty_batch(device):
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    mean, stat = _running(device, 3)
    _check(ops.batch_norm_apply.default, (x, w, b, mean, stat, True, EPS))


# (layout, training, grad_input_mask): all gradients on every layout; partial masks on one.
FULL = [True, True, True]
BACKWARD_CASES = [(layout, training, FULL) for layout in LAYOUTS for training in (True, False)]
BACKWARD_CASES += [(LAYOUTS[0], training, mask) for training in (True, False)
                   for mask in ([True, False, False], [False, True, True], [True, True, False])]


@pytest.mark.parametrize(
    "layout,training,mask", BACKWARD_CASES,
    ids=[f"{c[0][0]}-{'train' if c[1] else 'eval'}-{''.join('1' if v else '0' for v in c[2])}"
         for c in BACKWARD_CASES])
def test_opcheck_batch_norm_backward(device, layout, training, mask):
    _, shape, dtype, cl = layout
    C = shape[1]
    x = _input(device, shape, dtype, cl)
    dy = _input(device, shape, dtype, cl)
    w = torch.randn(C, device=device)
    mean, stat = _saved_stats(x, training, device)
    _check(ops.batch_norm_backward.default, (dy, x, w, mean, stat, training, EPS, mask))


def test_opcheck_batch_norm_backward_no_weight(device):
    x = torch.randn(4, 3, 5, device=device)
    dy = torch.randn_like(x)
    mean, stat = ops.batch_norm_stats(x, None, None, None, 0.1, EPS)
    _check(ops.batch_norm_backward.default,
           (dy, x, None, mean, stat, True, EPS, [True, False, False]))


def test_opcheck_mixed_and_strided_layouts(device):
    """Under Inductor (the ops are tagged flexible_layout) the ops may get any strides: a
    channels_last input with a contiguous grad_output, and a non-dense slice (for which
    empty_like, in the real and the fake implementation alike, gives a contiguous output)."""
    x = _input(device, (2, 3, 4, 5), channels_last=True, requires_grad=True)
    dy = _input(device, (2, 3, 4, 5))
    w = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    mean, stat = ops.batch_norm_stats(x.detach(), None, None, None, 0.1, EPS)
    _check(ops.batch_norm_backward.default,
           (dy, x.detach(), w.detach(), mean, stat, True, EPS, [True, True, True]))
    sliced = torch.randn(2, 3, 4, 10, device=device)[..., ::2].requires_grad_(True)
    rm, rv = _running(device, 3)
    _check(ops.batch_norm_stats.default, (sliced.detach(), rm, rv, None, 0.1, EPS))
    mean, stat = ops.batch_norm_stats(sliced.detach(), None, None, None, 0.1, EPS)
    _check(ops.batch_norm_apply.default, (sliced, w, b, mean, stat, True, EPS))
    _check(ops.batch_norm_backward.default,
           (dy, sliced.detach(), w.detach(), mean, stat, True, EPS, [True, True, True]))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_relu(device, training):
    """The relu flag (BatchNorm + ReLU) on both ops, channels_last."""
    _, shape, dtype, cl = LAYOUTS[2]
    C = shape[1]
    x = _input(device, shape, dtype, cl, requires_grad=True)
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    mean, stat = _saved_stats(x, training, device)
    _check(ops.batch_norm_apply.default, (x, w, b, mean, stat, training, EPS, True))
    dy = _input(device, shape, dtype, cl)
    _check(ops.batch_norm_backward.default,
           (dy, x.detach(), w.detach(), mean, stat, training, EPS, FULL, b.detach(), True))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "add"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_residual(device, training, relu):
    """The residual argument on both ops: channels_last input, contiguous residual (the
    residual's gradient is an output of the backward op only with ReLU)."""
    _, shape, dtype, cl = LAYOUTS[2]
    C = shape[1]
    x = _input(device, shape, dtype, cl, requires_grad=True)
    z = _input(device, shape, dtype, requires_grad=True)
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    mean, stat = _saved_stats(x, training, device)
    _check(ops.batch_norm_apply.default, (x, w, b, mean, stat, training, EPS, relu, z))
    dy = _input(device, shape, dtype, cl)
    _check(ops.batch_norm_backward.default,
           (dy, x.detach(), w.detach(), mean, stat, training, EPS, FULL, b.detach(), relu,
            z.detach()))
