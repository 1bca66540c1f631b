"""Triton helpers shared by every tritonbn kernel: tile indexing over the
``[outer(o0, o1, o2), inner, channel]`` view built by :mod:`tritonbn.kernels.geometry`,
and the "last program of a channel block finalizes" handshake."""
import triton
import triton.language as tl

# Axis with unit stride in every tensor of a launch: lets the compiler see contiguity and
# emit 128-bit accesses. Passed as the CONTIG constexpr.
CONTIG_NONE = 0
CONTIG_INNER = 1
CONTIG_CHANNEL = 2


@triton.jit
def aligned(n, VEC: tl.constexpr):
    """``n`` with its divisibility by VEC made visible to the compiler. The host chose VEC
    to divide n, so this is exact; it lets masks and strides keep VEC-wide vector access
    for shapes such as 14x14 = 196 that are multiples of 4 but not of 16."""
    if VEC > 1:
        n = (n // VEC) * VEC
    return n


@triton.jit
def tile_coords(tile, I, BLOCK_I: tl.constexpr):
    """(row, column) of tile ``tile`` in the row-major grid of (outer tiles, inner tiles):
    an integer division, which a loop over tiles avoids with next_tile."""
    num_i_tiles = tl.cdiv(I, BLOCK_I)
    return tile // num_i_tiles, tile % num_i_tiles


@triton.jit
def next_tile(t_o, t_i, I, BLOCK_I: tl.constexpr):
    """The coordinates of the tile after (t_o, t_i), without a division."""
    t_i += 1
    wrap = t_i == tl.cdiv(I, BLOCK_I)
    return tl.where(wrap, t_o + 1, t_o), tl.where(wrap, 0, t_i)


@triton.jit
def tile_index(tile, c_block, O1, O2, O, I, C,
               BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
               INT64: tl.constexpr, CONTIG: tl.constexpr, VEC: tl.constexpr):
    """tile_index_at for a flat tile number ``tile``."""
    t_o, t_i = tile_coords(tile, I, BLOCK_I)
    return tile_index_at(t_o, t_i, c_block, O1, O2, O, I, C,
                         BLOCK_O, BLOCK_I, BLOCK_C, INT64, CONTIG, VEC)


@triton.jit
def tile_index_at(t_o, t_i, c_block, O1, O2, O, I, C,
                  BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
                  INT64: tl.constexpr, CONTIG: tl.constexpr, VEC: tl.constexpr):
    """Indices of the tile at row ``t_o``, column ``t_i`` of the (outer tiles, inner tiles)
    grid, channel block ``c_block``. Returns o0, o1, o2 [BLOCK_O], i [BLOCK_I], c [BLOCK_C]
    and the [O, I, C] mask."""
    if CONTIG == 1:
        I = aligned(I, VEC)
    if CONTIG == 2:
        C = aligned(C, VEC)
    o = t_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i = t_i * BLOCK_I + tl.arange(0, BLOCK_I)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        o = o.to(tl.int64)
        i = i.to(tl.int64)
        c = c.to(tl.int64)
    mask = (o < O)[:, None, None] & (i < I)[None, :, None] & (c < C)[None, None, :]
    # Row decomposition: once per row, not per element.
    o0, o1, o2 = outer_index(o, O1, O2)
    return o0, o1, o2, i, c, mask


@triton.jit
def outer_index(o, O1, O2):
    """(o0, o1, o2) of a flat outer index o over the outer dims (O0, O1, O2)."""
    o2 = o % O2
    o01 = o // O2
    return o01 // O1, o01 % O1, o2


@triton.jit
def tile_offsets(o0, o1, o2, i, c, s0, s1, s2, s_inner, s_chan,
                 CONTIG: tl.constexpr, VEC: tl.constexpr):
    """Element offsets [BLOCK_O, BLOCK_I, BLOCK_C] of one tensor from its strides
    (every stride other than the unit one is a multiple of VEC)."""
    row = o0 * aligned(s0, VEC) + o1 * aligned(s1, VEC) + o2 * aligned(s2, VEC)
    if CONTIG == 1:
        inner = i
    else:
        inner = i * aligned(s_inner, VEC)
    if CONTIG == 2:
        chan = c
    else:
        chan = c * aligned(s_chan, VEC)
    return row[:, None, None] + inner[None, :, None] + chan[None, None, :]


@triton.jit
def channel_sum(a):
    """Per-channel sum of an [O, I, C] tile, a [C] vector, as one reduction over its O * I
    values per channel: a sum over I and then over O pays for two (compiled for sm_90, an
    NCHW tile [8, 256, 1] over 4 warps: about 45 more SASS instructions per thread a
    sum). As [C, I * O]: on a GPU the permute and reshape only rename registers (the same
    SASS count as [O * I, C]), and in the interpreter that reshape copies the channels'
    values next to each other, which numpy then sums pairwise (along a strided axis it
    adds them one after another: 6 ulps off on a 27-value sum in the tests, 1 here)."""
    return tl.sum(tl.reshape(tl.permute(a, (2, 1, 0)), [a.shape[2], a.shape[0] * a.shape[1]]), 1)


@triton.jit
def split_range(num_tiles, split, num_splits):
    """Contiguous range of tiles handled by program ``split`` of ``num_splits``."""
    per_split = tl.cdiv(num_tiles, num_splits)
    begin = split * per_split
    end = tl.minimum(begin + per_split, num_tiles)
    return begin, end


@triton.jit
def arrive_is_last(counter_ptr, num_splits):
    """Publish this program's partials and count it in; True for the last of ``num_splits``.

    The barrier orders every thread's partial stores before the single release-acquire
    atomic; the last arriver resets the counter so the buffer is zero again for the next
    launch (no memset launch needed)."""
    tl.debug_barrier()
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = old == num_splits - 1
    if is_last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return is_last
