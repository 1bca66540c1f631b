"""The tuning space and the autotuning machinery (configs.py, launch.py).

* Every config of every kernel, forced through the real launch path, against a float64
  reference, in NCHW and channels_last, on inputs that give at least two tiles along the
  reduction axes (so several splits), two channel blocks, and masked tails on most axes.
* Autotuning really runs (on CPU with launch._cpu_bench): chosen configs are listed, trials
  leave the running statistics as torch leaves them, results match the reference.
* Pruning rules (configs.config_fits) and launch._prune never returning nothing.
* TRITONBN_AUTOTUNE=0 uses configs.default_config and tunes nothing.

Runs in the Triton interpreter on CPU and, unchanged, on a GPU (``device`` fixture).
"""
from __future__ import annotations

import pytest
import torch

import tritonbn
from tritonbn.kernels import configs, launch
from tritonbn.kernels.geometry import make_geometry
from tritonbn.kernels.tiles import CONTIG_CHANNEL, CONTIG_INNER

EPS = 1e-5
MOMENTUM = 0.1
LAYOUTS = ("nchw", "channels_last")


def _name(cfg) -> str:
    """Test id of a triton.Config."""
    kw = cfg.kwargs
    s = f"C{kw['BLOCK_C']}" if "BLOCK_O" not in kw else \
        f"O{kw['BLOCK_O']}_I{kw['BLOCK_I']}_C{kw['BLOCK_C']}"
    if "WAVES" in kw:
        s += f"_W{kw['WAVES']}"
    return f"{s}_w{cfg.num_warps}"


REDUCTION_CONFIGS = configs.kernel_configs(True)
APPLY_CONFIGS = configs.kernel_configs(False)
FUSED_CONFIGS = configs.fused_kernel_configs()


# ----------------------------------------------------------------------------- helpers

