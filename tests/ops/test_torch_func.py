"""tritonbn under torch.func transforms (grad, vjp, nested grad, vmap), as used by
meta-learning, per-example-loss and ensembling code with torch.func.functional_call.

Gradients of tritonbn in fp32 are compared with those of torch's BatchNorm in float64 under
the same transform. Training mode is covered without running statistics: with them,
torch's own module raises (its num_batches_tracked.add_ mutates a captured tensor inside
the transform), and so does tritonbn's, which runs the same line."""
import pytest
import torch
from torch.func import functional_call, grad, vjp

import tritonbn
from tests.reference import assert_within_largest, make_params, make_tensor

SHAPE = (6, 4, 3, 5)
pytestmark = pytest.mark.usefixtures("kernel_path")  # both kernel paths (conftest)


def _module(cls, training, dtype, params):
    """A BatchNorm2d with the given (weight, bias, running_mean, running_var); with
    batch statistics in training, no running statistics (see the module docstring)."""
    bn = cls(SHAPE[1], track_running_stats=not training, dtype=dtype,
             device=params[0].device)
    bn.train(training)
    with torch.no_grad():
        for t, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), params):
            if t is not None:
                t.copy_(v)
    return bn


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train_batch_stats"])
def test_grad_of_functional_call(training):
    """torch.func.grad through functional_call, w.r.t. the parameters and the input."""
    x, dy = make_tensor(SHAPE), make_tensor(SHAPE)
    values = make_params(SHAPE[1])

    def grads(cls, dtype):
        bn = _module(cls, training, dtype, values)
        params = {k: v.detach() for k, v in bn.named_parameters()}

        def loss(p, x):
            return (functional_call(bn, p, (x,)) * dy.to(dtype)).sum()

        g_params, g_x = grad(loss, argnums=(0, 1))(params, x.to(dtype))
        return [g_params["weight"], g_params["bias"], g_x]

    got = grads(tritonbn.BatchNorm2d, torch.float32)
    ref = grads(torch.nn.BatchNorm2d, torch.float64)
    for name, g, r in zip(("grad_weight", "grad_bias", "grad_input"), got, ref):
        assert_within_largest(g, r, name)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_vjp_of_functional_batch_norm(relu):
    """torch.func.vjp of tritonbn.batch_norm with batch statistics: output and cotangents."""
    x, dy = make_tensor(SHAPE), make_tensor(SHAPE)
    w, b, _, _ = make_params(SHAPE[1])

    def run(fn, dtype):
        f = lambda x, w, b: fn(x, None, None, w, b, True, 0.1, 1e-5)  # noqa: E731
        out, pullback = vjp(f, x.to(dtype), w.to(dtype), b.to(dtype))
        return [out, *pullback(dy.to(dtype))]

    def torch_bn(*args):
        out = torch.nn.functional.batch_norm(*args)
        return torch.relu(out) if relu else out

    got = run(lambda *a: tritonbn.batch_norm(*a, relu=relu), torch.float32)
    ref = run(torch_bn, torch.float64)
    for name, g, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert_within_largest(g, r, name)


def test_nested_grad():
    """grad of a gradient norm (second order) through torch.func, batch statistics."""
    x, dy = make_tensor(SHAPE), make_tensor(SHAPE)
    w, b, _, _ = make_params(SHAPE[1])

    def second(fn, dtype):
        def inner(w, x):
            return (fn(x, None, None, w, b.to(dtype), True, 0.1, 1e-5) * dy.to(dtype)).sum()

        def outer(w, x):
            return (grad(inner, argnums=1)(w, x) ** 2).sum()

        return grad(outer)(w.to(dtype), x.to(dtype))

    assert_within_largest(second(tritonbn.batch_norm, torch.float32),
           second(torch.nn.functional.batch_norm, torch.float64), "d|dx|^2/dweight")


def test_running_stats_mutation_raises_like_torch():
    """Training with running statistics inside torch.func.grad: both raise RuntimeError."""
    x = make_tensor(SHAPE)
    for cls in (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d):
        bn = cls(SHAPE[1], device=x.device)
        params = {k: v.detach() for k, v in bn.named_parameters()}
        with pytest.raises(RuntimeError, match="mutate"):
            grad(lambda p: functional_call(bn, p, (x,)).sum())(params)


B = 3  # vmapped slices
F = torch.nn.functional


def _per_slice(fn, *batched):
    """torch's BatchNorm slice by slice in float64: the reference for vmap. ``batched``:
    tensors with the vmapped dimension first (None: absent)."""
    return torch.stack([fn(*(None if t is None else t[i].double() for t in batched))
                        for i in range(B)])


