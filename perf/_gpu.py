"""GPU mode: time every provider on every case, within a time budget.

Timing: ``triton.testing.do_bench`` median (it flushes L2 before every call) over inputs
rotated through several buffer sets (together at least 4x the L2 size where memory allows),
after a warm-up call whose wall time (compile / autotuning) is reported separately as
first_call_s. For short cases (< 100 us) also a CUDA-graph timing (many calls captured in
one graph, rotated inputs, no flush: the graph figure hides host overhead, and it is
L2-resident when the rotated set fits in L2; flagged per row).
Effective bandwidth uses the minimal bytes: forward x + y, backward x + dy + dx.
Nothing here is ever estimated: a row carries what was measured, or an error / skip reason.
"""
from __future__ import annotations

import importlib
import math
import signal
import statistics
import time

import torch
import triton
import triton.testing

import _network as N
import _providers as P
import _shapes as S
from _common import Progress

GRAPH_BELOW_MS = 0.1      # also time with a CUDA graph when do_bench says less than this
CASE_TIMEOUT_S = 150      # SIGALRM per case: a stuck case is recorded and skipped
REF_MAX_NUMEL = 64 << 20  # float64 accuracy check of the forward up to this size
DEVICE = "cuda"           # (tests point this elsewhere to exercise the pipeline on CPU)


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    info = dict(name=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 1e9, 1),
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    info["l2_bytes"] = getattr(p, "L2_cache_size", None) or 50 << 20
    return info


def copy_bandwidth(n_bytes: int = 1 << 30) -> dict:
    """Device-to-device copy: (bytes read + bytes written) / time, do_bench median."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100,
                                 return_mode="median")
    del src, dst
    return dict(bytes=n_bytes, ms=ms, gbps=2 * n_bytes / ms / 1e6)


def host_overhead(n_calls: int = 2000, device: str = "cuda") -> list[dict]:
    """Host time per call of a BatchNorm2d module on a tiny input: the loop runs without
    synchronisation (enqueue rate) then one final synchronize (both reported). The input
    fits the single-pass kernel: tritonbn_split gives the split path's launches next to it.
    train_fwd_bwd: forward and backward of an input that requires grad, as in a network.
    ``device``: "cpu" runs the same code through the interpreter (tests)."""
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(2, 16, 4, 4, device=device)
    x_grad, dy = x.clone().requires_grad_(), torch.randn_like(x)
    for prov in ("tritonbn", "tritonbn_tuned", "tritonbn_split", "torch"):
        for mode in ("train_fwd", "train_fwd_bwd", "eval_fwd"):
            training = mode != "eval_fwd"
            try:
                with P.provider_env(prov):
                    m, fwd = P.make(prov, 4, 16, device)
                    m.train(training)

                    def call():
                        if mode == "train_fwd_bwd":
                            fwd(x_grad).backward(dy)
                        else:
                            fwd(x)

                    with torch.set_grad_enabled(training):
                        for _ in range(min(20, n_calls)):
                            call()
                        sync()
                        t0 = time.perf_counter()
                        for _ in range(n_calls):
                            call()
                        t1 = time.perf_counter()
                        sync()
                        t2 = time.perf_counter()
                rows.append(dict(provider=prov, phase=mode, shape="2x16x4x4", n_calls=n_calls,
                                 us_per_call_no_sync=(t1 - t0) / n_calls * 1e6,
                                 us_per_call_with_sync=(t2 - t0) / n_calls * 1e6))
            except Exception as e:
                rows.append(dict(provider=prov, phase=mode, error=_msg(e)))
    return rows


def _msg(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


def _profile(f) -> tuple[int, list[str]]:
    """GPU activities (kernels, memsets, copies) of one call, via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        f()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return len(names), names


def _backend(names: list[str]) -> str:
    low = " ".join(names).lower()
    if "cudnn" in low or "bn_fw" in low or "bn_bw" in low:
        return "cudnn"
    if "batch_norm" in low:
        return "native"
    if "triton" in low:
        return "triton"
    return "other"


def _short(name: str) -> str:
    name = name.split("(")[0].split("<")[0].replace("void ", "").strip()
    return name[-60:]


