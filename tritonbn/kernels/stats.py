"""Forward statistics: per-channel mean / biased variance by a split reduction.

Math, per channel c over the M = N*L values x_m:
    mean = sum(x) / M,  var = sum((x - mean)^2) / M,  invstd = 1 / sqrt(var + eps)
    running_mean <- (1 - f) * running_mean + f * mean
    running_var  <- (1 - f) * running_var  + f * var * M / (M - 1)
with f = momentum, or f = 1 / num_batches_tracked (cumulative average, momentum=None).

Parallel layout: grid = (channel blocks, splits). Each program walks a contiguous range of
``[BLOCK_O, BLOCK_I, BLOCK_C]`` tiles keeping per lane the sums of v and v^2, v = x - K2,
K2 a per-channel shift near the data it reads (see the kernel), and turns them into one
(count, K2, mean - K2, M2) per channel, its partial. The last program of a channel block
to arrive merges the partials of all splits with Chan's formula in split order
(deterministic: same input, same bits), their means taken relative to R, the mean of the
first slab of partials it reads (8 to 64 splits), then writes mean / invstd and updates
the running statistics in place. One launch, no memset, no host synchronisation.

Per element, the loop does a subtraction, a select, an add and a fused multiply-add: a
Welford update (count, delta, a division, two updates, masks) compiled to about 28 SASS
instructions per fp32 value for sm_90, more than an H200 issues in the time its memory
delivers a bf16 value (perf/kernel_report.py counts them).
"""
import triton
import triton.language as tl

from .tiles import (arrive_is_last, channel_sum, next_tile, outer_index, split_range,
                    tile_coords, tile_index_at, tile_offsets)


# Sums of values that may be near fp32's limit are taken at 2^-32 scale: a power of two
# scales exactly (bar subnormals, below 2^-94 ~ 5e-29 after scaling), and 2^31 values of
# any finite magnitude then sum without overflow.
SUM_SCALE = tl.constexpr(2.3283064365386963e-10)
SUM_UNSCALE = tl.constexpr(4294967296.0)


@triton.jit
def _weighted_mean(count, value, axis: tl.constexpr):
    """sum(count * value) / sum(count) along ``axis``. Where a finite |value| exceeds 2^64
    the sum is taken at 2^-32 scale, so that no finite value overflows it (counts sum to
    less than 2^31); powers of two scale exactly, and below 2^64 nothing is scaled, so
    that small values do not turn subnormal."""
    finite = tl.where(tl.abs(value) < float("inf"), tl.abs(value), 0.0)
    large = tl.max(finite, axis) > 18446744073709551616.0
    scale = tl.where(large, SUM_SCALE, 1.0)
    unscale = tl.where(large, SUM_UNSCALE, 1.0)
    total = tl.sum(count * (value * tl.expand_dims(scale, axis)), axis)
    return total / tl.maximum(tl.sum(count, axis), 1.0) * unscale


@triton.jit
def _fold_lanes(count, mean, m2, axis: tl.constexpr):
    """Merge Welford states along ``axis`` (exact parallel formula, fp32)."""
    n = tl.sum(count, axis)
    mu = _weighted_mean(count, mean, axis)
    d = mean - tl.expand_dims(mu, axis)
    q = tl.sum(m2 + count * d * d, axis)
    return n, mu, q


@triton.jit
def tile_mean_shift(x, n):
    """A per-channel shift K near the data: the mean of an [O, I, C] register tile (masked
    lanes hold 0) whose channels each hold ``n`` values, each value scaled by 1/n before
    the sum so that no finite input overflows it. Sums then describe x - K, whose
    magnitude is that of the spread, not of the mean. 0 where the tile has no value, or an
    inf or a NaN."""
    k = channel_sum(x * (1.0 / tl.maximum(n, 1.0)))
    return tl.where(tl.abs(k) < float("inf"), k, 0.0)


