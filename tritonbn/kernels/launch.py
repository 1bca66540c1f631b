"""Launchers: shape -> config (autotuned or the fixed default) -> grid -> kernel.

Host code reads only shapes, strides and dtypes, never tensor values, so nothing here
synchronises with the device. Set TRITONBN_AUTOTUNE=0 (or torch.use_deterministic_algorithms)
to use the fixed default config of configs.default_config instead of autotuning.
"""
from __future__ import annotations

import functools
import os
import threading
import time

import torch
import triton
from triton.runtime.autotuner import Autotuner

from . import configs as C_
from .apply import bn_apply_kernel
from .fused import bn_fused_kernel
from .geometry import Geometry, make_geometry
from .grad_stats import bn_grad_stats_kernel
from .stats import bn_stats_kernel

INTERPRETED = type(bn_stats_kernel).__name__ == "InterpretedFunction"


def autotune_enabled() -> bool:
    """Autotuning is on unless TRITONBN_AUTOTUNE=0 or torch.use_deterministic_algorithms(True)
    (both read at every call). The config sets the order of the reductions, and a choice
    made by timing can differ from one process to the next, so in deterministic mode every
    run takes the fixed default config and gives the same bits on the same GPU model."""
    return (os.environ.get("TRITONBN_AUTOTUNE", "1") != "0"
            and not torch.are_deterministic_algorithms_enabled())


def fused_enabled() -> bool:
    """The single-pass kernel (fused.py) serves the shapes it fits unless TRITONBN_FUSED=0
    (read at every call): the switch lets the split path be measured on the same shapes."""
    return os.environ.get("TRITONBN_FUSED", "1") != "0"


def use_fused(geom: Geometry) -> bool:
    """Whether a phase on this geometry runs as one single-pass launch."""
    return fused_enabled() and C_.fused_fits(geom)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: programs run one by one; a few still exercise the split path


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_tiles(geom: Geometry, meta: dict) -> int:
    return _cdiv(geom.outer_size, meta["BLOCK_O"]) * _cdiv(geom.inner_size, meta["BLOCK_I"])


def reduction_grid(geom: Geometry, meta: dict, device: torch.device) -> tuple[int, int]:
    """(channel blocks, splits): about WAVES programs per SM, no empty split."""
    c_blocks = _cdiv(geom.channels, meta["BLOCK_C"])
    tiles = _num_tiles(geom, meta)
    target = meta["WAVES"] * _sm_count(device)
    splits = min(tiles, C_.MAX_SPLITS, max(1, _cdiv(target, c_blocks)))
    return c_blocks, _cdiv(tiles, _cdiv(tiles, splits))


def apply_grid(geom: Geometry, meta: dict) -> tuple[int]:
    return (_num_tiles(geom, meta) * _cdiv(geom.channels, meta["BLOCK_C"]),)


def fused_grid(geom: Geometry, meta: dict) -> tuple[int]:
    return (_cdiv(geom.channels, meta["BLOCK_C"]),)


@functools.lru_cache(maxsize=4096)
def _max_splits(geom: Geometry, device: torch.device, elem_size: int, tuned: bool) -> int:
    """Most splits any candidate config can launch: sizes the partials workspace.
    Cached: it depends on shapes only, and host time per call matters for small layers."""
    metas = [C_.default_config(geom, elem_size, INTERPRETED)]
    if tuned:
        metas += [c.kwargs for c in C_.kernel_configs(reduction=True)]
    return max(reduction_grid(geom, m, device)[1] for m in metas)