def _graph_ms(build, n_calls: int, replays: int = 5) -> float:
    """Median time per call of ``n_calls`` calls captured in one CUDA graph. ``build`` makes
    the callable on the capture stream (so backward graphs share its stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        f = build()
        for _ in range(3):
            f()
    stream.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for _ in range(n_calls):
            f()
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / n_calls)
    del g
    return statistics.median(times)


class CaseTimeout(BaseException):
    """Raised by _Alarm. Not an Exception: the handlers that record a phase's error and go
    on (and any inside torch) do not catch it, so it ends the whole case, which _one_case
    records as timed out."""


class _Alarm:
    """SIGALRM after ``seconds``: CaseTimeout."""

    def __init__(self, seconds):
        self.seconds = seconds

    def _fire(self, *a):
        raise CaseTimeout(f"case took over {self.seconds} s")

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def _tensors_per_set(case: S.Case) -> int:
    """x and dy, and the residual z in the "+add_relu" cases."""
    return 3 if case.family.endswith("+add_relu") else 2


def _rotation(case: S.Case, l2: int) -> int:
    """Buffer sets (x, dy[, z]) so that the rotated set is >= 4x L2, at most 32 and 8 GB."""
    per_set = _tensors_per_set(case) * case.numel * case.elem_size
    k = math.ceil(4 * l2 / per_set)
    return max(1, min(k, 32, (8 << 30) // per_set))


class Bencher:
    def __init__(self, opts, info: dict, copy_gbps: float | None, log):
        self.opts, self.info, self.copy_gbps, self.log = opts, info, copy_gbps, log
        self.profiled: set = set()

    def case_rows(self, case: S.Case) -> list[dict]:
        k = _rotation(case, self.info["l2_bytes"])
        dt = S.DTYPES[case.dtype]
        xs, dys, zs = [], [], None
        for _ in range(k):
            xs.append(S.empty(case.shape, case.layout, dt, DEVICE).normal_().requires_grad_())
            dys.append(S.empty(case.shape, case.layout, dt, DEVICE).normal_())
        if _tensors_per_set(case) == 3:
            zs = [S.empty(case.shape, case.layout, dt, DEVICE).normal_().requires_grad_()
                  for _ in range(k)]
        ref = None
        if case.numel <= REF_MAX_NUMEL:
            m64 = P.init_module(P.TORCH_CLASSES[len(case.shape)](case.shape[1])).to(DEVICE).double()
            with torch.no_grad():
                ref = m64(xs[0].detach().double())
                if zs is not None:
                    ref = (ref + zs[0].double()).clamp_min(0)
            del m64
        rows = []
        for prov in case.providers:
            rows += self._provider_rows(case, prov, xs, dys, ref, k, zs)
        del xs, dys, zs, ref
        torch.cuda.empty_cache()
        return rows

    def _provider_rows(self, case, prov, xs, dys, ref, k, zs) -> list[dict]:
        rows = []
        base = dict(family=case.family, name=case.name, shape="x".join(map(str, case.shape)),
                    layout=case.layout, dtype=case.dtype, count=case.count, provider=prov,
                    numel=case.numel, rot_sets=k,
                    rot_bytes=_tensors_per_set(case) * k * case.numel * case.elem_size)
        residual = None
        if zs is not None:
            by_input = {x.data_ptr(): z for x, z in zip(xs, zs)}
            residual = lambda x: by_input[x.data_ptr()]  # noqa: E731
        try:
            if prov.startswith("torch_compile"):
                torch._dynamo.reset()
            m, fwd = P.make(prov, len(case.shape), case.shape[1], DEVICE, case.dtype, residual)
        except Exception as e:
            return [dict(base, phase=p, error=_msg(e)) for p in self.opts.phases]
        for phase in self.opts.phases:
            row = dict(base, phase=phase,
                       min_bytes=S.min_passes(case.family, phase) * case.numel * case.elem_size)
            try:
                with P.provider_env(prov):
                    self._measure(row, case, prov, phase, m, fwd, xs, dys, ref, zs)
            except Exception as e:
                row["error"] = _msg(e)
                self.log(f"  {prov} {phase} {case.label}: {row['error']}")
            rows.append(row)
        return rows

    def _measure(self, row, case, prov, phase, m, fwd, xs, dys, ref, zs):
        f = P.phase_callable(phase, m, fwd, xs, dys, zs)
        t0 = time.perf_counter()
        out = f()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        if phase == "train_fwd" and ref is not None and prov != "apex":
            if prov in S.RELU_PROVIDERS:
                ref = ref.clamp_min(0)
            row["max_rel_err_vs_fp64"] = ((out.double() - ref).abs().max()
                                          / ref.abs().max()).item()
        del out
        ms = triton.testing.do_bench(f, warmup=self.opts.warmup_ms, rep=self.opts.rep_ms,
                                     return_mode="median")
        row["ms"] = ms
        row["gbps"] = row["min_bytes"] / ms / 1e6
        if self.copy_gbps:
            row["pct_of_copy_bw"] = 100 * row["gbps"] / self.copy_gbps
        if ms < GRAPH_BELOW_MS and self.opts.graphs:
            k = len(xs)
            n = min(400, max(k, int(1.0 / max(ms, 1e-3))))
            n = k * math.ceil(n / k)
            try:
                g = _graph_ms(lambda: P.phase_callable(phase, m, fwd, xs, dys, zs), n)
                row["ms_graph"] = g
                row["graph_calls"] = n
                row["gbps_graph"] = row["min_bytes"] / g / 1e6
                row["graph_l2_resident"] = row["rot_bytes"] <= self.info["l2_bytes"]
            except Exception as e:
                row["graph_error"] = _msg(e)
        key = (prov, case.family, case.layout, case.dtype, phase)
        if self.opts.profile != "none" and (self.opts.profile == "all" or prov == "torch"
                                            or key not in self.profiled):
            self.profiled.add(key)
            try:
                n, names = _profile(f)
                if n == 0:
                    raise RuntimeError("the profiler recorded no GPU kernel")
                row["launches"] = n
                row["kernels"] = ";".join(sorted({_short(x) for x in names}))
                if prov == "torch":
                    row["backend"] = _backend(names)
            except Exception as e:
                row["profile_error"] = _msg(e)


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<provider> on the tritonbn rows: provider ms / tritonbn ms (providers
    measured in separate cases of the same shape, e.g. torch.compile, match too).
    On the shapes the single-pass kernel takes, speedup_vs_tritonbn_split > 1 says it beats
    the split path (elsewhere both providers run the split path)."""
    key = lambda r: (r["family"], r["name"], r["shape"], r["layout"], r["dtype"], r["phase"])
    ms = {}
    for r in rows:
        if r.get("ms"):
            ms[key(r) + (r["provider"],)] = r["ms"]
    for r in rows:
        if r["provider"] in ("tritonbn", "tritonbn_relu", "tritonbn_add_relu") and r.get("ms"):
            group = S.peers(r["provider"])  # BatchNorm [+ add] + ReLU against its peers
            for (*k, prov), v in ms.items():
                if (tuple(k) == key(r) and prov != r["provider"]
                        and S.peers(prov) == group):
                    r[f"speedup_vs_{prov}"] = v / r["ms"]


