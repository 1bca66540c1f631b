"""perf/report.py: CPU mode end to end (--quick), and GPU mode's pipeline on CPU tensors.

The first test runs `perf/report.py --quick --cpu --out TMP` in a child process and checks
its files and summary.json. The second drives GPU mode's code (end-to-end steps of a
small ResNet, cases, phases, rows, speedups, network sums, report.md, plots) on tiny CPU
tensors with the CUDA-only calls stubbed out; its output lives in pytest's tmp dir only.
Others run perf/host_overhead.py briefly, GPU mode's host-time rows on CPU tensors, and
its time-budget handling.
"""
import functools
import json
import math
import os
import subprocess
import sys
import time
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PERF = os.path.join(REPO, "perf")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="GPU machine: perf/gpu_run.sh runs the report in GPU mode")
def test_cpu_quick_report(tmp_path):
    out = tmp_path / "cpu"
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("TRITON_INTERPRET", None)  # the report sets it itself
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(PERF, "report.py"), "--quick",
                           "--cpu", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.csv", "summary.json", "report.md", "grid.csv", "cpu_traffic.png",
                 "cpu_accuracy.png", "cpu_programs.png"):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "cpu" and s["quick"] is True
    for key in ("traffic", "kernels", "rows", "grid", "versions", "date"):
        assert key in s, key
    assert isinstance(s["kernels"], list)
    assert s["kernels"] or s["kernels_error"]
    traffic = s["traffic"]
    assert {t["phase"] for t in traffic} == {"train_fwd", "bwd", "fwd_bwd", "eval_fwd"}
    launches = {"split": {"train_fwd": 2, "eval_fwd": 1, "bwd": 2, "fwd_bwd": 4},
                "single_pass": {"train_fwd": 1, "eval_fwd": 1, "bwd": 1, "fwd_bwd": 2}}
    for t in traffic:
        for key in ("provider", "path", "phase", "layout", "dtype", "bytes_per_element",
                    "min_bytes_per_element", "launches"):
            assert key in t, key
        assert t["bytes_per_element"] >= t["min_bytes_per_element"]
        assert t["launches"] == launches[t["path"]][t["phase"]], t
        if t["path"] == "single_pass":
            assert t["provider"] == "tritonbn"
            # the minimum: x (and dy) read once, the output written once
            assert t["bytes_per_element"] == pytest.approx(t["min_bytes_per_element"]), t
    paths = {(t["provider"], t["path"]) for t in traffic}
    assert {("tritonbn", "single_pass"), ("tritonbn", "split"),
            ("tritonbn_split", "split")} <= paths, paths
    for k in s["kernels"]:
        for key in ("kernel", "config", "arch", "registers", "spill_bytes", "load_bits"):
            assert key in k
    acc = [r for r in s["rows"] if r["provider"] == "tritonbn" and r["dtype"] == "fp32"]
    assert acc and all(r["max_rel_err"] < 1e-5 for r in acc)
    # the small ResNet's step (its bars are tests/perf/test_network.py's)
    assert [r["variant"] for r in s["network_accuracy"]] == ["torch", "tritonbn",
                                                             "tritonbn_fused"]
    assert all(r["grads_rel_err"] < 1e-3 for r in s["network_accuracy"])
    md = (out / "report.md").read_text()
    assert "not GPU timings" in md and "## A ResNet training step against float64" in md
    assert wall < 300, f"--quick took {wall:.0f} s"


