"""PNG plots of the report (matplotlib, Agg backend). Every function returns the list of
files it wrote and never raises for missing data (an empty panel says so)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import _shapes as S  # noqa: E402

CPU_LABEL = "CPU: interpreter counts and models, not GPU timings"
COLORS = {"tritonbn": "tab:blue", "tritonbn_tuned": "tab:cyan", "tritonbn_split": "tab:olive",
          "torch": "tab:orange", "torch_compile": "tab:green", "apex": "tab:purple",
          "tritonbn_relu": "tab:red", "torch_relu": "tab:brown",
          "torch_compile_relu": "tab:pink", "tritonbn_add_relu": "tab:gray",
          "torch_add_relu": "black", "torch_compile_add_relu": "gold"}
MARKERS = {"NCHW": "o", "NHWC": "s", "NC": "^", "NCL": "v", "NCDHW": "D", "NDHWC": "P"}
PHASE_TITLES = {"train_fwd": "training forward", "bwd": "backward",
                "fwd_bwd": "forward + backward", "eval_fwd": "eval forward"}


def _save(fig, out_dir, name, files):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append(path)


def _empty(ax, text="no data"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


# -- CPU mode ----------------------------------------------------------------------------
def cpu_plots(summary: dict, out_dir: str) -> list[str]:
    files: list[str] = []
    _cpu_traffic(summary, out_dir, files)
    _cpu_accuracy(summary, out_dir, files)
    _cpu_programs(summary, out_dir, files)
    return files


def _cpu_traffic(summary, out_dir, files):
    """One panel per dtype and phase: a bar pair per layout, colour = provider (tritonbn,
    tritonbn_split), hatched where the phase ran the single-pass kernel."""
    traffic = [t for t in summary.get("traffic", []) if t.get("bytes_per_element") is not None]
    dtypes = [d for d in ("fp32", "bf16") if any(t["dtype"] == d for t in traffic)] or ["fp32"]
    layouts = [l for l in MARKERS if any(t["layout"] == l for t in traffic)]
    provs = [p for p in COLORS if any(t["provider"] == p for t in traffic)]
    fig, axes = plt.subplots(len(dtypes), len(S.PHASES), figsize=(4 * len(S.PHASES),
                             3.6 * len(dtypes)), squeeze=False, sharey="row")
    width = 0.8 / max(len(provs), 1)
    for row, dt in zip(axes, dtypes):
        for ax, phase in zip(row, S.PHASES):
            sel = [t for t in traffic if t["dtype"] == dt and t["phase"] == phase]
            if not sel:
                _empty(ax)
                continue
            for li, layout in enumerate(layouts):
                for pi, prov in enumerate(provs):
                    r = next((t for t in sel if t["layout"] == layout and t["provider"] == prov),
                             None)
                    if r is None:
                        continue
                    x = li - 0.4 + width * (pi + 0.5)
                    ax.bar(x, r["bytes_per_element"], width, color=COLORS[prov], edgecolor="k",
                           lw=0.4, hatch="xx" if r["path"] == "single_pass" else None)
                    ax.bar(x, r["small_bytes_per_element"], width, bottom=r["bytes_per_element"],
                           color=COLORS[prov], alpha=0.35)
            ax.axhline(sel[0]["min_bytes_per_element"], color="k", lw=1)
            ax.axhline(sel[0]["torch_native_bytes_per_element"], color="red", ls="--", lw=1)
            ax.set_xticks(range(len(layouts)), layouts, fontsize=7)
            ax.set_title(f"{PHASE_TITLES[phase]}, {dt}", fontsize=9)
        row[0].set_ylabel("bytes moved per input element")
    handles = [Patch(facecolor=COLORS[p], edgecolor="k", lw=0.4, label=p) for p in provs]
    handles += [Patch(facecolor="white", edgecolor="k", hatch="xx",
                      label="single-pass kernel (bn_fused_kernel)"),
                Patch(facecolor="gray", alpha=0.35, label="per-channel vectors, partials"),
                Line2D([], [], color="k", lw=1, label="minimum"),
                Line2D([], [], color="red", ls="--", lw=1, label="PyTorch native CUDA")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(CPU_LABEL + " - tritonbn kernel traffic: single-pass vs split path",
                 fontsize=10, color="darkred")
    fig.tight_layout()
    _save(fig, out_dir, "cpu_traffic.png", files)


def _cpu_accuracy(summary, out_dir, files):
    rows = [r for r in summary.get("rows", []) if r.get("max_rel_err") is not None]
    provs = [p for p in COLORS if any(r["provider"] == p for r in rows)]
    dtypes = [d for d in S.DTYPES if any(r["dtype"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(S.PHASES), figsize=(16, 4), squeeze=False, sharey=True)
    for ax, phase in zip(axes[0], S.PHASES):
        width = 0.8 / max(len(provs), 1)
        for pi, prov in enumerate(provs):
            for di, dt in enumerate(dtypes):
                errs = [r["max_rel_err"] for r in rows
                        if r["provider"] == prov and r["dtype"] == dt and r["phase"] == phase]
                if errs:
                    ax.bar(di - 0.4 + width * (pi + 0.5), max(max(errs), 1e-12), width,
                           color=COLORS[prov], label=prov if di == 0 else None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(dtypes)), dtypes)
        ax.set_title(PHASE_TITLES[phase], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("max |err| / max |ref| vs float64\n(worst layout)")
    # below the panels: inside one, the legend hid the tallest (bf16) bars
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(CPU_LABEL + " - accuracy against float64", fontsize=10, color="darkred")
    _save(fig, out_dir, "cpu_accuracy.png", files)


def _cpu_programs(summary, out_dir, files):
    grid = [g for g in summary.get("grid", []) if g["family"].startswith("resnet50")
            and g["dtype"] == "bf16"]
    fams = [f for f in ("resnet50_b256", "resnet50_b32") if any(g["family"] == f for g in grid)]
    fig, axes = plt.subplots(1, max(len(fams), 1), figsize=(7 * max(len(fams), 1), 4.4),
                             squeeze=False, sharey=True)
    names = [n for n, *_ in S.RESNET50_BN]
    # Fixed colours across panels; a series shows where it has rows (fused: only the shapes
    # the single-pass kernel takes).
    series = [("NCHW", "stats/grad_stats"), ("NCHW", "apply"), ("NCHW", "fused"),
              ("NHWC", "stats/grad_stats"), ("NHWC", "apply"), ("NHWC", "fused")]
    for ax, fam in zip(axes[0], fams):
        rows = [g for g in grid if g["family"] == fam]
        shown = [(si, s) for si, s in enumerate(series)
                 if any((g["layout"], g["kernel"]) == s for g in rows)]
        width = 0.8 / max(len(shown), 1)
        for k, (si, (layout, kernel)) in enumerate(shown):
            ys = []
            for n in names:
                g = next((g for g in rows if g["name"] == n and g["layout"] == layout
                          and g["kernel"] == kernel), None)
                ys.append(g["programs_per_sm"] if g else 0)
            ax.bar([i - 0.4 + width * (k + 0.5) for i in range(len(names))], ys, width,
                   label=f"{layout} {kernel}", color=f"C{si}")
        ax.axhline(1, color="k", lw=0.8, ls="--", label="1 program per SM")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=8)
        ax.set_title(f"ResNet-50 {fam.split('_')[1]} bf16: programs per launch / 132 SMs\n"
                     "(default config, H200 grid model)", fontsize=9)
        ax.legend(fontsize=7)
    if not fams:
        _empty(axes[0][0])
    axes[0][0].set_ylabel("programs per SM")
    fig.suptitle(CPU_LABEL, fontsize=10, color="darkred", y=1.04)
    _save(fig, out_dir, "cpu_programs.png", files)


# -- GPU mode ----------------------------------------------------------------------------
def gpu_plots(summary: dict, out_dir: str) -> list[str]:
    files: list[str] = []
    rows = [r for r in summary.get("rows", []) if r.get("gbps")]
    dev = summary.get("device", {}).get("name", "GPU")
    copy = (summary.get("copy_bandwidth") or {}).get("gbps")
    for phase in S.PHASES:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), squeeze=False, sharey=True)
        for ax, dt in zip(axes[0], S.DTYPES):
            sel = [r for r in rows if r["phase"] == phase and r["dtype"] == dt]
            if not sel:
                _empty(ax)
            for prov in COLORS:
                for layout, mk in MARKERS.items():
                    pts = sorted((r["min_bytes"], r["gbps"]) for r in sel
                                 if r["provider"] == prov and r["layout"] == layout)
                    if pts:
                        ax.scatter([p[0] / 1e6 for p in pts], [p[1] for p in pts], s=22,
                                   marker=mk, color=COLORS[prov], alpha=0.8,
                                   label=f"{prov} {layout}")
            if copy:
                ax.axhline(copy, color="k", ls="--", lw=0.8, label="measured copy bandwidth")
            ax.set_xscale("log")
            ax.set_xlabel("minimal bytes moved per call (MB)")
            ax.set_title(f"{dt}", fontsize=10)
            ax.grid(alpha=0.3)
            if sel:
                ax.legend(fontsize=6, ncol=2)
        axes[0][0].set_ylabel("effective bandwidth (GB/s)")
        fig.suptitle(f"{PHASE_TITLES[phase]}: effective bandwidth, {dev} "
                     f"(do_bench median, L2 flushed)", fontsize=11)
        _save(fig, out_dir, f"bandwidth_{phase}.png", files)
    _gpu_summary(summary, out_dir, files, dev)
    _gpu_speedups(summary, out_dir, files, dev)
    _gpu_network_steps(summary, out_dir, files, dev)
    return files


def _gpu_summary(summary, out_dir, files, dev):
    """The report's summary table as bars: tritonbn's geometric-mean speedup per phase and
    dtype over torch eager and over torch.compile, the whiskers spanning min to max."""
    rows = [r for r in summary.get("headline", []) if r["provider"] == "tritonbn"
            and r["dtype"] != "all"]
    if not rows:
        return
    dtypes = [d for d in S.DTYPES if any(r["dtype"] == d for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), squeeze=False, sharey=True)
    width = 0.8 / len(dtypes)
    for ax, (peer, title) in zip(axes[0], (("torch", "torch eager"),
                                           ("compile", "torch.compile"))):
        for di, dt in enumerate(dtypes):
            xs, ys, lo, hi = [], [], [], []
            for pi, phase in enumerate(S.PHASES):
                r = next((r for r in rows if r["phase"] == phase and r["dtype"] == dt
                          and r.get(f"cases_vs_{peer}")), None)
                if r:
                    g = r[f"geomean_vs_{peer}"]
                    xs.append(pi - 0.4 + width * (di + 0.5))
                    ys.append(g)
                    lo.append(g - r[f"min_vs_{peer}"])
                    hi.append(r[f"max_vs_{peer}"] - g)
            if xs:  # bars from 1: up for faster, down for slower
                ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=dt)
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="k", capsize=3, lw=1)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_yscale("log")  # ratios: 2x faster and 2x slower equally far from 1
        ax.set_xticks(range(len(S.PHASES)), [PHASE_TITLES[p] for p in S.PHASES], fontsize=8)
        ax.set_title(f"over {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if ax.patches:
            ax.legend(fontsize=8)
        else:
            _empty(ax)
    axes[0][0].set_ylabel("speedup of tritonbn (geometric mean; whiskers: min - max)")
    fig.suptitle(f"tritonbn's speedup over every case measured, {dev} (do_bench medians)",
                 fontsize=11)
    _save(fig, out_dir, "summary_speedup.png", files)


def _gpu_network_steps(summary, out_dir, files, dev):
    """Images per second of each variant of the end-to-end ResNet-50 step, per (batch,
    dtype)."""
    rows = [r for r in summary.get("network_steps", []) if r.get("images_per_s")]
    if not rows:
        return
    configs = list(dict.fromkeys((r["batch"], r["dtype"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(configs), 4.5))
    width = 0.8 / len(variants)
    for vi, v in enumerate(variants):
        ys = [next((r["images_per_s"] for r in rows if (r["batch"], r["dtype"]) == c
                    and r["variant"] == v), 0) for c in configs]
        bars = ax.bar([i - 0.4 + width * (vi + 0.5) for i in range(len(configs))], ys, width,
                      label=v)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(configs)), [f"batch {b}, {d}" for b, d in configs])
    ax.set_ylabel("training images per second (higher is better)")
    ax.set_title(f"{rows[0]['model']} training step (forward + backward), channels_last, {dev}",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out_dir, "network_resnet50.png", files)


def _gpu_speedups(summary, out_dir, files, dev):
    rows = [r for r in summary.get("rows", []) if r["provider"] == "tritonbn"
            and r.get("speedup_vs_torch") and r["family"].startswith("resnet50")]
    dtype = "bf16" if any(r["dtype"] == "bf16" for r in rows) else (
        rows[0]["dtype"] if rows else "bf16")
    rows = [r for r in rows if r["dtype"] == dtype]
    panels = [(f, l) for f in ("resnet50_b256", "resnet50_b32") for l in ("NCHW", "NHWC")]
    fig, axes = plt.subplots(2, 2, figsize=(15, 8), squeeze=False, sharey=True)
    names = [n for n, *_ in S.RESNET50_BN]
    for ax, (fam, layout) in zip(axes.flat, panels):
        width = 0.8 / len(S.PHASES)
        any_bar = False
        for pi, phase in enumerate(S.PHASES):
            ys = []
            for n in names:
                r = next((r for r in rows if r["family"] == fam and r["layout"] == layout
                          and r["name"] == n and r["phase"] == phase), None)
                ys.append(r["speedup_vs_torch"] if r else 0)
            any_bar |= any(ys)
            ax.bar([i - 0.4 + width * (pi + 0.5) for i in range(len(names))], ys, width,
                   label=PHASE_TITLES[phase])
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=8)
        ax.set_title(f"ResNet-50 {fam.split('_')[1]} {layout} {dtype}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if not any_bar:
            _empty(ax)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup of tritonbn over torch eager")
    fig.suptitle(f"tritonbn vs torch eager on ResNet-50's BatchNorm layers, {dev} "
                 "(do_bench medians)", fontsize=11)
    fig.subplots_adjust(hspace=0.45)
    _save(fig, out_dir, "speedup_resnet50.png", files)
