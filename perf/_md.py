"""report.md of both modes: tables built from the summary (never from anything else)."""
from __future__ import annotations

import os

import _shapes as S
from _common import fmt, md_table
from _plots import CPU_LABEL, PHASE_TITLES


def _header(summary: dict, title: str) -> list[str]:
    v = summary.get("versions", {})
    return [f"# {title}", "",
            f"Date: {summary.get('date')}  ",
            f"Versions: Python {v.get('python')}, torch {v.get('torch')}, triton "
            f"{v.get('triton')}, tritonbn {summary.get('tritonbn_version')}  ",
            f"Command: `{summary.get('command')}`  ",
            f"Wall time: {summary.get('wall_s')} s", ""]


def _images(files: list[str], out_dir: str) -> list[str]:
    return [f"![{os.path.basename(f)}]({os.path.relpath(f, out_dir)})" for f in files] + [""]


# -- CPU -----------------------------------------------------------------------------------
def cpu_report(summary: dict, out_dir: str, plots: list[str]) -> str:
    L = _header(summary, "tritonbn performance report: CPU mode")
    L += [f"**{CPU_LABEL}.** No GPU was available: the Triton kernels ran in the Triton "
          "interpreter on small tensors. This report gives what can be known without a GPU: "
          "accuracy, the memory traffic the kernels ask for, kernel launches, the number of "
          "programs each launch would start on an H200, and the compiled kernels' resources. "
          "GPU timings come from GPU mode (`perf/gpu_run.sh` on a GPU machine).", ""]
    L += _cpu_traffic(summary)
    L += _cpu_accuracy(summary)
    L += _cpu_network(summary)
    L += _cpu_grid(summary)
    L += _cpu_kernels(summary)
    L += ["## Plots", ""] + _images(plots, out_dir)
    return "\n".join(L) + "\n"


def _cpu_traffic(summary) -> list[str]:
    t = summary.get("traffic", [])
    single = dict.fromkeys(f"{r['shape']} {r['layout']}" for r in t
                           if r.get("path") == "single_pass")
    L = ["## Memory traffic and launches per phase (tritonbn, counted)", "",
         "Bytes read and written by tritonbn's kernels, counted by instrumenting the "
         "interpreter's loads and stores (active lanes x element size), per element of the "
         "input. *Big* = x, y, dy, dx; *small* = per-channel vectors, split partials, "
         "statistics (counted once per program that loads them, on the interpreter's grid). "
         "A pass is one full read or write of the tensor. The minimum is 2 passes forward "
         "(read x, write y) and 3 backward (read x, dy; write dx); PyTorch's native CUDA "
         "kernels make 3 and 5 (design notes, section 2; eval forward: 2). These are the bytes "
         "the kernels request: on a GPU the second read of x (and dy) comes from L2 when the "
         "tensor fits there (60 MB on H200), from HBM otherwise.", "",
         "Path *single_pass*: training forward and backward each run as one `bn_fused_kernel` "
         "launch that holds all M = N x spatial values of its channels in registers, so it "
         "reads x (and dy) once; tritonbn takes "
         "it when M fits one register tile of at most "
         f"{fmt(summary.get('fused_max_volume'))} lanes (outer and inner extents rounded up to "
         "powers of two, times the layout's smallest channel block), here "
         f"{', '.join(single) or 'no shape'}. Path *split*: statistics (or grad_stats) then "
         "apply, which `tritonbn_split` (TRITONBN_FUSED=0) runs on every shape; eval forward "
         "is one apply launch on both.", ""]
    rows = []
    for phase in S.PHASES:
        for layout in dict.fromkeys(r["layout"] for r in t):
            for prov in dict.fromkeys(r["provider"] for r in t):
                by = {r["dtype"]: r for r in t if r["phase"] == phase
                      and r["layout"] == layout and r["provider"] == prov}
                r32, r16 = by.get("fp32"), by.get("bf16") or by.get("fp16")
                if not (r32 or r16):
                    continue
                r = r32 or r16
                es = 4 if r is r32 else 2
                rows.append([PHASE_TITLES[phase], layout, r["shape"], prov, r["path"],
                             r32 and r32["bytes_per_element"], r16 and r16["bytes_per_element"],
                             r["bytes_per_element"] / es, S.MIN_PASSES[phase],
                             S.TORCH_NATIVE_PASSES[phase], r["small_bytes_per_element"],
                             r["launches"], r["launch_kernels"]])
    L.append(md_table(["phase", "layout", "shape", "provider", "path", "fp32 B/elem",
                       "16-bit B/elem", "passes", "min passes", "torch native passes",
                       "small B/elem (fp32)", "launches", "kernels"], rows))
    return L + [""]