def _prune(configs, named_args, **kwargs):
    """early_config_prune: keep the configs that can pay off for this shape."""
    outer, inner, chans = named_args["O"], named_args["I"], named_args["C"]
    target = 2 * _sm_count(named_args["x_ptr"].device)
    kept = [c for c in configs
            if C_.config_fits(c.kwargs, outer, inner, chans, kwargs["CONTIG"], target)]
    if kept:
        return kept
    # Tiny problem, nothing fits: the smallest-volume tile that wastes the fewest lanes.
    def padded(c):
        k = c.kwargs
        return (_cdiv(outer, k["BLOCK_O"]) * k["BLOCK_O"] * _cdiv(inner, k["BLOCK_I"])
                * k["BLOCK_I"] * _cdiv(chans, k["BLOCK_C"]) * k["BLOCK_C"])

    small = [c for c in configs if c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_I"]
             * c.kwargs["BLOCK_C"] == min(C_.VOLUME_WARPS)]
    return [min(small or configs, key=padded)]


def _prune_fused(configs, named_args, **kwargs):
    """early_config_prune of the single-pass kernel (configs.fused_config_fits)."""
    target = 2 * _sm_count(named_args["x_ptr"].device)
    return [c for c in configs
            if C_.fused_config_fits(c.kwargs["BLOCK_C"], c.num_warps, kwargs["BLOCK_O"],
                                    kwargs["BLOCK_I"], named_args["C"], kwargs["CONTIG"],
                                    target)]


def _cpu_bench(kernel_call, quantiles=None):
    """Benchmark for the interpreter (no GPU timer): one timed CPU run."""
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms, ms, ms] if quantiles else ms


def _autotuned(kernel, configs, key_flags: list[str], restore: list[str], prune=_prune):
    return triton.autotune(
        configs=configs,
        key=["KEY_M", "KEY_C", "CONTIG", *key_flags],
        prune_configs_by={"early_config_prune": prune},
        restore_value=restore,  # trials must not advance the running statistics
        do_bench=_cpu_bench if INTERPRETED else None,
    )(kernel)


TUNED = {
    "bn_stats_kernel": _autotuned(bn_stats_kernel, C_.kernel_configs(True), ["UPDATE_RUNNING"],
                                  ["run_mean_ptr", "run_var_ptr"]),
    "bn_grad_stats_kernel": _autotuned(bn_grad_stats_kernel, C_.kernel_configs(True),
                                       ["WRITE_COEF", "RELU", "RESIDUAL"], []),
    "bn_apply_kernel": _autotuned(bn_apply_kernel, C_.kernel_configs(False),
                                  ["BACKWARD", "BATCH_STATS", "RELU", "RESIDUAL"], []),
    "bn_fused_kernel": _autotuned(bn_fused_kernel, C_.fused_kernel_configs(),
                                  ["BLOCK_O", "BLOCK_I", "BACKWARD", "STAT_IS_VAR",
                                   "UPDATE_RUNNING", "HAS_GRAD_WEIGHT", "WRITE_OUT", "RELU",
                                   "RESIDUAL"],
                                  ["run_mean_ptr", "run_var_ptr"], _prune_fused),
}
RAW = {"bn_stats_kernel": bn_stats_kernel, "bn_grad_stats_kernel": bn_grad_stats_kernel,
       "bn_apply_kernel": bn_apply_kernel, "bn_fused_kernel": bn_fused_kernel}


def chosen_configs() -> dict[str, dict[tuple, dict]]:
    """Autotuning decisions so far: kernel name -> {tuning key -> chosen config kwargs}."""
    return {name: {key: dict(cfg.all_kwargs()) for key, cfg in tuner.cache.items()}
            for name, tuner in TUNED.items()}


