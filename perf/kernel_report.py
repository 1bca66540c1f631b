"""Compiled-kernel report: every config of every tritonbn kernel, compiled ahead of time.

Runs on a CPU-only machine. Each config of ``bn_stats_kernel``, ``bn_grad_stats_kernel``,
``bn_apply_kernel`` and the single-pass ``bn_fused_kernel`` (forward, and backward with
batch statistics; the last one at its largest tile, see FUSED_KERNELS) is compiled with Triton's
AOT path (``triton.compile(ASTSource(...), target=GPUTarget(...))``) for sm_90 (Hopper) and
sm_80 (Ampere), for aligned inputs in NCHW (CONTIG=1: unit stride along the inner axis) and
channels_last (CONTIG=2: unit stride along the channels). The kernel arguments are the ones
the real launchers pass (captured from ``tritonbn.kernels.launch``), specialised the way
the JIT specialises them for aligned tensors (``tt.divisibility=16`` on pointers and on
ints divisible by 16, ints equal to 1 folded into constants).

Per kernel, config, arch, layout and dtype it reports:
  registers, spill_bytes (local memory per thread), stack_bytes  (cuobjdump --dump-resource-usage)
  shared_bytes    shared memory the kernel asks for at launch (Triton metadata)
  load_bits       width of the main (tile) load of each big tensor (x, dy) in the ptx - its
                  widest load; the narrowest over those tensors. 128 = every thread moves
                  16 bytes per load instruction. (Single elements read besides, if any,
                  do not count.)
  store_bits      narrowest global store of the big output (apply kernel only)
  load_bits_max / store_bits_max   widest such access
  vec128          every bulk load and store is 128-bit
  sass_per_elem   SASS instructions of the tile loop (whole kernel without one) per element
                  each thread handles per tile (cuobjdump -sass, perf/_sass.py), and in
                  the .md against the issue budget of the bytes the kernel moves
  eligible        config_fits() keeps this config for some aligned shape in this layout
                  (a config whose block along the unit-stride axis is below
                  configs.MIN_CONTIG_BLOCK is never run in that layout)
Bulk accesses are told apart from per-channel ones (mean, weight, partials ...) by a taint
analysis of the ptx (perf/_ptx.py): every address is traced back to the kernel parameter it
derives from.

Rows named "variant:..." compile the other constexpr branches once each (FLAG_VARIANTS:
eval mode, absent weight/bias/outputs, momentum=None, int64 offsets, no unit-stride axis,
the variance output of SyncBatchNorm's local statistics, the fused ReLU, the fused
residual),
in quick mode too: a branch the tests only ever interpret must still compile for a GPU.

WAVES (the split factor of the reductions) is a host-side knob: it is not used in the
kernel body, so configs differing only in WAVES share one binary (compiled once, reported
once per config).

Usage:
  python perf/kernel_report.py [--out DIR] [--quick] [--jobs 2] [--dtypes fp32,bf16]
                               [--archs 90,80]   (--quick: 90 only)  [--shape 32,256,16,16]
Writes DIR/kernel_report.csv and DIR/kernel_report.md; exits 1 if any config spills (or
fails to compile), listing them.
From Python: ``run(out_dir, quick=False) -> list[dict]``.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing as mp

from _ptx import analyse_ptx
import _sass

# No triton / tritonbn import at module level: the compile workers must import them with
# TRITON_INTERPRET unset (real JITFunctions), whatever the parent process did.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "perf", "results", "cpu")

# (label, kernel name, reduction?) ; the label selects the launcher mode (see _capture).
KERNELS = (
    ("bn_stats_kernel", "bn_stats_kernel", True),
    ("bn_grad_stats_kernel", "bn_grad_stats_kernel", True),
    ("bn_apply_kernel[fwd]", "bn_apply_kernel", False),
    ("bn_apply_kernel[bwd]", "bn_apply_kernel", False),
)
# Big tensors of each kernel: pointer arguments whose loads / stores are the bulk traffic.
BULK_LOADS = {"bn_stats_kernel": ("x_ptr",), "bn_grad_stats_kernel": ("x_ptr", "dy_ptr"),
              "bn_apply_kernel": ("x_ptr", "dy_ptr"), "bn_fused_kernel": ("x_ptr", "dy_ptr")}
BULK_STORES = {"bn_stats_kernel": (), "bn_grad_stats_kernel": (),
               "bn_apply_kernel": ("out_ptr",), "bn_fused_kernel": ("out_ptr",)}
# The single-pass kernel (fused.py): its tile covers a whole channel, so its shape comes
# from the input, not from the config. Each config is compiled at its largest tile, the
# most elements per thread of configs.FUSED_PER_THREAD within configs.FUSED_MAX_VOLUME (the
# register high-water mark), for an input of that many values per channel: NCHW
# (N, 256, 1, W) with W <= 256, channels_last (M, 256, 1, 1) (BLOCK_C >= 16 only: smaller
# blocks are never chosen there).
FUSED_KERNELS = ("bn_fused_kernel[fwd]", "bn_fused_kernel[bwd]")
# Big-tensor values each kernel reads and writes per element, as compiled here (training
# step, no ReLU or residual): the bytes its instructions have to keep up with.
PASSES = {"bn_stats_kernel": 1, "bn_grad_stats_kernel": 2, "bn_apply_kernel[fwd]": 2,
          "bn_apply_kernel[bwd]": 3, "bn_fused_kernel[fwd]": 2, "bn_fused_kernel[bwd]": 3}
ELEM_BYTES = {"fp32": 4, "bf16": 2}
FUSED_CHANNELS = 256
QUICK_FUSED = ((1, 4), (16, 8))  # (BLOCK_C, num_warps) compiled by --quick
# Flag variants: the rows above compile each kernel in the mode its launcher uses for a
# training step; these compile, once each (default config, sm_90, bf16, NCHW), the other
# constexpr branches the launchers can take: eval mode, absent weight / bias / running
# statistics / outputs, momentum=None, 64-bit offsets, no unit-stride axis (CONTIG=0,
# e.g. a strided slice), the fused ReLU and the fused residual add. The interpreter runs them all in the tests but does not compile
# them; a branch that fails to compile for a GPU would otherwise go unseen.
_EVERY_KERNEL_VARIANTS = [dict(INT64=True), dict(CONTIG=0, VEC=1)]
FLAG_VARIANTS = {label: variants + _EVERY_KERNEL_VARIANTS for label, variants in {
    "bn_stats_kernel": [dict(UPDATE_RUNNING=False), dict(CUMULATIVE=True),
                        dict(UPDATE_RUNNING=False, WRITE_VAR=True)],
    "bn_grad_stats_kernel": [dict(STAT_IS_VAR=True, WRITE_COEF=False),
                             dict(HAS_GRAD_WEIGHT=False), dict(HAS_GRAD_BIAS=False),
                             dict(RELU=True, HAS_WEIGHT=True, HAS_BIAS=True),
                             dict(RELU=True, HAS_WEIGHT=True, HAS_BIAS=True, RESIDUAL=True)],
    "bn_apply_kernel[fwd]": [dict(STAT_IS_VAR=True), dict(HAS_WEIGHT=False, HAS_BIAS=False),
                             dict(RELU=True), dict(RESIDUAL=True),
                             dict(RELU=True, RESIDUAL=True, STAT_IS_VAR=True)],
    "bn_apply_kernel[bwd]": [dict(BATCH_STATS=False, STAT_IS_VAR=True),
                             dict(HAS_WEIGHT=False), dict(RELU=True, HAS_BIAS=True),
                             dict(RELU=True, HAS_BIAS=True, BATCH_STATS=False,
                                  STAT_IS_VAR=True)],
    "bn_fused_kernel[fwd]": [dict(HAS_WEIGHT=False, HAS_BIAS=False),
                             dict(UPDATE_RUNNING=False), dict(CUMULATIVE=True),
                             dict(RELU=True), dict(RESIDUAL=True, RELU=True)],
    "bn_fused_kernel[bwd]": [dict(STAT_IS_VAR=True),
                             dict(STAT_IS_VAR=True, HAS_GRAD_WEIGHT=False),
                             dict(HAS_GRAD_WEIGHT=False, HAS_GRAD_BIAS=False),
                             dict(WRITE_OUT=False), dict(HAS_WEIGHT=False),
                             dict(RELU=True, HAS_BIAS=True),
                             dict(RELU=True, HAS_BIAS=True, STAT_IS_VAR=True),
                             dict(RELU=True, HAS_BIAS=True, RESIDUAL=True)],
}.items()}
LAYOUTS = ("nchw", "channels_last")
ARCHS = (90, 80)
DTYPES = ("fp32", "bf16")
# Representative aligned problem: every size and stride a multiple of 16.
SHAPE = (32, 256, 16, 16)
# Tiles compiled by --quick (one per tile volume, eligible in both layouts).
QUICK_TILES = ((4, 16, 16), (1, 64, 64))

FIELDS = ["kernel", "config", "arch", "layout", "dtype", "eligible", "registers",
          "spill_bytes", "stack_bytes", "shared_bytes", "load_bits", "load_bits_max",
          "store_bits", "store_bits_max", "other_load_bits_max", "n_bulk_loads",
          "n_bulk_stores", "vec128", "sass_per_elem", "compile_s", "error"]


# --------------------------------------------------------------------------- configs

def _config_name(kwargs: dict, num_warps: int, num_stages: int) -> str:
    s = "O{BLOCK_O}_I{BLOCK_I}_C{BLOCK_C}".format(**kwargs)
    if "WAVES" in kwargs:
        s += "_W{WAVES}".format(**kwargs)
    return f"{s}_w{num_warps}_s{num_stages}"


def _tile(kwargs: dict) -> tuple[int, int, int]:
    return kwargs["BLOCK_O"], kwargs["BLOCK_I"], kwargs["BLOCK_C"]


def _eligible(kwargs: dict, contig: int) -> bool:
    """config_fits keeps it for at least one aligned shape of this layout: the unit-stride
    axis (inner for NCHW, channels for channels_last) is a multiple of 16 elements, the
    premise of 128-bit access; the other axes take any size."""
    from tritonbn.kernels import configs
    from tritonbn.kernels.tiles import CONTIG_INNER
    target = 2 * 132
    any_size = [1, 2, 4, 16, 64, 256, 1024, 4096, 16384, 65536]
    aligned = [16, 64, 256, 1024, 4096, 16384, 65536]
    inners, chans = (aligned, any_size[1:]) if contig == CONTIG_INNER else (any_size, aligned)
    for outer, inner, c in itertools.product([1, 4, 32, 256], inners, chans):
        if configs.config_fits(kwargs, outer, inner, c, contig, target):
            return True
    return False


# --------------------------------------------------------------------------- worker side

_CAPTURED: dict = {}


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence a 3.9 warning
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


class _Recorder:
    """Stands in for a kernel in launch.RAW / launch.TUNED: records the call."""

    def __init__(self, name, sink):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.sink[self.name] = (args, kwargs)
        return call


def _capture(label: str, layout: str, dtype: str, shape=SHAPE):
    """(kernel, positional args, keyword args) the launcher passes for ``shape``."""
    key = (label, layout, dtype, tuple(shape))
    if key in _CAPTURED:
        return _CAPTURED[key]
    import torch
    from tritonbn.kernels import launch
    from tritonbn.kernels.geometry import make_geometry

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(shape, dtype=tdtype).to(memory_format=fmt)
    dy = torch.empty_like(x)
    out = torch.empty_like(x)
    C = shape[1]
    w, b = torch.ones(C), torch.zeros(C)
    mean, invstd = torch.zeros(C), torch.ones(C)
    sink: dict = {}
    saved = dict(launch.RAW), dict(launch.TUNED)
    launch.clear_caches()  # cached launch plans hold the kernel objects
    try:
        for name in launch.RAW:
            launch.RAW[name] = _Recorder(name, sink)
            launch.TUNED[name] = _Recorder(name, sink)
        if label == "bn_stats_kernel":  # training forward, momentum update
            launch.launch_stats(x, make_geometry(x), torch.zeros(C), torch.ones(C), None,
                                0.1, 1e-5)
        elif label == "bn_grad_stats_kernel":  # training backward
            launch.launch_grad_stats(x, dy, mean, invstd, 1e-5, stat_is_var=False,
                                     grad_weight=torch.empty(C), grad_bias=torch.empty(C),
                                     want_coef=True)
        elif label == "bn_apply_kernel[fwd]":  # training forward: y from batch stats
            launch.launch_apply(x, None, out, mean, invstd, w, b, None, 1e-5,
                                stat_is_var=False, backward=False)
        elif label == "bn_apply_kernel[bwd]":  # training backward: dx with (k1, k2)
            launch.launch_apply(x, dy, out, mean, invstd, w, None, torch.zeros(2, C), 1e-5,
                                stat_is_var=False, backward=True)
        elif label == "bn_fused_kernel[fwd]":  # training forward, momentum update
            launch.launch_fused_forward(x, out, make_geometry(x, out), w, b, torch.zeros(C),
                                        torch.ones(C), None, 0.1, 1e-5)
        elif label == "bn_fused_kernel[bwd]":  # training backward, every gradient
            launch.launch_fused_backward(x, dy, out, make_geometry(x, dy, out), mean, invstd,
                                         w, 1e-5, stat_is_var=False,
                                         grad_weight=torch.empty(C), grad_bias=torch.empty(C))
        else:
            raise ValueError(label)
    finally:
        launch.RAW.update(saved[0])
        launch.TUNED.update(saved[1])
        launch.clear_caches()
    (name, (args, kwargs)), = sink.items()
    kernel = saved[0][name]
    _CAPTURED[key] = (kernel, args, kwargs)
    return _CAPTURED[key]


def _specialize(value, specialize: bool):
    """(type, spec) like the JIT: spec 'D' = divisible by 16, ('constexpr', 1) for ints == 1."""
    import torch
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        return ty, ("D" if specialize and value % 16 == 0 else None)
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        ty = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
              torch.int32: "i32", torch.int64: "i64"}[value.dtype]
        return "*" + ty, "D"  # aligned tensors (the report's premise)
    raise TypeError(type(value))


def _ast_source(kernel, values: dict):
    """ASTSource for these argument values (triton >= 3.3 format: string-keyed constexprs,
    attrs keyed by (arg index,))."""
    from triton.compiler import ASTSource
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            continue
        ty, spec = _specialize(v, not p.do_not_specialize)
        if ty == "constexpr":
            signature[p.name] = "constexpr"
            constexprs[p.name] = spec
        else:
            signature[p.name] = ty
            if spec == "D" and not getattr(p, "do_not_specialize_on_alignment", False):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), signature


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> dict:
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return {}
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, stack_bytes=stack, static_shared=shared, spill_bytes=local)


def compile_one(job: dict) -> dict:
    """Compile one (kernel, config, arch, layout, dtype) and measure it; a compile error is
    reported in the row's ``error`` field."""
    try:
        return _compile_one(job)
    except Exception as e:  # noqa: BLE001  (reported, and makes the report fail)
        msg = _error_text(e)
        row = dict(job["row"], error=msg[:300], vec128=False, load_bits=None,
                   store_bits=None, compile_s=None)
        return row


