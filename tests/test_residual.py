"""BatchNorm + residual add (+ ReLU) in one op: ``tritonbn.batch_norm(..., residual=z)``,
the layers' ``forward(x, z)`` and the add fusion of ``fuse_relu_traced``, against
``[relu](batch_norm(x) + z)`` by torch in float64.

With ReLU the backward recomputes the mask from x and z and writes the masked dy, which is
the residual's gradient; without ReLU the residual's gradient is dy itself. These tests
check outputs, all four gradients and the running statistics on both kernel paths, in
training and eval, across dtypes and mixed layouts (residual strides unlike the input's).
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tests.reference import (DEVICE, Call, assert_close_to_reference, assert_within_largest,
                             eager_and_compiled, make_params, make_tensor, penalty_gradients,
                             reference_scales)

pytestmark = pytest.mark.usefixtures("kernel_path")  # both kernel paths (conftest)

SHAPE = (4, 6, 5, 7)


def _torch_fused(x, running_mean, running_var, weight, bias, training, residual, relu):
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training) + residual
    return F.relu(out) if relu else out


@pytest.mark.parametrize("dtype,x_layout,z_layout", [
    (torch.float32, "contiguous", "channels_last"),
    (torch.bfloat16, "channels_last", "contiguous"),
    (torch.float16, "sliced", "sliced")], ids=["fp32", "bf16_cl", "fp16_sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "add"])
def test_functional_residual_matches_torch(dtype, x_layout, z_layout, training, relu):
    # mean 0.3: about 60% of the pre-activations are positive, so both sides of the mask
    # carry weight in every sum
    x = make_tensor(SHAPE, dtype, x_layout, mean=0.3)
    z = make_tensor(SHAPE, dtype, z_layout)
    dy = make_tensor(SHAPE, dtype, x_layout)
    w, b, rm, rv = make_params(SHAPE[1])

    def run(fn, cast):
        # detach keeps the strides of the sliced layouts (a clone would make them dense)
        leaves = [cast(t).requires_grad_() for t in (x, w, b, z)]
        stats = [cast(rm).clone(), cast(rv).clone()]
        y = fn(leaves[0], *stats, leaves[1], leaves[2], training, leaves[3], relu)
        grads = torch.autograd.grad(y, leaves, cast(dy))
        return [y.detach(), *grads, *stats]

    got = run(lambda x, rm, rv, w, b, t, z, r: tritonbn.batch_norm(
        x, rm, rv, w, b, t, relu=r, residual=z), lambda t: t.detach())
    ref = run(_torch_fused, lambda t: t.double())

    # BatchNorm's own term magnitudes (reference.reference_scales), plus |z| in the output.
    # The residual's gradient is dy, masked: exact, so its bound is one storage rounding.
    scales = reference_scales(Call(x, w, b, rm, rv, training, grad_output=dy))
    scales["output"] = scales["output"] + z.double().abs()
    scales["grad_residual"] = torch.zeros(SHAPE, dtype=torch.float64, device=DEVICE)
    names = ["output", "grad_input", "grad_weight", "grad_bias", "grad_residual",
             "running_mean", "running_var"]
    for name, g, r in zip(names, got, ref):
        assert_close_to_reference(name, g, r, scales[name])
    assert got[0].stride() == x.detach().stride() or x_layout == "sliced"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_with_residual(training):
    """create_graph=True through relu(BatchNorm(x) + z): first and second-order gradients
    of a gradient penalty, the residual's included, match torch's in float64."""
    x, z, dy = make_tensor(SHAPE, mean=0.3), make_tensor(SHAPE), make_tensor(SHAPE)
    w, b, rm, rv = make_params(SHAPE[1])

    def penalty(fn, cast):
        return penalty_gradients(
            lambda x, w, b, z: fn(x, cast(rm), cast(rv), w, b, training, z, True),
            [cast(t).requires_grad_() for t in (x, w, b, z)], cast(dy))

    got = penalty(lambda x, rm, rv, w, b, t, z, r: tritonbn.batch_norm(
        x, rm, rv, w, b, t, relu=r, residual=z), lambda t: t.clone())
    ref = penalty(_torch_fused, lambda t: t.double())
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_within_largest(g, r, i)


def test_residual_costs_no_launch(kernel_launches):
    """The residual rides in the BatchNorm kernels: the same launches as without it."""
    x = make_tensor(SHAPE).requires_grad_()
    z = make_tensor(SHAPE).requires_grad_()
    for relu in (False, True):
        launches = []
        for residual in (None, z):
            kernel_launches.clear()
            y = tritonbn.batch_norm(x, None, None, None, None, True, relu=relu,
                                    residual=residual)
            y.backward(torch.ones_like(y))
            launches.append(dict(kernel_launches))
        assert launches[0] == launches[1], (relu, launches)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts bytes in the Triton interpreter")
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "add"])
def test_residual_traffic(kernel_path, relu, monkeypatch):
    """Bytes the kernels move, counted in the interpreter (perf/_traffic.py), per input
    element (fp32): the residual adds its one read to the forward (a separate add would
    read two tensors and write one: 3 passes, and a separate ReLU 2 more). Backward:
    nothing without ReLU (dz = dy); with ReLU, one read of z and one write of dz, the
    grad_input pass then reading dz in place of dy (a separate ReLU backward: 3 passes)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "perf"))
    from _traffic import TrafficCounter

    x, z, dy = make_tensor(SHAPE), make_tensor(SHAPE), make_tensor(SHAPE)
    w, b, _, _ = make_params(SHAPE[1])
    moved = {}
    for residual in (None, z):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        with TrafficCounter() as fwd:
            y = tritonbn.batch_norm(xr, None, None, wr, br, True, relu=relu, residual=residual)
        with TrafficCounter() as bwd:
            y.backward(dy)
        moved[residual is not None] = [c.summary(x.numel())["bytes_per_element"]
                                       for c in (fwd, bwd)]
    extra = [a - b for a, b in zip(moved[True], moved[False])]
    assert extra == pytest.approx([4, 8 if relu else 0]), moved