@pytest.mark.parametrize("relu,residual", [(False, False), (True, True)],
                         ids=["bn", "add_relu"])
def test_vmap_batch_statistics(relu, residual, kernel_launches):
    """Each slice's own batch statistics; a batched weight and residual, a shared bias."""
    x, z = make_tensor((B, *SHAPE)), make_tensor((B, *SHAPE))
    w = 1 + 0.5 * make_tensor((B, SHAPE[1]))
    _, b, _, _ = make_params(SHAPE[1])
    z = z if residual else None

    def ref(x, w, z):
        out = F.batch_norm(x, None, None, w, b.double(), True)
        out = out if z is None else out + z
        return torch.relu(out) if relu else out

    got = torch.func.vmap(lambda x, w, z: tritonbn.batch_norm(
        x, None, None, w, b, True, relu=relu, residual=z), in_dims=(0, 0, 0 if residual else None))(x, w, z)
    assert_within_largest(got, _per_slice(ref, x, w, z), "output")
    assert sum(kernel_launches.values()) > 0  # the kernels, not a fallback


@pytest.mark.parametrize("stats_dim", [0, 1])
def test_vmap_running_statistics_per_slice(stats_dim):
    """Batched running statistics: each slice normalises with and updates its own, in
    training, and reads its own in evaluation; the input vmapped along its dimension 1.
    Statistics vmapped along their dimension 1 ([C, B]) cannot be folded into one vector
    without a copy, whose update must reach them."""
    x = make_tensor((SHAPE[0], B, *SHAPE[1:]))
    w, b, _, _ = make_params(SHAPE[1])
    rm, rv = 0.3 * make_tensor((B, SHAPE[1])), 0.5 + make_tensor((B, SHAPE[1])).abs()
    rm_ref, rv_ref = rm.double(), rv.double()
    rm_phys, rv_phys = rm, rv
    if stats_dim == 1:  # stored [C, B]; rm, rv: [B, C] views of that storage
        rm_phys, rv_phys = rm.t().contiguous(), rv.t().contiguous()
        rm, rv = rm_phys.t(), rv_phys.t()
    for training in (True, False):
        got = torch.func.vmap(lambda x, rm, rv: tritonbn.batch_norm(x, rm, rv, w, b, training),
                              in_dims=(1, stats_dim, stats_dim))(x, rm_phys, rv_phys)
        ref = torch.stack([F.batch_norm(x[:, i].double(), rm_ref[i], rv_ref[i], w.double(),
                                        b.double(), training) for i in range(B)])
        assert_within_largest(got, ref, ("output", training))
        assert_within_largest(rm, rm_ref, ("running_mean", training))
        assert_within_largest(rv, rv_ref, ("running_var", training))


@pytest.mark.parametrize("running", [True, False], ids=["running_stats", "no_running_stats"])
def test_vmap_ensemble_shares_input_and_running_statistics(running):
    """One input and one set of running statistics (or none) for every slice (an ensemble
    of weights): the statistics are updated once, as by torch's batching rule."""
    x = make_tensor(SHAPE)
    w, b = 1 + 0.5 * make_tensor((B, SHAPE[1])), make_tensor((B, SHAPE[1]))
    _, _, rm, rv = make_params(SHAPE[1])
    rm, rv = (rm, rv) if running else (None, None)
    rm_ref, rv_ref = (rm.double(), rv.double()) if running else (None, None)
    got = torch.func.vmap(lambda w, b: tritonbn.batch_norm(x, rm, rv, w, b, True, relu=True))(w, b)
    ref = torch.relu(_per_slice(lambda w, b: F.batch_norm(x.double(), None, None, w, b, True),
                                w, b))
    assert_within_largest(got, ref, "output")
    if running:
        F.batch_norm(x.double(), rm_ref, rv_ref, None, None, True)  # the one update
        assert_within_largest(rm, rm_ref, "running_mean")
        assert_within_largest(rv, rv_ref, "running_var")


def test_vmap_unbatched_running_statistics_raise_like_torch():
    """A batched input with running statistics shared by the slices: torch raises (which
    slice would update them?), and so does tritonbn, with torch's words."""
    x = make_tensor((B, *SHAPE))
    _, _, rm, rv = make_params(SHAPE[1])
    for fn in (F.batch_norm, tritonbn.batch_norm):
        with pytest.raises(RuntimeError, match="were not batched"):
            torch.func.vmap(lambda x: fn(x, rm, rv, None, None, True))(x)