def test_gpu_pipeline_on_cpu(tmp_path, monkeypatch):
    """GPU mode's bookkeeping with do_bench / synchronize stubbed by CPU timers: catches
    errors in code that otherwise only runs on a GPU machine."""
    monkeypatch.syspath_prepend(PERF)
    import triton.testing

    import _gpu
    import _shapes as S
    import report

    def cpu_bench(fn, warmup=0, rep=0, return_mode="median", **kw):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    import tritonbn.modules
    # The kernels are covered elsewhere; here speed matters: torch's CPU BatchNorm stands in.
    monkeypatch.setattr(tritonbn.modules, "runs_on_triton", lambda x: False)
    monkeypatch.setattr(_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(triton.testing, "do_bench", cpu_bench)
    monkeypatch.setattr(_gpu, "device_info", lambda: dict(name="CPU stub", sm_count=2,
                                                          l2_bytes=1 << 20))
    monkeypatch.setattr(_gpu, "copy_bandwidth", lambda: dict(bytes=0, ms=1.0, gbps=1.0))
    monkeypatch.setattr(_gpu, "host_overhead", lambda n: [])
    cases = [S.Case("resnet50_b32", n, (2, 4, 3, 3), layout, "fp32", count,
                    ("tritonbn", "tritonbn_split", "torch"))
             for layout in ("NCHW", "NHWC") for n, _, _, count in S.RESNET50_BN]
    cases.append(S.Case("bn1d", "tiny", (16, 4), "NC", "bf16"))
    cases.append(S.Case("resnet50_b32+relu", "l1.b", (2, 4, 3, 3), "NHWC", "fp32", 1,
                        ("tritonbn_relu", "torch_relu")))
    cases.append(S.Case("resnet50_b32+add_relu", "l1.b", (2, 4, 3, 3), "NHWC", "fp32", 1,
                        ("tritonbn_add_relu", "torch_add_relu")))
    monkeypatch.setattr(_gpu.S, "gpu_cases", lambda *a: cases)
    # the end-to-end steps on a small ResNet, in both dtypes
    monkeypatch.setattr(_gpu.N, "CONFIGS", ((2, "fp32"), (2, "bf16")))
    monkeypatch.setattr(_gpu.N, "run", functools.partial(
        _gpu.N.run, image=32, blocks=(1, 1, 1, 1), width=8, warmup=1, steps=1, repeats=1))
    opts = report.parse_args(["--phases", "train_fwd,bwd,fwd_bwd,eval_fwd", "--no-graphs", "--profile", "none"])
    opts.phases = tuple(opts.phases.split(","))
    # a generous network share: its SIGALRM is real, and the small network runs its steps
    # through torch's CPU BatchNorm here (~10 s), slower on a loaded machine
    opts.budget_s, opts.on_partial, opts.network_s = 600, None, 240
    summary = _gpu.run(opts, lambda m: None)
    rows = summary["rows"]
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    assert len(rows) == sum(len(c.providers) for c in cases) * 4
    t = [r for r in rows if r["provider"] == "tritonbn"]
    assert all(r["ms"] > 0 and "speedup_vs_torch" in r for r in t)
    assert all("speedup_vs_tritonbn_split" in r for r in t if r["family"] == "resnet50_b32")
    assert any(r["provider"] == "tritonbn_split" and r["ms"] > 0 for r in rows)
    relu = [r for r in rows if r["provider"] == "tritonbn_relu"]
    assert relu and all("speedup_vs_torch_relu" in r and "speedup_vs_torch" not in r
                        for r in relu)
    add = [r for r in rows if r["provider"] == "tritonbn_add_relu"]
    assert add and all(set(k for k in r if k.startswith("speedup")) == {"speedup_vs_torch_add_relu"}
                       for r in add)
    # the residual's bytes count: x, z and y forward; x, dy, dx and dz backward
    assert {r["phase"]: r["min_bytes"] // (2 * 4 * 3 * 3 * 4) for r in add} == {
        "train_fwd": 3, "bwd": 4, "fwd_bwd": 7, "eval_fwd": 3}
    assert all(r["max_rel_err_vs_fp64"] < 1e-2 for r in rows if r["phase"] == "train_fwd")
    assert len(summary["network_sums"]) == 2 * 4 * 3  # layouts x phases x providers
    # the summary: fp32 and bf16 cases and "all" for BatchNorm, fp32 for each epilogue
    head = {(h["provider"], h["phase"], h["dtype"]): h for h in summary["headline"]}
    assert set(head) == {(p, ph, d) for ph in opts.phases for p, d in (
        ("tritonbn", "fp32"), ("tritonbn", "bf16"), ("tritonbn", "all"),
        ("tritonbn_relu", "fp32"), ("tritonbn_add_relu", "fp32"))}
    for (prov, phase, dtype), h in head.items():
        speedups = [r["speedup_vs_" + h["vs"]] for r in rows if r["provider"] == prov
                    and r["phase"] == phase and dtype in ("all", r["dtype"])]
        assert h["cases"] == h["cases_vs_torch"] == len(speedups) > 0
        assert h["min_vs_torch"] <= h["geomean_vs_torch"] <= h["max_vs_torch"]
        assert h["min_vs_torch"] == min(speedups) and h["max_vs_torch"] == max(speedups)
        assert h["slower_vs_torch"] == sum(s < 1 for s in speedups)
        assert h["cases_vs_compile"] == 0  # no torch.compile case in this run
    steps = summary["network_steps"]
    assert [(r["dtype"], r["variant"]) for r in steps] == [
        (d, v) for d in ("fp32", "bf16") for v in _gpu.N.VARIANTS], steps
    assert all(r["step_ms"] > 0 and "error" not in r and r["batchnorm_layers"] == 17
               and math.isfinite(r["loss_rel_err"]) and math.isfinite(r["conv1_grad_rel_err"])
               and "gpu_busy_ms" not in r for r in steps)  # (a GPU's kernel time only)
    assert all(("speedup_vs_torch" in r) == (r["variant"] != "torch") for r in steps)
    assert os.environ.get("TRITONBN_AUTOTUNE") == "0"  # run() restored conftest's setting
    n, names = _gpu._profile(lambda: torch.ones(3) + 1)  # profiler plumbing (no GPU work)
    assert n == len(names)
    summary.update(date="test", versions={}, command="test", wall_s=0)
    report.write_outputs(summary, str(tmp_path), True, lambda m: None)
    for name in ("results.csv", "summary.json", "report.md", "summary_speedup.png",
                 "speedup_resnet50.png",
                 "bandwidth_train_fwd.png", "network_resnet50.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "report.md").read_text()
    assert "## BatchNorm + ReLU" in md and "## ResNet-50 training step, end to end" in md
    assert md.index("## Summary") < md.index("## Host overhead")


def test_host_overhead_script_runs():
    """perf/host_overhead.py (the README's host-time table) runs and prints every row."""
    proc = subprocess.run([sys.executable, os.path.join(PERF, "host_overhead.py"), "--calls",
                           "20"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(" us")]
    assert len(rows) == 4, proc.stdout


def test_gpu_host_overhead_on_cpu(monkeypatch):
    """GPU mode's host-time rows (perf/_gpu.host_overhead), run on CPU tensors through the
    interpreter: every provider and phase gives a time, none an error."""
    monkeypatch.syspath_prepend(PERF)
    import _gpu

    rows = _gpu.host_overhead(2, device="cpu")
    assert [(r["provider"], r["phase"]) for r in rows] == [
        (p, m) for p in ("tritonbn", "tritonbn_tuned", "tritonbn_split", "torch")
        for m in ("train_fwd", "train_fwd_bwd", "eval_fwd")]
    assert all("error" not in r and r["us_per_call_with_sync"] > 0 for r in rows), rows


def test_case_timeout_is_not_swallowed_by_a_phase(monkeypatch):
    """The per-case SIGALRM raises CaseTimeout wherever the case is: the per-phase
    handlers (which record other errors and go on) must pass it on, so that it ends the
    case instead of one phase; the case is then recorded as timed out."""
    monkeypatch.syspath_prepend(PERF)
    import _gpu
    import _shapes as S
    import report

    monkeypatch.setattr(_gpu, "DEVICE", "cpu")
    bench = _gpu.Bencher(report.parse_args(["--profile", "none"]), dict(l2_bytes=1 << 20),
                         None, lambda m: None)
    bench.opts.phases = ("train_fwd", "bwd")
    measured = []

    def measure(row, *args):
        measured.append(row["phase"])
        raise _gpu.CaseTimeout("case took over 5 s")

    monkeypatch.setattr(bench, "_measure", measure)
    case = S.Case("bn1d", "tiny", (16, 4), "NC", "fp32")
    rows, skipped, case_s = [], [], []
    prog = types.SimpleNamespace(step=lambda msg: None)
    _gpu._one_case(case, bench, time.perf_counter() + 60, case_s, rows, skipped, prog,
                   types.SimpleNamespace(on_partial=None))
    assert measured == ["train_fwd"]  # the timeout ended the case at its first phase
    assert rows and all(r["phase"] == "all" and "over 5 s" in r["error"] for r in rows)


def test_cases_reach_every_group_first(monkeypatch):
    """A short budget still measures every kind of case: the first cases are one of each
    group (family, dtype, layout, providers), then the rest."""
    monkeypatch.syspath_prepend(PERF)
    import _shapes as S

    cases = S.gpu_cases()
    groups = [(c.family, c.dtype, c.layout, c.providers) for c in cases]
    n = len(set(groups))
    assert len(set(groups[:n])) == n
    assert sorted(cases, key=str) == sorted(S._one_of_each_first(cases), key=str)


def test_grid_model_has_every_resnet_layer(monkeypatch):
    """CPU mode's program-count model (grid.csv, cpu_programs.png) covers every ResNet-50
    layer in both layouts at both batch sizes, under the plain family names the plot looks
    up: the shapes GPU mode also times with a fused ReLU or residual are not filed under
    those variants (which left l1.b channels_last at batch 256 out of the plot)."""
    monkeypatch.syspath_prepend(PERF)
    import _shapes as S

    have = {(c.family, c.name, c.layout, c.dtype) for c in S.grid_model_cases()}
    want = {(f"resnet50_b{batch}", name, layout, dt) for batch in (32, 256)
            for name, *_ in S.RESNET50_BN for layout in ("NCHW", "NHWC")
            for dt in ("fp32", "bf16")}
    assert want <= have, sorted(want - have)
    assert not any("+" in family for family, *_ in have)


def test_network_steps_keep_what_a_timeout_interrupts(monkeypatch):
    """GPU mode's end-to-end steps: a configuration whose run times out keeps the rows it
    measured and gets a timed-out row; configurations past the deadline are listed as
    skipped (budget)."""
    monkeypatch.syspath_prepend(PERF)
    import _gpu

    def run(device, configs, autotune, log, rows):
        rows.append(dict(batch=configs[0][0], dtype=configs[0][1], variant="torch", step_ms=1.0))
        raise _gpu.CaseTimeout("case took over 60 s")

    monkeypatch.setattr(_gpu.N, "run", run)
    opts = types.SimpleNamespace(quick=False, autotune="subset")
    skipped = []
    rows = _gpu.network_steps(opts, time.perf_counter() + 60, skipped, lambda m: None, [])
    first = _gpu.N.CONFIGS[0]
    assert rows[0] == dict(batch=first[0], dtype=first[1], variant="torch", step_ms=1.0)
    assert rows[1]["batch"] == first[0] and "over 60 s" in rows[1]["error"]
    # the alarm is not real here: every configuration ran, each timed out
    assert len(rows) == 2 * len(_gpu.N.CONFIGS) and not skipped
    skipped = []
    assert _gpu.network_steps(opts, time.perf_counter() + 5, skipped, lambda m: None, []) == []
    assert skipped == [f"network resnet50 batch {b} {d}" for b, d in _gpu.N.CONFIGS]
