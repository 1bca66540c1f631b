"""Tuning space of the tritonbn kernels, shape-based pruning, and the fixed default config.

A config is a tile ``[BLOCK_O, BLOCK_I, BLOCK_C]`` (outer rows x inner x channels, see
geometry.py) with its num_warps, plus, for the two split reductions, WAVES: how many
programs per SM the split aims for (the split factor). The space is small on purpose: every
config is compiled and checked (tests/kernels/test_configs.py, perf/kernel_report.py), and
pruning leaves a handful per shape, so first-call tuning stays short.
"""
from __future__ import annotations

import functools
import itertools

import triton

from .geometry import Geometry
from .tiles import CONTIG_CHANNEL, CONTIG_INNER

# Tile volumes: 1024 elements with 4 warps (8 per thread) and 4096 with 8 warps (16 per
# thread). Larger tiles spilled the fp32 Welford state the statistics kernel kept (3 values
# per element) on sm_90; its shifted sums keep 2.
VOLUME_WARPS = {1024: 4, 4096: 8}
BLOCK_O_CHOICES = (1, 4)
# Powers of 4 keep the space small while covering 1 .. 4096 along inner / channel axes.
BLOCK_IC_CHOICES = (1, 4, 16, 64, 256, 1024, 4096)
WAVES_CHOICES = (2, 8)
# num_stages is not tuned: these loops have no tl.dot, and Triton's pipeliner leaves them
# alone - bn_stats_kernel compiled for sm_90 with num_stages=1 and 3 gives the same ptx
# (checked with triton 3.9). One value keeps the space, compile time and tuning time half.
NUM_STAGES = 1
# Smallest block along the unit-stride axis, when the axis is that long: 16 elements keep
# every thread on 128-bit accesses (4 x fp32 / 8 x bf16) and each row segment >= 64 bytes.
MIN_CONTIG_BLOCK = 16
MAX_SPLITS = 1024


def _tiles():
    for volume, warps in VOLUME_WARPS.items():
        for bo, bi, bc in itertools.product(BLOCK_O_CHOICES, BLOCK_IC_CHOICES, BLOCK_IC_CHOICES):
            if bo * bi * bc == volume and bc <= 256:
                yield dict(BLOCK_O=bo, BLOCK_I=bi, BLOCK_C=bc), warps


def kernel_configs(reduction: bool) -> list[triton.Config]:
    """Every config of a kernel: reductions also tune WAVES (the split factor)."""
    waves = WAVES_CHOICES if reduction else (None,)
    out = []
    for (tile, warps), w in itertools.product(_tiles(), waves):
        kwargs = dict(tile) if w is None else dict(tile, WAVES=w)
        out.append(triton.Config(kwargs, num_warps=warps, num_stages=NUM_STAGES))
    return out


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 is a slow call)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def _min_contig_block(n: int) -> int:
    """Smallest block allowed along a unit-stride axis of length n: MIN_CONTIG_BLOCK, or,
    for a shorter axis, the largest block choice that fits in it rounded up to a power
    of two (for n = 5..8 that is 4: 8 is not a choice, and 16 would break rule 1)."""
    return min(MIN_CONTIG_BLOCK, max(b for b in BLOCK_IC_CHOICES if b <= _pow2(n)))


def config_fits(cfg: dict, outer: int, inner: int, channels: int, contig: int,
                programs_target: int) -> bool:
    """Whether a tile can pay off for this shape (the pruning rules):
    1. no block is larger than its axis rounded up to a power of two (wasted lanes);
    2. the block along the unit-stride axis is at least MIN_CONTIG_BLOCK (or, for a
       shorter axis, the largest block choice that rule 1 allows), so that accesses stay
       128-bit;
    3. a 4096-element tile is dropped when the problem is too small to give the device
       `programs_target` programs with it (a 1024-element tile fills it better).
    perf/kernel_report.py checks the premise of rule 2: every config that passes it for
    an input whose unit-stride axis is a multiple of 16 compiles to 128-bit loads and
    stores, with no spills, on sm_80 and sm_90."""
    bo, bi, bc = cfg["BLOCK_O"], cfg["BLOCK_I"], cfg["BLOCK_C"]
    if bo > _pow2(outer) or bi > _pow2(inner) or bc > _pow2(channels):
        return False
    if contig == CONTIG_INNER and bi < _min_contig_block(inner):
        return False
    if contig == CONTIG_CHANNEL and bc < _min_contig_block(channels):
        return False
    volume = bo * bi * bc
    if volume > min(VOLUME_WARPS) and outer * inner * channels < volume * programs_target:
        return False
    return True