def headline(rows: list[dict]) -> list[dict]:
    """The report's summary: for each of tritonbn's providers, phase and dtype (and "all"
    dtypes), over the cases measured, the geometric mean, minimum and maximum of the
    speedup over torch eager and over torch.compile, the number of cases where tritonbn
    was slower, and the median share of the copy bandwidth."""
    def stats(values):
        if not values:
            return dict(geomean=None, min=None, max=None, slower=0, cases=0)
        # (clamped: exp(mean(log)) of a single value can round past it)
        geomean = math.exp(statistics.fmean(math.log(v) for v in values))
        return dict(geomean=min(max(geomean, min(values)), max(values)),
                    min=min(values), max=max(values), slower=sum(v < 1 for v in values),
                    cases=len(values))

    out = []
    for ours in ("tritonbn", "tritonbn_relu", "tritonbn_add_relu"):
        eager, compiled = (S.peers(ours)[1:] or ("torch", "torch_compile"))
        mine = [r for r in rows if r["provider"] == ours and r.get("ms")]
        for phase in dict.fromkeys(r["phase"] for r in mine):
            for dtype in [*dict.fromkeys(r["dtype"] for r in mine), "all"]:
                rs = [r for r in mine if r["phase"] == phase and dtype in ("all", r["dtype"])]
                if not rs or (dtype == "all" and len({r["dtype"] for r in rs}) < 2):
                    continue
                pct = [r["pct_of_copy_bw"] for r in rs if r.get("pct_of_copy_bw")]
                row = dict(provider=ours, phase=phase, dtype=dtype, cases=len(rs),
                           vs=eager, vs_compiled=compiled,
                           pct_of_copy_bw_median=statistics.median(pct) if pct else None)
                for name, peer in (("torch", eager), ("compile", compiled)):
                    for k, v in stats([r[f"speedup_vs_{peer}"] for r in rs
                                       if r.get(f"speedup_vs_{peer}")]).items():
                        row[f"{k}_vs_{name}"] = v
                out.append(row)
    return out


def network_sums(rows: list[dict]) -> list[dict]:
    """Sum over ResNet-50's 53 BatchNorm layers (count x measured per-layer time), for each
    batch, layout, dtype, phase and provider with all 12 distinct layers measured."""
    groups: dict = {}
    for r in rows:
        if r["family"].startswith("resnet50") and r.get("ms"):
            k = (r["family"], r["layout"], r["dtype"], r["phase"], r["provider"])
            groups.setdefault(k, []).append(r)
    out = []
    for (fam, layout, dt, phase, prov), rs in sorted(groups.items()):
        if len({r["name"] for r in rs}) == len(S.RESNET50_BN):
            out.append(dict(family=fam, layout=layout, dtype=dt, phase=phase, provider=prov,
                            layers=sum(r["count"] for r in rs),
                            ms=sum(r["count"] * r["ms"] for r in rs)))
    return out


