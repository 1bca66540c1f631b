"""Host-side view of a BatchNorm operand as a ``[outer, inner, channel]`` index space.

Every kernel in tritonbn addresses its tensors through strides, never through a copy.
BatchNorm reduces over every dimension except dim 1 (the channel). We collapse those
reduction dimensions into at most four (three "outer" dims and one "inner" dim) by
merging neighbours that are contiguous with each other in *every* participating tensor:

    NCHW contiguous        (N, C, H, W)  -> outer (N,)        inner H*W (stride 1)
    channels_last          (N, C, H, W)  -> outer ()          inner N*H*W (stride C)
    BatchNorm1d (N, C)                   -> outer ()          inner N (stride C)
    x[..., ::2] of NCHW                  -> outer (N, H)      inner W (stride 2)

A kernel tile is ``[BLOCK_O, BLOCK_I, BLOCK_C]``; the outer row index is decomposed into
(o0, o1, o2) once per row (cheap), the inner and channel indices are plain strided ranges,
so whichever of inner/channel has stride 1 gives coalesced 128-bit accesses.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .tiles import CONTIG_CHANNEL, CONTIG_INNER, CONTIG_NONE

MAX_OUTER_DIMS = 3
INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Geometry:
    """Reduction geometry shared by a group of same-shaped tensors."""

    channels: int
    outer_sizes: tuple[int, int, int]  # slowest first, padded with 1s at the end
    inner_size: int
    # Per tensor: (outer strides x3, inner stride, channel stride).
    strides: tuple[tuple[int, int, int, int, int], ...]
    needs_int64: bool

    def __post_init__(self):
        # Every per-shape cache (launch plans, path choice, workspace size) hashes the
        # geometry on every call: hash it once.
        object.__setattr__(self, "_hash", hash((self.channels, self.outer_sizes,
                                                self.inner_size, self.strides,
                                                self.needs_int64)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def outer_size(self) -> int:
        o0, o1, o2 = self.outer_sizes
        return o0 * o1 * o2

    @property
    def reduction_size(self) -> int:
        """M: the number of values per channel."""
        return self.outer_size * self.inner_size

    @property
    def contig(self) -> int:
        """Axis with unit stride in every tensor (see tiles.CONTIG_*): enables 128-bit access."""
        if self.inner_size > 1 and all(s[3] == 1 for s in self.strides):
            return CONTIG_INNER
        if self.channels > 1 and all(s[4] == 1 for s in self.strides):
            return CONTIG_CHANNEL
        return CONTIG_NONE

    def vec(self, elem_size: int) -> int:
        """Elements per vector access (up to 16 bytes) that the layout allows along the
        unit-stride axis: the largest power of two dividing that axis' length and every
        other stride. A multiple of 16 is already visible to the JIT; this covers the rest
        (a 14x14 = 196 plane in NCHW, 24 channels in channels_last, ...)."""
        contig = self.contig
        if contig == CONTIG_NONE:
            return 1
        length = self.inner_size if contig == CONTIG_INNER else self.channels
        unit_axis = 3 if contig == CONTIG_INNER else 4
        others = [st for strides in self.strides for k, st in enumerate(strides) if k != unit_axis]
        vec = 16 // elem_size
        while vec > 1 and any(v % vec for v in (length, *others)):
            vec //= 2
        return vec

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        """Size arguments in kernel order: O1, O2, O, I, C."""
        _, o1, o2 = self.outer_sizes
        return (o1, o2, self.outer_size, self.inner_size, self.channels)


def make_geometry(*tensors: torch.Tensor) -> Geometry:
    """Coalesce the reduction dims of ``tensors`` (same shape, dim 1 = channels)."""
    shape = tensors[0].shape
    for t in tensors[1:]:
        assert t.shape == shape, (t.shape, shape)
    return _coalesce(tuple(shape), tuple(t.stride() for t in tensors))


@functools.lru_cache(maxsize=4096)
def _coalesce(shape: tuple[int, ...], all_strides: tuple[tuple[int, ...], ...]) -> Geometry:
    """Cached on shape and strides: a training step asks for the same few geometries."""
    n = len(all_strides)
    channels = shape[1]
    red_dims = [0] + list(range(2, len(shape)))
    # Each entry: [size, stride in tensor 0, stride in tensor 1, ...]; size-1 dims vanish.
    dims = [[shape[d]] + [st[d] for st in all_strides] for d in red_dims if shape[d] != 1]
    merged: list[list[int]] = []
    for dim in dims:
        if merged:
            prev = merged[-1]
            # prev is outside (slower than) dim: mergeable when prev.stride == dim.stride * dim.size
            if all(prev[1 + k] == dim[1 + k] * dim[0] for k in range(n)):
                merged[-1] = [prev[0] * dim[0]] + dim[1:]
                continue
        merged.append(dim)
    if not merged:
        merged = [[1] + [0] * n]
    inner, outer = merged[-1], merged[:-1]
    if len(outer) > MAX_OUTER_DIMS:  # cannot happen for <= 5-D inputs, kept as a guard
        raise NotImplementedError("tritonbn supports inputs of at most 5 dimensions")
    # Padded at the end: the kernels split a flat outer index with // and % by O1 and O2
    # (tiles.outer_index), and a size of 1 is a compile-time constant to the JIT, so the
    # usual one or two outer dims cost no integer division (padding in front put the one
    # dim of an NCHW input, N, in O2: two divisions per row of every tile).
    outer = outer + [[1] + [0] * n] * (MAX_OUTER_DIMS - len(outer))
    strides = tuple(
        tuple(o[1 + k] for o in outer) + (inner[1 + k], all_strides[k][1]) for k in range(n)
    )
    max_offset = max(sum((s - 1) * abs(st) for s, st in zip(shape, sts)) for sts in all_strides)
    return Geometry(
        channels=channels,
        outer_sizes=tuple(o[0] for o in outer),
        inner_size=inner[0],
        strides=strides,
        needs_int64=max_offset > INT32_LIMIT,
    )
