"""Parity of ``tritonbn.BatchNorm1d/2d/3d`` with torch's modules over several steps, and
``convert_model``.

A step is forward + backward (grad_input, grad_weight, grad_bias). Each case runs 3 training
steps then 1 eval step, side by side with torch's module in the same dtype and in float64,
checking outputs, gradients, running statistics and num_batches_tracked after every step.
Before each step torch's modules start from the kernel module's current buffers (upcast
exactly), so every step is judged on its own error instead of compounding the last one's.
"""
from __future__ import annotations

import copy
import inspect
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tests.reference import (DEVICE, Call, assert_close_to_reference,
                             assert_not_worse_than_torch, check_layout, make_tensor,
                             reference_scales)

# Every test in this file runs on both kernel paths (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")

# torch >= 2.? has BatchNorm(..., bias=False); the GPU image may carry an older torch.
HAS_BIAS_KWARG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
TORCH_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
TRITON_CLASSES = {1: tritonbn.BatchNorm1d, 2: tritonbn.BatchNorm2d, 3: tritonbn.BatchNorm3d}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def randomize(module: nn.Module) -> None:
    """Parameters and running statistics away from their 1/0 defaults."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name in ("weight",):
                t.copy_(1 + 0.5 * torch.randn_like(t, dtype=F32))
            elif name in ("bias", "running_mean"):
                t.copy_(0.3 * torch.randn_like(t, dtype=F32))
            elif name == "running_var":
                t.copy_(0.5 + torch.rand_like(t, dtype=F32))


def step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Forward + backward; returns output and grads (grads by autograd.grad: no .grad
    accumulation between steps)."""
    x = x.detach().requires_grad_()
    y = module(x)
    wrt = [("grad_input", x)] + [(f"grad_{n}", p) for n, p in module.named_parameters()]
    grads = torch.autograd.grad(y, [t for _, t in wrt], dy)
    return {"output": y.detach(), **{n: g for (n, _), g in zip(wrt, grads)}}


def effective_call(module: nn.Module, x, dy) -> Call:
    """The functional call torch's _BatchNorm.forward makes for ``module`` (to size the
    error bounds), given its buffers *before* the step."""
    training = module.training
    tracking = module.track_running_stats
    momentum = module.momentum
    if training and tracking and momentum is None:
        momentum = 1.0 / float(module.num_batches_tracked + 1)
    use_running = not training or tracking
    return Call(x, module.weight, module.bias,
                module.running_mean if use_running else None,
                module.running_var if use_running else None,
                training or module.running_mean is None, momentum or 0.0, module.eps, dy)


def run_steps(dims, shape, x_dtype, param_dtype, layout="contiguous", steps=3, **kwargs):
    C = shape[1]
    torch_mod = TORCH_CLASSES[dims](C, device=DEVICE, dtype=param_dtype, **kwargs)
    randomize(torch_mod)
    kernel_mod = TRITON_CLASSES[dims](C, device=DEVICE, dtype=param_dtype, **kwargs)
    kernel_mod.load_state_dict(torch_mod.state_dict())
    ref_mod = copy.deepcopy(torch_mod).double()
    for i in range(steps + 1):
        training = i < steps
        for m in (torch_mod, kernel_mod, ref_mod):
            m.train(training)
        # Start torch's modules from the kernel module's state (see module docstring).
        torch_mod.load_state_dict(kernel_mod.state_dict())
        ref_mod.load_state_dict(kernel_mod.state_dict())
        call = effective_call(torch_mod, make_tensor(shape, x_dtype, layout),
                              make_tensor(shape, x_dtype, layout))
        scales = reference_scales(call)
        got = step(kernel_mod, call.x, call.grad_output)
        same = step(torch_mod, call.x, call.grad_output)
        ref = step(ref_mod, call.x.double(), call.grad_output.double())
        assert set(got) == set(ref)
        assert got["output"].dtype == x_dtype and got["grad_input"].dtype == x_dtype
        check_layout(call.x, got["output"], "output")
        check_layout(call.x, got["grad_input"], "grad_input")
        for name in got:
            what = f"step {i} ({'train' if training else 'eval'}): {name}"
            assert_close_to_reference(what, got[name], ref[name], scales[name])
            assert_not_worse_than_torch(what, got[name], same[name], ref[name], scales[name])
        got_state, ref_state = kernel_mod.state_dict(), ref_mod.state_dict()
        assert got_state.keys() == torch_mod.state_dict().keys()
        for name in ("running_mean", "running_var"):
            if name in got_state:
                assert got_state[name].dtype == param_dtype
                assert_close_to_reference(f"step {i}: {name}", got_state[name],
                                          ref_state[name], scales[name])
                assert_not_worse_than_torch(f"step {i}: {name}", got_state[name],
                                            torch_mod.state_dict()[name], ref_state[name],
                                            scales[name])
        if "num_batches_tracked" in got_state:
            assert torch.equal(got_state["num_batches_tracked"],
                               torch_mod.state_dict()["num_batches_tracked"])
            assert got_state["num_batches_tracked"].item() == min(i + 1, steps)