def _cpu_network(summary) -> list[str]:
    rows = summary.get("network_accuracy", [])
    if not rows:
        return []
    r0 = rows[0]
    table = [[r["variant"], r["loss_rel_err"], r["grads_rel_err"], r["worst_param"],
              r["worst_param_ratio_to_torch"]] for r in rows]
    return ["## A ResNet training step against float64", "",
            f"One fp32 training step (forward, cross-entropy, backward) of a small ResNet of "
            f"GPU mode's code (perf/_network.py: one bottleneck per stage, width 8, "
            f"{r0['batchnorm_layers']} BatchNorms), batch {r0['batch']} of {r0['image']}x"
            f"{r0['image']} images, seed {r0['seed']}, through the kernels, against the same "
            "step in float64 with torch's BatchNorm: relative errors of the loss and of all "
            "gradients together (each parameter's scaled by its float64 norm), and the "
            "parameter whose gradient's error is largest next to torch's fp32 error on it. "
            "The last stage's BatchNorms see 4 values per channel, which makes the gradients "
            "ill-conditioned: torch's own row is the bar "
            "(`tests/perf/test_network.py::test_variants_train_like_torch` holds tritonbn "
            "to 2x its error on all gradients, 4x on each).", "",
            md_table(["variant", "loss error", "all gradients' error", "worst parameter",
                      "its error / torch's"], table), ""]


def _cpu_accuracy(summary) -> list[str]:
    sub = summary.get("compile_subset") or {}
    rows = [r for r in summary.get("rows", []) if r.get("max_rel_err") is not None]
    fails = [r for r in summary.get("rows", []) if r.get("error")]
    L = ["## Accuracy against float64", "",
         "Max |error| / max |reference| over the phase's outputs (training forward: y and the "
         "updated running mean / variance; backward: dx, dweight, dbias; eval forward: y), "
         "worst layout, against torch's BatchNorm computed in float64 on the same (rounded) "
         "inputs. Parameters and running statistics are fp32 (the AMP set-up). torch.compile "
         f"(Inductor, CPU) ran on layouts {', '.join(sub.get('layouts', []))} in "
         f"{', '.join(sub.get('dtypes', []))}"
         + (f" (skipped: {summary['compile_skipped']})" if summary.get("compile_skipped") else "")
         + ".", ""]
    cast = summary.get("interpreter_bf16_cast")
    if cast and cast != "round-to-nearest-even":
        L += [f"Note: the Triton interpreter converts fp32 to bf16 by {cast} (checked in this "
              "run with a one-line kernel), where a GPU rounds to nearest even; tritonbn's bf16 "
              "outputs here can therefore be off by one unit in the last place more than on a "
              "GPU. fp16 conversion rounds to nearest in both.", ""]
    table = []
    for prov in dict.fromkeys(r["provider"] for r in rows):
        for dt in S.DTYPES:
            sel = [r for r in rows if r["provider"] == prov and r["dtype"] == dt]
            if not sel:
                continue
            errs = [max((r["max_rel_err"] for r in sel if r["phase"] == p), default=None)
                    for p in S.PHASES]
            kept = all(r.get("layout_kept", True) for r in sel)
            table.append([prov, dt, len({r["layout"] for r in sel}), *errs,
                          "yes" if kept else "NO"])
    L.append(md_table(["provider", "dtype", "layouts", *[PHASE_TITLES[p] for p in S.PHASES],
                       "output layout = input layout"], table))
    if fails:
        L += ["", "Failures:", ""] + [f"- {r['provider']} {r['layout']} {r['dtype']} "
                                      f"{r['phase']}: {r['error']}" for r in fails]
    return L + [""]


