"""Small shared helpers: progress line, CSV / JSON writing, environment description."""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
import time


class Progress:
    """A progress line per step on stderr: [ 3/40]  0:12 elapsed  ~1:05 left  label."""

    def __init__(self, total: int, title: str):
        self.total, self.done, self.start = max(total, 1), 0, time.perf_counter()
        print(f"{title}: {total} steps", file=sys.stderr, flush=True)

    def step(self, label: str):
        self.done += 1
        el = time.perf_counter() - self.start
        left = el / self.done * (self.total - self.done)
        bar = "#" * int(20 * self.done / self.total)
        print(f"[{bar:<20}] {self.done:>3}/{self.total} {_mmss(el)} elapsed ~{_mmss(left)} "
              f"left  {label}", file=sys.stderr, flush=True)


def _mmss(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def clean(v):
    """JSON-safe value: NaN/inf -> None, tuples -> lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def write_csv(rows: list[dict], path: str) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, path)


def write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(obj), f, indent=1)
    os.replace(tmp, path)


def versions() -> dict:
    import torch
    import triton
    return dict(python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, platform=platform.platform(),
                cpu_count=os.cpu_count())


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def fmt(v, digits: int = 3) -> str:
    """Compact number for markdown tables ('-' for missing)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
