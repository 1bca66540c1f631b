"""Bad input raises what torch raises: the same exception type, and the same message where
torch's message is stable (its own Python-level checks and the size checks of ATen).

Each case runs torch's call and tritonbn's call on the same arguments and compares the
outcome, so the test follows torch's behaviour instead of a hard-coded copy of it.
"""
from __future__ import annotations

import fractions

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tests.reference import DEVICE, make_tensor


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (we compare whatever torch raises)
        return type(e), str(e)
    return None, None


def assert_same_error(torch_call, triton_call, *, same_message=True):
    expected_type, expected_msg = outcome(torch_call)
    assert expected_type is not None, "the case is not an error for torch: fix the test"
    got_type, got_msg = outcome(triton_call)
    assert got_type is expected_type, (
        f"torch raises {expected_type.__name__}({expected_msg!r}), tritonbn "
        f"{'raises ' + got_type.__name__ + repr((got_msg,)) if got_type else 'does not raise'}")
    if same_message:
        assert got_msg == expected_msg


# --- modules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 4, 5)), (1, (3,)), (2, (2, 3, 4)),
                                        (2, (2, 3, 4, 5, 6)), (3, (2, 3, 4, 5)),
                                        (3, (2, 3))],
                         ids=["1d_got_4d", "1d_got_1d", "2d_got_3d", "2d_got_5d",
                              "3d_got_4d", "3d_got_2d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_wrong_rank(dims, shape, training):
    """ValueError('expected 4D input (got 3D input)') and its siblings."""
    torch_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    triton_cls = {1: tritonbn.BatchNorm1d, 2: tritonbn.BatchNorm2d,
                  3: tritonbn.BatchNorm3d}[dims]
    x = make_tensor(shape)
    assert_same_error(lambda: torch_cls(3, device=DEVICE).train(training)(x),
                      lambda: triton_cls(3, device=DEVICE).train(training)(x))


@pytest.mark.parametrize("track", [True, False], ids=["tracking", "no_tracking"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_channel_mismatch(track, training):
    """A 4-channel input into BatchNorm2d(3): RuntimeError. Type only: which of weight /
    running_mean the message names first is ATen's check order, not a contract."""
    x = make_tensor((2, 4, 3, 3))
    assert_same_error(
        lambda: nn.BatchNorm2d(3, track_running_stats=track, device=DEVICE).train(training)(x),
        lambda: tritonbn.BatchNorm2d(3, track_running_stats=track,
                                     device=DEVICE).train(training)(x),
        same_message=False)


@pytest.mark.parametrize("dims,shape", [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)),
                                        (3, (1, 3, 1, 1, 1))],
                         ids=["1d_NC", "1d_NCL", "2d", "3d"])
def test_module_one_value_per_channel_in_training(dims, shape):
    """ValueError('Expected more than 1 value per channel when training, ...')."""
    torch_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    triton_cls = {1: tritonbn.BatchNorm1d, 2: tritonbn.BatchNorm2d,
                  3: tritonbn.BatchNorm3d}[dims]
    x = make_tensor(shape)
    assert_same_error(lambda: torch_cls(3, device=DEVICE)(x),
                      lambda: triton_cls(3, device=DEVICE)(x))


def test_one_value_per_channel_is_fine_in_eval():
    x = make_tensor((1, 3))
    y = tritonbn.BatchNorm1d(3, device=DEVICE).eval()(x)
    torch.testing.assert_close(y, nn.BatchNorm1d(3, device=DEVICE).eval()(x))


# hyperparameters a layer hands torch's argument parser as they are, set after construction
_HYPERPARAMETER_CASES = {
    "momentum_str": ("momentum", "0.3"),
    "momentum_fraction": ("momentum", fractions.Fraction(1, 3)),
    "momentum_1d_tensor": ("momentum", torch.tensor([0.3])),
    "eps_fraction": ("eps", fractions.Fraction(1, 1000)),
    "eps_str": ("eps", "0.001"),  # a comparison's TypeError, from torch's Python checks
    "eps_requires_grad": ("eps", torch.tensor(1e-3, requires_grad=True)),
}


@pytest.mark.parametrize("name", list(_HYPERPARAMETER_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_hyperparameter_types(name, training):
    """What torch's parser refuses as momentum or eps, the layers refuse with its
    TypeError, leaving the running statistics as they were (num_batches_tracked counts the
    call in training, in both)."""
    attr, value = _HYPERPARAMETER_CASES[name]
    x = make_tensor((2, 3, 4))
    layers = [cls(3, device=DEVICE).train(training)
              for cls in (nn.BatchNorm1d, tritonbn.BatchNorm1d)]
    for m in layers:
        setattr(m, attr, value)
    assert_same_error(lambda: layers[0](x), lambda: layers[1](x))
    for key, t in layers[0].state_dict().items():
        assert torch.equal(layers[1].state_dict()[key], t), key


@pytest.mark.parametrize("how", ["set_to_none", "tracking_switched_on"])
def test_sync_batch_norm_needs_its_count_in_training(how):
    """torch's SyncBatchNorm (unlike BatchNorm) raises AssertionError in training when
    tracking statistics without num_batches_tracked, before touching anything."""
    layers = []
    for cls in (nn.SyncBatchNorm, tritonbn.SyncBatchNorm):
        if how == "set_to_none":
            m = cls(3, device=DEVICE)
            m.num_batches_tracked = None
        else:
            m = cls(3, track_running_stats=False, device=DEVICE)
            m.track_running_stats = True
        layers.append(m)
    x = make_tensor((2, 3, 4))
    assert_same_error(lambda: layers[0](x), lambda: layers[1](x))
    for key, t in layers[0].state_dict().items():
        assert torch.equal(layers[1].state_dict()[key], t), key


# --- functional -------------------------------------------------------------------------------

def _stats(C=3):
    return torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)


FUNCTIONAL_CASES = {
    # (x shape, running_mean, running_var, weight, bias, training), same_message
    "running_var_none": (lambda: ((4, 3, 5), _stats()[0], None, None, None, True), True),
    "running_mean_none": (lambda: ((4, 3, 5), None, _stats()[1], None, None, True), True),
    "running_mean_none_eval": (lambda: ((4, 3, 5), None, _stats()[1], None, None, False),
                               True),
    "eval_without_running_stats": (lambda: ((4, 3, 5), None, None, None, None, False), True),
    "one_value_per_channel": (lambda: ((1, 3), *_stats(), None, None, True), True),
    "one_value_per_channel_no_stats": (lambda: ((1, 3, 1, 1), None, None, None, None, True),
                                       True),
    "1d_input_no_stats": (lambda: ((5,), None, None, None, None, True), False),
    "1d_input_with_stats": (lambda: ((5,), *_stats(5), None, None, True), False),
    "1d_input_with_stats_eval": (lambda: ((5,), *_stats(5), None, None, False), False),
    "0d_input": (lambda: ((), None, None, None, None, True), False),
    "channel_mismatch": (lambda: ((4, 4, 5), *_stats(), None, None, True), True),
    "channel_mismatch_eval": (lambda: ((4, 4, 5), *_stats(), None, None, False), True),
    "weight_size": (lambda: ((4, 3, 5), *_stats(), torch.ones(4, device=DEVICE), None,
                             True), True),
    "bias_size": (lambda: ((4, 3, 5), None, None, None, torch.ones(2, device=DEVICE), True),
                  True),
    # Parameter dtypes: fp32 or the input's; mixing is an error (message names the device).
    "weight_float64": (lambda: ((4, 3, 5), *_stats(),
                                torch.ones(3, dtype=torch.float64, device=DEVICE), None, True),
                       False),
    "running_stats_int": (lambda: ((4, 3, 5), *(t.long() for t in _stats()), None, None,
                                   True), False),
}


def _functional_args(spec, dtype=torch.float32):
    shape, rm, rv, w, b, training = spec()
    return make_tensor(shape, dtype), rm, rv, w, b, training


@pytest.mark.parametrize("name", list(FUNCTIONAL_CASES))
def test_functional_errors(name):
    spec, same_message = FUNCTIONAL_CASES[name]
    args = _functional_args(spec)
    assert_same_error(lambda: F.batch_norm(*args), lambda: tritonbn.batch_norm(*args),
                      same_message=same_message)


@pytest.mark.parametrize("param_dtypes", [
    (torch.float32, torch.float16), (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16)], ids=["w32_stats16", "w16_stats32", "bf16_params"])
def test_functional_mixed_parameter_dtypes(param_dtypes):
    """fp16 input: the parameters must be all fp16 or all fp32 (torch's mixed-type rule on
    CPU and CUDA); fp16 weight with fp32 running stats or vice versa raises, as does a bf16
    parameter."""
    w_dtype, stat_dtype = param_dtypes
    x = make_tensor((4, 3, 5), torch.float16)
    w = torch.ones(3, dtype=w_dtype, device=DEVICE)
    rm, rv = (t.to(stat_dtype) for t in _stats())
    assert_same_error(lambda: F.batch_norm(x, rm, rv, w, None, True),
                      lambda: tritonbn.batch_norm(x, rm, rv, w, None, True),
                      same_message=False)


@pytest.mark.parametrize("eps,training", [(0.0, True), (-1e-5, True), (-1e-5, False),
                                          (0.0, False)],
                         ids=["eps0_train", "eps_negative_train", "eps_negative_eval",
                              "eps0_eval"])
def test_functional_bad_eps(eps, training):
    """Whatever this torch says of eps: torch <= 2.9 does not check it, 2.10 and 2.11 raise
    ValueError('batch_norm eps must be positive, ...') for eps <= 0 in both modes, 2.12 on
    allow eps = 0 in evaluation and word the two errors differently."""
    x = make_tensor((4, 3, 5))
    expected_type, _ = outcome(lambda: F.batch_norm(x, *_stats(), None, None, training,
                                                    0.1, eps))
    if expected_type is None:
        assert outcome(lambda: tritonbn.batch_norm(x, *_stats(), None, None, training, 0.1,
                                                   eps)) == (None, None)
        return
    assert_same_error(lambda: F.batch_norm(x, *_stats(), None, None, training, 0.1, eps),
                      lambda: tritonbn.batch_norm(x, *_stats(), None, None, training, 0.1, eps))


def test_module_zero_eps_in_training():
    x = make_tensor((4, 3, 5))
    assert_same_error(lambda: nn.BatchNorm1d(3, eps=0.0, device=DEVICE)(x),
                      lambda: tritonbn.BatchNorm1d(3, eps=0.0, device=DEVICE)(x))


ARGUMENT_CASES = {
    # torch.batch_norm's argument parser: TypeError, its message naming the position.
    # momentum=None is the module's business; torch's functional takes a float.
    "momentum_none": dict(momentum=None),
    "momentum_str": dict(momentum="0.1"),
    "momentum_fraction": dict(momentum=fractions.Fraction(1, 10)),
    "momentum_1d_tensor": dict(momentum=torch.tensor([0.1])),
    "momentum_requires_grad": dict(momentum=torch.tensor(0.1, requires_grad=True)),
    "training_none": dict(training=None),
    "training_int": dict(training=1),
    "training_tensor": dict(training=torch.tensor(True)),
    "weight_list": dict(weight=[1.0, 1.0, 1.0]),
    "running_mean_list": dict(running_mean=[0.0, 0.0, 0.0]),
    # autograd's check: running statistics are buffers, not inputs to differentiate
    "running_mean_requires_grad": dict(running_mean=torch.zeros(3, requires_grad=True)),
    "running_var_requires_grad_eval": dict(running_var=torch.ones(3, requires_grad=True),
                                           training=False),
}


@pytest.mark.parametrize("name", list(ARGUMENT_CASES))
def test_functional_argument_errors(name):
    x = make_tensor((4, 3, 5))

    def call(fn):
        rm, rv = _stats()
        kwargs = dict(running_mean=rm, running_var=rv, training=True, momentum=0.1)
        kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.dim() else v
                       for k, v in ARGUMENT_CASES[name].items()})
        return lambda: fn(x, **kwargs)

    assert_same_error(call(F.batch_norm), call(tritonbn.batch_norm))