def _cpu_grid(summary) -> list[str]:
    g = summary.get("grid", [])
    L = ["## Programs per launch on an H200 (model)", "",
         "For every GPU-mode shape, the grid tritonbn's launchers would use on a 132-SM H200 "
         "(`reduction_grid` / `apply_grid` with the fixed default config, "
         "`configs.default_config`), and, for autotuning, how many candidate configs survive "
         "the shape-based pruning and the range of their program counts. bf16 rows (fp32 rows "
         "in grid.csv). A reduction launch below 1 program per SM leaves SMs idle. The last "
         "columns say whether the tensor the second pass re-reads (x forward; x and dy "
         "backward, bf16) fits in the H200's 60 MB L2, where that re-read can avoid HBM: "
         "a size fact, not a measurement. Kernel `fused`: the single-pass kernel "
         "(`fused_grid` with `configs.fused_default_config`; its tile [O,I,C] holds whole "
         "channels), listed on the shapes it takes (column single-pass), where it replaces "
         "stats/grad_stats + apply in training and makes no re-read.", ""]
    rows = []
    for r in g:
        if r["dtype"] != "bf16":
            continue
        rows.append([r["family"], r["name"], r["shape"], r["layout"],
                     "yes" if r.get("fused_fits") else "no", r["kernel"],
                     f"{r['default_tile']} w{r['default_warps']}", r["programs"],
                     r["programs_per_sm"], r["tuned_candidates"],
                     f"{fmt(r['tuned_programs_min'])}-{fmt(r['tuned_programs_max'])}",
                     r["tensor_mb"], "yes" if r["fwd_reread_fits_l2"] else "no",
                     "yes" if r["bwd_reread_fits_l2"] else "no"])
    L.append(md_table(["family", "layer", "shape", "layout", "single-pass", "kernel",
                       "default tile [O,I,C]", "programs", "per SM", "tuning candidates",
                       "their programs", "tensor MB", "fwd re-read fits L2",
                       "bwd re-read fits L2"], rows))
    return L + [""]


def _cpu_kernels(summary) -> list[str]:
    k = summary.get("kernels", [])
    L = ["## Compiled kernels (perf/kernel_report.py)", ""]
    if summary.get("kernels_error"):
        L += [f"{'Not available' if not k else 'Incomplete'}: {summary['kernels_error']}", ""]
    if not k:
        return L
    regs = [r["registers"] for r in k if isinstance(r.get("registers"), (int, float))]
    spills = [r for r in k if (r.get("spill_bytes") or 0) > 0]
    loads = [r["load_bits"] for r in k if isinstance(r.get("load_bits"), (int, float))]
    failed = [r for r in k if r.get("error")]
    L += [f"{len(k)} config rows; {len(k) - len(failed)} compiled, registers "
          f"{min(regs, default='-')}-{max(regs, default='-')} per thread, {len(spills)} spill, "
          f"narrowest bulk load {min(loads, default='-')} bits. Full table: kernel_report.md / "
          "kernel_report.csv; SASS instructions per element against the issue budget of "
          "the bytes each kernel moves: kernel_report.md, \"Instructions per element\".", ""]
    if failed:
        kinds = sorted({r["kernel"] for r in failed})
        L += [f"**{len(failed)} config rows failed to compile** ({', '.join(kinds)}), e.g.: "
              f"`{failed[0]['error'][:200]}`", ""]
    ok = [r for r in k if not r.get("error")]
    rows = [[r.get(f) for f in ("kernel", "config", "arch", "layout", "dtype", "registers",
                                "spill_bytes", "shared_bytes", "load_bits", "store_bits")]
            for r in ok[:40]]
    L.append(md_table(["kernel", "config", "arch", "layout", "dtype", "registers", "spill B",
                       "shared B", "load bits", "store bits"], rows))
    if len(ok) > 40:
        L.append(f"\n(first 40 of {len(ok)} compiled rows)")
    return L + [""]


