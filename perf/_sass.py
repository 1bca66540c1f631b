"""SASS reading for perf/kernel_report.py: how many instructions a compiled kernel issues
per element of its tile, a CPU-side model of whether it can keep up with memory.

A kernel with a tile loop (the split reductions) is counted over its first loop, the tile
loop, which precedes the merge of the partials; a kernel without one (the apply and
single-pass kernels, one tile per program) over its whole body. Either count divided by
the elements each thread handles per tile is ``sass_per_elem``.

What it is for: an H200 issues one warp instruction per clock on each of its 132 x 4
schedulers, about 3.3e13 thread instructions per second at 1.98 GHz, and its copy
bandwidth moves about 4.3e12 bytes per second, so a kernel that moves B bytes per element
keeps memory busy only while it needs fewer than about 7.8 * B instructions per element
(31 for a statistics pass over fp32 x, 16 over bf16). A model, not a GPU measurement:
clocks, dual issue and latency hiding are not in it.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import tempfile

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACKWARD = re.compile(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)")

# An H200's issue rate and copy bandwidth (see the module docstring).
ISSUE_PER_S = 132 * 4 * 32 * 1.98e9
COPY_BYTES_PER_S = 4.3e12


def issue_budget(bytes_per_elem: float) -> float:
    """Thread instructions per element an H200 can issue while its memory moves
    ``bytes_per_elem`` bytes per element at copy bandwidth."""
    return ISSUE_PER_S * bytes_per_elem / COPY_BYTES_PER_S


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every instruction of a ``cuobjdump -sass`` listing."""
    out = []
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def main_loop(ins: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The first loop (from a backward branch's target to the branch), else everything."""
    index = {a: k for k, (a, _) in enumerate(ins)}
    loops = []
    for k, (addr, text) in enumerate(ins):
        m = _BACKWARD.search(text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
            loops.append((index[int(m.group(1), 16)], k))
    if not loops:
        return ins
    start, end = min(loops)
    return ins[start:end + 1]


def sass_per_elem(sass: str, elems_per_thread: float) -> float:
    return round(len(main_loop(instructions(sass))) / elems_per_thread, 1)


def disassemble(cubin: bytes, cuobjdump: str) -> str:
    """``cuobjdump -sass`` of ``cubin``. The tool takes about 0.5 s a call whatever the
    kernel, most of a quick report's time, so listings are kept in Triton's cache
    directory under a hash of the cubin and of the tool: a second report over the same
    binaries (the test suite runs two; a re-run after a change elsewhere) reads them back."""
    tool = os.stat(cuobjdump)
    key = hashlib.sha256(cubin + f"{cuobjdump}:{tool.st_size}:{tool.st_mtime_ns}".encode())
    path = os.path.join(_cache_dir(), key.hexdigest() + ".sass.gz")
    try:
        with gzip.open(path, "rt") as f:
            return f.read()
    except (OSError, EOFError):
        pass
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([cuobjdump, "-sass", f.name], check=True,
                                 capture_output=True, text=True).stdout
    # Written under a unique name, then renamed: concurrent workers never read a partial
    # file. A cache that cannot be written (read-only) only costs the next run the tool.
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=os.path.dirname(path), delete=False) as f:
            f.write(gzip.compress(listing.encode()))
        os.replace(f.name, path)
    except OSError:
        pass
    return listing


def _cache_dir() -> str:
    import triton
    return os.path.join(triton.knobs.cache.dir, "tritonbn_sass")