def case(dims, shape, x_dtype=F32, param_dtype=F32, layout="contiguous", *, id, **kwargs):
    return pytest.param(dims, shape, x_dtype, param_dtype, layout, kwargs, id=id)


MODULE_CASES = [
    case(1, (2, 7), id="1d_NC_two_values_per_channel"),
    case(1, (2, 517), id="1d_large_C_tiny_N", momentum=None),
    case(1, (5, 6, 11), id="1d_NCL_momentum_none", momentum=None),
    case(1, (4, 3, 8), BF16, F32, "channels_last", id="1d_NLC_bf16_amp"),
    case(1, (6, 4, 5), id="1d_no_tracking_eval_uses_batch_stats", track_running_stats=False),
    case(2, (2, 3, 5, 7), id="2d_default"),
    case(2, (3, 1, 5, 5), id="2d_C1"),
    case(2, (2, 3, 5, 7), id="2d_affine_false", affine=False),
    case(2, (3, 4, 5, 5), F16, F16, "channels_last", id="2d_channels_last_fp16_module_fp16"),
    case(2, (2, 5, 4, 6), BF16, BF16, "channels_last", id="2d_channels_last_bf16_momentum_none",
         momentum=None),
    case(2, (3, 4, 3, 5), F16, F32, "sliced", id="2d_sliced_fp16_amp"),
    case(2, (3, 2, 7, 5), id="2d_no_tracking", track_running_stats=False),
    case(2, (3, 2, 5, 5), id="2d_nothing", affine=False, track_running_stats=False,
         momentum=None),
    case(2, (2, 3, 4, 5), layout="permuted_sliced", id="2d_permuted_sliced_momentum_1_eps",
         momentum=1.0, eps=1e-3),
    case(3, (2, 3, 3, 4, 5), id="3d_default"),
    case(3, (2, 4, 3, 3, 5), BF16, F32, "channels_last", id="3d_channels_last_3d_bf16_amp",
         momentum=None),
    case(3, (3, 2, 1, 5, 3), F16, F16, id="3d_fp16_no_tracking", track_running_stats=False),
]
if HAS_BIAS_KWARG:
    MODULE_CASES += [
        case(2, (2, 3, 5, 7), id="2d_bias_false", bias=False),
        case(3, (2, 3, 2, 3, 5), BF16, BF16, "channels_last", id="3d_bias_false_bf16",
             bias=False),
    ]


@pytest.mark.parametrize("dims,shape,x_dtype,param_dtype,layout,kwargs", MODULE_CASES)
def test_module_steps(dims, shape, x_dtype, param_dtype, layout, kwargs):
    run_steps(dims, shape, x_dtype, param_dtype, layout, **kwargs)


