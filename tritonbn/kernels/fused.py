"""Single-pass BatchNorm for small per-channel sizes: one program holds whole channels.

When all M = N*L values of BLOCK_C channels fit in one register tile (M small, as in the
7x7 and 14x14 layers of a ResNet at batch 32, or BatchNorm1d with a few hundred rows), one
program loads them once and finishes the job, so the tensor crosses HBM the minimum number
of times, in one launch:

    forward (training):  read x, write y                2 passes (split path: 3, 2 launches)
        mean = sum(x) / M,  var = sum((x - mean)^2) / M   (in registers: shifted by a
        first mean, corrected, then the centred sum of squares)
        invstd = 1 / sqrt(var + eps),  running stats as in stats.py
        y = (x - mean) * invstd * weight + bias
    backward (training): read x and dy, write dx        3 passes (split path: 5, 2 launches)
        grad_bias = sum(dy),  grad_weight = invstd * sum(dy * (x - mean))
        dx = (dy - k1 - (x - mean) * k2) * weight * invstd,
        k1 = sum(dy) / M,  k2 = sum(dy * (x - mean)) * invstd^2 / M
    backward (eval, running statistics): as above with invstd = 1 / sqrt(running_var + eps)
        and dx = dy * weight * invstd; x is read only when grad_weight is wanted.
    RELU (BatchNorm followed by ReLU): the forward writes max(y, 0); the backward zeroes dy
        where y, recomputed from x, is <= 0, before anything else uses it.
    RESIDUAL (y + z, z of the input's shape): the forward reads z and writes
        [max](y + z [, 0]); with RELU the backward reads z for the mask and writes the
        masked dy, the residual's gradient, to dz (without RELU dz = dy: nothing to do).

Grid: one program per channel block; the tile ``[BLOCK_O, BLOCK_I, BLOCK_C]`` covers the
whole outer x inner range (BLOCK_O >= O, BLOCK_I >= I, chosen by the host from the shape),
so there is no loop, no partial buffer and no cross-program handshake. Whether a shape is
eligible, and which BLOCK_C, is decided in configs.py.
"""
import triton
import triton.language as tl

from .grad_stats import (channel_scale, load_channel_stats, pre_activation, relu,
                         relu_backward, store_grad_params)
from .stats import tile_mean_shift, update_running_stats
from .tiles import channel_sum, tile_index, tile_offsets


