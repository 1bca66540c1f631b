"""BatchNorm + ReLU in one op: ``tritonbn.batch_norm(..., relu=True)`` and layers fused by
``convert_model(..., fuse_relu=True)``, against relu(batch_norm(x)) by torch in float64.

The backward recomputes the ReLU mask from x instead of storing it: these tests check
outputs, all three gradients and the running statistics on both kernel paths, in training
and eval, with and without affine parameters, across dtypes and layouts.
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


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"),
                                          (torch.bfloat16, "channels_last"),
                                          (torch.float16, "sliced")],
                         ids=["fp32", "bf16_cl", "fp16_sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_functional_relu_matches_torch(dtype, layout, training, affine):
    # mean 0.3: about 60% of the pre-activations are positive, so both sides of the mask
    # carry weight in every sum
    x = make_tensor(SHAPE, dtype, layout, mean=0.3)
    dy = make_tensor(SHAPE, dtype, layout)
    w, b, rm, rv = make_params(SHAPE[1])
    if not affine:
        w = b = None

    def run(fn, cast):
        # detach keeps the strides of the sliced layout (a clone would make it dense)
        leaves = [cast(x).requires_grad_()] + ([cast(w).requires_grad_(),
                                                cast(b).requires_grad_()] if affine else [])
        params = leaves[1:] if affine else [None, None]
        stats = [cast(rm).clone(), cast(rv).clone()]
        y = fn(leaves[0], *stats, *params, training)
        grads = torch.autograd.grad(y, leaves, cast(dy))
        return [y.detach(), *grads, *stats]

    got = run(lambda *a: tritonbn.batch_norm(*a, momentum=0.1, eps=1e-5, relu=True),
              lambda t: t.detach())
    ref = run(lambda *a: F.relu(F.batch_norm(*a, momentum=0.1, eps=1e-5)),
              lambda t: t.double())

    # Magnitudes of the terms: those of BatchNorm itself (reference.reference_scales). The
    # ReLU only zeroes some dy, so BatchNorm's bounds hold for the kept ones, and a wrong
    # mask moves a gradient by whole dy values, far past them.
    scales = reference_scales(Call(x, w, b, rm, rv, training, grad_output=dy))
    names = ["output", "grad_input"] + (["grad_weight", "grad_bias"] if affine else [])
    names += ["running_mean", "running_var"]
    for name, g, r in zip(names, got, ref):
        assert_close_to_reference(name, g, r, scales[name])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_with_relu(training):
    """create_graph=True through BatchNorm + ReLU (ops.differentiable_backward applies the
    mask): second-order gradients of a gradient penalty match torch's in float64."""
    x, dy = make_tensor(SHAPE, mean=0.3), make_tensor(SHAPE)
    w, b, rm, rv = make_params(SHAPE[1])

    def penalty(fn, cast):
        # the mask is constant to autograd: nothing of second order reaches the bias
        return penalty_gradients(
            lambda x, w, b: fn(x, cast(rm), cast(rv), w, b, training),
            [cast(t).requires_grad_() for t in (x, w, b)], cast(dy))

    got = penalty(lambda *a: tritonbn.batch_norm(*a, relu=True), lambda t: t.clone())
    ref = penalty(lambda *a: F.relu(F.batch_norm(*a)), lambda t: t.double())
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_within_largest(g, r, i)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_passes_nothing_where_the_pre_activation_is_zero(training):
    """relu'(0) = 0, as in torch (threshold_backward passes dy only where the output is
    positive). Channel 1 holds one value and has bias 0, so its pre-activation is exactly 0
    (in eval the value is its running mean): its output and every gradient through the
    recomputed mask must be exactly 0, where a mask of y >= 0 would pass dy * w / sqrt(eps).
    torch is no reference on that channel (its CPU kernel computes x * alpha + beta, which
    can land an ulp off 0); the other channels are compared with it in float64."""
    x, dy = make_tensor(SHAPE), make_tensor(SHAPE)
    w, b, rm, rv = make_params(SHAPE[1])
    x[:, 1], b[1], rm[1] = 2.5, 0.0, 2.5

    def run(fn, cast):
        leaves = [cast(t).requires_grad_() for t in (x, w, b)]
        y = fn(leaves[0], cast(rm), cast(rv), *leaves[1:], training)
        return [y.detach(), *torch.autograd.grad(y, leaves, cast(dy))]

    got = run(lambda *a: tritonbn.batch_norm(*a, relu=True), lambda t: t.clone())
    ref = run(lambda *a: F.relu(F.batch_norm(*a)), lambda t: t.double())
    others = [0, *range(2, SHAPE[1])]
    for name, g, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        zero_channel = g[:, 1] if g.dim() > 1 else g[1]
        assert torch.count_nonzero(zero_channel) == 0, (name, zero_channel.abs().max())
        if g.dim() > 1:
            g, r = g[:, others], r[:, others]
        else:
            g, r = g[others], r[others]
        assert_within_largest(g, r, name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
def test_relu_keeps_nan_as_torch(training, residual):
    """A NaN in the input (a diverged batch) stays visible, as with torch's ReLU: relu(NaN)
    is NaN (a plain maximum would return 0), and the backward zeroes dy only where
    y <= 0, so a NaN pre-activation passes dy, as torch's threshold_backward does. NaNs
    must sit where torch's are, in the output and every gradient, and the rest match."""
    x, dy = make_tensor(SHAPE, mean=0.3), make_tensor(SHAPE)
    w, b, rm, rv = make_params(SHAPE[1])
    x[1, 2, 3, 4] = float("nan")
    z = make_tensor(SHAPE) if residual else None

    def run(fn, cast):
        leaves = [cast(t).requires_grad_() for t in (x, w, b)]
        extra = {} if z is None else dict(residual=cast(z))
        y = fn(leaves[0], cast(rm), cast(rv), *leaves[1:], training, **extra)
        return [y.detach(), *torch.autograd.grad(y, leaves, cast(dy))]

    got = run(lambda *a, **k: tritonbn.batch_norm(*a, relu=True, **k), lambda t: t.clone())
    ref = run(lambda *a, residual=None: F.relu(
        F.batch_norm(*a) + (0 if residual is None else residual)), lambda t: t.double())
    for name, g, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert torch.equal(g.isnan(), r.isnan()), (name, g.isnan().sum(), r.isnan().sum())
        finite = ~r.isnan()
        assert_within_largest(g[finite], r[finite], name)


def test_double_backward_with_relu_reaches_every_input():
    """Second order through the ReLU: its mask is a constant, but the bias that moved it
    is in the graph, as in torch (torch.autograd.grad gives it zeros instead of raising that
    it was not used)."""
    x, dy = make_tensor(SHAPE, mean=0.3), make_tensor(SHAPE)
    w, b, _, _ = make_params(SHAPE[1])
    for fn in (lambda *a: F.relu(F.batch_norm(*a)),
               lambda *a: tritonbn.batch_norm(*a, relu=True)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(leaves[0], None, None, *leaves[1:], True)
        (gx,) = torch.autograd.grad(y, leaves[0], dy, create_graph=True)
        second = torch.autograd.grad(gx.pow(2).sum(), leaves)
        assert torch.count_nonzero(second[2]) == 0


def test_relu_costs_no_launch(kernel_launches, kernel_path):
    """The ReLU rides in the BatchNorm kernels: the same launches as without it."""
    x = make_tensor(SHAPE).requires_grad_()
    for relu in (False, True):
        kernel_launches.clear()
        y = tritonbn.batch_norm(x, None, None, None, None, True, relu=relu)
        y.backward(torch.ones_like(y))
        counts = dict(kernel_launches)
        if relu:
            assert counts == without
        without = counts


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts bytes in the Triton interpreter")
def test_relu_costs_no_traffic(kernel_path, monkeypatch):
    """Bytes the kernels move, counted in the interpreter (perf/_traffic.py): the fused
    ReLU adds none to the training forward and backward (a separate ReLU would add 2 and 3
    passes over the tensor)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "perf"))
    from _traffic import TrafficCounter

    x = make_tensor(SHAPE)
    dy = make_tensor(SHAPE)
    w, b, _, _ = make_params(SHAPE[1])
    moved = {}
    for relu in (False, True):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        with TrafficCounter() as fwd:
            y = tritonbn.batch_norm(xr, None, None, wr, br, True, relu=relu)
        with TrafficCounter() as bwd:
            y.backward(dy)
        moved[relu] = [c.summary(x.numel())["bytes_per_element"] for c in (fwd, bwd)]
    assert moved[True] == moved[False]
    # single-pass / split: forward 2 / 3 passes (+ one value per channel, the shift),
    # backward 3 / 5, 4-byte elements
    assert round(moved[False][0]) in (8, 12) and round(moved[False][1]) in (12, 20), moved


def _block():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         nn.Flatten(2), nn.BatchNorm1d(6), nn.Sigmoid()).to(DEVICE)


def test_convert_model_leaves_a_shared_batch_norm_alone():
    """One BatchNorm layer in two places, followed by a ReLU in one only: giving it the
    ReLU would apply it at the other place too, so convert_model leaves it unfused."""
    bn = nn.BatchNorm2d(3)
    torch_model = nn.Sequential(bn, nn.ReLU(), nn.Conv2d(3, 3, 1), bn).to(DEVICE)
    model = tritonbn.convert_model(copy.deepcopy(torch_model), fuse_relu=True)
    assert model[0] is model[3] and not model[0].fused_relu
    assert type(model[1]) is nn.ReLU
    x = make_tensor((2, 3, 4, 5))
    torch.testing.assert_close(model(x), torch_model(x), rtol=1e-5, atol=1e-5)


def test_convert_model_fuses_relu_in_sequential():
    """fuse_relu: each BatchNorm -> ReLU pair of a Sequential becomes one layer (the ReLU an
    Identity); outputs, gradients and running statistics stay those of the torch model."""
    torch_model = _block()
    model = tritonbn.convert_model(copy.deepcopy(torch_model), fuse_relu=True)
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "BatchNorm2d", "Identity", "Conv2d", "BatchNorm2d", "Identity", "Flatten",
        "BatchNorm1d", "Sigmoid"]
    assert model[1].fused_relu and model[4].fused_relu and not model[7].fused_relu
    assert "fused_relu=True" in repr(model[1])
    x = make_tensor((2, 3, 4, 5))
    outputs = []
    for m in (torch_model, model):
        y = m(x)
        y.sum().backward()
        outputs.append((y.detach(), m[0].weight.grad, m[1].running_var.clone()))
    for got, ref in zip(*outputs):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hooked", ["bn", "relu"])
def test_convert_model_leaves_hooked_pairs_alone(hooked):
    """A forward hook on the BatchNorm would see its ReLU'd output, one on the ReLU would
    no longer run: such a pair stays unfused, and the hooks do what they do in torch."""
    torch_model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(DEVICE)
    torch_model[0 if hooked == "bn" else 1].register_forward_hook(
        lambda module, args, out: out - 0.5)
    model = tritonbn.convert_model(copy.deepcopy(torch_model), fuse_relu=True)
    assert not model[0].fused_relu and type(model[1]) is nn.ReLU
    x = make_tensor((2, 3, 4, 5))
    torch.testing.assert_close(model(x), torch_model(x), rtol=1e-5, atol=1e-5)


class _SkipAroundReLU(nn.Sequential):
    """A Sequential subclass whose forward does not chain its children."""

    def forward(self, x):
        z = self[0](x)
        return self[1](z) + z


def test_convert_model_leaves_a_sequential_with_its_own_forward_alone():
    """A Sequential subclass with a forward of its own may use a BatchNorm's output
    elsewhere than in the ReLU after it: no fusion there."""
    torch_model = _SkipAroundReLU(nn.BatchNorm2d(3), nn.ReLU()).to(DEVICE)
    model = tritonbn.convert_model(copy.deepcopy(torch_model), fuse_relu=True)
    assert not model[0].fused_relu and type(model[1]) is nn.ReLU
    x = make_tensor((2, 3, 4, 5))
    torch.testing.assert_close(model(x), torch_model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["sequential", "traced"])
def test_convert_sync_batchnorm_keeps_fused_epilogues(fusion):
    """tritonbn.SyncBatchNorm.convert_sync_batchnorm after fusing (README's Usage order):
    torch's conversion builds new layers from parameters and buffers alone; the fused
    ReLUs and residuals come along, so the model computes what the torch model does, and
    revert_model can still undo them."""
    torch_model = _block() if fusion == "sequential" else _Bottleneck().to(DEVICE)
    model = copy.deepcopy(torch_model)
    if fusion == "sequential":
        model = tritonbn.convert_model(model, fuse_relu=True)
    else:
        model = tritonbn.fuse_relu_traced(model)
    before = {n: m.fused_relu for n, m in model.named_modules() if hasattr(m, "fused_relu")}
    model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    after = {n: m.fused_relu for n, m in model.named_modules() if hasattr(m, "fused_relu")}
    assert after == before and any(after.values())
    assert all(type(m) is tritonbn.SyncBatchNorm for n, m in model.named_modules()
               if n in after)
    x = make_tensor((2, 3 if fusion == "sequential" else 6, 4, 5))
    torch.testing.assert_close(model(x), torch_model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tritonbn.revert_model(model)(x), torch_model(x), rtol=1e-4,
                               atol=1e-5)


def test_fused_relu_under_compile():
    """The flag travels through the custom ops under torch.compile (aot_eager): compiled
    training steps give eager's outputs and gradients."""
    eager, compiled = eager_and_compiled(tritonbn.convert_model(_block(), fuse_relu=True),
                                         make_tensor((2, 3, 4, 5)))
    for got, ref in zip(compiled, eager):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


class _Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck pattern: ReLUs called from forward, one shared ReLU
    module, a functional ReLU, and a BatchNorm whose output meets the residual first
    (tests/test_residual.py has the residual fusion's own tests)."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + x)


class _Twice(nn.Module):
    """One BatchNorm module called twice: fusing it would change both calls."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(x)) + self.bn(x)


class _WithUnusedParts(nn.Module):
    """An auxiliary head and a buffer that forward does not use, nested and at the top."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
        self.body[1].register_buffer("scratch", torch.zeros(1), persistent=False)
        self.aux_head = nn.BatchNorm2d(3)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.relu(self.body[0](x))


def test_fuse_relu_traced_keeps_unused_parts():
    """What forward does not call stays in the traced model, so that the model's
    state_dict (same keys, same order) loads into it, and its parameters stay the same
    objects (an optimizer built before still holds them)."""
    model = _WithUnusedParts().to(DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    gm = tritonbn.fuse_relu_traced(model)
    assert list(gm.state_dict()) == list(state)
    assert [id(p) for p in gm.parameters()] == [id(p) for p in params]
    gm.load_state_dict(state)
    assert gm.body[0].fused_relu and "scratch" not in gm.state_dict()
    torch.testing.assert_close(gm(make_tensor((2, 3, 4, 5))).min().item(), 0.0)


def test_fuse_relu_traced_resnet_block():
    """torch.fx fusion: bn1 and bn2 take their ReLU, bn3 the residual and the ReLU after
    it, the BatchNorm called twice nothing; the traced model trains like the torch one
    (outputs, gradients, running statistics)."""
    torch_model = nn.Sequential(_Bottleneck(), _Twice()).to(DEVICE)
    model = copy.deepcopy(torch_model)
    gm = tritonbn.fuse_relu_traced(model)
    fused = {n: m.fused_relu for n, m in gm.named_modules() if hasattr(m, "fused_relu")}
    assert fused == {"0.bn1": True, "0.bn2": True, "0.bn3": True, "1.bn": False}
    assert gm.state_dict().keys() == torch_model.state_dict().keys()
    x = make_tensor((2, 6, 4, 5))
    results = []
    for m in (torch_model, gm):
        y = m(x)
        y.sum().backward()
        results.append([y.detach()] + [p.grad for p in m.parameters()]
                       + [b.clone() for b in m.buffers()])
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_revert_model_restores_torch_layers_and_relus():
    """revert_model undoes both conversions: torch's classes back (same parameter
    objects), the Sequential's ReLUs back in place of their Identity, and in a
    fuse_relu_traced graph bn3(x, z) with its ReLU back to bn3(x) + z then relu. The
    reverted models compute what the torch models do (in eval, with the same running
    statistics), and torch's class-keyed tools take them: conv-BatchNorm-ReLU fusion and
    torch.jit.script."""
    x = make_tensor((2, 3, 4, 5))
    torch_seq = _block().eval()
    seq = tritonbn.revert_model(tritonbn.convert_model(copy.deepcopy(torch_seq),
                                                       fuse_relu=True))
    assert [type(m) for m in seq] == [type(m) for m in torch_seq]
    assert seq[5].inplace  # the ReLU that was replaced, not a new one
    assert not any(hasattr(m, "fused_relu") for m in seq.modules())
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(seq), [["0", "1", "2"]])
    scripted = torch.jit.script(seq)
    with torch.no_grad():
        for m in (seq, fused, scripted):
            torch.testing.assert_close(m(x), torch_seq(x), rtol=1e-5, atol=1e-5)

    torch_block = _Bottleneck().to(DEVICE).eval()
    gm = tritonbn.fuse_relu_traced(copy.deepcopy(torch_block))
    weight = gm.bn3.weight
    gm = tritonbn.revert_model(gm)
    assert type(gm.bn3) is nn.BatchNorm2d and gm.bn3.weight is weight
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and "bn" in n.target]
    assert all(len(n.args) == 1 for n in calls)
    x6 = make_tensor((2, 6, 4, 5))
    with torch.no_grad():
        torch.testing.assert_close(gm(x6), torch_block(x6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["convert_then_trace", "fuse_relu_traced"])
def test_revert_model_gives_an_uninitialised_lazy_layer_its_relu_back(how):
    """A lazy layer that took a ReLU and was traced before its first input: revert_model
    puts the ReLU back into the graph, so the reverted model still applies it."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), nn.ReLU()).to(DEVICE)

    if how == "convert_then_trace":
        gm = torch.fx.symbolic_trace(tritonbn.convert_model(make(), fuse_relu=True))
    else:
        gm = tritonbn.fuse_relu_traced(make())
    gm = tritonbn.revert_model(gm)
    x = make_tensor((2, 3, 4, 5))
    torch.testing.assert_close(gm(x), make()(x), rtol=1e-5, atol=1e-5)
    assert type(gm.get_submodule("1")) is nn.BatchNorm2d


class _OwnIdentity(nn.Module):
    """A Sequential whose Identity is the model's own, after a layer fused by tracing."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.BatchNorm2d(3), nn.Identity())

    def forward(self, x):
        return torch.relu(self.seq[0](x)) + self.seq[1](x)


def test_revert_model_leaves_the_models_own_identity():
    """Only the Identity that convert_model put in place of a ReLU becomes a ReLU again:
    the model's own stays, and the traced layer's ReLU returns as a call in the graph."""
    torch_model = _OwnIdentity().to(DEVICE).eval()
    gm = tritonbn.revert_model(tritonbn.fuse_relu_traced(copy.deepcopy(torch_model)))
    assert type(gm.seq[1]) is nn.Identity
    x = make_tensor((2, 3, 4, 5))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), torch_model(x), rtol=1e-5, atol=1e-5)


def test_revert_model_refuses_what_it_cannot_undo():
    """A fused ReLU set by hand outside a Sequential, or a part of a traced model whose
    graph calls a layer with a residual: ValueError, and nothing changed."""
    block = tritonbn.convert_model(_Bottleneck())
    block.bn1.fused_relu = True
    with pytest.raises(ValueError, match="bn1 has a fused ReLU"):
        tritonbn.revert_model(block)
    assert type(block.bn1) is tritonbn.BatchNorm2d and block.bn1.fused_relu
    gm = tritonbn.fuse_relu_traced(_Bottleneck())
    with pytest.raises(ValueError, match="fused ReLU and residual"):
        tritonbn.revert_model(gm.bn3)
    assert type(gm.bn3) is tritonbn.BatchNorm2d
