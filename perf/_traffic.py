"""Memory traffic of tritonbn's kernels, counted in the Triton interpreter.

The interpreter (TRITON_INTERPRET=1) executes every ``tl.load`` / ``tl.store`` through
``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` (unmasked accesses are
routed there too) and every atomic through ``create_atomic_rmw`` / ``create_atomic_cas``.
``TrafficCounter`` wraps those methods of the interpreter's builder, plus
``GridExecutor.__call__`` (one call = one kernel launch), and counts for every access the
active (unmasked) lanes times the element size, attributed to the kernel argument whose
memory the address falls into (``x_ptr``, ``out_ptr``, ``partial_ptr`` ...).

These are the bytes the kernels ask for, per program as written, not what a GPU's caches
make of them: a per-channel vector read by every program is counted once per program.
"""
from __future__ import annotations

import collections
import contextlib

import numpy as np

# Kernel arguments that are full N*C*L tensors: the traffic that sets BatchNorm's speed
# (z, dz: a fused residual and its gradient).
BIG_ARGS = ("x_ptr", "dy_ptr", "out_ptr", "z_ptr", "dz_ptr")


def _span(t) -> tuple[int, int]:
    """[start, end) byte addresses covered by a strided tensor."""
    extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return start, start + extent * t.element_size()


class TrafficCounter:
    """Context manager: counts launches and bytes of every interpreted kernel call.

    ``launches``: list of (kernel name, grid); ``bytes``: Counter keyed by
    (kernel, arg name, 'load'|'store'|'atomic') -> bytes."""

    def __init__(self):
        self.launches: list[tuple[str, tuple[int, ...]]] = []
        self.bytes: collections.Counter = collections.Counter()
        self._kernel = "?"
        self._starts = np.zeros(0, dtype=np.uint64)
        self._ends = np.zeros(0, dtype=np.uint64)
        self._names: list[str] = []
        self._stack = contextlib.ExitStack()

    # -- hooks -------------------------------------------------------------------------
    def _set_args(self, fn, arg_names, args, kwargs):
        spans = []
        for name, val in list(zip(arg_names, args)) + list(kwargs.items()):
            if hasattr(val, "data_ptr") and hasattr(val, "numel") and val.numel() > 0:
                spans.append((*_span(val), name))
        spans.sort()
        self._starts = np.array([s[0] for s in spans], dtype=np.uint64)
        self._ends = np.array([s[1] for s in spans], dtype=np.uint64)
        self._names = [s[2] for s in spans]
        self._kernel = getattr(fn, "__name__", "?")

    def _count(self, ptrs, mask, kind: str):
        addr = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            active = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))
            addr = addr[active.reshape(-1)]
        if addr.size == 0:
            return
        elem = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        addr = addr.astype(np.uint64)
        idx = np.searchsorted(self._starts, addr, side="right").astype(np.int64) - 1
        ok = idx >= 0
        ok[ok] &= addr[ok] < self._ends[idx[ok]]
        for i, n in zip(*np.unique(idx[ok], return_counts=True)):
            self.bytes[(self._kernel, self._names[i], kind)] += int(n) * elem
        unknown = int((~ok).sum())
        if unknown:
            self.bytes[(self._kernel, "?", kind)] += unknown * elem

    # -- context -----------------------------------------------------------------------
    def __enter__(self):
        from triton.runtime import interpreter as I

        builder_cls = I.InterpreterBuilder
        counter = self
        orig_load = builder_cls.create_masked_load
        orig_store = builder_cls.create_masked_store
        orig_rmw = builder_cls.create_atomic_rmw
        orig_cas = builder_cls.create_atomic_cas
        orig_call = I.GridExecutor.__call__
        orig_grid = builder_cls.set_grid_dim

        # The hooks pass every further argument through untouched: their number changed
        # between Triton releases (3.6 has cache_modifier and eviction_policy where 3.9 has
        # one cache_policy), and only the pointers and the mask matter here.
        def load(b, ptrs, mask, *rest):
            counter._count(ptrs, mask, "load")
            return orig_load(b, ptrs, mask, *rest)

        def store(b, ptrs, value, mask, *rest):
            counter._count(ptrs, mask, "store")
            return orig_store(b, ptrs, value, mask, *rest)

        def rmw(b, rmwOp, ptr, val, mask, *rest):
            counter._count(ptr, mask, "atomic")
            return orig_rmw(b, rmwOp, ptr, val, mask, *rest)

        def cas(b, ptr, *rest):
            counter._count(ptr, None, "atomic")
            return orig_cas(b, ptr, *rest)

        def set_grid_dim(b, nx, ny, nz):
            counter.launches.append((counter._kernel, (nx, ny, nz)))
            return orig_grid(b, nx, ny, nz)

        def call(ex, *args, **kwargs):
            counter._set_args(ex.fn, ex.arg_names, args, kwargs)
            return orig_call(ex, *args, **kwargs)

        patches = [(builder_cls, "create_masked_load", load),
                   (builder_cls, "create_masked_store", store),
                   (builder_cls, "create_atomic_rmw", rmw),
                   (builder_cls, "create_atomic_cas", cas),
                   (builder_cls, "set_grid_dim", set_grid_dim),
                   (I.GridExecutor, "__call__", call)]
        for owner, name, new in patches:
            old = owner.__dict__[name]
            setattr(owner, name, new)
            self._stack.callback(setattr, owner, name, old)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    # -- summaries ---------------------------------------------------------------------
    def summary(self, numel: int) -> dict:
        """Bytes per element of the input: big tensors (x, y, dy, dx) and the rest."""
        big_r = sum(v for (k, a, kind), v in self.bytes.items() if a in BIG_ARGS and kind == "load")
        big_w = sum(v for (k, a, kind), v in self.bytes.items() if a in BIG_ARGS and kind == "store")
        small = sum(v for (k, a, kind), v in self.bytes.items() if a not in BIG_ARGS)
        unknown = sum(v for (k, a, kind), v in self.bytes.items() if a == "?")
        kernels = collections.Counter(name for name, _ in self.launches)
        return dict(
            launches=len(self.launches),
            launch_kernels=";".join(f"{k}x{n}" for k, n in kernels.items()),
            grids=";".join(f"{k}{list(g[:2]) if g[1] > 1 else [g[0]]}" for k, g in self.launches),
            big_read_bytes=big_r, big_write_bytes=big_w, small_bytes=small,
            unattributed_bytes=unknown,
            bytes_per_element=(big_r + big_w) / numel,
            small_bytes_per_element=small / numel,
        )

    def by_argument(self) -> dict[str, int]:
        out = collections.Counter()
        for (k, a, kind), v in self.bytes.items():
            out[f"{k}.{a}.{kind}"] += v
        return dict(out)
