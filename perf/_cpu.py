"""CPU mode (no GPU): what can be known without one, through the Triton interpreter.

1. Accuracy of every provider against float64, per phase, layout and dtype; and of one
   training step of a small ResNet (perf/_network.py) with each of its BatchNorm variants.
2. tritonbn's memory traffic per phase (bytes read and written by its kernels, counted by
   instrumenting the interpreter) and kernel launches, next to the minimum and to PyTorch's
   native kernels: ``tritonbn`` (single-pass kernel on the shapes it fits) and
   ``tritonbn_split`` (split path everywhere) side by side.
3. A program-count model: for every GPU-mode shape, how many programs each tritonbn launch
   would start on a 132-SM H200 (default config; range over the autotuning candidates),
   and whether the single-pass kernel takes the shape.
4. The compiled-kernel report of perf/kernel_report.py (registers, spills, load widths).
No timing here is a GPU timing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

import _network as N
import _providers as P
import _shapes as S
from _common import Progress
from _traffic import TrafficCounter

H200_SMS = 132
H200_L2_MB = 60
PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)


# -- accuracy and traffic ----------------------------------------------------------------
def _inputs(case: S.Case, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    C = case.shape[1]
    offset = (torch.arange(C, dtype=torch.float64) - C / 2).view(1, C, *[1] * (len(case.shape) - 2))
    x = torch.randn(case.shape, generator=g, dtype=torch.float64) * 2.0 + 3.0 + offset
    dy = torch.randn(case.shape, generator=g, dtype=torch.float64)
    dt = S.DTYPES[case.dtype]
    return S.to_layout(x.to(dt), case.layout), S.to_layout(dy.to(dt), case.layout)


def _run_phases(m, fwd, x, dy, counters: dict | None):
    """train forward, backward, eval forward; returns outputs per phase. ``counters``:
    phase -> TrafficCounter (tritonbn) to count each phase separately."""
    import contextlib

    def count(phase):
        return counters[phase] if counters is not None else contextlib.nullcontext()

    x = x.detach().requires_grad_()
    m.train()
    with count("train_fwd"):
        y = fwd(x)
    out = {"train_fwd": {"y": y, "running_mean": m.running_mean.clone(),
                         "running_var": m.running_var.clone()}}
    with count("bwd"):
        dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
    out["bwd"] = {"dx": dx, "dweight": dw, "dbias": db}
    m.eval()
    with count("eval_fwd"), torch.no_grad():
        ye = fwd(x)
    out["eval_fwd"] = {"y": ye}
    out["_layout_kept"] = (y.stride() == x.stride()) and (dx.stride() == x.stride())
    return out


def _errors(got: dict, ref: dict) -> tuple[float, float]:
    """Max abs error and max normwise relative error (max|err| / max|ref|) over outputs."""
    abs_e, rel_e = 0.0, 0.0
    for k, r in ref.items():
        d = (got[k].double() - r).abs().max().item()
        abs_e = max(abs_e, d)
        rel_e = max(rel_e, d / max(r.abs().max().item(), 1e-30))
    return abs_e, rel_e


def case_rows(case: S.Case, providers: list[str], log) -> list[dict]:
    x, dy = _inputs(case)
    ndim, C = len(case.shape), case.shape[1]
    ref_m = P.init_module(P.TORCH_CLASSES[ndim](C)).double()
    ref = _run_phases(ref_m, ref_m, x.double(), dy.double(), None)
    rows = []
    for prov in providers:
        base = dict(provider=prov, family=case.family, layout=case.layout,
                    shape="x".join(map(str, case.shape)), dtype=case.dtype, numel=case.numel)
        t0 = time.perf_counter()
        try:
            if prov == "torch_compile":
                torch._dynamo.reset()
            m, fwd = P.make(prov, ndim, C, "cpu", case.dtype)
            counters = ({p: TrafficCounter() for p in ("train_fwd", "bwd", "eval_fwd")}
                        if prov.startswith("tritonbn") else None)
            with P.provider_env(prov):
                got = _run_phases(m, fwd, x, dy, counters)
        except Exception as e:  # recorded, never fatal
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"  {prov} {case.label}: FAILED {msg}")
            rows += [dict(base, phase=p, error=msg) for p in S.PHASES]
            continue
        wall = time.perf_counter() - t0
        per = {}
        for phase in ("train_fwd", "bwd", "eval_fwd"):
            a, r = _errors(got[phase], ref[phase])
            row = dict(base, phase=phase, max_abs_err=a, max_rel_err=r,
                       layout_kept=got["_layout_kept"], wall_s=round(wall, 2))
            if counters is not None:
                row.update(counters[phase].summary(case.numel))
                row["_by_argument"] = counters[phase].by_argument()
            per[phase] = row
        fb = dict(base, phase="fwd_bwd",
                  max_abs_err=max(per["train_fwd"]["max_abs_err"], per["bwd"]["max_abs_err"]),
                  max_rel_err=max(per["train_fwd"]["max_rel_err"], per["bwd"]["max_rel_err"]),
                  layout_kept=got["_layout_kept"], wall_s=round(wall, 2))
        if counters is not None:
            for k in ("launches", "big_read_bytes", "big_write_bytes", "small_bytes",
                      "unattributed_bytes", "bytes_per_element", "small_bytes_per_element"):
                fb[k] = per["train_fwd"][k] + per["bwd"][k]
            fb["launch_kernels"] = per["train_fwd"]["launch_kernels"] + ";" + per["bwd"]["launch_kernels"]
        per["fwd_bwd"] = fb
        for phase in S.PHASES:
            r = per[phase]
            es = case.elem_size
            r["min_bytes_per_element"] = S.MIN_PASSES[phase] * es
            r["torch_native_bytes_per_element"] = S.TORCH_NATIVE_PASSES[phase] * es
            rows.append(r)
    return rows


# -- program-count model -----------------------------------------------------------------
def _grid_row(shape: dict, kernel: str, tile: str, warps: int, waves, programs: int,
              candidates: list[int], sizes: dict) -> dict:
    """One kernel of one shape: its default config's programs, and the candidates'."""
    return dict(shape, kernel=kernel, default_tile=tile, default_warps=warps,
                default_waves_param=waves, programs=programs,
                programs_per_sm=round(programs / H200_SMS, 2), tuned_candidates=len(candidates),
                tuned_programs_min=min(candidates, default=None),
                tuned_programs_max=max(candidates, default=None), **sizes)


def grid_rows() -> list[dict]:
    """Programs per launch on an H200 (132 SMs) for every GPU-mode shape: the fixed
    default config, and the range over the autotuning candidates that survive pruning; the
    split path's kernels on every shape, the single-pass kernel on the shapes it takes."""
    from tritonbn.kernels import configs as C_
    from tritonbn.kernels import launch as L
    from tritonbn.kernels.geometry import make_geometry

    cuda = torch.device("cuda")
    old = L._sm_count
    L._sm_count = lambda device: H200_SMS  # the launchers' grid functions, for an H200
    target = 2 * H200_SMS  # the launchers' programs target (2 x SMs)
    rows = []
    try:
        for case in S.grid_model_cases():
            x = S.empty(case.shape, case.layout, S.DTYPES[case.dtype], "meta")
            geom = make_geometry(x)
            es = x.element_size()
            fits = C_.fused_fits(geom)
            shape = dict(family=case.family, name=case.name,
                         shape="x".join(map(str, case.shape)), layout=case.layout,
                         dtype=case.dtype, fused_fits=fits)
            mb = case.numel * es / 1e6  # one tensor; the backward re-reads two (x, dy)
            sizes = dict(tensor_mb=round(mb, 2), fwd_reread_fits_l2=mb <= H200_L2_MB,
                         bwd_reread_fits_l2=2 * mb <= H200_L2_MB)
            default = C_.default_config(geom, es, interpreted=False)
            tile = "x".join(str(default[k]) for k in ("BLOCK_O", "BLOCK_I", "BLOCK_C"))
            for kernel, reduction in (("stats/grad_stats", True), ("apply", False)):
                def programs(meta):
                    if reduction:
                        cb, sp = L.reduction_grid(geom, meta, cuda)
                        return cb * sp
                    return L.apply_grid(geom, meta)[0]
                cands = [c.kwargs for c in C_.kernel_configs(reduction)
                         if C_.config_fits(c.kwargs, geom.outer_size, geom.inner_size,
                                           geom.channels, geom.contig, target)]
                rows.append(_grid_row(shape, kernel, tile, default["num_warps"],
                                      default["WAVES"] if reduction else None,
                                      programs(default), [programs(k) for k in cands], sizes))
            if fits:
                bo, bi = C_.fused_tile(geom)
                cfg = C_.fused_default_config(geom, target, interpreted=False)
                cands = [c.kwargs for c in C_.fused_kernel_configs()
                         if C_.fused_config_fits(c.kwargs["BLOCK_C"], c.num_warps, bo, bi,
                                                 geom.channels, geom.contig, target)]
                rows.append(_grid_row(shape, "fused", f"{bo}x{bi}x{cfg['BLOCK_C']}",
                                      cfg["num_warps"], None, L.fused_grid(geom, cfg)[0],
                                      [L.fused_grid(geom, k)[0] for k in cands], sizes))
    finally:
        L._sm_count = old
    return rows