def test_vmap_batched_num_batches_tracked_raises_like_torch():
    """momentum=None in an ensemble of layers (stack_module_state batches
    num_batches_tracked): torch's layer raises RuntimeError (it turns the batched counter
    into a Python number), and so does tritonbn's, rather than one slice's count for all."""
    x = make_tensor((B, *SHAPE))
    for cls in (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d):
        layers = [cls(SHAPE[1], momentum=None, device=x.device) for _ in range(B)]
        params, buffers = torch.func.stack_module_state(layers)
        with pytest.raises(RuntimeError, match=r"\.item\(\)"):
            torch.func.vmap(lambda p, bufs, x: functional_call(layers[0], (p, bufs), (x,)))(
                params, buffers, x)


def test_vmap_of_grad_and_grad_of_vmap():
    """Per-slice gradients (vmap of grad) and the gradient of a vmapped loss (grad of vmap),
    against torch's BatchNorm in float64 under the same transforms."""
    x, dy = make_tensor((B, *SHAPE)), make_tensor((B, *SHAPE))
    w, b, _, _ = make_params(SHAPE[1])

    def run(fn, dtype):
        def loss(w, x, dy):
            return (fn(x, None, None, w, b.to(dtype), True) * dy).sum()

        args = (x.to(dtype), dy.to(dtype))
        per_slice = torch.func.vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(
            w.to(dtype), *args)
        total = grad(lambda w: torch.func.vmap(loss, in_dims=(None, 0, 0))(w, *args).sum())(
            w.to(dtype))
        return [*per_slice, total]

    got, ref = run(tritonbn.batch_norm, torch.float32), run(F.batch_norm, torch.float64)
    for name, g, r in zip(("grad_weight per slice", "grad_input", "grad_weight"), got, ref):
        assert_within_largest(g, r, name)


def test_vmap_ensemble_of_modules_in_eval():
    """torch.func.stack_module_state + functional_call + vmap: an ensemble of tritonbn
    layers in evaluation, each slice with its own parameters and running statistics."""
    x = make_tensor((B, *SHAPE))
    layers = [tritonbn.BatchNorm2d(SHAPE[1], device=x.device).eval() for _ in range(B)]
    for layer in layers:
        with torch.no_grad():
            for t, v in zip((layer.weight, layer.bias, layer.running_mean, layer.running_var),
                            make_params(SHAPE[1])):
                t.copy_(v)
    params, buffers = torch.func.stack_module_state(layers)
    got = torch.func.vmap(lambda p, bufs, x: functional_call(layers[0], (p, bufs), (x,)))(
        params, buffers, x)
    ref = torch.stack([F.batch_norm(x[i].double(), m.running_mean.double(),
                                    m.running_var.double(), m.weight.double(),
                                    m.bias.double(), False) for i, m in enumerate(layers)])
    assert_within_largest(got, ref, "output")


@pytest.mark.parametrize("mode", ["dual_tensors", "func_jvp", "func_linearize"])
def test_forward_mode_ad(mode):
    """Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): computed by torch's
    BatchNorm, whose jvp formulas the kernels' Functions do not have; a tangent must never
    be dropped. A layer with the fused ReLU and a residual against torch's layer + ReLU
    in float64: output and tangent, and with dual tensors the running statistics of
    momentum=None (the count read on the host, as torch's layer does; inside a torch.func
    transform both layers refuse to update them, see the module docstring)."""
    x, tx = make_tensor(SHAPE), make_tensor(SHAPE)
    z = make_tensor(SHAPE)
    params = make_params(SHAPE[1])

    def run(layer, dtype, fused):
        bn = layer(SHAPE[1], momentum=None, dtype=dtype, device=x.device,
                   track_running_stats=mode == "dual_tensors")
        with torch.no_grad():
            for t, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), params):
                if t is not None:
                    t.copy_(v)
        bn.fused_relu = fused

        def f(x):
            return bn(x, z.to(dtype)) if fused else torch.relu(bn(x) + z.to(dtype))

        if mode == "func_jvp":
            y, ty = torch.func.jvp(f, (x.to(dtype),), (tx.to(dtype),))
        elif mode == "func_linearize":  # traced with make_fx, then the tangent map is run
            y, tangent_map = torch.func.linearize(f, x.to(dtype))
            ty = tangent_map(tx.to(dtype))
        else:
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(x.to(dtype), tx.to(dtype))
                y, ty = torch.autograd.forward_ad.unpack_dual(f(dual))
        return y, ty, bn.running_mean, bn.running_var

    got = run(tritonbn.BatchNorm2d, torch.float32, True)
    ref = run(torch.nn.BatchNorm2d, torch.float64, False)
    assert got[1] is not None, "the tangent was dropped"
    for name, g, r in zip(("output", "tangent", "running_mean", "running_var"), got, ref):
        if r is not None:
            assert_within_largest(g, r, name)