def _error_text(e: BaseException) -> str:
    """One line: where the compile failed (outermost) and why (innermost cause)."""
    def lines(x):
        return [ln.strip() for ln in str(x).splitlines() if ln.strip(" ^\t")]
    inner = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    where = lines(e)[:1]
    why = lines(inner)[-1:] if inner is not e else lines(e)[-1:]
    text = type(e).__name__ + (f" {where[0]}" if where else "")
    if why and why != where:
        text += f" ... {type(inner).__name__ + ': ' if inner is not e else ''}{why[0]}"
    return text


def _compile_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    kernel, args, kwargs = _capture(job["kernel"], job["layout"], job["dtype"], job["shape"])
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    for k in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
        values.pop(k, None)
    values.update(job["kwargs"])
    if not job["kernel"].startswith(("bn_stats_kernel", "bn_grad_stats_kernel")):
        values.pop("WAVES", None)
    src, signature = _ast_source(kernel, values)
    # Pointer arguments in ptx parameter order (constexprs are not kernel parameters).
    ptr_params = [(name, ty.startswith("*")) for name, ty in signature.items()
                  if ty != "constexpr"]
    start = time.perf_counter()
    ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                        options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
    seconds = time.perf_counter() - start
    name = kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__
    access = analyse_ptx(ck.asm["ptx"], [n for n, _ in ptr_params],
                         {n for n, is_ptr in ptr_params if is_ptr},
                         BULK_LOADS[name], BULK_STORES[name])
    row = dict(job["row"])
    row.update(_resources(ck.asm["cubin"]))
    tool = _cuobjdump()
    if tool is not None:
        tile = values["BLOCK_O"] * values["BLOCK_I"] * values["BLOCK_C"]
        row["sass_per_elem"] = _sass.sass_per_elem(_sass.disassemble(ck.asm["cubin"], tool),
                                                   tile / (32 * job["num_warps"]))
    row.update(access)
    row["shared_bytes"] = int(getattr(ck.metadata, "shared", 0) or 0)
    row["compile_s"] = round(seconds, 2)
    return row