# -- GPU -----------------------------------------------------------------------------------
def gpu_report(summary: dict, out_dir: str, plots: list[str]) -> str:
    dev = summary.get("device", {})
    L = _header(summary, f"tritonbn performance report: {dev.get('name')}")
    cb = summary.get("copy_bandwidth", {})
    L += [f"Device: {dev.get('name')}, {dev.get('sm_count')} SMs, L2 "
          f"{(dev.get('l2_bytes') or 0) >> 20} MB, CUDA {dev.get('cuda')}, cuDNN "
          f"{dev.get('cudnn')}  ",
          f"Measured device-to-device copy bandwidth (bytes read + written): "
          f"**{fmt(cb.get('gbps'))} GB/s** ({fmt((cb.get('bytes') or 0) / 2**30)} GiB copy)"
          + (f" - error: {cb['error']}" if cb.get("error") else ""), "",
          "Method: `triton.testing.do_bench` median (L2 flushed before every call), inputs "
          "rotated over buffer sets of at least 4x L2 where memory allows, after a warm-up call "
          "(its wall time, compile or autotuning included, is `first call s`). Effective "
          "bandwidth = minimal bytes (forward: x + y; backward: x + dy + dx) / time. "
          "`graph ms`: calls captured in one CUDA graph (host overhead hidden, no flush; "
          "marked L2 when the rotated set fits in L2). tritonbn = fixed default config "
          "(TRITONBN_AUTOTUNE=0), single-pass kernel on the shapes it takes; tritonbn_tuned = "
          "autotuned; tritonbn_split = fixed default config with the single-pass kernel off "
          "(TRITONBN_FUSED=0: statistics then apply on every shape; `split ms`). torch "
          "backend (cuDNN / native) from the profiler's kernel names. Every number below was "
          "measured in this run.", ""]
    first = summary.get("first_call_s_total") or {}
    if first:
        L += ["Time spent in first calls (JIT compile, autotuning, torch.compile), not in the "
              "timings: " + ", ".join(f"{p} {fmt(v)} s" for p, v in first.items())
              + f". Cases run: {summary.get('cases_run')}, not run (budget): "
              f"{len(summary.get('skipped_budget', []))}.", ""]
    L += _gpu_headline(summary)
    L += _gpu_host(summary)
    L += _gpu_network_steps(summary)
    L += _gpu_network(summary)
    for phase in summary.get("phases", S.PHASES):
        L += _gpu_phase(summary, phase)
    L += _gpu_relu(summary)
    skipped = summary.get("skipped_budget", [])
    errs = [r for r in summary.get("rows", []) if r.get("error")]
    if skipped:
        L += [f"## Not run (time budget {summary.get('budget_s')} s)", ""]
        L += [f"- {s}" for s in skipped] + [""]
    if errs:
        L += ["## Errors", ""] + [f"- {r['provider']} {r['phase']} {r['family']}/{r['name']} "
                                  f"{r['layout']} {r['dtype']}: {r['error']}" for r in errs]
        L.append("")
    L += ["## Plots", ""] + _images(plots, out_dir)
    return "\n".join(L) + "\n"