@functools.lru_cache(maxsize=4096)
def _plan(name: str, geom: Geometry, device: torch.device, elem_size: int, tuned: bool,
          flags: tuple, present: tuple):
    """Everything about a launch that depends on shapes, strides and flags only, computed
    once: (``kernel[grid]``, the trailing positional arguments (sizes, then the strides of
    each tensor slot, see _slot_strides), the keyword arguments with the ``flags`` pairs,
    ``chosen``). The grid is a function of the config when tuned. Host time per call
    matters for small layers, whose kernels run for microseconds.

    ``chosen``, for tuned plans (None otherwise): (the plain kernel's launcher, {argument
    dtypes: keyword arguments with the config the autotuner chose}), filled by _launch.
    The autotuner rebuilds its key from every argument on every call, tens of
    microseconds of host time per launch (perf/host_overhead.py); its key is a function of
    this plan and the arguments' dtypes, so once it has chosen, the plain kernel is
    launched with its choice."""
    tail = geom.sizes + _slot_strides(geom, present)
    kwargs = dict(KEY_M=C_._pow2(geom.reduction_size), KEY_C=C_._pow2(geom.channels),
                  CONTIG=geom.contig, INT64=geom.needs_int64, VEC=geom.vec(elem_size),
                  **dict(flags))
    if name == "bn_fused_kernel":
        kwargs["BLOCK_O"], kwargs["BLOCK_I"] = C_.fused_tile(geom)

        def grid(meta):
            return fused_grid(geom, meta)
    elif name == "bn_apply_kernel":
        def grid(meta):
            return apply_grid(geom, meta)
    else:
        def grid(meta):
            return reduction_grid(geom, meta, device)

    if tuned:
        return TUNED[name][grid], tail, kwargs, (RAW[name][grid], {})
    if name == "bn_fused_kernel":
        cfg = C_.fused_default_config(geom, 2 * _sm_count(device), INTERPRETED)
    else:
        cfg = C_.default_config(geom, elem_size, INTERPRETED)
        if name == "bn_apply_kernel":
            cfg.pop("WAVES")
    return RAW[name][grid(cfg)], tail, {**kwargs, **cfg}, None


def clear_caches() -> None:
    """Forget per-shape launch plans (with the autotuners' choices they remember),
    workspace sizes and path choices: needed after changing what they were built from
    (configs.default_config, the RAW / TUNED kernels, the autotuners' caches), e.g. in
    tests."""
    _plan.cache_clear()
    _max_splits.cache_clear()
    C_.fused_fits.cache_clear()


def _launch(name: str, geom: Geometry, device: torch.device, elem_size: int, args: tuple,
            flags: dict, present: tuple = (True,)):
    """Launch kernel ``name`` with its leading ``args`` (pointers and scalars) and constexpr
    ``flags``; ``present`` says which of its tensor slots hold an operand of ``geom`` (x
    first); the sizes and strides that follow ``args`` come from the cached plan."""
    launcher, tail, kwargs, chosen = _plan(name, geom, device, elem_size, autotune_enabled(),
                                           tuple(flags.items()), present)
    if chosen is not None:
        dtypes = tuple([a.dtype for a in args if isinstance(a, torch.Tensor)])
        choice = chosen[1].get(dtypes)
        if choice is None:
            # Through the autotuner this once. Its choice is read back from it
            # (best_config), so no other launch through an autotuner may come in between
            # (threads: nn.DataParallel runs a replica per thread).
            with _TUNER_LOCK:
                _on_device(device, launcher, args, tail, kwargs)
                _remember_choice(TUNED[name], chosen[1], dtypes, kwargs)
            return
        launcher, kwargs = chosen[0], choice
    _on_device(device, launcher, args, tail, kwargs)


_TUNER_LOCK = threading.Lock()


def _on_device(device: torch.device, launcher, args: tuple, tail: tuple, kwargs: dict) -> None:
    """``launcher(*args, *tail, **kwargs)`` on ``device``. (The arguments arrive packed:
    unpacking them into this call and again into the launcher's took 3.0 us per launch
    against 1.4 us, timed with timeit; perf/host_overhead.py drifts too much to show it.)"""
    # Triton launches on the current CUDA device and its current stream, not on the device
    # of the tensors: an input on cuda:1 while cuda:0 is current (a process that moved its
    # model with .to("cuda:1") without torch.cuda.set_device) needs the device switched,
    # as torch's own ops do with their device guards.
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            launcher(*args, *tail, **kwargs)
    else:
        launcher(*args, *tail, **kwargs)


