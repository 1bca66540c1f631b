"""tritonbn performance report: is tritonbn faster for my shapes, by how much, and how close
to the hardware limit?

    python perf/report.py                 # GPU mode when CUDA is available, else CPU mode
    python perf/report.py --quick         # a small subset (CPU mode: < 2 minutes)
    python perf/report.py --out DIR       # default perf/results/<gpu name> or perf/results/cpu

GPU mode times ResNet-50 training steps end to end with torch's and tritonbn's BatchNorm,
then tritonbn, torch eager (cuDNN or native, as torch picks), torch.compile and (when
importable) apex on ResNet-50's BatchNorm layers, BatchNorm1d, BatchNorm3d and small-C
shapes in four phases, within --budget-s seconds; CPU mode (no GPU) checks accuracy
against float64, counts tritonbn's memory traffic and launches in the Triton interpreter,
models the grid on an H200 and runs perf/kernel_report.py. Both write results.csv,
summary.json, report.md and PNG plots. Helpers: perf/_*.py.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default perf/results/<gpu name> or "
                                  "perf/results/cpu)")
    ap.add_argument("--quick", action="store_true", help="small subset of cases")
    ap.add_argument("--cpu", action="store_true",
                    help="CPU mode even when a GPU is present (Triton interpreter)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="leave torch.compile out")
    gpu = ap.add_argument_group("GPU mode")
    gpu.add_argument("--budget-s", type=float, default=300,
                     help="wall-time budget; cases that do not fit are skipped and listed "
                          "(default 300)")
    gpu.add_argument("--autotune", choices=("subset", "all", "off"), default="subset",
                     help="where the autotuned tritonbn (TRITONBN_AUTOTUNE=1) is timed next to "
                          "the fixed default config: a few ResNet-50 layers (default), every "
                          "case, or nowhere. First-call tuning costs seconds per new shape.")
    gpu.add_argument("--no-autotune", dest="autotune", action="store_const", const="off",
                     help="same as --autotune off")
    gpu.add_argument("--network-s", type=float, default=75,
                     help="seconds of the budget for ResNet-50 training steps end to end "
                          "(torch's BatchNorm against tritonbn's, perf/_network.py), run "
                          "first, at most 40%% of the budget; 0 leaves them out (default 75)")
    gpu.add_argument("--phases", default=",".join(("train_fwd", "bwd", "fwd_bwd", "eval_fwd")),
                     help="comma-separated subset of train_fwd,bwd,fwd_bwd,eval_fwd")
    gpu.add_argument("--rep-ms", type=int, default=30, help="do_bench rep time (ms)")
    gpu.add_argument("--warmup-ms", type=int, default=5, help="do_bench warm-up time (ms)")
    gpu.add_argument("--no-graphs", dest="graphs", action="store_false",
                     help="no CUDA-graph timing of short cases")
    gpu.add_argument("--profile", choices=("some", "all", "none"), default="some",
                     help="record kernel names and launch counts with torch.profiler: every "
                          "case (all), torch eager every case and the others once per group "
                          "(some), never (none)")
    return ap.parse_args(argv)


def _setup(force_cpu: bool) -> bool:
    """Import order matters: TRITON_INTERPRET must be set before triton is imported.
    Returns True for GPU mode."""
    sys.path[:0] = [p for p in (PERF_DIR, REPO) if p not in sys.path]
    if force_cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    gpu = torch.cuda.is_available() and not force_cpu
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice
    return gpu


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "gpu"


def main(argv=None) -> int:
    opts = parse_args(argv)
    gpu = _setup(opts.cpu)
    import torch  # noqa: F401  (after _setup)
    import tritonbn
    from _common import now, versions, write_csv

    opts.phases = tuple(p for p in opts.phases.split(",") if p)
    if gpu:
        name = _sanitize(torch.cuda.get_device_name(0))
    out_dir = opts.out or os.path.join(PERF_DIR, "results", name if gpu else "cpu")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    meta = dict(date=now(), versions=versions(), tritonbn_version=tritonbn.__version__,
                command=" ".join(["python perf/report.py", *sys.argv[1:]]),
                phases=opts.phases)
    # A kill (SIGTERM, e.g. from `timeout`) still writes what was measured so far.
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))

    if gpu:
        import _gpu
        opts.on_partial = lambda rows: write_csv(rows, os.path.join(out_dir, "results.csv"))
        try:
            summary = _gpu.run(opts, log)
        except KeyboardInterrupt:
            log("interrupted: writing partial results")
            summary = dict(mode="gpu", interrupted=True, rows=[])
    else:
        import _cpu
        summary = _cpu.run(opts.quick, out_dir, opts.compile, log)
    summary = {**meta, **summary}
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return write_outputs(summary, out_dir, gpu, log)


def write_outputs(summary: dict, out_dir: str, gpu: bool, log) -> int:
    import _md
    import _plots
    from _common import write_csv, write_json

    if summary.get("rows"):
        write_csv(summary["rows"], os.path.join(out_dir, "results.csv"))
    if summary.get("grid"):
        write_csv(summary["grid"], os.path.join(out_dir, "grid.csv"))

    def write_summary_and_report(plots):
        summary["plots"] = [os.path.basename(p) for p in plots]
        write_json(summary, os.path.join(out_dir, "summary.json"))
        md = (_md.gpu_report(summary, out_dir, plots) if gpu
              else _md.cpu_report(summary, out_dir, plots))
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write(md)

    # The numbers first: drawing takes seconds, which a run stopped at its limit may lack.
    write_summary_and_report([])
    try:
        plots = _plots.gpu_plots(summary, out_dir) if gpu else _plots.cpu_plots(summary, out_dir)
    except Exception as e:  # a plot must not cost the numbers
        log(f"plots failed: {type(e).__name__}: {e}")
        plots = []
    write_summary_and_report(plots)
    log(f"wrote {out_dir}: results.csv, summary.json, report.md, {len(plots)} plots "
        f"({summary['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