def _shape(cfg, layout: str) -> tuple[int, int, int, int]:
    """A small (N, C, H, W) input for this tile: 2+ tiles along the reduction axes, a
    masked tail on most tile axes, 2 channel blocks (the second one partly masked when
    BLOCK_C > 1)."""
    bo, bi, bc = cfg.kwargs["BLOCK_O"], cfg.kwargs["BLOCK_I"], cfg.kwargs["BLOCK_C"]
    C = bc + 1
    if layout == "nchw":  # outer = N, inner = H*W (unit stride)
        return bo + 1, C, 2, (bi + bi // 2 + 2) // 2
    # channels_last: everything but C merges into inner = N*H*W (stride C); outer = 1.
    return 2, C, 2, max(1, (3 * bi // 2 + 2) // 4)


def _input(shape, layout, device, scale=2.0, offset=3.0):
    x = torch.randn(shape, device=device) * scale + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _expected_contig(layout):
    return CONTIG_INNER if layout == "nchw" else CONTIG_CHANNEL


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _bc(v, x):
    """Per-channel [C] -> broadcastable against x."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _close(got, ref, scale, rtol=2e-5):
    """|got - ref| <= rtol * (scale + |ref|) + tiny: ``scale`` is the size of the terms the
    value is made of, so the bound is fp32 rounding of a sum of such terms."""
    got = got.double().cpu()
    ref = ref.double().cpu()
    scale = torch.as_tensor(scale, dtype=torch.float64).cpu()
    bound = rtol * (scale + ref.abs()) + 1e-6
    err = (got - ref).abs()
    assert torch.all(err <= bound), f"max err {err.max():.3g}, worst excess " \
        f"{(err - bound).max():.3g}"


def _ref_stats(x):
    xd = x.double()
    d = _dims(x)
    mean = xd.mean(d)
    var = xd.var(d, unbiased=False)
    return mean, var


class _Checked:
    """A RAW kernel that asserts each launch really uses the forced config's tile."""

    def __init__(self, kernel, cfg):
        self.kernel, self.cfg = kernel, cfg

    def __getitem__(self, grid):
        def launch_checked(*args, **kwargs):
            for k in self.cfg.kwargs.keys() & {"BLOCK_O", "BLOCK_I", "BLOCK_C"}:
                assert kwargs[k] == self.cfg.kwargs[k], (k, kwargs[k], self.cfg)
            assert kwargs["num_warps"] == self.cfg.num_warps
            return self.kernel[grid](*args, **kwargs)
        return launch_checked


@pytest.fixture
def forced_config(monkeypatch):
    """force(cfg): route every launch through the fixed-config path with ``cfg``.

    Launch plans and the partials workspace size are built from default_config and cached
    per shape (launch._plan, launch._max_splits): the caches are cleared whenever the forced
    config changes, and afterwards, so that neither a stale config nor a stale size (a
    too-small workspace would be written out of bounds) outlives the test."""
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "0")
    clear = launch.clear_caches
    real_kernels = dict(launch.RAW)

    def force(cfg):
        kw = dict(cfg.kwargs)
        warps = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if "BLOCK_O" in kw:  # split-path kernels
            kw.setdefault("WAVES", 4)  # the launcher pops it for the apply kernel
            monkeypatch.setattr(configs, "default_config", lambda *a, **k: dict(kw, **warps))
        else:  # the single-pass kernel
            monkeypatch.setattr(configs, "fused_default_config",
                                lambda *a, **k: dict(kw, **warps))
        for name, kernel in real_kernels.items():
            monkeypatch.setitem(launch.RAW, name, _Checked(kernel, cfg))
        clear()

    yield force
    monkeypatch.undo()
    clear()


# ------------------------------------------------------------- every config, every kernel

@pytest.mark.parametrize("cfg", REDUCTION_CONFIGS, ids=_name)
def test_stats_every_config(cfg, device, forced_config):
    forced_config(cfg)
    for layout in LAYOUTS:
        x = _input(_shape(cfg, layout), layout, device)
        geom = make_geometry(x)
        assert geom.contig == _expected_contig(layout)
        C = x.shape[1]
        rm0 = torch.randn(C, device=device)
        rv0 = torch.rand(C, device=device) + 0.5
        rm, rv = rm0.clone(), rv0.clone()
        assert launch.reduction_grid(geom, cfg.kwargs, x.device)[1] >= 2  # several splits
        mean, invstd = launch.launch_stats(x, geom, rm, rv, None, MOMENTUM, EPS)
        ref_mean, ref_var = _ref_stats(x)
        M = x.numel() // C
        mag = x.double().abs().amax(_dims(x)).cpu()
        _close(mean, ref_mean, mag)
        _close(invstd, 1 / torch.sqrt(ref_var + EPS), 0, rtol=1e-4)
        _close(rm, (1 - MOMENTUM) * rm0.double() + MOMENTUM * ref_mean, mag)
        _close(rv, (1 - MOMENTUM) * rv0.double() + MOMENTUM * ref_var * M / (M - 1), 0,
               rtol=1e-4)
        # The arrival counters are back to zero for the next launch.
        assert int(launch.counters.get(x.device, C).count_nonzero()) == 0


@pytest.mark.parametrize("cfg", REDUCTION_CONFIGS, ids=_name)
def test_grad_stats_every_config(cfg, device, forced_config):
    forced_config(cfg)
    for layout in LAYOUTS:
        x = _input(_shape(cfg, layout), layout, device)
        dy = _input(x.shape, layout, device, scale=1.0, offset=0.5)
        C = x.shape[1]
        ref_mean, ref_var = _ref_stats(x)
        mean = ref_mean.float().to(device)
        invstd = (1 / torch.sqrt(ref_var + EPS)).float().to(device)
        assert launch.reduction_grid(make_geometry(x, dy), cfg.kwargs, x.device)[1] >= 2
        gw = torch.empty(C, device=device)
        gb = torch.empty(C, device=device)
        coef = launch.launch_grad_stats(x, dy, mean, invstd, EPS, stat_is_var=False,
                                        grad_weight=gw, grad_bias=gb, want_coef=True)
        d = _dims(x)
        xmu = x.double() - _bc(mean.double(), x)
        dyd = dy.double()
        M = x.numel() // C
        inv = invstd.double().cpu()
        sum_dy, dot = dyd.sum(d).cpu(), (dyd * xmu).sum(d).cpu()
        s_dy = dyd.abs().sum(d).cpu()
        s_dot = (dyd * xmu).abs().sum(d).cpu()
        _close(gb, sum_dy, s_dy)
        _close(gw, dot * inv, s_dot * inv)
        _close(coef[0], sum_dy / M, s_dy / M)
        _close(coef[1], dot * inv * inv / M, s_dot * inv * inv / M)
        assert int(launch.counters.get(x.device, C).count_nonzero()) == 0


@pytest.mark.parametrize("mode", ["forward", "backward_train", "backward_eval"])
@pytest.mark.parametrize("cfg", APPLY_CONFIGS, ids=_name)
def test_apply_every_config(cfg, mode, device, forced_config):
    forced_config(cfg)
    for layout in LAYOUTS:
        x = _input(_shape(cfg, layout), layout, device)
        C = x.shape[1]
        w = torch.randn(C, device=device)
        b = torch.randn(C, device=device)
        mean = torch.randn(C, device=device) + 3.0
        var = torch.rand(C, device=device) + 0.5
        invstd = 1 / torch.sqrt(var + EPS)
        out = torch.empty_like(x)
        xd, wd = x.double(), _bc(w.double(), x)
        if mode == "forward":
            launch.launch_apply(x, None, out, mean, invstd, w, b, None, EPS,
                                stat_is_var=False, backward=False)
            xmu = xd - _bc(mean.double(), x)
            scale_t = xmu * _bc(invstd.double(), x) * wd
            ref = scale_t + _bc(b.double(), x)
            mag = (xd.abs() + _bc(mean.double().abs(), x)) * _bc(invstd.double(), x) \
                * wd.abs() + _bc(b.double().abs(), x)
        else:
            dy = _input(x.shape, layout, device, scale=1.0, offset=0.5)
            dyd = dy.double()
            if mode == "backward_train":
                coef = torch.randn(2, C, device=device)
                launch.launch_apply(x, dy, out, mean, invstd, w, None, coef, EPS,
                                    stat_is_var=False, backward=True)
                k1, k2 = _bc(coef[0].double(), x), _bc(coef[1].double(), x)
                xmu = xd - _bc(mean.double(), x)
                sc = wd * _bc(invstd.double(), x)
                ref = (dyd - k1 - xmu * k2) * sc
                mag = (dyd.abs() + k1.abs() + xmu.abs() * k2.abs()) * sc.abs()
            else:  # eval: running statistics, invstd computed in the kernel
                launch.launch_apply(x, dy, out, mean, var, w, None, None, EPS,
                                    stat_is_var=True, backward=True)
                sc = wd / torch.sqrt(_bc(var.double(), x) + EPS)
                ref = dyd * sc
                mag = (dyd * sc).abs()
        assert out.stride() == x.stride()
        _close(out, ref, mag)


def _fused_shape(cfg, layout: str) -> tuple[int, int, int, int]:
    """A small (N, C, H, W) input whose whole reduction fits one tile of this BLOCK_C (at
    most FUSED_MAX_VOLUME elements), with 2 channel blocks (the second one partly masked
    when BLOCK_C > 1) and masked tails along outer and inner."""
    bc = cfg.kwargs["BLOCK_C"]
    if layout == "nchw":  # outer N = 3 -> 4, inner H*W = 35 -> 64, or 15 -> 16
        return (3, bc + 1, 5, 7) if 4 * 64 * bc <= configs.FUSED_MAX_VOLUME else (3, bc + 1, 3, 5)
    return (3, bc + 1, 3, 3) if 32 * bc <= configs.FUSED_MAX_VOLUME else (2, bc + 1, 1, 3)


@pytest.mark.parametrize("cfg", FUSED_CONFIGS, ids=_name)
def test_fused_every_config(cfg, device, forced_config):
    """The single-pass kernel with each config: training forward (statistics, running
    statistics, output) and backward in training and eval mode, against float64."""
    forced_config(cfg)
    for layout in LAYOUTS:
        x = _input(_fused_shape(cfg, layout), layout, device)
        dy = _input(x.shape, layout, device, scale=1.0, offset=0.5)
        C = x.shape[1]
        M = x.numel() // C
        assert configs.fused_fits(make_geometry(x))
        w = torch.randn(C, device=device)
        b = torch.randn(C, device=device)
        rm0 = torch.randn(C, device=device)
        rv0 = torch.rand(C, device=device) + 0.5
        rm, rv = rm0.clone(), rv0.clone()
        y = torch.empty_like(x)
        mean, invstd = launch.launch_fused_forward(x, y, make_geometry(x, y), w, b, rm, rv, None,
                                                   MOMENTUM, EPS)
        ref_mean, ref_var = _ref_stats(x)
        ref_invstd = 1 / torch.sqrt(ref_var + EPS)
        mag = x.double().abs().amax(_dims(x)).cpu()
        _close(mean, ref_mean, mag)
        _close(invstd, ref_invstd, 0, rtol=1e-4)
        _close(rm, (1 - MOMENTUM) * rm0.double() + MOMENTUM * ref_mean, mag)
        _close(rv, (1 - MOMENTUM) * rv0.double() + MOMENTUM * ref_var * M / (M - 1), 0,
               rtol=1e-4)
        xd, dyd, wd = x.double(), dy.double(), _bc(w.double(), x)
        xhat = (xd - _bc(ref_mean, x)) * _bc(ref_invstd, x)
        assert y.stride() == x.stride()
        # y (and dx below) are built on the kernel's own invstd, whose 1e-4 bound (as in the
        # split statistics test) carries through: the output cannot be tighter than it.
        _close(y, xhat * wd + _bc(b.double(), x), (xhat.abs() + 1) * wd.abs() + 1, rtol=1e-4)

        for batch_stats in (True, False):
            gx = torch.empty_like(x)
            gw = torch.empty(C, device=device)
            gb = torch.empty(C, device=device)
            if batch_stats:
                m_in, s_in, inv = mean, invstd, _bc(invstd.double(), x)
            else:
                m_in, s_in, inv = rm0, rv0, _bc(1 / torch.sqrt(rv0.double() + EPS), x)
            launch.launch_fused_backward(x, dy, gx, make_geometry(x, dy, gx), m_in, s_in, w,
                                         EPS, stat_is_var=not batch_stats, grad_weight=gw,
                                         grad_bias=gb)
            d = _dims(x)
            xmu = xd - _bc(m_in.double(), x)
            sum_dy, dot = dyd.sum(d), (dyd * xmu).sum(d)
            s_dy, s_dot = dyd.abs().sum(d), (dyd * xmu).abs().sum(d)
            _close(gb, sum_dy, s_dy)
            _close(gw, dot * inv.flatten(), s_dot * inv.flatten())
            if batch_stats:
                k1, k2 = _bc(sum_dy / M, x), _bc(dot / M, x) * inv * inv
                ref = (dyd - k1 - xmu * k2) * wd * inv
                mag = (dyd.abs() + k1.abs() + (xmu * k2).abs()) * (wd * inv).abs()
            else:
                ref, mag = dyd * wd * inv, (dyd * wd * inv).abs()
            assert gx.stride() == x.stride()
            _close(gx, ref, mag, rtol=1e-4)


def test_every_config_is_exercised():
    """The parametrised tests above cover the whole tuning space, and it is what the
    autotuners are built with."""
    space = {"bn_stats_kernel": REDUCTION_CONFIGS, "bn_grad_stats_kernel": REDUCTION_CONFIGS,
             "bn_apply_kernel": APPLY_CONFIGS, "bn_fused_kernel": FUSED_CONFIGS}
    assert set(launch.TUNED) == set(space)
    for name, tuner in launch.TUNED.items():
        want = space[name]
        assert len(want) == len({_name(c) for c in want})
        assert sorted(map(_name, tuner.configs)) == sorted(map(_name, want))
    for cfg in REDUCTION_CONFIGS:
        assert cfg.kwargs["WAVES"] in configs.WAVES_CHOICES
    for cfg in REDUCTION_CONFIGS + APPLY_CONFIGS:
        kw = cfg.kwargs
        volume = kw["BLOCK_O"] * kw["BLOCK_I"] * kw["BLOCK_C"]
        assert configs.VOLUME_WARPS[volume] == cfg.num_warps


# ------------------------------------------------------------------------- autotuning

@pytest.fixture
def fresh_tuners(monkeypatch):
    """Empty autotune caches for the test (restored afterwards): every key is new, and the
    launch plans that remember the autotuners' choices are forgotten too."""
    for tuner in launch.TUNED.values():
        monkeypatch.setattr(tuner, "cache", {})
    launch.clear_caches()
    yield launch.TUNED
    launch.clear_caches()


def _timings(tuner):
    return getattr(tuner, "configs_timings", None) or {}


def test_autotune_runs_and_trials_leave_state_alone(device, monkeypatch, fresh_tuners,
                                                    kernel_path):
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    single = kernel_path == "single_pass"  # M = 512 fits the single-pass kernel
    forward_kernels = ["bn_fused_kernel"] if single else ["bn_stats_kernel", "bn_apply_kernel"]
    assert tritonbn.autotune_enabled()
    for tuner in fresh_tuners.values():
        monkeypatch.setattr(tuner, "configs_timings", {}, raising=False)
    # Small, but big enough that pruning keeps several configs of each kernel.
    x = torch.randn(2, 16, 16, 16, device=device) * 2 + 3
    ref_bn = torch.nn.BatchNorm2d(16).to(device)
    with torch.no_grad():
        ref_bn.weight.copy_(torch.randn(16))
        ref_bn.bias.copy_(torch.randn(16))
        ref_bn.running_mean.copy_(torch.randn(16))
        ref_bn.running_var.copy_(torch.rand(16) + 0.5)
    bn = tritonbn.BatchNorm2d(16).to(device)
    bn.load_state_dict(ref_bn.state_dict())

    xt = x.clone().requires_grad_(True)
    y = bn(xt)
    y_ref = ref_bn(x)
    # First call on a new key: several configs timed, and the running statistics advanced
    # exactly once, as torch's.
    chosen = tritonbn.chosen_configs()
    for name in forward_kernels:
        assert len(chosen[name]) == 1
        assert len(_timings(fresh_tuners[name])) > 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1

    # Results against the float64 reference.
    xd = x.double()
    mean, var = _ref_stats(x)
    wd, bd = bn.weight.detach().double(), bn.bias.detach().double()
    y64 = (xd - _bc(mean, x)) / torch.sqrt(_bc(var, x) + EPS) * _bc(wd, x) + _bc(bd, x)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    # Backward: the gradient statistics kernel (or the single-pass kernel on its backward
    # key) is tuned too.
    dy = torch.randn_like(x)
    y.backward(dy)
    backward_kernel = "bn_fused_kernel" if single else "bn_grad_stats_kernel"
    assert len(tritonbn.chosen_configs()[backward_kernel]) == (2 if single else 1)
    assert len(_timings(fresh_tuners[backward_kernel])) > 1
    x64 = xd.clone().requires_grad_(True)
    w64, b64 = wd.clone().requires_grad_(True), bd.clone().requires_grad_(True)
    y64 = torch.nn.functional.batch_norm(x64, None, None, w64, b64, True, 0.0, EPS)
    y64.backward(dy.double())
    torch.testing.assert_close(xt.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)

    # A second call on the same key reuses the decision (no new entry) and stays exact.
    before = {k: dict(v) for k, v in tritonbn.chosen_configs().items()}
    bn(x)
    ref_bn(x)
    assert tritonbn.chosen_configs() == before
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_chosen_configs_lists_kernel_key_and_config(device, monkeypatch, fresh_tuners,
                                                    kernel_path):
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    x = torch.randn(4, 8, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    bn = tritonbn.BatchNorm2d(8).to(device)
    bn(x)
    chosen = tritonbn.chosen_configs()
    assert set(chosen) == {"bn_stats_kernel", "bn_grad_stats_kernel", "bn_apply_kernel",
                           "bn_fused_kernel"}
    used = (["bn_fused_kernel"] if kernel_path == "single_pass"
            else ["bn_stats_kernel", "bn_apply_kernel"])
    assert all(chosen[name] == {} for name in set(chosen) - set(used))
    for name in used:
        (key, cfg), = chosen[name].items()
        assert isinstance(key, tuple)
        # Key: M and C buckets, the layout, the mode flags (and dtypes).
        assert key[0] == _next_pow2(x.numel() // 8) and key[1] == 8
        assert key[2] == CONTIG_CHANNEL
        tile = {"BLOCK_C"} if name == "bn_fused_kernel" else {"BLOCK_O", "BLOCK_I", "BLOCK_C"}
        assert tile | {"num_warps", "num_stages"} <= set(cfg)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test, then as it was."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("switch", ["env", "deterministic"])
def test_autotune_off_uses_default_config(device, monkeypatch, fresh_tuners, kernel_path,
                                          switch, request):
    """TRITONBN_AUTOTUNE=0, or torch's deterministic mode (a config chosen by timing may
    differ between processes, and with it the reductions' order and the result's bits)."""
    if switch == "env":
        monkeypatch.setenv("TRITONBN_AUTOTUNE", "0")
    else:
        monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
        request.getfixturevalue("deterministic_algorithms")
    assert not tritonbn.autotune_enabled()
    calls = []
    default = "fused_default_config" if kernel_path == "single_pass" else "default_config"
    real = getattr(configs, default)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(configs, default, spy)
    launch.clear_caches()  # a cached launch plan would not ask default_config again
    x = torch.randn(2, 8, 6, 6, device=device)
    bn = tritonbn.BatchNorm2d(8).to(device)
    ref = torch.nn.BatchNorm2d(8).to(device)
    xt = x.clone().requires_grad_(True)
    y = bn(xt)
    y.sum().backward()
    assert calls, "default_config was not used"
    assert all(v == {} for v in tritonbn.chosen_configs().values())
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("elem_size", [4, 2])
@pytest.mark.parametrize("interpreted", [False, True])
def test_default_config_shape(layout, elem_size, interpreted):
    """The default tile: power-of-two blocks, no block beyond its axis, unit-stride axis
    first (>= MIN_CONTIG_BLOCK when the axis allows), warps matched to the volume."""
    for shape in [(2, 3, 5, 7), (32, 64, 16, 16), (256, 512), (8, 2048, 1, 1), (1, 7, 3, 3)]:
        x = torch.empty(shape, device="meta")
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        geom = make_geometry(x)
        cfg = configs.default_config(geom, elem_size, interpreted)
        bo, bi, bc = cfg["BLOCK_O"], cfg["BLOCK_I"], cfg["BLOCK_C"]
        for b, n in ((bo, geom.outer_size), (bi, geom.inner_size), (bc, geom.channels)):
            assert b & (b - 1) == 0 and b <= _next_pow2(n)
        assert bo * bi * bc <= (512 if interpreted else 4096)
        assert cfg["num_warps"] == (8 if bo * bi * bc >= 4096 else 4)
        assert cfg["WAVES"] >= 1 and cfg["num_stages"] >= 1
        if not interpreted and geom.contig == CONTIG_INNER:
            assert bi >= min(_next_pow2(geom.inner_size), configs.MIN_CONTIG_BLOCK)
        if not interpreted and geom.contig == CONTIG_CHANNEL:
            assert bc >= min(_next_pow2(geom.channels), configs.MIN_CONTIG_BLOCK)


# ---------------------------------------------------------------------------- pruning

def _cfg(bo, bi, bc):
    return dict(BLOCK_O=bo, BLOCK_I=bi, BLOCK_C=bc)


def test_config_fits_rules():
    big = 1 << 20
    target = 2 * 132
    # 1. A block larger than its axis (rounded up to a power of two) is pruned.
    assert not configs.config_fits(_cfg(1, 1024, 1), 8, 100, 64, CONTIG_INNER, target)
    assert configs.config_fits(_cfg(1, 64, 16), 8, 100, 64, CONTIG_INNER, target)
    assert not configs.config_fits(_cfg(4, 16, 16), 1, big, 64, CONTIG_CHANNEL, target)
    assert not configs.config_fits(_cfg(1, 4, 256), 1, big, 100, CONTIG_CHANNEL, target)
    assert configs.config_fits(_cfg(1, 4, 256), 1, big, 200, CONTIG_CHANNEL, target)
    # 2. The block along the unit-stride axis keeps accesses 128-bit ...
    assert not configs.config_fits(_cfg(4, 4, 64), 64, 4096, 64, CONTIG_INNER, target)
    assert configs.config_fits(_cfg(4, 16, 16), 64, 4096, 64, CONTIG_INNER, target)
    assert not configs.config_fits(_cfg(1, 256, 4), 1, big, 64, CONTIG_CHANNEL, target)
    assert configs.config_fits(_cfg(1, 64, 16), 1, big, 64, CONTIG_CHANNEL, target)
    # ... or covers the whole (short) axis.
    assert configs.config_fits(_cfg(4, 4, 64), 64, 4, 64, CONTIG_INNER, target)
    assert configs.config_fits(_cfg(1, 256, 4), 1, big, 4, CONTIG_CHANNEL, target)
    # A short unit-stride axis that no block choice matches (8: between 4 and 16) takes
    # the largest choice below it, rather than leaving no config at all.
    assert configs.config_fits(_cfg(1, 256, 4), 1, big, 8, CONTIG_CHANNEL, target)
    assert not configs.config_fits(_cfg(1, 64, 16), 1, big, 8, CONTIG_CHANNEL, target)
    assert configs.config_fits(_cfg(4, 4, 64), 64, 8, 64, CONTIG_INNER, target)
    assert configs.config_fits(_cfg(4, 1, 256), 64, 2, 256, CONTIG_INNER, target)
    # Without a unit-stride axis rule 2 does not apply.
    assert configs.config_fits(_cfg(4, 4, 64), 64, 4096, 64, 0, target)
    # 3. A 4096-element tile needs enough work to fill the device ...
    assert not configs.config_fits(_cfg(1, 64, 64), 4, 256, 64, CONTIG_INNER, target)
    assert configs.config_fits(_cfg(1, 64, 64), 256, 4096, 64, CONTIG_INNER, target)
    # ... while a 1024-element tile is kept for the same small problem.
    assert configs.config_fits(_cfg(1, 64, 16), 4, 256, 64, CONTIG_INNER, target)


@pytest.mark.parametrize("reduction", [True, False])
def test_prune_never_empty(reduction):
    cfgs = configs.kernel_configs(reduction)
    dummy = torch.empty(0)
    sizes = [1, 2, 3, 7, 16, 100, 1000, 100000]
    for outer in [1, 2, 5, 64]:
        for inner in sizes:
            for chans in sizes:
                for contig in (0, CONTIG_INNER, CONTIG_CHANNEL):
                    kept = launch._prune(cfgs, dict(O=outer, I=inner, C=chans, x_ptr=dummy),
                                         CONTIG=contig)
                    assert kept, (outer, inner, chans, contig)
                    assert all(any(k is c for c in cfgs) for k in kept)
    # Short unit-stride axes (BatchNorm1d on (N, 8), (N, C, 8), (N, C, 2)) still find
    # fitting configs instead of the fallback.
    for outer, inner, chans, contig in [(1, 4096, 8, CONTIG_CHANNEL),
                                        (64, 8, 64, CONTIG_INNER),
                                        (64, 2, 256, CONTIG_INNER)]:
        kept = launch._prune(cfgs, dict(O=outer, I=inner, C=chans, x_ptr=dummy),
                             CONTIG=contig)
        assert all(configs.config_fits(c.kwargs, outer, inner, chans, contig, 4)
                   for c in kept), (outer, inner, chans, contig)
    # Pruning does its job on a typical shape: a few configs left out of the space.
    kept = launch._prune(cfgs, dict(O=32, I=3136, C=64, x_ptr=dummy), CONTIG=CONTIG_INNER)
    assert 1 < len(kept) < len(cfgs)
    assert all(c.kwargs["BLOCK_I"] >= configs.MIN_CONTIG_BLOCK for c in kept)


@pytest.mark.parametrize("shape,layout,fits", [
    ((32, 2048, 7, 7), "nchw", True),       # ResNet-50 layer4 at batch 32: 32 x 64 lanes
    ((32, 256, 14, 14), "nchw", True),      # 32 x 256 = 8192 lanes, the limit
    ((32, 512, 28, 28), "nchw", False),
    ((256, 2048, 7, 7), "nchw", False),     # 256 x 64 x 1 > 8192
    ((32, 2048, 7, 7), "channels_last", False),  # 2048 rows x 16 channels > 8192
    ((4, 64, 8, 8), "channels_last", True),      # 256 rows x 16 channels
    ((256, 1024), "nchw", True),            # BatchNorm1d: 256 rows x 16 channels
    ((7, 3, 5, 5), "channels_last", True),  # short channel axis: BLOCK_C 4 suffices
])
def test_fused_fits_prune_and_default(shape, layout, fits):
    """Which shapes the single-pass kernel takes, and that its pruning and default config
    follow the rules of configs.fused_config_fits (never an empty candidate list)."""
    x = torch.empty(shape, device="meta")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    geom = make_geometry(x)
    assert configs.fused_fits(geom) == fits
    if not fits:
        return
    bo, bi = configs.fused_tile(geom)
    assert bo >= geom.outer_size and bi >= geom.inner_size
    lo = 16 if geom.contig == CONTIG_CHANNEL and geom.channels >= 16 else 1
    if geom.contig == CONTIG_CHANNEL and geom.channels < 16:
        lo = 4
    kept = launch._prune_fused(FUSED_CONFIGS, dict(C=geom.channels, x_ptr=torch.empty(0)),
                               BLOCK_O=bo, BLOCK_I=bi, CONTIG=geom.contig)
    assert kept
    for c in kept:
        bc, volume = c.kwargs["BLOCK_C"], bo * bi * c.kwargs["BLOCK_C"]
        assert lo <= bc <= max(lo, _next_pow2(geom.channels))
        assert volume <= configs.FUSED_MAX_VOLUME
        assert volume // (32 * c.num_warps) in (8, 16, 32) or c.num_warps == 1
    for target in (4, 264):
        for interpreted in (False, True):
            cfg = configs.fused_default_config(geom, target, interpreted)
            assert configs.fused_config_fits(cfg["BLOCK_C"], cfg["num_warps"], bo, bi,
                                             geom.channels, geom.contig, target), cfg


def test_counters_reused_per_device_and_grown(device):
    """One counter buffer per device (and CUDA stream), reused across calls, replaced by a
    larger zeroed one when a launch needs more channel blocks than it holds."""
    a = launch.counters.get(torch.device(device), 8)
    assert launch.counters.get(torch.device(device), 8) is a
    big = launch.counters.get(torch.device(device), a.numel() + 1)
    assert big.numel() > a.numel() and int(big.count_nonzero()) == 0
    assert launch.counters.get(torch.device(device), 8) is big
