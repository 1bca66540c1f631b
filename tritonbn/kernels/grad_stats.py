"""Backward reduction: per-channel sum(dy) and sum(dy * (x - mean)) by a split reduction.

Math, per channel c over its M values, with xhat = (x - mean) * invstd:
    grad_bias   = sum(dy)
    grad_weight = sum(dy * xhat) = invstd * sum(dy * (x - mean))
and, for grad_input in training mode (see apply.py),
    dx = (dy - k1 - (x - mean) * k2) * weight * invstd,
    k1 = sum(dy) / M,   k2 = sum(dy * (x - mean)) * invstd^2 / M.

In eval mode (running statistics) mean/invstd come from running_mean/running_var and only
grad_weight/grad_bias are produced here; dx = dy * weight * invstd needs no reduction.
With RELU (BatchNorm followed by ReLU in one op) dy is first zeroed where the
pre-activation (x - mean) * invstd * weight + bias is <= 0, recomputed from x.
With RESIDUAL as well (relu(BatchNorm(x) + z)) the pre-activation includes z, read here,
and the masked dy, which is also the residual's gradient dz, is written out: the
grad_input pass then reads dz as its dy instead of reading dy and z again.

Same parallel layout as the forward statistics: grid = (channel blocks, splits), fp32
partial sums per split, and the last program of a channel block sums them in split order
(deterministic) and writes grad_weight, grad_bias and (k1, k2). One launch.
"""
import triton
import triton.language as tl

from .tiles import (arrive_is_last, channel_sum, next_tile, split_range, tile_coords,
                    tile_index_at, tile_offsets)


