"""Elementwise pass: the normalized output (forward) or grad_input (backward), one read
of each input and one write of the output, in the output's own dtype and layout.

    forward:              y  = (x - mean) * invstd * weight + bias
    backward, training:   dx = (dy - k1 - (x - mean) * k2) * weight * invstd
    backward, eval:       dx = dy * weight * invstd
(k1, k2 from grad_stats.py; weight = 1 and bias = 0 when absent.) With RESIDUAL the
forward adds a residual z of the input's shape, y + z (the dy slot carries z). With RELU
the forward writes max(y [+ z], 0), and the backward first zeroes dy where the
pre-activation y, recomputed from x, is <= 0: no mask tensor is stored or read.
(The backward never sees a residual: with one, grad_stats.py writes the masked dy, which
this pass then reads as its dy with RELU off.)

Grid: one program per (tile, channel block), channel block fastest, walked from the last
tile to the first: the preceding reduction (statistics or gradient statistics) read the
tensor front to back, so its most recent reads - the ones most likely still in L2 - are
the first ones this pass asks for again.
"""
import triton
import triton.language as tl

from .grad_stats import (channel_scale, load_channel_stats, pre_activation, relu,
                         relu_backward)
from .tiles import tile_index, tile_offsets


@triton.jit(do_not_specialize=["KEY_M", "KEY_C"])
def bn_apply_kernel(
    x_ptr,            # input [O0, O1, O2, I, C] through strides sx*
    dy_ptr,           # grad_output (BACKWARD), or the residual z (forward, RESIDUAL), strides sd*
    out_ptr,          # y (forward) or grad_input (backward), strides so*
    mean_ptr,         # [C] batch mean or running_mean
    stat_ptr,         # [C] invstd, or running_var when STAT_IS_VAR
    weight_ptr,       # [C] when HAS_WEIGHT
    bias_ptr,         # [C] when HAS_BIAS (forward; backward with RELU)
    coef_ptr,         # fp32 [2, C]: k1, k2 (backward with batch statistics)
    eps,
    O1, O2, O, I, C,
    sx0, sx1, sx2, sxi, sxc,
    sd0, sd1, sd2, sdi, sdc,
    so0, so1, so2, soi, soc,
    KEY_M, KEY_C,     # power-of-two buckets of M and C: autotuning key only
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
    CONTIG: tl.constexpr, INT64: tl.constexpr,
    VEC: tl.constexpr,                # elements per vector access the strides and sizes allow
    STAT_IS_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BACKWARD: tl.constexpr, BATCH_STATS: tl.constexpr, RELU: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # back to front: see module docstring
    c_block = pid % num_c_blocks
    tile = pid // num_c_blocks
    o0, o1, o2, i, c, mask = tile_index(tile, c_block, O1, O2, O, I, C,
                                        BLOCK_O, BLOCK_I, BLOCK_C, INT64, CONTIG, VEC)
    c_mask = c < C
    mean, invstd = load_channel_stats(mean_ptr, stat_ptr, c, c_mask, eps, STAT_IS_VAR)
    scale = channel_scale(weight_ptr, c, c_mask, invstd, HAS_WEIGHT)
    mean = mean[None, None, :]

    # constexpr: a plain local would make this a runtime branch and leave x undefined below
    needs_x: tl.constexpr = (not BACKWARD) or BATCH_STATS or RELU
    if needs_x:
        x_offs = tile_offsets(o0, o1, o2, i, c, sx0, sx1, sx2, sxi, sxc, CONTIG, VEC)
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD or RESIDUAL:
        dy_offs = tile_offsets(o0, o1, o2, i, c, sd0, sd1, sd2, sdi, sdc, CONTIG, VEC)
        dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        if RELU:
            y = pre_activation(x - mean, scale, bias_ptr, c, c_mask, HAS_BIAS)
            dy = relu_backward(dy, y)
        if BATCH_STATS:
            k1 = tl.load(coef_ptr + c, mask=c_mask, other=0.0)[None, None, :]
            k2 = tl.load(coef_ptr + C + c, mask=c_mask, other=0.0)[None, None, :]
            out = (dy - k1 - (x - mean) * k2) * scale
        else:
            out = dy * scale
    else:
        out = pre_activation(x - mean, scale, bias_ptr, c, c_mask, HAS_BIAS)
        if RESIDUAL:
            out += dy  # the residual z, in the dy slot
        if RELU:
            out = relu(out)
    out_offs = tile_offsets(o0, o1, o2, i, c, so0, so1, so2, soi, soc, CONTIG, VEC)
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