def run(opts, log) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + opts.budget_s - 20  # keep 20 s for the outputs
    info = device_info()
    log(f"GPU mode on {info['name']} ({info['sm_count']} SMs, L2 {info['l2_bytes'] >> 20} MB)")
    summary = dict(mode="gpu", device=info, quick=opts.quick, budget_s=opts.budget_s)
    try:
        summary["copy_bandwidth"] = copy_bandwidth()
        log(f"copy bandwidth: {summary['copy_bandwidth']['gbps']:.0f} GB/s")
    except Exception as e:
        summary["copy_bandwidth"] = dict(error=_msg(e))
    copy_gbps = summary["copy_bandwidth"].get("gbps")
    summary["host_overhead"] = host_overhead(500 if opts.quick else 2000)
    # Imported now, outside any case: a timeout inside a first import would leave the
    # module half-loaded for the rest of the run (sympy: autograd's first symbolic shape).
    for module in ("sympy", "torch.fx.experimental.symbolic_shapes", "torch.profiler"):
        importlib.import_module(module)
    cases = S.gpu_cases(opts.quick, opts.autotune, opts.compile)
    if P.apex_available():
        cases += [S.Case(c.family, c.name, c.shape, c.layout, "fp16", c.count, ("apex",))
                  for c in cases if c.family == "resnet50_b256" and c.layout == "NHWC"
                  and c.dtype == "bf16" and c.name in S.RESNET50_FEW]
    bench = Bencher(opts, info, copy_gbps, log)
    prog = Progress(len(cases), "GPU cases")
    rows, skipped, case_s = [], [], []
    network = []
    try:
        # The end-to-end steps first, within network_s (at most 40% of the budget): what a
        # user's training step gains is the headline; the cases then take what is left
        # and list what did not fit.
        network_s = min(getattr(opts, "network_s", 0), 0.4 * opts.budget_s)
        if network_s > 0:
            network_steps(opts, time.perf_counter() + network_s, skipped, log, network)
        for case in cases:
            _one_case(case, bench, deadline, case_s, rows, skipped, prog, opts)
    except KeyboardInterrupt:  # SIGTERM / Ctrl-C: keep what was measured
        summary["interrupted"] = True
        log("interrupted: writing what was measured")
    add_speedups(rows)
    first = {}
    for r in rows:
        if r.get("first_call_s") is not None:
            first[r["provider"]] = round(first.get(r["provider"], 0.0) + r["first_call_s"], 1)
    summary.update(rows=rows, skipped_budget=skipped, headline=headline(rows),
                   network_sums=network_sums(rows),
                   network_steps=network,
                   first_call_s_total=first, cases_run=len(case_s),
                   wall_s=round(time.perf_counter() - t_start, 1))
    return summary


def network_steps(opts, deadline, skipped, log, rows: list) -> list[dict]:
    """The end-to-end ResNet-50 training steps (perf/_network.py) into ``rows``, as they
    are measured (an interrupted run keeps them), a configuration at a time until
    ``deadline``: one that runs past it is recorded as timed out (its first step compiles
    the kernels of every layer shape), the rest as skipped."""
    for batch, dtype in N.QUICK_CONFIGS if opts.quick else N.CONFIGS:
        label = f"network resnet50 batch {batch} {dtype}"
        left = int(deadline - time.perf_counter())
        if left < 10:
            skipped.append(label)
            continue
        try:
            with _Alarm(left):
                N.run(DEVICE, configs=((batch, dtype),), autotune=opts.autotune == "all",
                      log=log, rows=rows)
        except (Exception, CaseTimeout) as e:
            rows.append(dict(model="resnet50", batch=batch, dtype=dtype, error=_msg(e)))
            torch.cuda.empty_cache()
    return rows


def _one_case(case, bench, deadline, case_s, rows, skipped, prog, opts):
    """Runs one case unless the budget is spent (then lists it as skipped)."""
    est = statistics.median(case_s) if case_s else 3.0
    if time.perf_counter() + est > deadline:
        skipped.append(case.label + " " + "+".join(case.providers))
        prog.step(f"skipped (budget) {case.label}")
        return
    t0 = time.perf_counter()
    # no case may run far past the deadline: the report's outputs must still be written
    seconds = min(CASE_TIMEOUT_S, max(5, int(deadline - t0) + 10))
    try:
        with _Alarm(seconds):
            rows += bench.case_rows(case)
    except (Exception, CaseTimeout) as e:  # out of memory, timeout ...
        rows += [dict(family=case.family, name=case.name, layout=case.layout,
                      shape="x".join(map(str, case.shape)), dtype=case.dtype,
                      provider=p, phase="all", error=_msg(e)) for p in case.providers]
        torch.cuda.empty_cache()
    case_s.append(time.perf_counter() - t0)
    prog.step(f"{case.label} [{'+'.join(case.providers)}] {case_s[-1]:.1f} s")
    if opts.on_partial:
        opts.on_partial(rows)