def test_forward_mode_ad_of_higher_order():
    """hessian (jacfwd of jacrev) with respect to the weight, against torch's in float64."""
    x = make_tensor(SHAPE)
    w = make_params(SHAPE[1])[0]

    def hess(fn, dtype):
        return torch.func.hessian(
            lambda w: fn(x.to(dtype), None, None, w, None, True).pow(3).sum())(w.to(dtype))

    assert_within_largest(hess(tritonbn.batch_norm, torch.float32),
                          hess(torch.nn.functional.batch_norm, torch.float64), "hessian")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batched_grad_outputs(training):
    """autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) run the
    backward under autograd's vmap, whose batched grad_output the kernels cannot read: the
    backward is then computed with torch operations. Against torch in float64, with the
    fused ReLU and a residual."""
    x, z = make_tensor(SHAPE, mean=0.3), make_tensor(SHAPE)
    dys = torch.stack([make_tensor(SHAPE) for _ in range(3)])
    w, b, rm, rv = make_params(SHAPE[1])

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b, z)]
        y = fn(leaves[0], rm.to(dtype), rv.to(dtype), *leaves[1:3], training, leaves[3])
        return torch.autograd.grad(y, leaves, dys.to(dtype), is_grads_batched=True)

    got = grads(lambda *a: tritonbn.batch_norm(*a[:6], relu=True, residual=a[6]),
                torch.float32)
    ref = grads(lambda *a: torch.relu(torch.nn.functional.batch_norm(*a[:6]) + a[6]),
                torch.float64)
    for name, g, r in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), got,
                          ref):
        assert_within_largest(g, r, name)
    small = make_tensor((3, 2, 2, 2))
    jacobians = [torch.autograd.functional.jacobian(
        lambda x: fn(x, None, None, None, None, True), small.to(dtype), vectorize=True)
        for fn, dtype in ((tritonbn.batch_norm, torch.float32),
                          (torch.nn.functional.batch_norm, torch.float64))]
    assert_within_largest(*jacobians, "jacobian")


def test_forward_mode_ad_under_compile_raises():
    """Dual tensors inside torch.compile: the compiled graph holds the custom ops, which
    have no forward-mode formula, so the tangent would be lost: an error instead."""
    torch._dynamo.reset()
    x, tx = make_tensor(SHAPE), make_tensor(SHAPE)
    compiled = torch.compile(lambda x: tritonbn.batch_norm(x, None, None, training=True),
                             backend="aot_eager")
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(Exception, match="forward-mode AD"):
            compiled(torch.autograd.forward_ad.make_dual(x, tx))


@pytest.mark.parametrize("transform", ["grad", "vmap"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_transform_under_compile_raises(training, transform):
    """torch.func.grad or vmap inside torch.compile is a known limit (README): Dynamo
    cannot trace the custom ops' autograd under a transform. tritonbn's error, whose
    words Dynamo's own error carries, rather than an internal one; jvp there works
    through the dual tensors (computed by torch)."""
    torch._dynamo.reset()
    x, (w, _, rm, rv) = make_tensor(SHAPE), make_params(SHAPE[1])

    def loss(w):
        return tritonbn.batch_norm(x, rm, rv, w, None, training).square().sum()

    if transform == "grad":
        fn, arg = torch.func.grad(loss), w
    else:
        fn, arg = torch.func.vmap(lambda w: loss(w)), torch.stack([w, w])
    with pytest.raises(Exception, match="torch.func transforms"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(arg)
    torch._dynamo.reset()


def test_jvp_under_compile_matches_torch():
    """torch.func.jvp inside torch.compile: the input's tangent is seen as a dual tensor, and
    torch's BatchNorm computes the call, as in eager mode."""
    torch._dynamo.reset()
    x, tx = make_tensor(SHAPE), make_tensor(SHAPE)

    def jvp(fn, dtype):
        return torch.func.jvp(lambda x: fn(x, None, None, None, None, True),
                              (x.to(dtype),), (tx.to(dtype),))

    got = torch.compile(lambda: jvp(tritonbn.batch_norm, torch.float32),
                        backend="aot_eager", fullgraph=True)()
    ref = jvp(torch.nn.functional.batch_norm, torch.float64)
    for name, g, r in zip(("output", "tangent"), got, ref):
        assert_within_largest(g, r, name)
    torch._dynamo.reset()