def test_residual_errors():
    """A residual the kernels cannot add raises, on the kernel path and on torch's path
    (float64), before the running statistics change; on the kernel path torch's own
    checks on the BatchNorm arguments come first."""
    x = make_tensor(SHAPE)
    bad = [make_tensor((4, 6, 5, 1)),                  # would broadcast
           make_tensor(SHAPE, torch.float16),          # another dtype
           1.0]                                        # not a tensor
    for residual in bad:
        for inp, z in ((x, residual), (x.double(), residual)):
            stats = [torch.zeros(SHAPE[1], dtype=inp.dtype, device=DEVICE),
                     torch.ones(SHAPE[1], dtype=inp.dtype, device=DEVICE)]
            with pytest.raises(RuntimeError, match="residual must be a tensor"):
                tritonbn.batch_norm(inp, *stats, training=True, residual=z)
            assert torch.equal(stats[0], torch.zeros_like(stats[0]))
            assert torch.equal(stats[1], torch.ones_like(stats[1]))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        tritonbn.batch_norm(x[:1, :, :1, :1], None, None, training=True, residual=1.0)


def test_module_residual_and_fallback():
    """``layer(x, z)`` computes [relu](layer(x) + z); a residual the kernels cannot take (a
    broadcast, another dtype) is added by torch with its rules (shape, promotion)."""
    torch_bn = nn.BatchNorm2d(SHAPE[1]).to(DEVICE)
    x = make_tensor(SHAPE)
    for z in (make_tensor(SHAPE, layout="channels_last"), make_tensor((1, 6, 1, 1)),
              make_tensor(SHAPE, torch.float64)):
        for fused_relu in (False, True):
            bn = tritonbn.convert_model(copy.deepcopy(torch_bn))
            bn.fused_relu = fused_relu
            ref_bn = copy.deepcopy(torch_bn)
            got = bn(x, z)
            ref = ref_bn(x) + z
            ref = F.relu(ref) if fused_relu else ref
            assert got.dtype == ref.dtype and got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bn.running_var, ref_bn.running_var)
            assert int(bn.num_batches_tracked) == 1


class _Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck with a projection shortcut: ``out += identity``
    (in place) where identity is another BatchNorm's output, then a ReLU module."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _Inverted(nn.Module):
    """MobileNetV2's inverted residual: the skip added first, no ReLU after the sum. Then
    a ReLU before the addition, ``out + relu(bn2(out))``, which bn2 takes but not the add;
    and a BatchNorm1d whose output is added to in place, ``z.add_(bn(x))``, which must stay."""

    def __init__(self, c=6):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.flat, self.bn1d = nn.Flatten(2), nn.BatchNorm1d(c)

    def forward(self, x):
        out = x + self.bn(self.conv(x))
        out = out + F.relu(self.bn2(out))
        flat = self.flat(out)
        return flat.clone().add_(self.bn1d(flat))


