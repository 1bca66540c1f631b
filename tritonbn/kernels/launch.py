"""Launchers: shape -> tile configuration -> grid -> kernel. Host code only reads shapes,
strides and dtypes (never tensor values), so nothing here synchronises with the device."""
from __future__ import annotations

import functools

import torch
import triton

from .apply import bn_apply_kernel
from .geometry import Geometry, make_geometry
from .grad_stats import bn_grad_stats_kernel
from .stats import bn_stats_kernel
from .tiles import CONTIG_CHANNEL

INTERPRETED = type(bn_stats_kernel).__name__ == "InterpretedFunction"

# Upper bound of splits per channel block: bounds the finalizer's work and the partials.
MAX_SPLITS = 1024


@functools.lru_cache(maxsize=None)
def _programs_target(device: torch.device) -> int:
    """Programs a reduction should start to fill the device (a few waves per SM)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: programs run one after another; a few exercise the split path


def _pow2_at_most(n: int, cap: int) -> int:
    return max(1, min(triton.next_power_of_2(max(n, 1)), cap))


def tile_config(geom: Geometry, elem_size: int) -> dict:
    """Block sizes of a ``[BLOCK_O, BLOCK_I, BLOCK_C]`` tile: about ``budget`` elements,
    spread first along the unit-stride axis so that each thread issues 128-bit accesses."""
    budget = 512 if INTERPRETED else 4096
    o, inner, chans = geom.outer_size, geom.inner_size, geom.channels
    if geom.contig == CONTIG_CHANNEL:
        block_c = _pow2_at_most(chans, 256 if elem_size < 4 else 128)
        block_i = _pow2_at_most(inner, budget // block_c)
        block_o = _pow2_at_most(o, budget // (block_c * block_i))
    else:
        block_i = _pow2_at_most(inner, budget)
        block_o = _pow2_at_most(o, budget // block_i)
        block_c = _pow2_at_most(chans, budget // (block_i * block_o))
    elems = block_o * block_i * block_c
    return dict(BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_C=block_c,
                num_warps=8 if elems >= 4096 else 4)


def _num_tiles(geom: Geometry, cfg: dict) -> int:
    return triton.cdiv(geom.outer_size, cfg["BLOCK_O"]) * triton.cdiv(geom.inner_size, cfg["BLOCK_I"])


def reduction_grid(geom: Geometry, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(channel blocks, splits): enough programs to fill the device, no empty split."""
    c_blocks = triton.cdiv(geom.channels, cfg["BLOCK_C"])
    tiles = _num_tiles(geom, cfg)
    splits = min(tiles, MAX_SPLITS, max(1, triton.cdiv(_programs_target(device), c_blocks)))
    per_split = triton.cdiv(tiles, splits)
    return c_blocks, triton.cdiv(tiles, per_split)


def _finalize_block(cfg: dict) -> int:
    return _pow2_at_most(2048 // cfg["BLOCK_C"], 64)


class _Counters:
    """Per-device int32 arrival counters, zeroed once and re-zeroed by the kernels."""

    def __init__(self):
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, n: int) -> torch.Tensor:
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            self._buffers[device] = buf
        return buf


counters = _Counters()


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)


def launch_stats(x, geom, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Batch mean and invstd (fp32 [C]); updates running stats in place when given."""
    device = x.device
    cfg = tile_config(geom, x.element_size())
    grid = reduction_grid(geom, cfg, device)
    C = geom.channels
    mean = torch.empty(C, dtype=torch.float32, device=device)
    invstd = torch.empty(C, dtype=torch.float32, device=device)
    partials = torch.empty((3, grid[1], C), dtype=torch.float32, device=device)
    update = running_mean is not None
    cumulative = update and momentum is None
    dummy = _dummy(device)
    bn_stats_kernel[grid](
        x, partials, counters.get(device, grid[0]), mean, invstd,
        running_mean if update else dummy, running_var if update else dummy,
        num_batches_tracked if cumulative else dummy,
        0.0 if momentum is None else float(momentum), float(eps),
        *geom.sizes, *geom.strides[0],
        BLOCK_S=_finalize_block(cfg), CONTIG=geom.contig, INT64=geom.needs_int64,
        UPDATE_RUNNING=update, CUMULATIVE=cumulative, **cfg,
    )
    return mean, invstd


def launch_apply(x, dy, out, mean, stat, weight, bias, coef, eps, *, stat_is_var, backward):
    """y (forward) or grad_input (backward) into ``out``."""
    tensors = (x, dy, out) if backward else (x, out)
    geom = make_geometry(*tensors)
    strides = geom.strides if backward else (geom.strides[0], geom.strides[0], geom.strides[1])
    cfg = tile_config(geom, x.element_size())
    grid = (_num_tiles(geom, cfg) * triton.cdiv(geom.channels, cfg["BLOCK_C"]),)
    dummy = _dummy(x.device)
    bn_apply_kernel[grid](
        x, dy if backward else dummy, out, mean, stat,
        dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if coef is None else coef, float(eps),
        *geom.sizes, *strides[0], *strides[1], *strides[2],
        CONTIG=geom.contig, INT64=geom.needs_int64, STAT_IS_VAR=stat_is_var,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BACKWARD=backward, BATCH_STATS=coef is not None, **cfg,
    )
    return out


def launch_grad_stats(x, dy, mean, stat, eps, *, stat_is_var, grad_weight, grad_bias, want_coef):
    """Writes grad_weight / grad_bias (when given) and returns the fp32 [2, C] (k1, k2)
    coefficients of grad_input when ``want_coef``."""
    device = x.device
    geom = make_geometry(x, dy)
    cfg = tile_config(geom, x.element_size())
    grid = reduction_grid(geom, cfg, device)
    C = geom.channels
    partials = torch.empty((2, grid[1], C), dtype=torch.float32, device=device)
    coef = torch.empty((2, C), dtype=torch.float32, device=device) if want_coef else None
    dummy = _dummy(device)
    bn_grad_stats_kernel[grid](
        x, dy, partials, counters.get(device, grid[0]), mean, stat,
        dummy if grad_weight is None else grad_weight,
        dummy if grad_bias is None else grad_bias,
        dummy if coef is None else coef,
        float(eps), 1.0 / geom.reduction_size,
        *geom.sizes, *geom.strides[0], *geom.strides[1],
        BLOCK_S=_finalize_block(cfg), CONTIG=geom.contig, INT64=geom.needs_int64,
        STAT_IS_VAR=stat_is_var, HAS_GRAD_WEIGHT=grad_weight is not None,
        HAS_GRAD_BIAS=grad_bias is not None, WRITE_COEF=want_coef, **cfg,
    )
    return coef