@pytest.mark.skipif(not HAS_BIAS_KWARG, reason="this torch has no BatchNorm(bias=False)")
def test_bias_false_has_no_bias():
    m = tritonbn.BatchNorm2d(3, bias=False)
    assert m.bias is None and m.weight is not None
    assert set(m.state_dict()) == set(nn.BatchNorm2d(3, bias=False).state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_empty_batch(training):
    """N = 0 as torch: empty output, zero parameter grads, running statistics unchanged,
    num_batches_tracked incremented (the module counts the call)."""
    torch_mod = nn.BatchNorm2d(3, device=DEVICE)
    randomize(torch_mod)
    kernel_mod = tritonbn.BatchNorm2d(3, device=DEVICE)
    kernel_mod.load_state_dict(torch_mod.state_dict())
    x = make_tensor((0, 3, 4, 5), layout="channels_last")
    dy = make_tensor((0, 3, 4, 5), layout="channels_last")
    results = []
    for m in (torch_mod, kernel_mod):
        m.train(training)
        results.append(step(m, x, dy))
    for name, t in results[0].items():
        assert torch.equal(results[1][name], t), name
    for name, t in torch_mod.state_dict().items():
        assert torch.equal(kernel_mod.state_dict()[name], t), name
    assert kernel_mod.num_batches_tracked.item() == int(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_does_not_modify_inputs(training):
    """The input and the parameters are read-only; buffers change only in training."""
    m = tritonbn.BatchNorm2d(4, device=DEVICE).train(training)
    randomize(m)
    x = make_tensor((3, 4, 5, 5), torch.bfloat16, "channels_last").requires_grad_()
    before = {n: t.detach().clone() for n, t in m.state_dict().items()}
    x0 = x.detach().clone()
    m(x).sum().backward()
    assert torch.equal(x.detach(), x0)
    for name, t in m.state_dict().items():
        changed = not torch.equal(t, before[name])
        assert changed == (training and name != "weight" and name != "bias"), name


def test_no_tracking_module_keeps_no_buffers():
    m = tritonbn.BatchNorm1d(4, track_running_stats=False, device=DEVICE)
    x = make_tensor((3, 4, 5))
    for training in (True, False):
        m.train(training)
        y = m(x)
        ref = nn.functional.batch_norm(x.double(), None, None, m.weight.double(),
                                       m.bias.double(), True)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_sees_parametrizations_and_plain_attributes(training, kernel_launches):
    """The layer reads its registered parameters and buffers from the module's tables (host
    time, modules._arguments); a weight under torch.nn.utils.parametrize (a property, no
    longer in the table) and tensors set as plain attributes in place of the bias and the
    running statistics must still be the ones used, as by torch's forward."""
    from torch.nn.utils import parametrize

    x = make_tensor((3, 4, 5))
    ref = nn.BatchNorm1d(4, device=DEVICE)
    randomize(ref)
    ours = tritonbn.BatchNorm1d(4, device=DEVICE)
    ours.load_state_dict(ref.state_dict())
    ref.double()
    for m in (ours, ref):
        m.train(training)
        parametrize.register_parametrization(m, "weight", _Doubled())
        dtype = m.running_var.dtype
        for name, value in (("bias", -0.5), ("running_mean", 0.25), ("running_var", 2.0)):
            delattr(m, name)
            setattr(m, name, torch.full((4,), value, dtype=dtype, device=DEVICE))
    assert "weight" not in ours._parameters and "bias" not in ours._parameters
    assert "running_mean" not in ours._buffers
    y = ours(x)
    assert sum(kernel_launches.values()) > 0
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean.double(), ref.running_mean)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var)


# --- convert_model -----------------------------------------------------------------------------

class UserBatchNorm(nn.BatchNorm2d):
    """A user subclass: may override forward, so convert_model must leave it alone."""