@triton.jit
def shifted_m2(sum1_scaled, sum2, mean):
    """M2 = sum((v - mean)^2) from sum1_scaled = sum(v) * 2^-32 (SUM_SCALE: the sum of
    values near fp32's limit cannot overflow), sum2 = sum(v^2) and mean = sum(v) / n, as
    sum2 - sum(v) * mean: negative only by rounding (then 0). With sum2 = inf it is inf when
    the values are finite (a variance beyond fp32, as torch's; sum(v) * mean may overflow
    too, and inf - inf would be NaN) and NaN when an inf is among them (sum(v) = inf, as
    Welford's inf - inf); a NaN stays NaN."""
    # (sum2 finite: |sum(v)| <= sqrt(n * sum2) is finite too, and unscaled first, so that
    # sum(v) * mean does not underflow where v^2 is subnormal)
    m2 = tl.where(sum2 < float("inf"), sum2 - (sum1_scaled * SUM_UNSCALE) * mean,
                  tl.where(tl.abs(sum1_scaled) < float("inf"), sum2, float("nan")))
    return tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def _channel_moments(s1, s2, n):
    """Per-channel (sum(v) * 2^-32, sum(v^2), mean of v, M2) from _shifted_sums' per-lane
    s1 and s2, for channels of ``n`` values."""
    sum1_scaled = channel_sum(s1)
    sum2 = channel_sum(s2)
    mean = sum1_scaled / tl.maximum(n, 1.0) * SUM_UNSCALE
    return sum1_scaled, sum2, mean, shifted_m2(sum1_scaled, sum2, mean)


@triton.jit
def _element(x_ptr, o, i, c, c_mask, O1, O2, sx0, sx1, sx2, sxi, sxc, INT64: tl.constexpr):
    """x[o, c, i] in fp32 for a [BLOCK_C] vector of channels (o a flat outer index; o and
    i spread over c's shape, which also makes tensors of constants)."""
    o = o + tl.zeros_like(c)
    i = i + tl.zeros_like(c)
    if INT64:
        o = o.to(tl.int64)
        i = i.to(tl.int64)
        c = c.to(tl.int64)
    o0, o1, o2 = outer_index(o, O1, O2)
    offs = o0 * sx0 + o1 * sx1 + o2 * sx2 + i * sxi + c * sxc
    return tl.load(x_ptr + offs, mask=c_mask, other=0.0).to(tl.float32)


@triton.jit
def median_shift(x_ptr, c, c_mask, O1, O2, O, I, sx0, sx1, sx2, sxi, sxc,
                 INT64: tl.constexpr):
    """The split path's first shift K: the median of the channel's first, middle and last
    values. Each program's shift K2 is K plus the mean of x - K over a sample tile, so
    that sums describe x - K2, whose magnitude is that of the spread, not of the mean
    (unshifted, at mean 1e4 / std 1 every Welford update of an fp32 mean rounds at 1e4's
    scale, ~5e-4). A median, unlike the first value alone, is no single outlier (with
    K = a spike of 3e4, the sample's mean of x - K rounds at 3e4's scale); when two of
    the three are, K2 still lands near the data, within that rounding."""
    a = _element(x_ptr, 0, 0, c, c_mask, O1, O2, sx0, sx1, sx2, sxi, sxc, INT64)
    b = _element(x_ptr, O // 2, I // 2, c, c_mask, O1, O2, sx0, sx1, sx2, sxi, sxc, INT64)
    z = _element(x_ptr, O - 1, I - 1, c, c_mask, O1, O2, sx0, sx1, sx2, sxi, sxc, INT64)
    k = tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), z))
    return tl.where(tl.abs(k) < float("inf"), k, 0.0)