# --------------------------------------------------------------------------- driver

def _jobs(quick: bool, archs, dtypes, shape=SHAPE, variants: bool = True) -> list[dict]:
    """Compile jobs (one per distinct binary) and the report rows each one stands for;
    ``variants``: with the FLAG_VARIANTS compile checks."""
    from tritonbn.kernels import configs
    from tritonbn.kernels.tiles import CONTIG_CHANNEL, CONTIG_INNER
    contig = {"nchw": CONTIG_INNER, "channels_last": CONTIG_CHANNEL}
    jobs = []
    for label, _, reduction in KERNELS:
        cfgs = configs.kernel_configs(reduction)
        by_binary: dict = {}
        for cfg in cfgs:
            kw = dict(cfg.kwargs)
            if quick and _tile(kw) not in QUICK_TILES:
                continue
            binary = (_tile(kw), cfg.num_warps, cfg.num_stages)  # WAVES: host side only
            by_binary.setdefault(binary, []).append(cfg)
        for (tile, warps, stages), group in by_binary.items():
            for arch, layout, dtype in itertools.product(archs, LAYOUTS, dtypes):
                kw = dict(group[0].kwargs)
                rows = [dict(kernel=label,
                             config=_config_name(c.kwargs, c.num_warps, c.num_stages),
                             arch=f"sm_{arch}", layout=layout, dtype=dtype,
                             eligible=_eligible(c.kwargs, contig[layout])) for c in group]
                jobs.append(dict(kernel=label, layout=layout, dtype=dtype, arch=arch,
                                 shape=shape, kwargs=kw, num_warps=warps,
                                 num_stages=stages, row=rows[0], rows=rows))
    # The fixed default config (TRITONBN_AUTOTUNE=0) of ``shape``, which need not be in the
    # tuning space.
    import torch
    from tritonbn.kernels.geometry import make_geometry
    for (label, _, reduction), arch, layout, dtype in itertools.product(
            KERNELS, archs, LAYOUTS, dtypes):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.empty(shape, device="meta").to(memory_format=fmt)
        cfg = configs.default_config(make_geometry(x), 4 if dtype == "fp32" else 2, False)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        if not reduction:
            cfg.pop("WAVES", None)
        row = dict(kernel=label, config="default:" + _config_name(cfg, warps, stages),
                   arch=f"sm_{arch}", layout=layout, dtype=dtype, eligible=True)
        jobs.append(dict(kernel=label, layout=layout, dtype=dtype, arch=arch, shape=shape,
                         kwargs=cfg, num_warps=warps, num_stages=stages, row=row,
                         rows=[row]))
    return jobs + _fused_jobs(quick, archs, dtypes) + (_variant_jobs() if variants else [])