@triton.jit(do_not_specialize=["KEY_M", "KEY_C"])
def bn_fused_kernel(
    x_ptr,            # input [O0, O1, O2, I, C] through strides sx*
    dy_ptr,           # grad_output (BACKWARD), strides sd*
    out_ptr,          # y (forward) or grad_input (backward, WRITE_OUT), strides so*
    mean_ptr,         # fp32 [C]: forward out, batch mean; backward in, saved mean or running_mean
    stat_ptr,         # fp32 [C]: forward out, invstd; backward in, invstd or running_var (STAT_IS_VAR)
    weight_ptr,       # [C] when HAS_WEIGHT
    bias_ptr,         # [C] when HAS_BIAS (forward; backward with RELU)
    run_mean_ptr,     # [C] running_mean, updated in place when UPDATE_RUNNING (forward)
    run_var_ptr,      # [C] running_var, updated in place when UPDATE_RUNNING (forward)
    nbt_ptr,          # int64 [1] num_batches_tracked, read when CUMULATIVE
    grad_weight_ptr,  # [C] out when HAS_GRAD_WEIGHT (backward)
    grad_bias_ptr,    # [C] out when HAS_GRAD_BIAS (backward)
    z_ptr,            # residual z when RESIDUAL, strides sz*
    dz_ptr,           # out (backward, RESIDUAL and RELU): the residual's gradient, strides sdz*
    momentum, eps, inv_m,   # floats; inv_m = 1 / M
    O1, O2, O, I, C,
    sx0, sx1, sx2, sxi, sxc,
    sd0, sd1, sd2, sdi, sdc,
    so0, so1, so2, soi, soc,
    sz0, sz1, sz2, szi, szc,
    sdz0, sdz1, sdz2, sdzi, sdzc,
    KEY_M, KEY_C,     # power-of-two buckets of M and C: autotuning key only
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,   # >= O and >= I: the whole reduction
    BLOCK_C: tl.constexpr,
    CONTIG: tl.constexpr, INT64: tl.constexpr,
    VEC: tl.constexpr,                # elements per vector access the strides and sizes allow
    BACKWARD: tl.constexpr, STAT_IS_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr,
    RELU: tl.constexpr, RESIDUAL: tl.constexpr,
):
    c_block = tl.program_id(0)
    o0, o1, o2, i, c, mask = tile_index(0, c_block, O1, O2, O, I, C,
                                        BLOCK_O, BLOCK_I, BLOCK_C, INT64, CONTIG, VEC)
    c_mask = c < C
    # The host sets RESIDUAL in a backward only with RELU: without a mask, dz = dy.
    if RESIDUAL:
        z_offs = tile_offsets(o0, o1, o2, i, c, sz0, sz1, sz2, szi, szc, CONTIG, VEC)
        z = tl.load(z_ptr + z_offs, mask=mask, other=0.0).to(tl.float32)
    # constexpr: a plain local would make this a runtime branch and leave x undefined below
    needs_x: tl.constexpr = (not BACKWARD) or (not STAT_IS_VAR) or HAS_GRAD_WEIGHT or RELU
    if needs_x:
        x_offs = tile_offsets(o0, o1, o2, i, c, sx0, sx1, sx2, sxi, sxc, CONTIG, VEC)
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)

    if BACKWARD:
        mean, invstd = load_channel_stats(mean_ptr, stat_ptr, c, c_mask, eps, STAT_IS_VAR)
        scale = channel_scale(weight_ptr, c, c_mask, invstd, HAS_WEIGHT)
        dy_offs = tile_offsets(o0, o1, o2, i, c, sd0, sd1, sd2, sdi, sdc, CONTIG, VEC)
        dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
        if needs_x:
            xmu = tl.where(mask, x - mean[None, None, :], 0.0)
        if RELU:  # the gradient that reaches BatchNorm through max(y, 0)
            y = pre_activation(xmu, scale, bias_ptr, c, c_mask, HAS_BIAS)
            if RESIDUAL:
                y += z
            dy = relu_backward(dy, y)
            if RESIDUAL:
                dz_offs = tile_offsets(o0, o1, o2, i, c, sdz0, sdz1, sdz2, sdzi, sdzc,
                                       CONTIG, VEC)
                tl.store(dz_ptr + dz_offs, dy.to(dz_ptr.dtype.element_ty), mask=mask)
        sum_dy = channel_sum(dy)
        if needs_x:
            sum_dy_xmu = channel_sum(dy * xmu)
        else:
            sum_dy_xmu = sum_dy  # unused: no grad_weight and no batch statistics
        store_grad_params(grad_weight_ptr, grad_bias_ptr, c, c_mask, sum_dy, sum_dy_xmu,
                          invstd, HAS_GRAD_WEIGHT, HAS_GRAD_BIAS)
    else:
        # Two-pass statistics over the tile in registers, of x - K with K the channel's
        # mean in a first sum (stats.tile_mean_shift), corrected by the mean of x - K,
        # which, near 0, is exact where a sum of x rounds at x's scale; then the centred
        # sum of squares (a constant channel gets exactly 0, where a sum of (x - K)^2
        # minus M * mean(x - K)^2 could round, or overflow for a constant above ~1e24).
        # The mean of x - K sums values scaled by 1 / (BLOCK_O * BLOCK_I), a power of two
        # (exact unless below ~1e-34) no smaller than 1 / M: no finite input overflows it.
        # Masked lanes hold 0.
        m = tl.zeros([BLOCK_C], tl.float32) + O * I
        shift = tile_mean_shift(x, m)
        xk = tl.where(mask, x - shift[None, None, :], 0.0)
        lanes: tl.constexpr = BLOCK_O * BLOCK_I
        mean_k = channel_sum(xk * (1.0 / lanes)) * lanes / m
        xmu_k = tl.where(mask, xk - mean_k[None, None, :], 0.0)
        var = channel_sum(xmu_k * xmu_k) / m
        mean = mean_k + shift
        xmu = tl.where(mask, x - mean[None, None, :], 0.0)
        invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        scale = channel_scale(weight_ptr, c, c_mask, invstd, HAS_WEIGHT)
        tl.store(mean_ptr + c, mean, mask=c_mask)
        tl.store(stat_ptr + c, invstd, mask=c_mask)
        if UPDATE_RUNNING:
            update_running_stats(run_mean_ptr, run_var_ptr, nbt_ptr, c, c_mask, mean, var,
                                 m, momentum, CUMULATIVE)

    if WRITE_OUT:
        if BACKWARD:
            if STAT_IS_VAR:
                out = dy * scale
            else:
                k1 = (sum_dy * inv_m)[None, None, :]
                k2 = (sum_dy_xmu * inv_m * invstd * invstd)[None, None, :]
                out = (dy - k1 - xmu * k2) * scale
        else:
            out = pre_activation(xmu, scale, bias_ptr, c, c_mask, HAS_BIAS)
            if RESIDUAL:
                out += z
            if RELU:
                out = relu(out)
        out_offs = tile_offsets(o0, o1, o2, i, c, so0, so1, so2, soi, soc, CONTIG, VEC)
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