def _gpu_headline(summary) -> list[str]:
    """One line per provider, phase and dtype: the speedups of the tables below, summed up."""
    rows = summary.get("headline", [])
    if not rows:
        return []

    def spread(r, peer):
        if not r.get(f"cases_vs_{peer}"):
            return None
        return (f"{fmt(r[f'geomean_vs_{peer}'])} ({fmt(r[f'min_vs_{peer}'])} - "
                f"{fmt(r[f'max_vs_{peer}'])}), slower in {r[f'slower_vs_{peer}']} of "
                f"{r[f'cases_vs_{peer}']}")

    table = [[r["provider"], PHASE_TITLES[r["phase"]], r["dtype"], r["cases"],
              spread(r, "torch"), spread(r, "compile"), r["pct_of_copy_bw_median"]]
             for r in rows]
    return ["## Summary", "",
            "Speedup = the other provider's time / tritonbn's, per case (layer shape, layout, "
            "dtype) in the tables below: geometric mean (min - max) over the cases measured, "
            "and in how many of them tritonbn was slower. tritonbn_relu and "
            "tritonbn_add_relu are compared with torch's BatchNorm + ReLU [+ add], eager "
            "and compiled.", "",
            md_table(["provider", "phase", "dtype", "cases", "speedup vs torch eager",
                      "speedup vs torch.compile", "median % copy BW"], table), ""]


def _gpu_host(summary) -> list[str]:
    rows = [[r["provider"], r["phase"], r.get("us_per_call_no_sync"),
             r.get("us_per_call_with_sync"), r.get("error", "")]
            for r in summary.get("host_overhead", [])]
    return ["## Host overhead (tiny input 2x16x4x4, target < 20 us per call)", "",
            md_table(["provider", "phase", "us/call, loop without sync",
                      "us/call incl. final sync", "error"], rows), ""]


def _gpu_network(summary) -> list[str]:
    sums = summary.get("network_sums", [])
    if not sums:
        return []
    L = ["## ResNet-50: all 53 BatchNorm layers (sum of count x measured layer time)", ""]
    rows = []
    keys = dict.fromkeys((s["family"], s["layout"], s["dtype"], s["phase"]) for s in sums)
    for fam, layout, dt, phase in keys:
        by = {s["provider"]: s["ms"] for s in sums if (s["family"], s["layout"], s["dtype"],
                                                       s["phase"]) == (fam, layout, dt, phase)}
        t, e = by.get("tritonbn"), by.get("torch")
        rows.append([fam, layout, dt, PHASE_TITLES[phase], t, by.get("tritonbn_split"), e,
                     e / t if t and e else None])
    L.append(md_table(["model", "layout", "dtype", "phase", "tritonbn ms", "split ms",
                       "torch ms", "speedup vs torch"], rows))
    return L + [""]


def _gpu_network_steps(summary) -> list[str]:
    """perf/_network.py's rows: ResNet-50 training steps end to end."""
    rows = summary.get("network_steps", [])
    if not rows:
        return []
    table = [[r.get("batch"), r.get("dtype"), r.get("variant", "-"), r.get("step_ms"),
              r.get("gpu_busy_ms"), r.get("images_per_s"), r.get("speedup_vs_torch"),
              r.get("first_step_s"), r.get("loss_rel_err"), r.get("conv1_grad_rel_err"),
              r.get("error", "")] for r in rows]
    autotuned = any(r.get("autotune") for r in rows)
    model, image = rows[0].get("model", "resnet50"), rows[0].get("image", 224)
    return ["## ResNet-50 training step, end to end", "",
            f"{model} (torchvision's architecture, perf/_network.py), channels_last, "
            f"{image}x{image} images, forward (bf16: under torch.autocast; fp32: torch's "
            "defaults, TF32 convolutions) + cross-entropy + "
            "backward, no optimizer step. torch = torch.nn.BatchNorm2d; tritonbn = "
            "convert_model; tritonbn_fused = fuse_relu_traced(convert_model(...)), ReLUs and "
            "shortcut adds in the BatchNorm kernels. tritonbn with "
            + ("autotuning" if autotuned else "its fixed default configs (TRITONBN_AUTOTUNE=0)")
            + ". `ms/step`: median of 3 wall-time runs of 10 consecutive steps, synchronised "
            "at both ends (the host queues ahead of the GPU as in training); `GPU busy ms`: "
            "the kernel time of one step (torch.profiler): ms/step above it is time the GPU "
            "waited for the host; `first step s`: the first step's wall time (kernel "
            "compilation). `loss err` and `conv1 grad err`: the first step's loss and conv1 "
            "weight gradient against the same step in float64, relative; torch's row is the "
            "scale of its own rounding (bf16 autocast's included) to read tritonbn's against.",
            "", md_table(["batch", "dtype", "variant", "ms/step", "GPU busy ms", "images/s",
                          "speedup vs torch", "first step s", "loss err", "conv1 grad err",
                          "error"], table), ""]