def _remember_choice(tuner, choices: dict, dtypes: tuple, kwargs: dict) -> None:
    """After a launch through ``tuner``: the config it chose (``best_config``) for launches
    with these argument dtypes on the same plan. Not for a config with a pre-launch hook,
    which only the autotuner would run (tritonbn's have none), nor for stand-ins (tests)."""
    if isinstance(tuner, Autotuner) and getattr(tuner, "best_config", None) is not None:
        config = tuner.best_config
        if config.pre_hook is None:
            choices[dtypes] = {**kwargs, **config.all_kwargs()}


class _Counters:
    """int32 arrival counters per device and CUDA stream, zeroed once and re-zeroed by the
    kernels. Per stream: two reductions running concurrently on different streams must not
    count into the same slots (each would miss its "last program" and never finalize);
    reductions on one stream run one after another and can share them."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, device: torch.device, n: int) -> torch.Tensor:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
        key = (device, stream)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            self._buffers[key] = buf
        return buf


counters = _Counters()


@functools.lru_cache(maxsize=None)
def _dummy(device: torch.device) -> torch.Tensor:
    """Placeholder for absent optional pointers (never read: its constexpr flag is off)."""
    return torch.empty(0, dtype=torch.float32, device=device)


def _vec(t):
    """Per-channel vectors are indexed as dense [C] arrays by the kernels; a strided view
    (e.g. every other element of a longer tensor) is read from a dense copy of C values.
    Never applied to the big operands, which are always addressed through their strides."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _running_update(running_mean, running_var, num_batches_tracked, momentum, device):
    """Kernel arguments of the in-place running-statistics update: (dense running_mean,
    dense running_var), the pointers (run_mean, run_var, num_batches_tracked), the momentum
    float and the flags. A strided buffer is updated as a dense copy of its C values, which
    _write_back then copies into the view."""
    update = running_mean is not None
    cumulative = update and momentum is None
    dummy = _dummy(device)
    dense = (_vec(running_mean), _vec(running_var))
    ptrs = (dense[0] if update else dummy, dense[1] if update else dummy,
            num_batches_tracked if cumulative else dummy)
    return (dense, ptrs, 0.0 if momentum is None else float(momentum),
            dict(UPDATE_RUNNING=update, CUMULATIVE=cumulative))


def _write_back(running, dense) -> None:
    """Copy the dense copies made by _running_update back into strided running buffers."""
    for view, copy in zip(running, dense):
        if copy is not view:
            view.copy_(copy)


def _slot_strides(geom: Geometry, present: tuple) -> tuple:
    """Stride arguments of a kernel's tensor slots (x first, always present), from a
    geometry built over the present operands in slot order; an absent operand's slot
    repeats x's strides (never read)."""
    it = iter(geom.strides)
    return sum((next(it) if p else geom.strides[0] for p in present), ())


def _workspace(geom: Geometry, device: torch.device, elem_size: int, rows: int):
    """fp32 partials [rows, splits, C] and counters sized for every candidate config."""
    splits = _max_splits(geom, device, elem_size, autotune_enabled())
    partials = torch.empty((rows, splits, geom.channels), dtype=torch.float32, device=device)
    return partials, counters.get(device, geom.channels)


def launch_stats(x, geom, running_mean, running_var, num_batches_tracked, momentum, eps,
                 write_var=False):
    """Batch mean and invstd (fp32 [C]); updates running stats in place when given.
    ``write_var``: the biased variance in place of invstd (SyncBatchNorm's local stats)."""
    device = x.device
    C = geom.channels
    mean = torch.empty(C, dtype=torch.float32, device=device)
    invstd = torch.empty(C, dtype=torch.float32, device=device)
    partials, counter = _workspace(geom, device, x.element_size(), 4)
    dense, run_ptrs, momentum, run_flags = _running_update(
        running_mean, running_var, num_batches_tracked, momentum, device)
    args = (x, partials, counter, mean, invstd, *run_ptrs, momentum, float(eps))
    _launch("bn_stats_kernel", geom, device, x.element_size(), args,
            dict(run_flags, WRITE_VAR=write_var))
    _write_back((running_mean, running_var), dense)
    return mean, invstd