def default_config(geom: Geometry, elem_size: int, interpreted: bool) -> dict:
    """The fixed config used when autotuning is off: a tile of about 4096 elements (512 in
    the interpreter, where programs run one by one), filled first along the unit-stride
    axis so each thread issues 128-bit accesses."""
    budget = 512 if interpreted else 4096
    o, inner, chans = geom.outer_size, geom.inner_size, geom.channels

    def fit(n, cap):
        return max(1, min(_pow2(n), cap))

    if geom.contig == CONTIG_CHANNEL:
        bc = fit(chans, 256 if elem_size < 4 else 128)
        bi = fit(inner, budget // bc)
        bo = fit(o, budget // (bc * bi))
    else:
        bi = fit(inner, budget)
        bo = fit(o, budget // bi)
        bc = fit(chans, budget // (bi * bo))
    warps = 8 if bo * bi * bc >= 4096 else 4
    return dict(BLOCK_O=bo, BLOCK_I=bi, BLOCK_C=bc, WAVES=4, num_warps=warps,
                num_stages=NUM_STAGES)


# ----------------------------------------------------------------------- single-pass kernel
# fused.py holds all M values of BLOCK_C channels in one register tile. Its BLOCK_O and
# BLOCK_I are not tuned: they are O and I rounded up to powers of two (fused_tile). Tuned:
# BLOCK_C and num_warps, at 8, 16 or 32 tile elements per thread (the backward keeps x and
# dy, 2 x 32 fp32 registers per thread at most; perf/kernel_report.py compiles each config
# at its largest tile and checks for spills). Each per-channel reduction costs a thread
# shuffles and adds for every channel it holds, whatever its share of the channel's
# values, so more values per thread spread that cost: compiled for sm_90, the forward over
# channels_last bf16 (8 channels per thread) issues 60-79 instructions per element at 16
# per thread and 36-46 at 32. The default config stays at 16 per thread until a GPU has
# timed 32; the autotuner times both.
FUSED_MAX_VOLUME = 8192
FUSED_BLOCK_C_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FUSED_WARPS_CHOICES = (1, 2, 4, 8, 16)
FUSED_PER_THREAD = (8, 16, 32)
FUSED_DEFAULT_PER_THREAD = 16


def fused_tile(geom: Geometry) -> tuple[int, int]:
    """(BLOCK_O, BLOCK_I) of the single-pass kernel: the whole outer x inner range."""
    return _pow2(geom.outer_size), _pow2(geom.inner_size)


def _fused_min_block_c(channels: int, contig: int) -> int:
    """Channels-contiguous layouts need BLOCK_C along the unit-stride axis for 128-bit
    access (as rule 2 of config_fits); otherwise one channel per program is fine."""
    return _min_contig_block(channels) if contig == CONTIG_CHANNEL else 1


@functools.lru_cache(maxsize=4096)
def fused_fits(geom: Geometry) -> bool:
    """Whether the single-pass kernel can take this shape: the smallest allowed tile holding
    whole channels fits FUSED_MAX_VOLUME."""
    bo, bi = fused_tile(geom)
    return bo * bi * _fused_min_block_c(geom.channels, geom.contig) <= FUSED_MAX_VOLUME


def fused_warps_fit(volume: int, warps: int) -> bool:
    """8, 16 or 32 elements per thread; a tile smaller than 8 per thread of one warp gets
    one."""
    per_thread = volume // (32 * warps)
    return per_thread in FUSED_PER_THREAD or (warps == 1 and per_thread < min(FUSED_PER_THREAD))


def fused_kernel_configs() -> list[triton.Config]:
    return [triton.Config(dict(BLOCK_C=bc), num_warps=w, num_stages=NUM_STAGES)
            for bc, w in itertools.product(FUSED_BLOCK_C_CHOICES, FUSED_WARPS_CHOICES)]


def fused_config_fits(block_c: int, num_warps: int, block_o: int, block_i: int,
                      channels: int, contig: int, programs_target: int) -> bool:
    """Pruning for the single-pass kernel: BLOCK_C between the layout's minimum and C rounded
    up; the tile within FUSED_MAX_VOLUME at 8, 16 or 32 elements per thread; and a block larger
    than the minimum only while the grid still has ``programs_target`` programs."""
    lo = _fused_min_block_c(channels, contig)
    if block_c < lo or block_c > max(lo, _pow2(channels)):
        return False
    volume = block_o * block_i * block_c
    if volume > FUSED_MAX_VOLUME or not fused_warps_fit(volume, num_warps):
        return False
    return block_c == lo or -(-channels // block_c) >= programs_target


def fused_default_config(geom: Geometry, programs_target: int, interpreted: bool) -> dict:
    """Fixed config when autotuning is off: the smallest BLOCK_C, doubled while the tile stays
    within 4096 elements (512 in the interpreter) and the grid keeps ``programs_target``
    programs; FUSED_DEFAULT_PER_THREAD elements per thread."""
    bo, bi = fused_tile(geom)
    budget = 512 if interpreted else 4096
    bc = _fused_min_block_c(geom.channels, geom.contig)
    while (bo * bi * bc * 2 <= budget and bc * 2 <= _pow2(geom.channels)
           and -(-geom.channels // (bc * 2)) >= programs_target):
        bc *= 2
    volume = bo * bi * bc
    warps = max(1, min(max(FUSED_WARPS_CHOICES), volume // (32 * FUSED_DEFAULT_PER_THREAD)))
    return dict(BLOCK_C=bc, num_warps=warps, num_stages=NUM_STAGES)