@triton.jit
def tile_count(t_o, t_i, O, I, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """How many (outer, inner) positions of the tile at (t_o, t_i) are inside the tensor (0
    for a tile past the last): the values each of its channels holds there, as
    tile_index_at's mask counts them, without a per-element add."""
    rows = tl.minimum(tl.maximum(O - t_o * BLOCK_O, 0), BLOCK_O)
    cols = tl.minimum(I - t_i * BLOCK_I, BLOCK_I)
    return rows * cols


@triton.jit
def _shifted_sums(x_ptr, begin, end, skip, local, s1, s2, n, c_block, O1, O2, O, I, C,
                  sx0, sx1, sx2, sxi, sxc,
                  BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
                  INT64: tl.constexpr, CONTIG: tl.constexpr, VEC: tl.constexpr):
    """s1 + sum of v * 2^-32 and s2 + sum of v^2 per lane, v = x - local, and n + the
    values per channel, over tiles [begin, end) but ``skip`` (the sample tile, already
    summed; ``end`` for none). The tile grid is walked with a row/column counter, not a
    division per tile."""
    local_3d = local[None, None, :]
    t_o, t_i = tile_coords(begin, I, BLOCK_I)
    for tile in range(begin, end):
        if tile != skip:
            o0, o1, o2, i, ci, mask = tile_index_at(t_o, t_i, c_block, O1, O2, O, I, C,
                                                    BLOCK_O, BLOCK_I, BLOCK_C, INT64,
                                                    CONTIG, VEC)
            offs = tile_offsets(o0, o1, o2, i, ci, sx0, sx1, sx2, sxi, sxc, CONTIG, VEC)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.where(mask, x - local_3d, 0.0)
            s1 += v * SUM_SCALE
            s2 += v * v
            n += tile_count(t_o, t_i, O, I, BLOCK_O, BLOCK_I)
        t_o, t_i = next_tile(t_o, t_i, I, BLOCK_I)
    return s1, s2, n


@triton.jit
def update_running_stats(run_mean_ptr, run_var_ptr, nbt_ptr, c, c_mask, mean, var, n,
                         momentum, CUMULATIVE: tl.constexpr):
    """running <- (1 - f) * running + f * batch value, in the buffers' own dtype, with the
    unbiased variance var * n / (n - 1) (n > 1 in training). f = momentum, or
    1 / num_batches_tracked read on the device (CUMULATIVE, momentum=None)."""
    if CUMULATIVE:
        f = 1.0 / tl.load(nbt_ptr).to(tl.float32)
    else:
        f = momentum
    rm = tl.load(run_mean_ptr + c, mask=c_mask, other=0.0)
    rv = tl.load(run_var_ptr + c, mask=c_mask, other=0.0)
    unbiased = var * n / tl.maximum(n - 1.0, 1.0)
    new_rm = f * mean + (1.0 - f) * rm.to(tl.float32)
    new_rv = f * unbiased + (1.0 - f) * rv.to(tl.float32)
    tl.store(run_mean_ptr + c, new_rm.to(rm.dtype), mask=c_mask)
    tl.store(run_var_ptr + c, new_rv.to(rv.dtype), mask=c_mask)


@triton.jit
def _partial_slab(partial_ptr, s0, c, c_mask, num_splits, C, BLOCK_S: tl.constexpr,
                  WITH_M2: tl.constexpr):
    """The partials (count, K2, mean - K2, M2 or 0) of splits [s0, s0 + BLOCK_S) for the
    channels c: [BLOCK_S, BLOCK_C] each, zero past the last split. Read through L2 (.cg):
    other programs wrote them."""
    s = s0 + tl.arange(0, BLOCK_S)
    m = (s < num_splits)[:, None] & c_mask[None, :]
    ps = partial_ptr + s[:, None] * C + c[None, :]
    stride_part = num_splits * C
    n = tl.load(ps, mask=m, other=0.0, cache_modifier=".cg")
    k2 = tl.load(ps + stride_part, mask=m, other=0.0, cache_modifier=".cg")
    mean = tl.load(ps + 2 * stride_part, mask=m, other=0.0, cache_modifier=".cg")
    if WITH_M2:
        m2 = tl.load(ps + 3 * stride_part, mask=m, other=0.0, cache_modifier=".cg")
    else:
        m2 = tl.zeros_like(n)
    return n, k2, mean, m2


@triton.jit
def _rough_mean(n, k2, mean):
    """Per-channel mean of a slab of partials, at x's scale (rounding at |mean|'s): the
    reference the merge takes means relative to. 0 where it is not finite (the data holds
    an inf or a NaN, which the merge then carries)."""
    r = _weighted_mean(n, k2 + mean, 0)
    return tl.where(tl.abs(r) < float("inf"), r, 0.0)


@triton.jit
def _mean_relative_to(k2, mean, ref):
    """(K2 + mean) - ref, a partial's mean relative to the merge's reference, rounded once
    at its own scale: K2 - ref is split into its rounded value and the exact rounding error
    (Knuth's two-sum), so a K2 far from ref (a spike in the program's sample tile) costs
    nothing; the mean, relative to K2, is then added to the larger part first."""
    hi = k2 - ref
    b_virtual = hi - k2
    lo = (k2 - (hi - b_virtual)) + (-ref - b_virtual)
    return (hi + mean) + lo


@triton.jit(do_not_specialize=["KEY_M", "KEY_C"])
def bn_stats_kernel(
    x_ptr,            # input: [O0, O1, O2, I, C] through strides sx*
    partial_ptr,      # fp32 [4, num_splits, C]: count, K2, mean - K2, M2 of each split
    counter_ptr,      # int32 [num channel blocks], zero on entry and on exit
    mean_ptr,         # fp32 [C] out: batch mean (saved for backward)
    invstd_ptr,       # fp32 [C] out: 1 / sqrt(var + eps) (saved for backward), or the
                      # biased variance itself when WRITE_VAR (SyncBatchNorm's local stats)
    run_mean_ptr,     # [C] running_mean, updated in place when UPDATE_RUNNING
    run_var_ptr,      # [C] running_var, updated in place when UPDATE_RUNNING
    nbt_ptr,          # int64 [1] num_batches_tracked, read when CUMULATIVE
    momentum, eps,    # floats
    O1, O2, O, I, C,  # outer dims 1, 2, total outer size, inner size, channels
    sx0, sx1, sx2, sxi, sxc,
    KEY_M, KEY_C,     # power-of-two buckets of M and C: autotuning key only
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
    WAVES: tl.constexpr,            # split factor: programs per SM the grid aims for (host side)
    CONTIG: tl.constexpr, INT64: tl.constexpr,
    VEC: tl.constexpr,                # elements per vector access the strides and sizes allow
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, WRITE_VAR: tl.constexpr,
):
    c_block = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    num_tiles = tl.cdiv(O, BLOCK_O) * tl.cdiv(I, BLOCK_I)
    begin, end = split_range(num_tiles, split, num_splits)

    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C

    # Shifts. K (median_shift) is the same in every program. Each program's sums are taken
    # relative to K2 = K + the mean of x - K over a sample tile of its own (its first, or
    # its second when that holds more values: a first tile at the end of a row of tiles may
    # hold a single column), close to the data this program reads, so that the sums need
    # no per-element division (a Welford update divides by its count at every element).
    # If the sample's mean is D away from the program's, the cancellation in
    # s2 - s1^2 / n multiplies the rounding error of s2 by s2 / M2 = 1 + D^2 / var, at
    # most 1 + n / T (the sample alone holds at least T * D^2 of M2, T values per channel
    # in it); past 2, the program sums again (below). s1 sums v * 2^-32 (exact bar
    # deviations below ~5e-29, which turn subnormal; fused into the add), so that values
    # near fp32's limit cannot overflow it.
    shift = median_shift(x_ptr, c, c_mask, O1, O2, O, I, sx0, sx1, sx2, sxi, sxc, INT64)
    # (a program with no tile, begin >= end, has begin >= the number of tiles: its masks
    # and counts are 0)
    b_o, b_i = tile_coords(begin, I, BLOCK_I)
    n_o, n_i = next_tile(b_o, b_i, I, BLOCK_I)
    n_first = tile_count(b_o, b_i, O, I, BLOCK_O, BLOCK_I)
    n_next = tl.where(begin + 1 < end, tile_count(n_o, n_i, O, I, BLOCK_O, BLOCK_I), 0)
    take_next = n_next > n_first
    sample = tl.where(take_next, begin + 1, begin)
    n = tl.maximum(n_first, n_next)
    o0, o1, o2, i, ci, mask = tile_index_at(tl.where(take_next, n_o, b_o),
                                            tl.where(take_next, n_i, b_i), c_block, O1, O2,
                                            O, I, C, BLOCK_O, BLOCK_I, BLOCK_C, INT64, CONTIG,
                                            VEC)
    offs = tile_offsets(o0, o1, o2, i, ci, sx0, sx1, sx2, sxi, sxc, CONTIG, VEC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    local = shift + tile_mean_shift(tl.where(mask, x - shift[None, None, :], 0.0),
                                    n.to(tl.float32))
    v = tl.where(mask, x - local[None, None, :], 0.0)
    s1, s2, n = _shifted_sums(x_ptr, begin, end, sample, local, v * SUM_SCALE, v * v, n,
                              c_block, O1, O2, O, I, C, sx0, sx1, sx2, sxi, sxc,
                              BLOCK_O, BLOCK_I, BLOCK_C, INT64, CONTIG, VEC)

    # Lanes -> one (count, mean - K2, M2) per channel. Every lane of a channel has the same
    # shift, so its sums add up.
    n_c = tl.where(c_mask, n.to(tl.float32), 0.0)
    sum1_scaled, sum2, mean_local, q_c = _channel_moments(s1, s2, n_c)
    # A sample unlike the rest of the program's data (a tile of padding among values near
    # 1e3) costs up to sum2 / M2 times the rounding of sum2: past 2 (the sample's mean
    # more than a standard deviation from the program's), or when sum2 overflowed on
    # finite data, the program sums again, shifted by the mean it found. Random data
    # never gets there; the second pass reads the program's tiles again.
    redo = (sum2 > 2.0 * q_c) | ((sum2 == float("inf")) & (tl.abs(sum1_scaled) < float("inf")))
    if tl.sum(redo.to(tl.int32), 0) > 0:
        local = tl.where(tl.abs(mean_local) < float("inf"), local + mean_local, local)
        zero = tl.zeros([BLOCK_O, BLOCK_I, BLOCK_C], tl.float32)
        s1, s2, _ = _shifted_sums(x_ptr, begin, end, end, local, zero, zero, n, c_block,
                                  O1, O2, O, I, C, sx0, sx1, sx2, sxi, sxc,
                                  BLOCK_O, BLOCK_I, BLOCK_C, INT64, CONTIG, VEC)
        sum1_scaled, sum2, mean_local, q_c = _channel_moments(s1, s2, n_c)

    # The partial keeps K2 and the mean relative to it apart: K2 - K can be as far as K is
    # from the data (two spikes among the median's three samples make K a spike), and
    # their sum would round at that scale.
    stride_part = num_splits * C
    p = partial_ptr + split * C + c
    tl.store(p, n_c, mask=c_mask)
    tl.store(p + stride_part, local, mask=c_mask)
    tl.store(p + 2 * stride_part, mean_local, mask=c_mask)
    tl.store(p + 3 * stride_part, q_c, mask=c_mask)

    if arrive_is_last(counter_ptr + c_block, num_splits):
        # Splits merged per step: a [BLOCK_S, BLOCK_C] slab of at most 2048 partials, their
        # means relative to R, the mean of the first slab's partials (all of them for at
        # most BLOCK_S splits): near the data, whatever K and any one K2 are.
        BLOCK_S: tl.constexpr = 64 if BLOCK_C < 32 else 2048 // BLOCK_C
        n_s, k2_s, mean_s, _ = _partial_slab(partial_ptr, 0, c, c_mask, num_splits, C,
                                             BLOCK_S, False)
        ref = _rough_mean(n_s, k2_s, mean_s)
        n_acc = tl.zeros([BLOCK_C], tl.float32)
        mu_acc = tl.zeros([BLOCK_C], tl.float32)
        q_acc = tl.zeros([BLOCK_C], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            n_s, k2_s, mean_s, q_s = _partial_slab(partial_ptr, s0, c, c_mask, num_splits, C,
                                                   BLOCK_S, True)
            mu_s = _mean_relative_to(k2_s, mean_s, ref[None, :])
            n_b, mu_b, q_b = _fold_lanes(n_s, mu_s, q_s, 0)
            # Chan's merge of (n_acc, mu_acc, q_acc) with (n_b, mu_b, q_b).
            n_new = n_acc + n_b
            d = mu_b - mu_acc
            w_b = n_b / tl.maximum(n_new, 1.0)
            mu_acc = mu_acc + d * w_b
            # weights first: with n_acc = 0 an overflowing d * d would make inf * 0 = NaN
            q_acc = q_acc + q_b + n_acc * w_b * d * d
            n_acc = n_new
        var = q_acc / tl.maximum(n_acc, 1.0)  # n_acc = 0 only in masked lanes
        mu_acc += ref
        tl.store(mean_ptr + c, mu_acc, mask=c_mask)
        if WRITE_VAR:
            tl.store(invstd_ptr + c, var, mask=c_mask)
        else:
            tl.store(invstd_ptr + c, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), mask=c_mask)
        if UPDATE_RUNNING:
            update_running_stats(run_mean_ptr, run_var_ptr, nbt_ptr, c, c_mask, mu_acc, var,
                                 n_acc, momentum, CUMULATIVE)