def test_fuse_relu_traced_fuses_residual_adds():
    """fx fusion: bn3 takes the shortcut and the ReLU after it; the MobileNet-style block's
    BatchNorm takes its skip (operand order swapped, no ReLU); bn2 takes its ReLU but not
    the addition after that ReLU; the in-place add onto the other operand is left alone. The fused graph trains like the torch model (outputs,
    gradients, running statistics, two steps)."""
    torch_model = nn.Sequential(_Bottleneck(), _Inverted()).to(DEVICE)
    model = copy.deepcopy(torch_model)
    gm = tritonbn.fuse_relu_traced(model)
    calls = {n.target: len(n.args) for n in gm.graph.nodes if n.op == "call_module"}
    assert calls["0.bn3"] == 2 and calls["1.bn"] == 2
    assert calls["0.bn1"] == calls["0.downsample.1"] == calls["1.bn2"] == calls["1.bn1d"] == 1
    fused = {n: m.fused_relu for n, m in gm.named_modules() if hasattr(m, "fused_relu")}
    assert fused == {"0.bn1": True, "0.bn3": True, "0.downsample.1": False, "1.bn": False,
                     "1.bn2": True, "1.bn1d": False}
    assert not [n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), nn.ReLU)]
    assert gm.state_dict().keys() == torch_model.state_dict().keys()
    inputs = [make_tensor((2, 6, 4, 5)) for _ in range(2)]
    results = []
    for m in (gm, copy.deepcopy(torch_model).double()):
        outs = []
        for x in inputs:
            y = m(x.to(next(m.parameters()).dtype))
            y.square().sum().backward()
            outs.append(y.detach())
        results.append(outs + [p.grad for p in m.parameters()] + [b.clone() for b in m.buffers()])
    # A wiring check against the float64 model (the kernels' accuracy has its bounds above):
    # a wrong graph moves values by O(0.1). atol 5e-4: over two training steps of both
    # blocks, fp32 rounding alone moves the gradients by up to ~2e-4 from float64 here (over
    # seeds 0-11, torch's own fp32 model 1.9e-4 at worst, tritonbn's 2.4e-4; torch's CPU
    # BatchNorm sums in double), the conv biases in front of a training BatchNorm, whose
    # gradient is 0 up to cancellation, included.
    for got, ref in zip(*results):
        torch.testing.assert_close(got.to(ref.dtype), ref, rtol=1e-4, atol=5e-4)


class _HookedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x, z):
        return self.relu1(self.bn1(x)) + self.relu2(self.bn2(x) + z)


@pytest.mark.parametrize("hooked", ["bn_forward", "bn_forward_pre", "relu_forward", "global"])
def test_fuse_relu_traced_leaves_hooked_modules_alone(hooked):
    """A hook sees a layer's own inputs and output, and may change them: a BatchNorm or
    ReLU module with hooks, or any while global module hooks are registered, is not fused,
    so the hooks see and do what they do in the torch model. (Fused, in an audit's
    repro: a hook subtracting 1 from a BatchNorm's output moved below the ReLU and the
    residual, 1.0 off; a pre-hook received (x, z) and dropped z; a ReLU's hook no longer
    ran.)"""
    def on_bn(module, args, out):
        return out - 1.0 if isinstance(module, nn.BatchNorm2d) else None

    torch_model = _HookedBlock().to(DEVICE)
    if hooked == "bn_forward":
        torch_model.bn2.register_forward_hook(on_bn)
    elif hooked == "bn_forward_pre":
        torch_model.bn2.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    elif hooked == "relu_forward":
        torch_model.relu2.register_forward_hook(lambda module, args, out: out * 0.5)
    x, z = make_tensor((2, 6, 4, 5)), make_tensor((2, 6, 4, 5))
    handle = (torch.nn.modules.module.register_module_forward_hook(on_bn)
              if hooked == "global" else None)
    try:
        gm = tritonbn.fuse_relu_traced(copy.deepcopy(torch_model))
        torch.testing.assert_close(gm(x, z), torch_model(x, z), rtol=1e-4, atol=1e-4)
    finally:
        if handle is not None:
            handle.remove()
    calls = {n.target: len(n.args) for n in gm.graph.nodes if n.op == "call_module"}
    if hooked == "global":
        assert calls == {"bn1": 1, "relu1": 1, "bn2": 1, "relu2": 1}
    elif hooked == "relu_forward":  # bn1 takes relu1; bn2 takes z, not the hooked relu2
        assert calls == {"bn1": 1, "bn2": 2, "relu2": 1} and gm.bn1.fused_relu
    else:
        assert calls == {"bn1": 1, "bn2": 1, "relu2": 1} and gm.bn1.fused_relu