def _fused_shape(block_c: int, num_warps: int, layout: str):
    """Input whose whole channel fills the config's largest tile, or None when that tile
    cannot hold one row of channels or, in channels_last, BLOCK_C is below 16."""
    from tritonbn.kernels import configs
    tiles = [32 * num_warps * p for p in configs.FUSED_PER_THREAD
             if 32 * num_warps * p <= configs.FUSED_MAX_VOLUME]
    per_channel = max(tiles, default=0) // block_c
    if per_channel < 1:
        return None
    if layout == "nchw":
        width = min(per_channel, 256)
        return (per_channel // width, FUSED_CHANNELS, 1, width)
    if block_c < configs.MIN_CONTIG_BLOCK:
        return None
    return (per_channel, FUSED_CHANNELS, 1, 1)


def _fused_jobs(quick: bool, archs, dtypes) -> list[dict]:
    """One compile per single-pass config, mode, arch, layout and dtype (see FUSED_KERNELS).
    eligible: the unit-stride block is at least 16 elements (128-bit access possible)."""
    from tritonbn.kernels import configs
    jobs = []
    for cfg in configs.fused_kernel_configs():
        bc, warps = cfg.kwargs["BLOCK_C"], cfg.num_warps
        if quick and (bc, warps) not in QUICK_FUSED:
            continue
        for label, arch, layout, dtype in itertools.product(FUSED_KERNELS, archs, LAYOUTS,
                                                            dtypes):
            shape = _fused_shape(bc, warps, layout)
            if shape is None:
                continue
            name = f"C{bc}_w{warps}_s{cfg.num_stages} at {'x'.join(map(str, shape))}"
            row = dict(kernel=label, config=name, arch=f"sm_{arch}", layout=layout,
                       dtype=dtype, eligible=layout != "nchw" or shape[-1] >= 16)
            jobs.append(dict(kernel=label, layout=layout, dtype=dtype, arch=arch,
                             shape=shape, kwargs=dict(cfg.kwargs), num_warps=warps,
                             num_stages=cfg.num_stages, row=row, rows=[row]))
    return jobs


def _variant_jobs() -> list[dict]:
    """One compile per FLAG_VARIANTS entry, on top of the label's default-config job
    (sm_90, bf16, NCHW); rows named "variant:FLAG=value,...", not eligible (they are
    compile checks, and CONTIG=0 cannot be 128-bit)."""
    base = {j["kernel"]: j for j in _jobs_for_variants()}
    jobs = []
    for label, variants in FLAG_VARIANTS.items():
        job = base[label]
        for flags in variants:
            name = "variant:" + ",".join(f"{k}={v}" for k, v in flags.items())
            row = dict(job["row"], config=name, eligible=False)
            jobs.append(dict(job, kwargs=dict(job["kwargs"], **flags), row=row, rows=[row]))
    return jobs


def _jobs_for_variants() -> list[dict]:
    """The default-config job of every split-path label and the quick (BLOCK_C=1) job of
    the single-pass labels, on sm_90 / bf16 / NCHW: the bases of the flag variants."""
    split = [j for j in _jobs(True, (90,), ("bf16",), SHAPE, variants=False)
             if j["row"]["config"].startswith("default:") and j["layout"] == "nchw"]
    fused = [j for j in _fused_jobs(True, (90,), ("bf16",))
             if j["layout"] == "nchw" and j["kwargs"]["BLOCK_C"] == 1]
    return split + fused


def _expand(job: dict, result: dict) -> list[dict]:
    out = []
    for r in job["rows"]:
        row = dict(result)
        row.update(r)
        out.append(row)
    return out


def _first(job: dict) -> bool:
    """Compiled first when a time budget may cut the run short: the default configs, the
    flag variants and the quick subset's tiles, which the report's summaries draw on."""
    if job["row"]["config"].startswith(("default:", "variant:")):
        return True
    kw = job["kwargs"]
    if "BLOCK_O" in kw:
        return _tile(kw) in QUICK_TILES
    return (kw["BLOCK_C"], job["num_warps"]) in QUICK_FUSED


def run(out_dir: str = DEFAULT_OUT, quick: bool = False, jobs: int = 2, archs=None,
        dtypes=DTYPES, verbose: bool = True, shape=SHAPE,
        budget_s: float | None = None, info: dict | None = None) -> list[dict]:
    """Compile, measure, write ``kernel_report.csv`` / ``kernel_report.md`` into ``out_dir``.

    Returns one dict per (kernel, config, arch, layout, dtype) with keys FIELDS (config
    "default:..." is the fixed default config of SHAPE). ``quick``: QUICK_TILES and the
    default configs only, on sm_90 unless ``archs`` says otherwise. Works from a process
    that runs the Triton interpreter: compiles happen in fresh spawned workers.
    ``shape``: the (N, C, H, W) input the kernels are specialised for (default SHAPE, every
    size a multiple of 16; other shapes show what the JIT does for unaligned ones).
    ``budget_s``: start no compile after that many seconds (with a cold Triton cache the
    quick subset's 102 compiles took 58 s on 2 cores, so every config's 1274 need about
    12 minutes); the defaults, variants and quick tiles
    on sm_90 go first, and the report (and ``info["not_run"]``, when a dict is given)
    says how many compiles did not run."""
    if archs is None:
        archs = (90,) if quick else ARCHS
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    start = time.perf_counter()
    shape = tuple(int(s) for s in shape)
    job_list = _jobs(quick, archs, dtypes, shape)
    order = sorted(range(len(job_list)),
                   key=lambda i: (not _first(job_list[i]), job_list[i]["arch"] != 90))
    deadline = start + budget_s if budget_s is not None else float("inf")
    not_run = 0
    if verbose:
        print(f"kernel_report: {len(job_list)} compiles "
              f"({sum(len(j['rows']) for j in job_list)} config rows) on {jobs} processes",
              flush=True)
    done: dict[int, list[dict]] = {}
    ctx = mp.get_context("spawn")
    # Spawned workers inherit os.environ: they must not see TRITON_INTERPRET (the
    # initializer removes it too, before anything imports triton).
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                 initializer=_worker_init) as pool:
            futures = [(i, pool.submit(compile_one, job_list[i])) for i in order]
            for n, (i, fut) in enumerate(futures, 1):
                if fut.cancelled():
                    continue
                job, result = job_list[i], fut.result()
                done[i] = _expand(job, result)
                if verbose:
                    print(f"[{n}/{len(futures)}] {job['kernel']} {job['row']['config']} "
                          f"sm_{job['arch']} {job['layout']} {job['dtype']}: "
                          f"reg={result.get('registers')} spill={result.get('spill_bytes')} "
                          f"ld={result.get('load_bits')} st={result.get('store_bits')} "
                          f"({result.get('compile_s')} s)"
                          + (f" ERROR {result['error']}" if result.get("error") else ""),
                          flush=True)
                # (checked after a result: the first compile always completes)
                if not not_run and time.perf_counter() > deadline:
                    not_run = sum(f.cancel() for _, f in futures[n:])
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    rows = [{k: r.get(k) for k in FIELDS} for i in sorted(done) for r in done[i]]
    wall = time.perf_counter() - start
    write_outputs(rows, out_dir, wall, quick, shape, not_run)
    if info is not None:
        info["not_run"] = not_run
    if verbose:
        print(f"kernel_report: wrote {out_dir}/kernel_report.csv and .md in {wall:.1f} s"
              + (f"; {not_run} compiles not run (budget {budget_s:.0f} s)" if not_run else ""),
              flush=True)
    return rows