@triton.jit
def load_channel_stats(mean_ptr, stat_ptr, c, c_mask, eps, STAT_IS_VAR: tl.constexpr):
    """mean and invstd of channels ``c``: saved batch statistics (stat = invstd) or running
    statistics (stat = running_var, invstd = 1 / sqrt(var + eps) as torch computes it)."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    stat = tl.load(stat_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    if STAT_IS_VAR:
        stat = tl.div_rn(1.0, tl.sqrt_rn(stat + eps))
    return mean, stat


@triton.jit
def channel_scale(weight_ptr, c, c_mask, invstd, HAS_WEIGHT: tl.constexpr):
    """weight * invstd of channels ``c`` as a [1, 1, BLOCK_C] tile (invstd alone without
    weight): the factor of x - mean in y and of dy in grad_input, in every kernel."""
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32) * invstd
    else:
        scale = invstd
    return scale[None, None, :]


@triton.jit
def pre_activation(xmu, scale, bias_ptr, c, c_mask, HAS_BIAS: tl.constexpr):
    """y before any activation, (x - mean) * (weight * invstd) + bias, for [.., .., C]
    tiles: one expression for every kernel, so that the forward's ReLU and the backward's
    recomputed mask see the same value."""
    y = xmu * scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, None, :]
    return y


@triton.jit
def relu(y):
    """max(y, 0) with NaN kept, as torch.relu (tl.maximum's default returns 0 for NaN)."""
    return tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_backward(dy, y):
    """torch's threshold_backward: dy zeroed where y <= 0, so a NaN y passes it."""
    return tl.where(y <= 0.0, 0.0, dy)


@triton.jit
def store_grad_params(grad_weight_ptr, grad_bias_ptr, c, c_mask, sum_dy, sum_dy_xmu, invstd,
                      HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr):
    """grad_weight = invstd * sum(dy * (x - mean)), grad_bias = sum(dy), in their dtypes."""
    if HAS_GRAD_WEIGHT:
        gw = grad_weight_ptr + c
        tl.store(gw, (sum_dy_xmu * invstd).to(gw.dtype.element_ty), mask=c_mask)
    if HAS_GRAD_BIAS:
        gb = grad_bias_ptr + c
        tl.store(gb, sum_dy.to(gb.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["KEY_M", "KEY_C"])
def bn_grad_stats_kernel(
    x_ptr,            # input [O0, O1, O2, I, C] through strides sx*
    dy_ptr,           # grad_output, same shape, strides sd*
    partial_ptr,      # fp32 [2, num_splits, C]: sum(dy), sum(dy * (x - mean)) per split
    counter_ptr,      # int32 [num channel blocks], zero on entry and on exit
    mean_ptr,         # [C] saved mean (training) or running_mean (eval)
    stat_ptr,         # [C] saved invstd (training) or running_var (eval, STAT_IS_VAR)
    weight_ptr,       # [C] when RELU and HAS_WEIGHT: recomputes the pre-activation
    bias_ptr,         # [C] when RELU and HAS_BIAS
    grad_weight_ptr,  # [C] out (weight dtype) when HAS_GRAD_WEIGHT
    grad_bias_ptr,    # [C] out (bias dtype) when HAS_GRAD_BIAS
    coef_ptr,         # fp32 [2, C] out: k1, k2 for the grad_input pass, when WRITE_COEF
    z_ptr,            # residual z (RESIDUAL), same shape, strides sz*
    dz_ptr,           # out (RESIDUAL): dy masked by ReLU, the residual's gradient, strides sdz*
    eps, inv_m,       # floats: eps, 1 / M
    O1, O2, O, I, C,
    sx0, sx1, sx2, sxi, sxc,
    sd0, sd1, sd2, sdi, sdc,
    sz0, sz1, sz2, szi, szc,
    sdz0, sdz1, sdz2, sdzi, sdzc,
    KEY_M, KEY_C,     # power-of-two buckets of M and C: autotuning key only
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
    WAVES: tl.constexpr,            # split factor: programs per SM the grid aims for (host side)
    CONTIG: tl.constexpr, INT64: tl.constexpr,
    VEC: tl.constexpr,                # elements per vector access the strides and sizes allow
    STAT_IS_VAR: tl.constexpr, HAS_GRAD_WEIGHT: tl.constexpr,
    HAS_GRAD_BIAS: tl.constexpr, WRITE_COEF: tl.constexpr,
    RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,           # with RELU only: a residual without one needs no mask
):
    c_block = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    num_tiles = tl.cdiv(O, BLOCK_O) * tl.cdiv(I, BLOCK_I)
    begin, end = split_range(num_tiles, split, num_splits)

    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean_c, invstd_c = load_channel_stats(mean_ptr, stat_ptr, c, c_mask, eps, STAT_IS_VAR)
    scale = channel_scale(weight_ptr, c, c_mask, invstd_c, HAS_WEIGHT)

    sum_dy = tl.zeros([BLOCK_O, BLOCK_I, BLOCK_C], tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_O, BLOCK_I, BLOCK_C], tl.float32)
    t_o, t_i = tile_coords(begin, I, BLOCK_I)
    for _ in range(begin, end):
        o0, o1, o2, i, ci, mask = tile_index_at(t_o, t_i, c_block, O1, O2, O, I, C,
                                                BLOCK_O, BLOCK_I, BLOCK_C, INT64, CONTIG, VEC)
        t_o, t_i = next_tile(t_o, t_i, I, BLOCK_I)
        x_offs = tile_offsets(o0, o1, o2, i, ci, sx0, sx1, sx2, sxi, sxc, CONTIG, VEC)
        dy_offs = tile_offsets(o0, o1, o2, i, ci, sd0, sd1, sd2, sdi, sdc, CONTIG, VEC)
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
        xmu = x - mean_c[None, None, :]
        if RELU:  # the gradient that reaches BatchNorm through max(y, 0)
            y = pre_activation(xmu, scale, bias_ptr, c, c_mask, HAS_BIAS)
            if RESIDUAL:
                z_offs = tile_offsets(o0, o1, o2, i, ci, sz0, sz1, sz2, szi, szc, CONTIG, VEC)
                y += tl.load(z_ptr + z_offs, mask=mask, other=0.0).to(tl.float32)
            dy = relu_backward(dy, y)
            if RESIDUAL:
                dz_offs = tile_offsets(o0, o1, o2, i, ci, sdz0, sdz1, sdz2, sdzi, sdzc,
                                       CONTIG, VEC)
                tl.store(dz_ptr + dz_offs, dy.to(dz_ptr.dtype.element_ty), mask=mask)
        sum_dy += dy
        sum_dy_xmu += tl.where(mask, dy * xmu, 0.0)

    stride_part = num_splits * C
    p = partial_ptr + split * C + c
    tl.store(p, channel_sum(sum_dy), mask=c_mask)
    tl.store(p + stride_part, channel_sum(sum_dy_xmu), mask=c_mask)

    if arrive_is_last(counter_ptr + c_block, num_splits):
        # Splits merged per step: a [BLOCK_S, BLOCK_C] slab of at most 2048 partials.
        BLOCK_S: tl.constexpr = 64 if BLOCK_C < 32 else 2048 // BLOCK_C
        dbeta = tl.zeros([BLOCK_C], tl.float32)
        dot = tl.zeros([BLOCK_C], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m = (s < num_splits)[:, None] & c_mask[None, :]
            ps = partial_ptr + s[:, None] * C + c[None, :]
            dbeta += tl.sum(tl.load(ps, mask=m, other=0.0, cache_modifier=".cg"), 0)
            dot += tl.sum(tl.load(ps + stride_part, mask=m, other=0.0, cache_modifier=".cg"), 0)
        store_grad_params(grad_weight_ptr, grad_bias_ptr, c, c_mask, dbeta, dot, invstd_c,
                          HAS_GRAD_WEIGHT, HAS_GRAD_BIAS)
        if WRITE_COEF:
            tl.store(coef_ptr + c, dbeta * inv_m, mask=c_mask)
            tl.store(coef_ptr + C + c, dot * inv_m * invstd_c * invstd_c, mask=c_mask)
