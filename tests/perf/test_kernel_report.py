"""perf/kernel_report.py: the compiled-kernel report (AOT compile, no GPU needed).

Runs the report on its quick subset (two tiles per kernel and the default configs, sm_90,
fp32 and bf16, NCHW and channels_last, plus the flag variants: every other constexpr branch
once) and checks its outputs and targets: everything compiles, nothing spills, the bulk
loads/stores of every eligible config are 128-bit.
"""
from __future__ import annotations

import csv
import importlib
import os
import pathlib
import sys

import pytest

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "perf")
if PERF not in sys.path:
    sys.path.insert(0, PERF)
kernel_report = importlib.import_module("kernel_report")
ptx = importlib.import_module("_ptx")
sass = importlib.import_module("_sass")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """(out dir, exit status, rows read back from the CSV) of one quick run through the
    Python API that perf/report.py uses."""
    out = tmp_path_factory.mktemp("kernel_report")
    api_rows = kernel_report.run(str(out), quick=True, verbose=False)
    for key in ("kernel", "config", "arch", "layout", "registers", "spill_bytes",
                "shared_bytes", "load_bits", "store_bits"):
        assert key in api_rows[0]
    with open(out / "kernel_report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(api_rows)
    return out, kernel_report.exit_code(api_rows), rows


def test_outputs_exist(quick_report):
    out, code, rows = quick_report
    assert (out / "kernel_report.csv").stat().st_size > 0
    md = (out / "kernel_report.md").read_text()
    assert "| kernel |" in md and "spilling configs: 0" in md
    assert list(rows[0].keys()) == kernel_report.FIELDS
    kernels = {r["kernel"] for r in rows}
    assert kernels == {k[0] for k in kernel_report.KERNELS} | set(kernel_report.FUSED_KERNELS)
    assert {r["layout"] for r in rows} == {"nchw", "channels_last"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    assert {r["arch"] for r in rows} == {"sm_90"}
    # Two tiles per kernel (x2 WAVES for the reductions) + the default config, per
    # (layout, dtype); the single-pass kernel's two quick configs in 2 modes, one of them
    # (BLOCK_C = 1) in NCHW only.
    variants = sum(len(v) for v in kernel_report.FLAG_VARIANTS.values())
    assert len(rows) == (4 + 4 + 2 + 2 + 4) * 2 * 2 + 2 * 3 * 2 + variants
    assert sum(r["config"].startswith("default:") for r in rows) == 4 * 2 * 2


def test_time_budget_keeps_the_first_compiles(tmp_path):
    """Every config with a budget spent at once: the compiles already handed to the
    workers finish, the rest are cancelled and counted, those that ran are of the kinds
    that go first (default configs, flag variants, quick tiles, on sm_90), and the .md
    says the report is incomplete."""
    info = {}
    rows = kernel_report.run(str(tmp_path), verbose=False, budget_s=0, info=info)
    jobs = kernel_report._jobs(False, kernel_report.ARCHS, kernel_report.DTYPES)
    key = lambda r: (r["kernel"], r["config"], r["arch"], r["layout"], r["dtype"])
    first = {key(r) for j in jobs if kernel_report._first(j) and j["arch"] == 90
             for r in j["rows"]}
    ran = {key(r) for r in rows}
    assert ran and ran <= first, ran - first
    compiled = [j for j in jobs if key(j["row"]) in ran]
    assert len(compiled) + info["not_run"] == len(jobs)
    assert "Incomplete: " + str(info["not_run"]) in (tmp_path / "kernel_report.md").read_text()


def test_flag_variants_compile(quick_report):
    """Every constexpr branch the launchers can take compiles for sm_90 (the interpreter
    would not notice one that does not), also in quick mode."""
    _, _, rows = quick_report
    seen = {(r["kernel"], r["config"]) for r in rows if r["config"].startswith("variant:")}
    for label, variants in kernel_report.FLAG_VARIANTS.items():
        for flags in variants:
            name = "variant:" + ",".join(f"{k}={v}" for k, v in flags.items())
            assert (label, name) in seen
    assert not [r for r in rows if r["config"].startswith("variant:") and r["error"]]


def test_compiles_without_spills(quick_report):
    _, code, rows = quick_report
    errors = [(r["kernel"], r["config"], r["layout"], r["error"]) for r in rows if r["error"]]
    assert not errors, errors
    spills = [(r["kernel"], r["config"], r["spill_bytes"]) for r in rows
              if r["spill_bytes"] and int(r["spill_bytes"]) > 0]
    assert not spills, spills
    assert code == 0
    if kernel_report._cuobjdump() is not None:
        assert all(0 < int(r["registers"]) <= 255 for r in rows)


def test_bulk_accesses_are_128_bit(quick_report):
    _, _, rows = quick_report
    for r in rows:
        if r["config"].startswith("variant:"):
            continue  # compile checks (CONTIG=0 cannot be 128-bit)
        assert r["eligible"] == "True", r  # quick tiles are usable in both layouts
        assert r["vec128"] == "True", r
        assert int(r["load_bits"]) == 128 and int(r["n_bulk_loads"]) > 0
        if r["kernel"].startswith(("bn_apply_kernel", "bn_fused_kernel")):
            assert int(r["store_bits"]) == 128 and int(r["n_bulk_stores"]) > 0
        else:
            assert r["store_bits"] == ""  # the reductions write only per-channel results


def test_waves_share_one_binary(quick_report):
    """WAVES is host-side: the two WAVES variants of a tile report the same binary."""
    _, _, rows = quick_report
    by_tile: dict = {}
    for r in rows:
        if "_W" in r["config"] and not r["config"].startswith(("default:", "variant:")):
            tile = r["config"].split("_W")[0]
            key = (r["kernel"], tile, r["arch"], r["layout"], r["dtype"])
            by_tile.setdefault(key, set()).add((r["registers"], r["shared_bytes"]))
    differing = {key: v for key, v in by_tile.items() if len(v) != 1}
    assert by_tile and not differing, differing


# The split path carries every shape the single-pass kernel cannot hold: its kernels must
# leave the schedulers room (dependency stalls, other warps) at memory speed, so they may
# use at most this share of the issue budget (perf/_sass.py). The per-element Welford
# update the statistics kernel had used 1.8x the bf16 budget (27.7 per element).
SPLIT_PATH_ISSUE_SHARE = 0.75


@pytest.mark.skipif(kernel_report._cuobjdump() is None, reason="no cuobjdump in the triton wheel")
def test_split_path_keeps_up_with_memory(quick_report):
    """The reductions' tile loops in every config; the apply kernel, one tile per program
    (its per-program set-up weighs more on small tiles, which only the autotuner, timing
    them, may pick), in the default configs."""
    _, _, rows = quick_report
    checked = 0
    for r in rows:
        if r["kernel"].startswith("bn_fused_kernel") or r["config"].startswith("variant:"):
            continue
        if r["kernel"].startswith("bn_apply_kernel") and not r["config"].startswith("default:"):
            continue
        budget = sass.issue_budget(kernel_report.PASSES[r["kernel"]]
                                   * kernel_report.ELEM_BYTES[r["dtype"]])
        assert float(r["sass_per_elem"]) <= SPLIT_PATH_ISSUE_SHARE * budget, (r, budget)
        checked += 1
    assert checked == (5 + 5 + 1 + 1) * 2 * 2


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/              @!P0 BRA 0x70 ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   FADD R8, R4, R8 ;
        /*0050*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0060*/               @P1 BRA 0x30 ;
        /*0070*/                   STG.E desc[UR4][R2.64], R8 ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_main_loop():
    """The tile loop is the first backward branch's range (the final self-loop comes after);
    without a loop the whole body counts."""
    ins = sass.instructions(SASS)
    assert len(ins) == 9 and ins[0] == (0, "LDC R1, c[0x0][0x28]")
    assert [a for a, _ in sass.main_loop(ins)] == [0x30, 0x40, 0x50, 0x60]
    assert sass.sass_per_elem(SASS, 2) == 2.0
    no_loop = "\n".join(line for line in SASS.splitlines() if "@P1 BRA" not in line)
    assert len(sass.main_loop(sass.instructions(no_loop))) == 8
    assert round(sass.issue_budget(4)) == 31


@pytest.mark.skipif(kernel_report._cuobjdump() is None, reason="no cuobjdump in the triton wheel")
def test_sass_listings_are_cached(quick_report, tmp_path, monkeypatch):
    """A listing comes back from the cache without running cuobjdump, equal to the tool's;
    an unreadable cache file is replaced by the tool's listing."""
    import triton
    # a binary the quick report compiled (its workers write to Triton's cache)
    cubin = next(pathlib.Path(triton.knobs.cache.dir).glob("*/*.cubin")).read_bytes()
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    tool = kernel_report._cuobjdump()
    first = sass.disassemble(cubin, tool)
    assert sass.instructions(first)
    calls = []
    monkeypatch.setattr(sass.subprocess, "run", lambda *a, **k: calls.append(a))
    assert sass.disassemble(cubin, tool) == first and not calls
    monkeypatch.undo()
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    (cached,) = (tmp_path / "tritonbn_sass").glob("*.sass.gz")
    cached.write_bytes(b"not gzip")
    assert sass.disassemble(cubin, tool) == first


PTX = """
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u64 .ptr .global .align 1 k_param_1,
\t.param .u32 k_param_2
)
{
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b64 \t%rd2, [k_param_1];
\tld.param.b32 \t%r1, [k_param_2];
\tmul.wide.s32 \t%rd3, %r1, 4;
\tadd.s64 \t%rd4, %rd1, %rd3;
\tmov.b64 \t%rd5, %rd4;
$L__BB0_1:
\t@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd5 + 0 ];
\tadd.s64 \t%rd5, %rd6, 16;
\tadd.s64 \t%rd6, %rd5, 0;
\t@%p1 ld.global.b32 { %r6 }, [ %rd6 + 0 ];
\tadd.s64 \t%rd7, %rd2, %rd3;
\t@%p2 ld.global.nc.v2.b32 { %r7, %r8 }, [ %rd7 + 0 ];
\t@%p2 st.global.v2.b16 [ %rd7 + 0 ], { %rs1, %rs2 };
\tret;
}
"""


def test_ptx_taint_analysis():
    """Bulk accesses are the ones whose address derives from a big tensor's pointer, also
    through loop-carried registers; the rest (here k_param_1's) are per-channel."""
    res = ptx.analyse_ptx(PTX, ["x_ptr", "w_ptr", "n"], {"x_ptr", "w_ptr"},
                          bulk_loads=("x_ptr",), bulk_stores=("w_ptr",))
    assert res["n_bulk_loads"] == 2
    # x's main (widest) load is 128-bit; its extra scalar load does not decide load_bits.
    assert res["load_bits"] == 128 and res["load_bits_max"] == 128
    assert res["other_load_bits_max"] == 64
    assert res["store_bits"] == 32 and res["n_bulk_stores"] == 1
    assert res["vec128"] is False  # the 32-bit store