def launch_apply(x, dy, out, mean, stat, weight, bias, coef, eps, *, stat_is_var, backward,
                 relu=False, residual=None):
    """y (forward) or grad_input (backward) into ``out``; ``relu``: BatchNorm + ReLU (the
    backward then needs ``bias`` too); ``residual`` (forward): y + residual, before the
    ReLU. The kernel reads the residual through its dy slot."""
    second = dy if backward else residual
    geom = make_geometry(x, out) if second is None else make_geometry(x, second, out)
    dummy = _dummy(x.device)
    args = (x, dummy if second is None else second, out, _vec(mean), _vec(stat),
            dummy if weight is None else _vec(weight), dummy if bias is None else _vec(bias),
            dummy if coef is None else coef, float(eps))
    _launch("bn_apply_kernel", geom, x.device, x.element_size(), args,
            dict(STAT_IS_VAR=stat_is_var, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, BACKWARD=backward, BATCH_STATS=coef is not None,
                 RELU=relu, RESIDUAL=residual is not None),
            (True, second is not None, True))
    return out


def launch_grad_input(x, dy, masked_dy, grad_input, mean, stat, weight, bias, coef, eps, *,
                      stat_is_var, relu):
    """The backward's grad_input pass of the split path (launch_apply, backward). It reads
    ``masked_dy`` when launch_grad_stats wrote one (ReLU with a residual: the mask is
    already applied), else ``dy``, masked here with ReLU's mask recomputed from x, weight
    and ``bias``."""
    return launch_apply(x, dy if masked_dy is None else masked_dy, grad_input, mean, stat,
                        weight, bias, coef, eps, stat_is_var=stat_is_var, backward=True,
                        relu=relu and masked_dy is None)


def launch_grad_stats(x, dy, mean, stat, eps, *, stat_is_var, grad_weight, grad_bias, want_coef,
                      relu=False, weight=None, bias=None, residual=None, grad_residual=None):
    """Writes grad_weight / grad_bias (when given) and returns the fp32 [2, C] (k1, k2)
    coefficients of grad_input when ``want_coef``. ``relu``: BatchNorm + ReLU, whose mask
    is recomputed from x, ``weight``, ``bias`` and ``residual`` (relu(y + residual)), and
    then, with a residual, written to ``grad_residual`` as the masked dy."""
    device = x.device
    with_z = residual is not None
    geom = make_geometry(x, dy, residual, grad_residual) if with_z else make_geometry(x, dy)
    C = geom.channels
    partials, counter = _workspace(geom, device, x.element_size(), 2)
    coef = torch.empty((2, C), dtype=torch.float32, device=device) if want_coef else None
    dummy = _dummy(device)
    args = (x, dy, partials, counter, _vec(mean), _vec(stat),
            dummy if weight is None else _vec(weight), dummy if bias is None else _vec(bias),
            dummy if grad_weight is None else grad_weight,
            dummy if grad_bias is None else grad_bias,
            dummy if coef is None else coef,
            residual if with_z else dummy, grad_residual if with_z else dummy,
            float(eps), 1.0 / geom.reduction_size)
    _launch("bn_grad_stats_kernel", geom, device, x.element_size(), args,
            dict(STAT_IS_VAR=stat_is_var, HAS_GRAD_WEIGHT=grad_weight is not None,
                 HAS_GRAD_BIAS=grad_bias is not None, WRITE_COEF=want_coef, RELU=relu,
                 HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RESIDUAL=with_z),
            (True, True, with_z, with_z))
    return coef