@pytest.mark.parametrize("momentum", [np.float32(0.25), np.int64(1), torch.tensor(0.25), True],
                         ids=["np_float32", "np_int64", "tensor_0d", "bool"])
def test_functional_momentum_types_torch_takes(momentum):
    """Numbers torch's parser takes as a float momentum: the same running statistics."""
    x = make_tensor((4, 3, 5))
    updated = []
    for fn in (F.batch_norm, tritonbn.batch_norm):
        rm, rv = _stats()
        fn(x, rm, rv, training=True, momentum=momentum)
        updated += [rm, rv]
    torch.testing.assert_close(updated[0], updated[2])
    torch.testing.assert_close(updated[1], updated[3])


def test_running_stats_requiring_grad_are_fine_without_grad_mode():
    """As in torch: the check is autograd's, so no_grad lets such buffers be updated."""
    x = make_tensor((4, 3, 5))
    updated = []
    for fn in (F.batch_norm, tritonbn.batch_norm):
        rm = torch.zeros(3, device=DEVICE, requires_grad=True)
        with torch.no_grad():
            fn(x, rm, torch.ones(3, device=DEVICE), training=True)
        updated.append(rm.detach())
    torch.testing.assert_close(*updated)


def test_integer_input():
    x = torch.ones(4, 3, 5, dtype=torch.int64, device=DEVICE)
    assert_same_error(lambda: F.batch_norm(x, *_stats(), training=True),
                      lambda: tritonbn.batch_norm(x, *_stats(), training=True))


def test_errors_leave_running_stats_alone():
    """A call that raises has not updated anything on the way."""
    rm, rv = _stats()
    with pytest.raises(RuntimeError):
        tritonbn.batch_norm(make_tensor((4, 3, 5)), rm, rv, torch.ones(4, device=DEVICE),
                            None, True)
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))
    assert torch.equal(rv, torch.ones(3, device=DEVICE))
