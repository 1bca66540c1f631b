"""Parity of ``tritonbn.batch_norm`` with ``torch.nn.functional.batch_norm``.

Every case runs the kernels, torch in the same dtype and torch in float64 on the same
inputs, and checks output, grad_input, grad_weight, grad_bias and the running statistics
against the float64 reference and against torch's own error (tests/reference.py).

The matrices are laid out to cover each axis without a full cartesian product: every
dtype x layout x parameter dtype on one small 4-D shape; shape variety in fp32; options
(affine, bias, running stats, momentum, which inputs need grad) on one shape each.
"""
from __future__ import annotations

import pytest
import torch

import tritonbn
from tests.reference import (DEVICE, KERNEL_DTYPES, LAYOUTS, LOW_PRECISION, Call,
                             assert_within_largest, check_call, make_params, make_tensor,
                             memory_format_of)

# Every test in this file runs on both kernel paths (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")

SHAPE_4D = (3, 5, 6, 7)  # 630 values: odd sizes everywhere, M = 126 per channel


def make_call(shape, dtype=torch.float32, layout="contiguous", *, param_dtype=None,
              training=True, weight=True, bias=True, running=True, momentum=0.1, eps=1e-5,
              grad_layout=None, requires_grad=None) -> Call:
    C = shape[1]
    w, b, rm, rv = make_params(C, param_dtype or dtype)
    x = make_tensor(shape, dtype, layout)
    dy = make_tensor(shape, dtype, grad_layout or layout)
    return Call(x, w if weight else None, b if bias else None, rm if running else None,
                rv if running else None, training, momentum, eps, dy, requires_grad)


# --- dtype x layout x parameter dtype, one 4-D shape -----------------------------------------

def _dtype_layout_cases():
    for dtype in KERNEL_DTYPES:
        for layout in LAYOUTS:
            # fp16/bf16 input with fp32 weight, bias and running stats: the AMP case.
            yield pytest.param(dtype, torch.float32, layout,
                               id=f"{str(dtype)[6:]}-{layout}-params_fp32")
            if dtype in LOW_PRECISION and layout in ("contiguous", "channels_last"):
                # Everything in the input dtype (a module converted with .half()/.bfloat16()).
                yield pytest.param(dtype, dtype, layout,
                                   id=f"{str(dtype)[6:]}-{layout}-params_same")


@pytest.mark.parametrize("dtype,param_dtype,layout", list(_dtype_layout_cases()))
def test_training_dtype_layout(dtype, param_dtype, layout):
    check_call(tritonbn.batch_norm,
               make_call(SHAPE_4D, dtype, layout, param_dtype=param_dtype))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted_sliced"])
def test_eval_dtype_layout(dtype, layout):
    """Eval: normalize with running statistics; the backward uses them too."""
    check_call(tritonbn.batch_norm, make_call(SHAPE_4D, dtype, layout, training=False))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: str(d)[6:])
def test_eval_low_precision_running_stats(dtype):
    check_call(tritonbn.batch_norm,
               make_call(SHAPE_4D, dtype, "channels_last", param_dtype=dtype, training=False))


# --- shapes, fp32 ------------------------------------------------------------------------------