class _BetweenCallAndAdd(nn.Module):
    """Something between a BatchNorm call and the addition of its output: the fused call
    would happen at the addition, after it."""

    def __init__(self, between: str):
        super().__init__()
        self.bn, self.between = nn.BatchNorm2d(6), between

    def forward(self, x, z):
        h = x * 1
        y = self.bn(h)
        if self.between == "reads_running_mean":  # (as fx records it: the live buffer)
            seen = x.new_zeros(()) + self.bn.running_mean
        else:  # writes into the layer's input
            seen = h.mul_(3)
        return y + z, seen


@pytest.mark.parametrize("between", ["reads_running_mean", "writes_input"])
def test_fuse_relu_traced_keeps_call_order(between):
    """The residual is fused only where nothing between the BatchNorm's call and the
    addition writes into a tensor or reads the layer's state: here the fused call would
    read h after h.mul_(3), or update running_mean after it was read (in an audit's repro,
    3.7 and 0.02 off). Both outputs and the running statistics match the torch model over
    a training step and an eval step."""
    torch_model = _BetweenCallAndAdd(between).to(DEVICE)
    gm = tritonbn.fuse_relu_traced(copy.deepcopy(torch_model))
    assert [len(n.args) for n in gm.graph.nodes if n.target == "bn"] == [1]
    x, z = make_tensor((2, 6, 4, 5), mean=1.0), make_tensor((2, 6, 4, 5))
    for training in (True, False):
        for m in (gm, torch_model):
            m.train(training)
        for got, want in zip(gm(x, z), torch_model(x, z)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gm.bn.running_mean, torch_model.bn.running_mean)


def test_fuse_relu_traced_sync_batch_norm():
    """SyncBatchNorm layers take their ReLU and the residual too (the sync path has the same
    epilogues, tests/ops/test_sync_batch_norm.py); in a single process they are a
    BatchNorm, so the fused graph computes what the torch model does."""
    torch_model = _Bottleneck().to(DEVICE)
    model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(torch_model))
    gm = tritonbn.fuse_relu_traced(model)
    calls = {n.target: len(n.args) for n in gm.graph.nodes if n.op == "call_module"}
    assert type(gm.bn3) is tritonbn.SyncBatchNorm and calls["bn3"] == 2
    assert gm.bn1.fused_relu and gm.bn3.fused_relu
    assert not gm.get_submodule("downsample.1").fused_relu
    x = make_tensor((2, 6, 4, 5))
    torch.testing.assert_close(gm(x), torch_model(x), rtol=1e-4, atol=1e-4)


def test_fuse_relu_traced_add_off():
    """``add=False``: only BatchNorm -> ReLU pairs, as before the residual fusion."""
    gm = tritonbn.fuse_relu_traced(_Bottleneck().to(DEVICE), add=False)
    calls = {n.target: len(n.args) for n in gm.graph.nodes if n.op == "call_module"}
    assert calls["bn3"] == 1 and gm.bn1.fused_relu and not gm.bn3.fused_relu


def test_residual_under_compile_and_func():
    """The residual travels through the custom ops under torch.compile (aot_eager), and
    through torch.func.vjp: both give eager's outputs and gradients."""
    eager, compiled = eager_and_compiled(tritonbn.fuse_relu_traced(_Bottleneck().to(DEVICE)),
                                         make_tensor((2, 6, 4, 5)))
    # Compiled code runs eager's kernels (batch_norm_train), so the same bits; on a GPU the
    # convolutions' weight gradients may add in another order from one call to the next.
    tol = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-5)
    for got, ref in zip(compiled, eager):
        torch.testing.assert_close(got, ref, **tol)

    z, dy = make_tensor(SHAPE), make_tensor(SHAPE)
    xr, w, b = make_tensor(SHAPE, mean=0.3), *make_params(SHAPE[1])[:2]

    def fn(x, w, b, z):
        return tritonbn.batch_norm(x, None, None, w, b, True, relu=True, residual=z)

    out, vjp = torch.func.vjp(fn, xr, w, b, z)
    leaves = [t.clone().requires_grad_() for t in (xr, w, b, z)]
    ref = fn(*leaves)
    torch.testing.assert_close(out, ref.detach())
    for got, want in zip(vjp(dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(got, want)