def build_model() -> nn.Module:
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3, padding=1),
        bn2=nn.BatchNorm2d(4),
        relu=nn.ReLU(),
        user=UserBatchNorm(4),
        inner=nn.ModuleDict(dict(
            bn2_frozen=nn.BatchNorm2d(4, affine=True),
            bn2_no_stats=nn.BatchNorm2d(4, track_running_stats=False),
        )),
    ))
    model.head = nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, momentum=None))
    model.vol = nn.BatchNorm3d(2, affine=False)
    model.inner["bn2_frozen"].weight.requires_grad_(False)
    model.inner["bn2_frozen"].eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize(m)
    return model.to(DEVICE)


def bn_layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_convert_model_in_place():
    model = build_model()
    before = {n: (type(m), m.training, {k: (id(t), t.dtype, t.device, t.requires_grad)
                                         for k, t in list(m.named_parameters())
                                         + list(m.named_buffers())})
              for n, m in bn_layers(model)}
    assert tritonbn.convert_model(model) is model
    for name, m in bn_layers(model):
        cls, training, tensors = before[name]
        if cls is UserBatchNorm:
            assert type(m) is UserBatchNorm, "a user subclass must be left alone"
        else:
            assert type(m).__name__ == cls.__name__ and type(m).__module__.startswith("tritonbn")
            assert isinstance(m, cls), "still an instance of torch's class"
        assert m.training == training, name
        now = {k: (id(t), t.dtype, t.device, t.requires_grad)
               for k, t in list(m.named_parameters()) + list(m.named_buffers())}
        assert now == tensors, f"{name}: parameters/buffers must be the very same objects"


def test_convert_and_revert_a_parametrized_layer(kernel_launches):
    """A layer under torch.nn.utils.parametrize is an instance of a subclass made for it
    (ParametrizedBatchNorm2d): converted and reverted all the same, the parametrization
    staying on top, the fused ReLU too; the reverted layer is torch's class again (for
    tools keyed on it), and removing the parametrization leaves the converted class."""
    from torch.nn.utils import parametrize

    torch_model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).to(DEVICE)
    randomize(torch_model[1])
    parametrize.register_parametrization(torch_model[1], "weight", _Doubled())
    model = tritonbn.convert_model(copy.deepcopy(torch_model), fuse_relu=True)
    assert isinstance(model[1], tritonbn.BatchNorm2d) and parametrize.is_parametrized(model[1])
    assert model[1].fused_relu and type(model[2]) is nn.Identity
    x = make_tensor((2, 3, 4, 5))
    torch.testing.assert_close(model(x), torch_model(x), rtol=1e-5, atol=1e-5)
    assert sum(kernel_launches.values()) > 0, "the converted layer ran the kernels"

    tritonbn.revert_model(model)
    assert type(model[1]).__bases__ == (nn.BatchNorm2d,) and type(model[2]) is nn.ReLU
    assert parametrize.is_parametrized(model[1]) and "fused_relu" not in model[1].__dict__
    torch.testing.assert_close(model(x), torch_model(x), rtol=1e-5, atol=1e-5)

    tritonbn.convert_model(model)
    parametrize.remove_parametrizations(model[1], "weight")
    assert type(model[1]) is tritonbn.BatchNorm2d


def test_convert_model_same_results_as_torch():
    torch_model = build_model()
    kernel_model = tritonbn.convert_model(copy.deepcopy(torch_model))
    calls = []
    kernel_model.bn2.register_forward_hook(lambda *a: calls.append(1))
    x = make_tensor((2, 3, 5, 6))
    vol = make_tensor((3, 2, 2, 3, 4))
    for model in (torch_model, kernel_model):
        model.train()
        model.inner["bn2_frozen"].eval()

    # The convolution runs once, outside: cuDNN (TF32) need not give both copies the same
    # bits, and it is not what this test is about.
    h0 = torch_model.conv(x).detach()

    def forward(model):
        h = model.inner["bn2_no_stats"](model.inner["bn2_frozen"](
            model.user(model.relu(model.bn2(h0)))))
        return model.head(h), model.vol(vol)

    for _ in range(2):
        outs = [forward(m) for m in (torch_model, kernel_model)]
        for t, k in zip(*outs):
            torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2, "hooks registered on the converted module fire"
    for (name, t), (_, k) in zip(torch_model.state_dict().items(),
                                 kernel_model.state_dict().items()):
        torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_convert_model_module_itself_and_idempotent():
    bn = nn.BatchNorm3d(3)
    assert tritonbn.convert_model(bn) is bn and type(bn) is tritonbn.BatchNorm3d
    assert tritonbn.convert_model(bn) is bn and type(bn) is tritonbn.BatchNorm3d