def _gpu_relu(summary) -> list[str]:
    """The fused epilogues against the same computation by torch, eager and compiled."""
    L = []
    for ours, title, what, bytes_note in (
            ("tritonbn_relu", "BatchNorm + ReLU (tritonbn's fused ReLU against BatchNorm then "
             "ReLU)", "BN+ReLU", "BatchNorm bytes"),
            ("tritonbn_add_relu", "BatchNorm + residual + ReLU (tritonbn's fused add and ReLU "
             "against BatchNorm, += residual, ReLU)", "BN+add+ReLU", "+ residual bytes")):
        rows = [r for r in summary.get("rows", []) if r["provider"] == ours]
        if not rows:
            continue
        torch_eager, torch_compiled = S.peers(ours)[1:]
        table = [[r["family"], r["name"], r["layout"], r["dtype"], PHASE_TITLES[r["phase"]],
                  r.get("ms"), r.get("gbps"), r.get(f"speedup_vs_{torch_eager}"),
                  r.get(f"speedup_vs_{torch_compiled}"), r.get("error", "")] for r in rows]
        L += [f"## {title}", "",
              md_table(["family", "layer", "layout", "dtype", "phase", f"{ours} ms",
                        f"GB/s (minimal: {bytes_note})", f"speedup vs torch {what}",
                        f"speedup vs compiled {what}", "error"], table), ""]
    return L


def _gpu_phase(summary, phase) -> list[str]:
    rows = [r for r in summary.get("rows", []) if r.get("phase") == phase
            and not S.peers(r["provider"])]
    if not rows:
        return []
    key = lambda r: (r["family"], r["name"], r["shape"], r["layout"], r["dtype"])
    table = []
    for k in dict.fromkeys(key(r) for r in rows):
        by = {r["provider"]: r for r in rows if key(r) == k}
        t = by.get("tritonbn", {})
        e = by.get("torch", {})
        c = by.get("torch_compile", {})
        tu = by.get("tritonbn_tuned", {})
        sp = by.get("tritonbn_split", {})
        graph = t.get("ms_graph")
        table.append([k[0], k[1], k[2], k[3], k[4], t.get("ms"), t.get("gbps"),
                      t.get("pct_of_copy_bw"), e.get("ms"), e.get("backend"),
                      t.get("speedup_vs_torch"), c.get("ms"), t.get("speedup_vs_torch_compile"),
                      tu.get("ms"), sp.get("ms"),
                      (fmt(graph) + (" L2" if t.get("graph_l2_resident") else ""))
                      if graph else None,
                      e.get("ms_graph"), t.get("first_call_s"), t.get("launches")])
    return [f"## {PHASE_TITLES[phase]}", "",
            md_table(["family", "layer", "shape", "layout", "dtype", "tritonbn ms", "GB/s",
                      "% copy BW", "torch ms", "torch backend", "speedup vs torch",
                      "compile ms", "speedup vs compile", "tuned ms", "split ms",
                      "tritonbn graph ms", "torch graph ms", "first call s", "launches"],
                     table), ""]
