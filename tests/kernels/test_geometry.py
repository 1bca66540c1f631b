"""``make_geometry``: the [outer(3), inner, channel] view of BatchNorm operands.

The property that matters: for every channel c and every reduction index r (row-major over
N and the spatial dims), the offset the kernels compute from the geometry is the element's
real offset, in every tensor of the group. Checked on real strides without running a kernel
(meta tensors for the huge ones)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import LAYOUTS, make_tensor
from tritonbn.kernels.geometry import INT32_LIMIT, make_geometry
from tritonbn.kernels.tiles import CONTIG_CHANNEL, CONTIG_INNER, CONTIG_NONE


def kernel_offsets(geom, k: int) -> np.ndarray:
    """[M, C] offsets of tensor ``k`` as the kernels compute them (tiles.tile_index /
    tile_offsets, written out in numpy)."""
    o1_size, o2_size, outer, inner, chans = geom.sizes
    s0, s1, s2, si, sc = geom.strides[k]
    r = np.arange(outer * inner, dtype=np.int64)
    o, i = r // inner, r % inner
    o2, o01 = o % o2_size, o // o2_size
    o0, o1 = o01 // o1_size, o01 % o1_size
    row = o0 * s0 + o1 * s1 + o2 * s2 + i * si
    return row[:, None] + np.arange(chans, dtype=np.int64)[None, :] * sc


def true_offsets(t: torch.Tensor) -> np.ndarray:
    """[M, C] offsets of ``t``'s elements, reduction index row-major over (N, spatial...)."""
    storage = torch.arange(t.storage_offset() + sum((s - 1) * st for s, st in
                                                    zip(t.shape, t.stride())) + 1)
    view = storage.as_strided(t.shape, t.stride(), t.storage_offset())
    return (view.movedim(1, -1).reshape(-1, t.shape[1]) - t.storage_offset()).numpy()


def assert_addresses_every_element(*tensors):
    geom = make_geometry(*tensors)
    assert geom.channels == tensors[0].shape[1]
    assert geom.reduction_size * geom.channels == tensors[0].numel()
    for k, t in enumerate(tensors):
        np.testing.assert_array_equal(kernel_offsets(geom, k), true_offsets(t))
    return geom


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4),
                                   (1, 3, 1, 5), (3, 1, 4, 1, 2)])
def test_offsets_match(shape, layout):
    assert_addresses_every_element(make_tensor(shape, layout=layout, device="cpu"))


@pytest.mark.parametrize("layouts", [("contiguous", "channels_last"),
                                     ("channels_last", "sliced"),
                                     ("permuted", "contiguous", "permuted_sliced")])
def test_offsets_match_for_a_group_of_layouts(layouts):
    """x, grad_output and grad_input share one geometry; dims merge only where all agree."""
    tensors = [make_tensor((2, 3, 4, 5), layout=lay, device="cpu") for lay in layouts]
    assert_addresses_every_element(*tensors)


def test_storage_offset_is_not_part_of_the_geometry():
    base = torch.randn(4, 6, 5, 5)
    assert_addresses_every_element(base[1:3, 2:5])


def test_contiguous_4d():
    g = make_geometry(torch.empty(2, 3, 4, 5))
    # outer dims padded with 1s at the end: O1 = O2 = 1 are constants to the JIT (no
    # integer division in tiles.outer_index)
    assert g.outer_sizes == (2, 1, 1) and g.inner_size == 20
    assert g.strides == ((60, 0, 0, 1, 20),)
    assert g.contig == CONTIG_INNER and not g.needs_int64


def test_channels_last_is_one_inner_dim():
    g = make_geometry(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert g.outer_sizes == (1, 1, 1) and g.inner_size == 40
    assert g.strides == ((0, 0, 0, 3, 1),) and g.contig == CONTIG_CHANNEL


def test_channels_last_3d_is_one_inner_dim():
    g = make_geometry(torch.empty(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d))
    assert g.inner_size == 240 and g.strides[0][3:] == (3, 1)


def test_1d_NC():
    g = make_geometry(torch.empty(7, 5))
    assert g.inner_size == 7 and g.strides == ((0, 0, 0, 5, 1),)
    assert g.contig == CONTIG_CHANNEL


def test_sliced_merges_rows_when_strides_line_up():
    """x[..., ::2] of a (.., 10) tensor: rows are 10 apart = 5 x 2, so H and W merge."""
    g = make_geometry(torch.empty(2, 3, 4, 10)[..., ::2])
    assert g.outer_sizes == (2, 1, 1) and g.inner_size == 20
    assert g.strides == ((120, 0, 0, 2, 40),) and g.contig == CONTIG_NONE


def test_sliced_keeps_rows_apart():
    """x[..., ::2] of a (.., 9) tensor: rows are 9 apart, not 5 x 2: H stays an outer dim."""
    g = make_geometry(torch.empty(2, 3, 4, 9)[..., ::2])
    assert g.outer_sizes == (2, 4, 1) and g.inner_size == 5
    assert g.strides == ((108, 9, 0, 2, 36),) and g.contig == CONTIG_NONE


def test_mixed_layouts_lose_the_unit_stride_axis():
    x = torch.empty(2, 3, 4, 5)
    g = make_geometry(x, x.to(memory_format=torch.channels_last))
    assert g.contig == CONTIG_NONE


def test_size_one_dims_vanish():
    g = make_geometry(torch.empty(1, 3, 1, 7, 1))
    assert g.outer_sizes == (1, 1, 1) and g.inner_size == 7


def test_single_value_per_channel():
    g = make_geometry(torch.empty(1, 3))
    assert g.reduction_size == 1 and g.inner_size == 1


def test_needs_int64_only_past_int32():
    """The largest offset decides, not numel: exactly INT32_LIMIT still fits in int32."""
    fits = torch.empty_strided((2, 1), (INT32_LIMIT, 1), device="meta")
    assert not make_geometry(fits).needs_int64
    over = torch.empty_strided((2, 1), (INT32_LIMIT + 1, 1), device="meta")
    assert make_geometry(over).needs_int64
    big = torch.empty((2**16, 2, 2**15 + 1), device="meta", dtype=torch.bfloat16)
    assert big.numel() > 2**31 and make_geometry(big).needs_int64
    # Any tensor of the group decides for all.
    small = torch.empty((2**16, 2, 2**15 + 1), device="meta").as_strided(
        (2**16, 2, 2**15 + 1), (1, 0, 0))
    assert make_geometry(small, big).needs_int64