def test_convert_model_optimizer_keeps_working():
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tritonbn.convert_model(model)
    w0 = model.bn2.weight.detach().clone()
    x = make_tensor((2, 3, 4, 4))
    model.bn2(model.conv(x)).square().sum().backward()
    opt.step()
    assert not torch.equal(model.bn2.weight.detach(), w0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_state_dict_interchangeable(dims):
    kwargs = dict(momentum=None)
    torch_mod = TORCH_CLASSES[dims](5, **kwargs)
    randomize(torch_mod)
    torch_mod.num_batches_tracked.fill_(7)
    kernel_mod = TRITON_CLASSES[dims](5, **kwargs)
    assert kernel_mod.state_dict().keys() == torch_mod.state_dict().keys()
    kernel_mod.load_state_dict(torch_mod.state_dict())
    back = TORCH_CLASSES[dims](5, **kwargs)
    back.load_state_dict(kernel_mod.state_dict())
    for name, t in torch_mod.state_dict().items():
        assert torch.equal(kernel_mod.state_dict()[name], t), name
        assert torch.equal(back.state_dict()[name], t), name
    assert isinstance(kernel_mod, TORCH_CLASSES[dims])
    assert repr(kernel_mod) == repr(torch_mod)


def test_lazy_layer_compiled_with_module_compile():
    """Module.compile keeps the layer's bound call, which outlives the lazy layer's switch
    to its class: the second call must still work, as torch's lazy layer's does."""
    torch._dynamo.reset()
    layer = tritonbn.LazyBatchNorm2d(device=DEVICE)
    layer.compile(backend="aot_eager")
    x = make_tensor((4, 3, 2, 2))
    for _ in range(2):
        torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True),
                                   rtol=1e-5, atol=1e-5)
    assert type(layer) is tritonbn.BatchNorm2d
    torch._dynamo.reset()


@pytest.mark.parametrize("lazy_cls,shape,becomes", [
    (nn.LazyBatchNorm1d, (4, 3, 5), tritonbn.BatchNorm1d),
    (nn.LazyBatchNorm2d, (4, 3, 5, 6), tritonbn.BatchNorm2d),
    (nn.LazyBatchNorm3d, (2, 3, 2, 3, 4), tritonbn.BatchNorm3d)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("fuse_relu", [False, True], ids=["plain", "fused_relu"])
def test_convert_lazy_batch_norm(lazy_cls, shape, becomes, fuse_relu, kernel_launches):
    """A converted lazy layer becomes tritonbn's BatchNorm on its first input (torch's own
    lazy class would become torch's BatchNorm, silently bypassing the kernels), runs the
    kernels from that first call on, with the ReLU it took, and computes what torch's lazy
    layer (then a ReLU) does."""
    x = make_tensor(shape)
    ours, ref = (nn.Sequential(lazy_cls(momentum=None, device=DEVICE), nn.ReLU())
                 for _ in range(2))
    model = tritonbn.convert_model(ours, fuse_relu=fuse_relu)
    assert type(model[0]).__module__.startswith("tritonbn")
    for step in range(2):
        kernel_launches.clear()
        y, y_ref = model(x), ref(x)
        assert type(model[0]) is becomes
        assert kernel_launches, f"call {step + 1} did not run the kernels"
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[0].running_var, ref[0].running_var, rtol=1e-5,
                                   atol=1e-6)
