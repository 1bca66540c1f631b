"""tritonbn under torch.func transforms (grad, vjp, nested grad; vmap raises), as used by
meta-learning and per-example-loss code with torch.func.functional_call.

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


def test_vmap_raises():
    """vmap is not supported (torch's BatchNorm has batching rules, tritonbn's autograd
    Functions have none): it must raise, not compute something else."""
    x = make_tensor((3, *SHAPE))
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda x: tritonbn.batch_norm(x, None, None, None, None, True))(x)
