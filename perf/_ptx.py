"""PTX reading for perf/kernel_report.py: how wide the global loads and stores of a
compiled kernel are, told apart by which kernel argument their addresses derive from.

A bulk access (a tile of x, dy or y) is one whose address is computed from a big tensor's
pointer; per-channel reads (mean, weight, partial sums) derive from other pointers. The
origin of every register is found by forward taint propagation from the ``ld.param`` of
each pointer argument, iterated to a fixed point so that loop-carried addresses count.
"""
from __future__ import annotations

import re

_REG = re.compile(r"%[A-Za-z_][\w.]*")
_PARAM = re.compile(r"\[\s*(\w+_param_(\d+))\s*\]")
_TYPE_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16,
              "bf16": 16, "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64,
              "u64": 64, "s64": 64, "f64": 64, "b128": 128}


def _split_operands(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _instructions(ptx: str):
    """(opcode, operands) of every instruction in the kernel body."""
    body = ptx.split("{", 1)[1] if "{" in ptx else ptx
    for raw in body.splitlines():
        line = raw.split("//", 1)[0].strip().rstrip(";").strip()
        if not line or line[0] in ".{}$" or line.endswith(":"):
            continue
        if line.startswith("@"):
            line = line.split(None, 1)[1] if " " in line else ""
        parts = line.split(None, 1)
        if not parts:
            continue
        yield parts[0], _split_operands(parts[1]) if len(parts) > 1 else []


def _access_bits(opcode: str) -> int:
    mods = opcode.split(".")
    vec = 1
    bits = 0
    for m in mods:
        if re.fullmatch(r"v\d+", m):
            vec = int(m[1:])
        elif m in _TYPE_BITS:
            bits = _TYPE_BITS[m]
    return vec * bits


def analyse_ptx(ptx: str, param_names: list[str], pointer_names: set[str],
                bulk_loads, bulk_stores) -> dict:
    """Widths of the global loads / stores, split into bulk (addresses derived from a big
    tensor's pointer) and the rest, by forward taint propagation to a fixed point."""
    insts = list(_instructions(ptx))
    taint: dict[str, frozenset] = {}
    seeds = []
    for op, ops in insts:
        if op.startswith("ld.param") and len(ops) == 2:
            m = _PARAM.search(ops[1])
            if m:
                idx = int(m.group(2))
                if idx < len(param_names) and param_names[idx] in pointer_names:
                    seeds.append((ops[0], param_names[idx]))
    for reg, name in seeds:
        taint[reg] = taint.get(reg, frozenset()) | {name}
    no_dest = ("st.", "red.", "bar", "bra", "ret", "membar", "fence", "exit", "prefetch")
    changed = True
    while changed:
        changed = False
        for op, ops in insts:
            if not ops or op.startswith(no_dest) or op.startswith("ld.param"):
                continue
            dests = _REG.findall(ops[0])
            srcs = [r for o in ops[1:] for r in _REG.findall(o)]
            t = frozenset().union(*(taint.get(r, frozenset()) for r in srcs))
            if not t:
                continue
            for d in dests:
                old = taint.get(d, frozenset())
                if not t <= old:
                    taint[d] = old | t
                    changed = True

    def addr_taint(operand: str) -> frozenset:
        return frozenset().union(*(taint.get(r, frozenset()) for r in _REG.findall(operand)))

    loads, stores, other_loads = [], [], []
    per_tensor: dict[str, list[int]] = {}
    for op, ops in insts:
        if op.startswith("ld.global") and len(ops) >= 2:
            bits = _access_bits(op)
            big = addr_taint(ops[1]) & set(bulk_loads)
            (loads if big else other_loads).append(bits)
            for name in big:
                per_tensor.setdefault(name, []).append(bits)
        elif op.startswith("st.global") and ops:
            if addr_taint(ops[0]) & set(bulk_stores):
                stores.append(_access_bits(op))
    # The main load of a big tensor is its widest one (the tile load); single elements read
    # besides it, if any, do not decide the width.
    main_loads = [max(b) for b in per_tensor.values()]
    res = dict(load_bits=min(main_loads, default=None), load_bits_max=max(loads, default=None),
               store_bits=min(stores, default=None), store_bits_max=max(stores, default=None),
               other_load_bits_max=max(other_loads, default=None),
               n_bulk_loads=len(loads), n_bulk_stores=len(stores))
    res["vec128"] = bool(main_loads) and min(main_loads) >= 128 and (not bulk_stores or
                                                          (bool(stores) and min(stores) >= 128))
    return res