# -- compiled-kernel report --------------------------------------------------------------
KERNEL_FIELDS = ("kernel", "config", "arch", "layout", "dtype", "registers", "spill_bytes",
                 "shared_bytes", "load_bits", "store_bits", "sass_per_elem", "error")


def kernel_report(out_dir: str, quick: bool, timeout_s: float, log) -> tuple[list, str | None]:
    """perf/kernel_report.run(out_dir, quick) in a child process (it compiles with the real
    Triton compiler, so TRITON_INTERPRET must be unset there), which starts no compile
    after timeout_s - 60 s (a cold compile cache needs more than that for every config);
    timeout_s is the hard limit. Returns (rows, None), or (the rows compiled, a message
    saying what is missing or what failed)."""
    if not os.path.exists(os.path.join(PERF_DIR, "kernel_report.py")):
        return [], "perf/kernel_report.py is absent"
    budget_s = max(timeout_s - 60, 0)
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    code = ("import sys, json; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "import kernel_report as K; info = {}; "
            "rows = K.run(sys.argv[3], quick=sys.argv[4] == '1', budget_s=float(sys.argv[6]), "
            "info=info); json.dump(dict(rows=rows, **info), open(sys.argv[5], 'w'), default=str)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        # A session of its own: on timeout the whole group goes, the compile workers the
        # report spawned included (killing the child alone left them running).
        proc = subprocess.Popen([sys.executable, "-c", code, PERF_DIR, REPO, out_dir,
                                 "1" if quick else "0", tmp, str(budget_s)],
                                env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return [], f"kernel_report did not finish within {timeout_s:.0f} s"
        if proc.returncode != 0:
            tail = (stderr or stdout).strip().splitlines()[-3:]
            return [], f"kernel_report failed (exit {proc.returncode}): " + " | ".join(tail)
        with open(tmp) as f:
            out = json.load(f)
        rows = [{k: r.get(k) for k in KERNEL_FIELDS} for r in out["rows"]]
        if out["not_run"]:
            return rows, (f"{out['not_run']} compiles did not run within "
                          f"{budget_s:.0f} s (cold Triton cache); the default configs, "
                          "flag variants and quick tiles on sm_90 ran first")
        return rows, None
    except Exception as e:
        return [], f"kernel_report failed: {type(e).__name__}: {e}"
    finally:
        os.unlink(tmp)


def interpreter_bf16_cast() -> str:
    """How the interpreter rounds fp32 -> bf16 in ``.to(tl.bfloat16)`` (the GPU rounds to
    nearest even): explains bf16 errors of up to one unit in the last place here."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(src, dst, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < n).to(tl.bfloat16), mask=i < n)

    a = torch.randn(256, generator=torch.Generator().manual_seed(0))
    b = torch.empty(256, dtype=torch.bfloat16)
    cast[(1,)](a, b, 256, BLOCK=256)
    trunc = (a.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    if torch.equal(b, a.to(torch.bfloat16)):
        return "round-to-nearest-even"
    if torch.equal(b, trunc):
        return "truncation (round toward zero)"
    return "other"


# -- driver ------------------------------------------------------------------------------
def compile_works(log) -> str | None:
    """None when torch.compile runs a BatchNorm on CPU here, else the reason it does not."""
    try:
        torch._dynamo.reset()
        m = torch.compile(torch.nn.BatchNorm1d(4), dynamic=False)
        m(torch.randn(8, 4)).sum()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def network_accuracy() -> list[dict]:
    """N.step_errors on CPU (the interpreter), each variant's worst parameter given as the
    ratio of its gradient's error to torch's on the same parameter."""
    rows = N.step_errors("cpu")
    torch_errs = rows[0]["param_rel_err"]
    for r in rows:
        ratios = {p: e / max(torch_errs[p], 1e-300) for p, e in r.pop("param_rel_err").items()}
        r["worst_param"] = max(ratios, key=ratios.get)
        r["worst_param_ratio_to_torch"] = ratios[r["worst_param"]]
    return rows


def run(quick: bool, out_dir: str, use_compile: bool, log) -> dict:
    from tritonbn.kernels.configs import FUSED_MAX_VOLUME

    t_start = time.perf_counter()
    cases = S.cpu_cases(quick)
    compile_reason = compile_works(log) if use_compile else "disabled (--no-compile)"
    if compile_reason:
        log(f"torch.compile skipped: {compile_reason}")
    # torch.compile on the 2d layouts only (its compile time is seconds per dtype/shape).
    compile_layouts = ("NCHW",) if quick else ("NCHW", "NHWC")
    compile_dtypes = ("fp32",) if quick else ("fp32", "bf16", "fp16")
    prog = Progress(len(cases) + 3, "CPU mode (Triton interpreter)")
    rows = []
    for case in cases:
        provs = ["tritonbn", "tritonbn_split", "torch"]
        if (compile_reason is None and case.layout in compile_layouts
                and case.dtype in compile_dtypes):
            provs.append("torch_compile")
        rows += case_rows(case, provs, log)
        prog.step(case.label)
    network = network_accuracy()
    prog.step("small ResNet training step against float64")
    bf16_cast = interpreter_bf16_cast()
    grid = grid_rows()
    prog.step(f"program-count model: {len(grid)} rows")
    kt = time.perf_counter()
    kernels, kerr = kernel_report(out_dir, quick, 90 if quick else 480, log)
    if kerr:
        log(f"kernel report: {kerr}")
    prog.step(f"kernel report: {len(kernels)} rows ({time.perf_counter() - kt:.0f} s)")

    # path: which tritonbn path served the phase, read off the kernels it launched (eval
    # forward is the apply kernel alone on both).
    traffic = [dict(provider=r["provider"], phase=r["phase"], layout=r["layout"],
                    shape=r["shape"], dtype=r["dtype"],
                    path="single_pass" if "bn_fused_kernel" in (r.get("launch_kernels") or "")
                    else "split",
                    bytes_per_element=r.get("bytes_per_element"),
                    small_bytes_per_element=r.get("small_bytes_per_element"),
                    min_bytes_per_element=r["min_bytes_per_element"],
                    torch_native_bytes_per_element=r["torch_native_bytes_per_element"],
                    launches=r.get("launches"), launch_kernels=r.get("launch_kernels"),
                    bytes_by_argument=r.get("_by_argument"))
               for r in rows if r["provider"].startswith("tritonbn") and "error" not in r]
    for r in rows:
        r.pop("_by_argument", None)
    return dict(mode="cpu", quick=quick, rows=rows, grid=grid, traffic=traffic,
                network_accuracy=network,
                fused_max_volume=FUSED_MAX_VOLUME,
                kernels=kernels, kernels_error=kerr, compile_skipped=compile_reason,
                interpreter_bf16_cast=bf16_cast,
                compile_subset=dict(layouts=compile_layouts, dtypes=compile_dtypes),
                wall_s=round(time.perf_counter() - t_start, 1))