SHAPES = [
    pytest.param((2, 9), id="1d_NC_two_values_per_channel"),
    pytest.param((13, 7), id="1d_NC_prime"),
    pytest.param((2, 517), id="1d_NC_large_C_tiny_N"),
    pytest.param((3, 1, 11), id="1d_NCL_C1"),
    pytest.param((5, 3, 17), id="1d_NCL_prime"),
    pytest.param((1, 4, 2), id="1d_NCL_N1_two_values"),
    pytest.param((2, 3, 1, 1), id="2d_spatial_1x1"),
    pytest.param((1, 6, 5, 7), id="2d_N1"),
    pytest.param((7, 1, 3, 5), id="2d_C1"),
    pytest.param((2, 67, 3, 3), id="2d_C_prime_67"),
    pytest.param((2, 3, 31, 37), id="2d_primes_long_rows"),
    pytest.param((2, 3, 3, 4, 5), id="3d"),
    pytest.param((3, 2, 1, 5, 1), id="3d_size1_dims"),
    pytest.param((2, 5, 3, 1, 7), id="3d_primes"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_shapes(shape, training):
    check_call(tritonbn.batch_norm, make_call(shape, training=training))


# Layouts on the other ranks (the matrix above is 4-D): channels_last_3d for 5-D input, the
# channel-innermost storage for 3-D input, strided and permuted views on each.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 6), (3, 4, 9), (2, 3, 3, 4, 5)],
                         ids=["rank2", "rank3", "rank5"])
def test_layouts_other_ranks(shape, layout):
    check_call(tritonbn.batch_norm, make_call(shape, layout=layout))


def test_channels_last_3d_bf16():
    call = make_call((2, 3, 3, 4, 5), torch.bfloat16, "channels_last")
    assert memory_format_of(call.x) == torch.channels_last_3d
    check_call(tritonbn.batch_norm, call)


@pytest.mark.parametrize("x_layout,dy_layout", [("channels_last", "contiguous"),
                                                ("contiguous", "channels_last"),
                                                ("sliced", "permuted")])
def test_grad_output_in_another_layout(x_layout, dy_layout):
    """grad_output often arrives in a different layout than the input was."""
    check_call(tritonbn.batch_norm,
               make_call(SHAPE_4D, layout=x_layout, grad_layout=dy_layout))


# --- options -----------------------------------------------------------------------------------

OPTIONS = [
    pytest.param(dict(weight=False, bias=False), id="affine_false"),
    pytest.param(dict(bias=False), id="weight_only"),
    pytest.param(dict(weight=False), id="bias_only"),
    pytest.param(dict(running=False), id="no_running_stats"),
    pytest.param(dict(running=False, weight=False, bias=False), id="nothing"),
    pytest.param(dict(momentum=0.0), id="momentum_0"),
    pytest.param(dict(momentum=1.0), id="momentum_1"),
    pytest.param(dict(momentum=0.37, eps=1e-2), id="momentum_0.37_eps_1e-2"),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_options_training(options):
    check_call(tritonbn.batch_norm, make_call((4, 3, 5, 6), **options))


@pytest.mark.parametrize("options", [o for o in OPTIONS if "running" not in o.values[0]])
def test_options_eval(options):
    check_call(tritonbn.batch_norm, make_call((4, 3, 5, 6), training=False, **options))


# Which of (x, weight, bias) need a gradient decides which kernels the backward runs.
GRAD_MASKS = [(True, False, False), (False, True, False), (False, False, True),
              (False, True, True), (True, True, False)]


@pytest.mark.parametrize("mask", GRAD_MASKS, ids=lambda m: "".join("xwb"[i] for i in range(3)
                                                                      if m[i]))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_partial_requires_grad(mask, training):
    check_call(tritonbn.batch_norm, make_call((3, 4, 5, 5), layout="channels_last",
                                              training=training, requires_grad=mask))


def test_grad_of_constant_channel():
    """A channel whose values are all equal: var = 0, invstd = 1/sqrt(eps) (large), x - mean
    exactly 0, output exactly the bias."""
    call = make_call((4, 3, 5, 5))
    call.x[:, 1] = 2.5
    got = check_call(tritonbn.batch_norm, call)
    assert torch.equal(got["output"][:, 1], call.bias[1].expand(4, 5, 5))


@pytest.mark.parametrize("strided", ["weight", "bias", "running_mean", "running_var"])
def test_strided_parameter_views(strided):
    """A per-channel tensor given as a strided view (every other element of a longer
    tensor): read and written through its stride, the elements in between left alone."""
    C = 5
    x = make_tensor((4, C, 3, 3))
    dy = make_tensor((4, C, 3, 3))
    params = dict(zip(("weight", "bias", "running_mean", "running_var"), make_params(C)))
    longer = torch.stack([params[strided], torch.full_like(params[strided], 7.0)], 1)
    results = []
    for fn in (torch.nn.functional.batch_norm, tritonbn.batch_norm):
        store = longer.clone().flatten()
        p = {k: v.clone() for k, v in params.items()}
        p[strided] = store[::2]
        w, b = p["weight"].requires_grad_(), p["bias"].requires_grad_()
        y = fn(x, p["running_mean"], p["running_var"], w, b, True, 0.5, 1e-5)
        results.append((y, *torch.autograd.grad(y, [w, b], dy), p["running_mean"],
                        p["running_var"], store))
    names = ("output", "grad_weight", "grad_bias", "running_mean", "running_var", "storage")
    for name, t, k in zip(names, *results):
        torch.testing.assert_close(k, t, msg=lambda m: f"{name}: {m}")


# --- empty batch -------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch(training, layout):
    """N = 0: empty output and grad_input, zero grad_weight / grad_bias, running statistics
    unchanged, exactly as torch."""
    shape = (0, 3, 4, 5)
    x = make_tensor(shape, layout=layout)
    dy = make_tensor(shape)
    results = []
    for fn in (torch.nn.functional.batch_norm, tritonbn.batch_norm):
        torch.manual_seed(1)  # the same parameters for both
        w, b, rm, rv = make_params(3)
        rm0, rv0 = rm.clone(), rv.clone()
        xl, wl, bl = (t.detach().requires_grad_() for t in (x, w, b))
        y = fn(xl, rm, rv, wl, bl, training, 0.1, 1e-5)
        grads = torch.autograd.grad(y, [xl, wl, bl], dy)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        results.append((y, *grads))
    for name, t, k in zip(("output", "grad_input", "grad_weight", "grad_bias"), *results):
        assert k.shape == t.shape and k.dtype == t.dtype, name
        assert torch.equal(k, t), name
    assert results[1][0].is_contiguous(memory_format=memory_format_of(x))


def _ones(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device=DEVICE)


# (input shape, input dtype, (running_mean, running_var, weight, bias) makers, training):
# arguments torch's kernels would reject, which ATen's empty-input path takes or fails on
# in its own way (weight[0], bias[0])
_EMPTY_CASES = {
    "C0_weight": ((4, 0, 3), torch.float32, (None, None, lambda: _ones(0), None), True),
    "C0_bias_eval": ((4, 0, 3), torch.float32,
                     (lambda: _ones(0), lambda: _ones(0), None, lambda: _ones(0)), False),
    "C0_no_affine": ((4, 0, 3), torch.float32, (None, None, None, None), True),
    "weight_of_7": ((0, 3, 5), torch.float32, (None, None, lambda: _ones(7), lambda: _ones(7)),
                    True),
    "running_stats_of_7": ((0, 3, 5), torch.float32,
                           (lambda: _ones(7), lambda: _ones(7), None, None), True),
    "eval_without_running_stats": ((0, 3, 5), torch.float32, (None, None, None, None), False),
    "running_mean_only": ((0, 3, 5), torch.float32, (lambda: _ones(3), None, None, None),
                          True),
    "running_mean_requires_grad": ((0, 3, 5), torch.float32,
                                   (lambda: _ones(3).requires_grad_(), lambda: _ones(3), None,
                                    None), True),
    "1d_input_with_weight": ((0,), torch.float32, (None, None, lambda: _ones(1), None), True),
    "bf16_weight_fp16_input": ((0, 3, 5), torch.float16,
                               (None, None, lambda: _ones(3, dtype=torch.bfloat16), None),
                               True),
    "weight_1x3": ((0, 3, 5), torch.float32, (None, None, lambda: _ones(1, 3), None), True),
    "weight_0d": ((0, 3, 5), torch.float32, (None, None, lambda: _ones(), None), True),
}


@pytest.mark.parametrize("case", list(_EMPTY_CASES))
def test_empty_input_takes_torch_path(case):
    """An empty input gets ATen's empty-input result, ``input.clone() * weight[0] +
    bias[0]``, returned before torch checks the per-channel tensors: the same result and
    gradients where torch returns one, torch's error (IndexError for C = 0 with a weight,
    the broadcast error of a (1, C) weight) where it raises, running statistics as they
    were."""
    shape, dtype, makers, training = _EMPTY_CASES[case]
    outcomes = []
    for fn in (torch.nn.functional.batch_norm, tritonbn.batch_norm):
        rm, rv, w, b = (None if make is None else make() for make in makers)
        x = make_tensor(shape, dtype).requires_grad_()
        leaves = [t for t in (x, w, b) if t is not None and t.is_floating_point()]
        for t in leaves[1:]:
            t.requires_grad_()
        stats = [t.detach().clone() for t in (rm, rv) if t is not None]
        try:
            y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
        except Exception as e:  # noqa: BLE001  (whatever torch raises)
            outcomes.append((type(e), str(e)))
            continue
        assert all(torch.equal(s, t) for s, t in zip(stats, [t for t in (rm, rv)
                                                             if t is not None]))
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        outcomes.append((y, y.stride(), *grads))
    expected, got = outcomes
    if isinstance(expected[0], type):
        assert got == expected
        return
    assert not isinstance(got[0], type), f"tritonbn raised {got}"
    assert got[1] == expected[1], "strides"
    for e, g in zip(expected[:1] + expected[2:], got[:1] + got[2:]):
        assert g.shape == e.shape and g.dtype == e.dtype and torch.equal(g, e)


# --- tensor subclasses and other layouts -------------------------------------------------------

class _Tagged(torch.Tensor):
    """A __torch_function__ subclass (as torchvision's tv_tensors, or a user's metadata
    tag): torch's BatchNorm hands it the call and returns a _Tagged."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", ""))
        return super().__torch_function__(func, types, args, kwargs or {})


def _two_tensor(t):
    """A __torch_dispatch__ wrapper subclass (as DTensor) of ``t`` and a copy: no storage
    the kernels could read."""
    from torch.testing._internal.two_tensor import TwoTensor
    return TwoTensor(t, t.clone())


def _jagged(shape):
    return torch.nested.nested_tensor([make_tensor(shape[1:]), make_tensor(shape[1:])],
                                      layout=torch.jagged)


# input maker (of a shape), weight maker (of a plain weight)
_SUBCLASS_CASES = {
    "torch_function_input": (lambda s: make_tensor(s).as_subclass(_Tagged), None),
    "torch_function_weight": (make_tensor, lambda w: w.as_subclass(_Tagged)),
    "torch_dispatch_input": (lambda s: _two_tensor(make_tensor(s)), None),
    "torch_dispatch_weight": (make_tensor, _two_tensor),
    "jagged_nested": (_jagged, None),
    "sparse": (lambda s: make_tensor(s).to_sparse(), None),
}


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("case", list(_SUBCLASS_CASES))
def test_tensor_subclasses_get_torch_semantics(case, api):
    """Inputs and parameters the kernels cannot or should not read directly go to torch's
    BatchNorm, which gives each what it expects: the same result type and values (or the
    same error), and a __torch_function__ subclass sees the batch_norm call."""
    from torch.testing._internal.two_tensor import TwoTensor

    make_input, make_weight = _SUBCLASS_CASES[case]
    outcomes = []
    # one input for both (a jagged tensor's ragged size is named anew by each construction)
    x = make_input((2, 3, 4))
    w = make_params(3)[0]
    w = make_weight(w) if make_weight is not None else w
    for fn, cls in ((torch.nn.functional.batch_norm, torch.nn.BatchNorm1d),
                    (tritonbn.batch_norm, tritonbn.BatchNorm1d)):
        _Tagged.seen = []
        try:
            if api == "functional":
                y = fn(x, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), w,
                       None, True, 0.1, 1e-5)
            else:
                layer = cls(3, device=DEVICE)
                layer.weight = torch.nn.Parameter(w.clone())  # keeps a subclass's type
                y = layer(x)
        except Exception as e:  # noqa: BLE001  (whatever torch raises)
            outcomes.append((type(e), str(e)))
            continue
        outcomes.append((type(y), "batch_norm" in _Tagged.seen, y))
    expected, got = outcomes
    assert got[:2] == expected[:2]
    if issubclass(expected[0], BaseException):
        return
    y_got, y_expected = got[2], expected[2]
    if isinstance(y_expected, TwoTensor):
        pairs = ((y_got.a, y_expected.a), (y_got.b, y_expected.b))
    else:
        pairs = ((y_got.as_subclass(torch.Tensor), y_expected.as_subclass(torch.Tensor)),)
    for g, e in pairs:
        torch.testing.assert_close(g, e)


# --- no input is modified ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "train_no_running_stats", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_inputs_never_modified(mode, dtype):
    """x, weight, bias and grad_output are read-only; running statistics change only in
    training (FlagGems overwrote the input with track_running_stats=False)."""
    x = make_tensor((3, 4, 5, 5), dtype, "channels_last").requires_grad_()
    dy = make_tensor((3, 4, 5, 5), dtype)
    w, b, rm, rv = (t.requires_grad_(i < 2) for i, t in enumerate(make_params(4)))
    before = [t.detach().clone() for t in (x, dy, w, b, rm, rv)]
    training = mode != "eval"
    stats = (None, None) if mode == "train_no_running_stats" else (rm, rv)
    y = tritonbn.batch_norm(x, *stats, w, b, training, 0.1, 1e-5)
    y.backward(dy)
    names = ("x", "grad_output", "weight", "bias", "running_mean", "running_var")
    after = (x, dy, w, b, rm, rv)
    for name, t0, t1 in zip(names, before, after):
        if name.startswith("running") and mode == "train":
            assert not torch.equal(t0, t1), f"{name} should have been updated"
        else:
            assert torch.equal(t0, t1.detach()), f"{name} was modified"


# --- the kernels really ran --------------------------------------------------------------------

@pytest.fixture
def launches(monkeypatch, kernel_launches):
    """Counts kernel launches by kernel name (conftest.kernel_launches), and makes every
    torch BatchNorm entry point raise, so a silent fallback to torch cannot pass for the
    kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch's batch_norm was called: the kernels did not run")

    for owner, attr in ((torch.nn.functional, "batch_norm"), (torch, "batch_norm"),
                        (torch, "native_batch_norm"), (torch, "_native_batch_norm_legit")):
        if hasattr(owner, attr):
            monkeypatch.setattr(owner, attr, forbidden)
    return kernel_launches


STATS, APPLY, GRAD_STATS = "bn_stats_kernel", "bn_apply_kernel", "bn_grad_stats_kernel"
FUSED = "bn_fused_kernel"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d)[6:])
def test_kernel_launches_per_phase(launches, dtype, kernel_path):
    """M = 40 values per channel: the single-pass kernel takes every phase in one launch
    when allowed; the split path needs two per phase (one for eval forward)."""
    single = kernel_path == "single_pass"
    x = make_tensor((2, 3, 4, 5), dtype).requires_grad_()
    w, b, rm, rv = (t.requires_grad_(i < 2) for i, t in enumerate(make_params(3)))
    assert tritonbn.runs_on_triton(x)

    y = tritonbn.batch_norm(x, rm, rv, w, b, True)
    assert launches == ({FUSED: 1} if single else {STATS: 1, APPLY: 1}), "training forward"
    launches.clear()
    y.sum().backward()
    assert launches == ({FUSED: 1} if single else {GRAD_STATS: 1, APPLY: 1}), \
        "training backward"
    launches.clear()

    y = tritonbn.batch_norm(x, rm, rv, w, b, False)
    assert launches == {APPLY: 1}, "eval forward = apply, on both paths"
    launches.clear()
    y.sum().backward()
    assert launches == ({FUSED: 1} if single else {GRAD_STATS: 1, APPLY: 1}), \
        "eval backward with weight grads"
    launches.clear()

    y = tritonbn.batch_norm(x, rm, rv, w.detach(), b.detach(), False)
    launches.clear()
    y.sum().backward()
    assert launches == ({FUSED: 1} if single else {APPLY: 1}), \
        "eval backward, grad_input only: one elementwise pass, no reduction"