def launch_fused_forward(x, out, geom, weight, bias, running_mean, running_var,
                         num_batches_tracked, momentum, eps, relu=False, residual=None):
    """Training forward in one single-pass launch: ``geom`` = forward_geometry(x, out,
    residual), for which use_fused holds. Writes ``out`` (``relu``: max(y, 0); with a
    ``residual``: of y + residual) and returns the batch (mean, invstd), fp32 [C]; updates
    running stats in place."""
    device = x.device
    # two allocations, not views of one: the outputs of a custom op may not alias
    mean = torch.empty(geom.channels, dtype=torch.float32, device=device)
    invstd = torch.empty(geom.channels, dtype=torch.float32, device=device)
    dummy = _dummy(device)
    dense, run_ptrs, momentum, run_flags = _running_update(
        running_mean, running_var, num_batches_tracked, momentum, device)
    args = (x, dummy, out, mean, invstd,
            dummy if weight is None else _vec(weight), dummy if bias is None else _vec(bias),
            *run_ptrs, dummy, dummy, dummy if residual is None else residual, dummy,
            momentum, float(eps), 1.0 / geom.reduction_size)
    with_z = residual is not None
    _launch("bn_fused_kernel", geom, device, x.element_size(), args,
            dict(BACKWARD=False, STAT_IS_VAR=False, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, HAS_GRAD_WEIGHT=False, HAS_GRAD_BIAS=False,
                 WRITE_OUT=True, RELU=relu, RESIDUAL=with_z, **run_flags),
            (True, False, True, with_z, False))
    _write_back((running_mean, running_var), dense)
    return mean, invstd


def launch_fused_backward(x, dy, grad_input, geom, mean, stat, weight, eps, *, stat_is_var,
                          grad_weight, grad_bias, relu=False, bias=None, residual=None,
                          grad_residual=None):
    """Backward in one single-pass launch: ``geom`` = backward_geometry(x, dy, grad_input,
    residual, grad_residual), for which use_fused holds. Writes grad_input (when given),
    grad_weight and grad_bias (when given). ``relu``: BatchNorm + ReLU, whose mask is
    recomputed from x, weight, ``bias`` and ``residual`` (relu(y + residual)); the masked dy
    then goes to ``grad_residual``."""
    device = x.device
    with_z = residual is not None
    dummy = _dummy(device)
    args = (x, dy, dummy if grad_input is None else grad_input, _vec(mean), _vec(stat),
            dummy if weight is None else _vec(weight), dummy if bias is None else _vec(bias),
            dummy, dummy, dummy,
            dummy if grad_weight is None else grad_weight,
            dummy if grad_bias is None else grad_bias,
            residual if with_z else dummy, grad_residual if with_z else dummy,
            0.0, float(eps), 1.0 / geom.reduction_size)
    _launch("bn_fused_kernel", geom, device, x.element_size(), args,
            dict(BACKWARD=True, STAT_IS_VAR=stat_is_var, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, UPDATE_RUNNING=False, CUMULATIVE=False,
                 HAS_GRAD_WEIGHT=grad_weight is not None, HAS_GRAD_BIAS=grad_bias is not None,
                 WRITE_OUT=grad_input is not None, RELU=relu, RESIDUAL=with_z),
            (True, True, grad_input is not None, with_z, with_z))


def forward_geometry(x, out, residual=None) -> Geometry:
    """Geometry of the training forward's operands, in the single-pass kernel's slot order:
    x, out, and the residual when there is one."""
    return make_geometry(*(t for t in (x, out, residual) if t is not None))


def backward_geometry(x, dy, grad_input=None, residual=None, grad_residual=None) -> Geometry:
    """Geometry of the backward's operands, in the single-pass kernel's slot order: x, dy,
    grad_input when it is written, the residual and its gradient when ReLU's mask needs
    them."""
    return make_geometry(*(t for t in (x, dy, grad_input, residual, grad_residual)
                           if t is not None))