def spilling(rows: list[dict]) -> list[dict]:
    return [r for r in rows if (r.get("spill_bytes") or 0) > 0]


def failed(rows: list[dict]) -> list[dict]:
    """Configs that did not compile."""
    return [r for r in rows if r.get("error")]


def not_vectorized(rows: list[dict]) -> list[dict]:
    """Eligible configs whose bulk loads or stores are not all 128-bit."""
    return [r for r in rows if r["eligible"] and not r["vec128"] and not r.get("error")]


def _fmt(v) -> str:
    return "" if v is None else str(v)


def write_outputs(rows: list[dict], out_dir: str, wall: float, quick: bool,
                  shape=SHAPE, not_run: int = 0) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernel_report.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    spills = spilling(rows)
    novec = not_vectorized(rows)
    lines = ["# tritonbn compiled-kernel report", ""]
    lines.append(f"{len(rows)} config rows ({'quick subset' if quick else 'every config'}), "
                 f"{wall:.0f} s. Inputs of shape {tuple(shape)} (16-byte aligned "
                 "tensors); AOT compile, no GPU. "
                 "Bits: narrowest (max) global load/store of the big tensors; 128 = 16 bytes "
                 "per thread per instruction. `eligible`: config_fits keeps the config for "
                 "some shape in this layout. WAVES is host-side only (same binary).")
    lines.append("")
    if not_run:
        lines += [f"**Incomplete: {not_run} compiles did not run within the time budget** "
                  "(a cold Triton cache; the default configs, flag variants and quick tiles "
                  "on sm_90 ran first). Run `perf/kernel_report.py` for every row.", ""]
    lines.append(f"- spilling configs: {len(spills)}")
    for r in spills:
        lines.append(f"  - {r['kernel']} {r['config']} {r['arch']} {r['layout']} "
                     f"{r['dtype']}: {r['spill_bytes']} bytes")
    errors = failed(rows)
    lines.append(f"- configs that fail to compile: {len(errors)}")
    for r in errors:
        lines.append(f"  - {r['kernel']} {r['config']} {r['arch']} {r['layout']} "
                     f"{r['dtype']}: {r['error']}")
    lines.append(f"- eligible configs without 128-bit bulk loads/stores: {len(novec)}")
    for r in novec:
        lines.append(f"  - {r['kernel']} {r['config']} {r['arch']} {r['layout']} "
                     f"{r['dtype']}: load {r['load_bits']} store {r['store_bits']}")
    groups: dict = {}
    for r in rows:
        g = groups.setdefault((r["kernel"], r["arch"], r["layout"], r["dtype"]),
                              dict(n=0, elig=0, vec=0, maxreg=0))
        g["n"] += 1
        g["elig"] += bool(r["eligible"])
        g["vec"] += bool(r["eligible"] and r["vec128"])
        g["maxreg"] = max(g["maxreg"], r["registers"] or 0)
    lines += ["", "## Summary", "",
              "| kernel | arch | layout | dtype | configs | eligible | eligible & 128-bit "
              "| max registers |", "|---|---|---|---|---|---|---|---|"]
    for (k, a, lay, d), g in groups.items():
        lines.append(f"| {k} | {a} | {lay} | {d} | {g['n']} | {g['elig']} | {g['vec']} "
                     f"| {g['maxreg']} |")
    lines += issue_lines(rows)
    cols = ["kernel", "config", "arch", "layout", "dtype", "eligible", "registers",
            "spill_bytes", "shared_bytes", "load_bits", "load_bits_max", "store_bits",
            "store_bits_max", "other_load_bits_max", "vec128", "sass_per_elem"]
    lines += ["", "## Every config", "", "| " + " | ".join(cols) + " |",
              "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    with open(os.path.join(out_dir, "kernel_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def issue_lines(rows: list[dict]) -> list[str]:
    """The "instructions per element" section: per kernel, layout and dtype on sm_90, the
    default config's figure and the range over the eligible configs, next to the issue
    budget of the bytes the kernel moves per element (perf/_sass.py)."""
    groups: dict = {}
    for r in rows:
        if r["arch"] != "sm_90" or r.get("sass_per_elem") is None or \
                r["config"].startswith("variant:"):
            continue
        g = groups.setdefault((r["kernel"], r["layout"], r["dtype"]), dict(default=None, elig=[]))
        if r["config"].startswith("default:"):
            g["default"] = r["sass_per_elem"]
        elif r["eligible"]:
            g["elig"].append(r["sass_per_elem"])
    if not groups:
        return []
    out = ["", "## Instructions per element (sm_90)", "",
           "SASS instructions of the kernel's tile loop (the whole kernel when it has none) "
           "per element each thread handles per tile, against the issue budget: the "
           "instructions an H200 can issue per element while its memory moves the bytes the "
           "kernel reads and writes per element at its copy bandwidth (132 SMs x 4 "
           "schedulers x 1.98 GHz, 4.3 TB/s: 7.8 per byte). Above about the budget a kernel "
           "cannot run at memory speed. A CPU-side model from the compiled code, not a GPU "
           "measurement.", "",
           "| kernel | layout | dtype | bytes/element | issue budget | default config "
           "| eligible configs (min-max) |", "|---|---|---|---|---|---|---|"]
    for (k, lay, d), g in groups.items():
        nbytes = PASSES[k] * ELEM_BYTES[d]
        rng = f"{min(g['elig'])}-{max(g['elig'])}" if g["elig"] else ""
        out.append(f"| {k} | {lay} | {d} | {nbytes} | {_sass.issue_budget(nbytes):.0f} "
                   f"| {_fmt(g['default'])} | {rng} |")
    return out


def exit_code(rows: list[dict]) -> int:
    """The script's exit status: 1 if any config spills or fails to compile."""
    return 1 if spilling(rows) or failed(rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--quick", action="store_true", help="compile a small subset")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of fp32,bf16")
    ap.add_argument("--archs", default=None,
                    help="comma list of SM versions (default 90,80; 90 with --quick)")
    ap.add_argument("--shape", default=",".join(map(str, SHAPE)),
                    help="N,C,H,W input the kernels are specialised for")
    a = ap.parse_args(argv)
    rows = run(a.out, quick=a.quick, jobs=a.jobs,
               archs=tuple(int(s) for s in a.archs.split(",")) if a.archs else None,
               dtypes=tuple(a.dtypes.split(",")), shape=a.shape.split(","))
    spills = spilling(rows)
    novec = not_vectorized(rows)
    print(f"{len(rows)} rows; {len(spills)} spilling; {len(failed(rows))} failing to "
          f"compile; {len(novec)} eligible rows without 128-bit bulk access")
    for r in spills:
        print(f"SPILL {r['kernel']} {r['config']} {r['arch']} {r['layout']} {r['dtype']}: "
              f"{r['spill_bytes']} bytes")
    for r in failed(rows):
        print(f"COMPILE ERROR {r['kernel']} {r['config']} {r['arch']} {r['layout']} "
              f"{r['dtype']}: {r['error']}")
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