def test_single_pass_only_where_it_fits(launches, kernel_path):
    """M = 3 * 64 * 64 = 12288 values per channel do not fit one register tile: split path
    on both settings."""
    x = make_tensor((3, 2, 64, 64)).requires_grad_()
    tritonbn.batch_norm(x, None, None, None, None, True).sum().backward()
    assert launches == {STATS: 1, APPLY: 2, GRAD_STATS: 1}


def test_module_runs_kernels(launches, kernel_path):
    m = tritonbn.BatchNorm2d(3).to(DEVICE)
    m(make_tensor((2, 3, 4, 5)).requires_grad_()).sum().backward()
    expected = {FUSED: 2} if kernel_path == "single_pass" else {STATS: 1, APPLY: 2, GRAD_STATS: 1}
    assert launches == expected
    launches.clear()
    m.eval()
    m(make_tensor((2, 3, 4, 5)))
    assert launches == {APPLY: 1}


def test_float64_falls_back_to_torch(monkeypatch):
    """float64 is left to torch (exact), and so is the module."""
    import tritonbn.kernels.launch as launch

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was launched for float64")

    monkeypatch.setattr(launch, "_launch", no_kernel)
    x = make_tensor((3, 4, 5), torch.float64)
    assert not tritonbn.runs_on_triton(x)
    for dtype in KERNEL_DTYPES:
        assert tritonbn.runs_on_triton(x.to(dtype))
    w, b, rm, rv = (t.double() for t in make_params(4))
    rm2, rv2 = rm.clone(), rv.clone()
    y = tritonbn.batch_norm(x, rm, rv, w, b, True)
    y_torch = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, True)
    assert torch.equal(y, y_torch) and torch.equal(rm, rm2) and torch.equal(rv, rv2)
    m = tritonbn.BatchNorm1d(4, dtype=torch.float64, device=DEVICE)
    assert torch.equal(m(x), torch.nn.BatchNorm1d(4, dtype=torch.float64, device=DEVICE)(x))


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_requires_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_autograd_same_results(context, training):
    """Without a gradient to record, the eager path calls the implementations directly
    (no autograd node): the output, and the running statistics it updates, must be the
    bits the autograd path gives."""
    x = make_tensor((3, 5, 6, 7))
    w, b, rm, rv = make_params(5)
    rm2, rv2 = rm.clone(), rv.clone()
    ref = tritonbn.batch_norm(x.requires_grad_(), rm, rv, w, b, training, 0.1, 1e-5)
    assert ref.grad_fn is not None
    x = x.detach()
    if context == "no_requires_grad":
        got = tritonbn.batch_norm(x, rm2, rv2, w.detach(), b.detach(), training, 0.1, 1e-5)
    else:
        with torch.no_grad() if context == "no_grad" else torch.inference_mode():
            got = tritonbn.batch_norm(x, rm2, rv2, w, b, training, 0.1, 1e-5)
    assert got.grad_fn is None and not got.requires_grad
    assert torch.equal(got, ref.detach())
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_matches_torch(training, affine):
    """create_graph=True, as in a gradient penalty: the first-order gradients must carry a
    graph, and the second-order gradients through BatchNorm must match torch's BatchNorm
    in float64 (the kernels' gradients are not differentiable: ops.differentiable_backward
    takes over)."""
    x, dy = make_tensor((6, 4, 3, 5)), make_tensor((6, 4, 3, 5))
    w, b, rm, rv = make_params(4)

    def penalty(fn, dtype):
        leaves = [x.to(dtype).requires_grad_()]
        if affine:
            leaves += [w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()]
        params = leaves[1:] if affine else [None, None]
        y = fn(leaves[0], rm.to(dtype), rv.to(dtype), *params, training, 0.1, 1e-5)
        first = torch.autograd.grad((y * dy.to(dtype)).sum(), leaves, create_graph=True)
        graphs = [g.requires_grad for g in first]
        gp = sum((g ** 2).sum() for g in first)
        # eval without weight: dx = dy * invstd depends on no leaf, so there is no graph
        # (torch's own gradients say requires_grad regardless; only the values compare).
        second = (torch.autograd.grad(gp, leaves, allow_unused=True) if gp.requires_grad
                  else [None] * len(leaves))
        second = [torch.zeros_like(t) if s is None else s for s, t in zip(second, leaves)]
        return graphs, [t.detach().double() for t in (*first, *second)]

    got_graphs, got = penalty(tritonbn.batch_norm, torch.float32)
    _, ref = penalty(torch.nn.functional.batch_norm, torch.float64)
    # dx depends on x through the batch statistics, and on the weight when there is one.
    assert got_graphs[0] == (training or affine)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_within_largest(g, r, i)
