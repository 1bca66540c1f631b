"""Host (Python) time per call of a tritonbn module, with the kernel launches stubbed out.

CPU-side figure, no GPU needed: it measures what tritonbn's own layers (module, functional,
autograd, launchers) cost per call, next to torch's BatchNorm on the same tiny CPU input
(which includes torch's actual computation). Triton's own launch cost is not included: GPU
mode of perf/report.py measures the real per-call host time with the kernels.

    python perf/host_overhead.py [--calls 2000]
"""
import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the kernel path (stubbed below)
os.environ.setdefault("TRITONBN_AUTOTUNE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import tritonbn  # noqa: E402
from tritonbn.kernels import launch  # noqa: E402


class _NoKernel:
    """Stands in for a kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(module, x, calls: int) -> float:
    for _ in range(calls // 10):
        module(x)
    start = time.perf_counter()
    for _ in range(calls):
        module(x)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    calls = ap.parse_args().calls
    for name in launch.RAW:
        launch.RAW[name] = launch.TUNED[name] = _NoKernel()
    launch.clear_caches()
    x = torch.randn(2, 64, 4, 4)
    ours, ref = tritonbn.BatchNorm2d(64), torch.nn.BatchNorm2d(64)
    print("CPU-side host time per call, input 2x64x4x4 "
          "(tritonbn: kernels stubbed out; torch: computing on CPU)")
    # Training records autograd; evaluation runs under no_grad as inference does, and with
    # autograd on (parameters requiring grad), as in a validation loop without no_grad.
    for mode, grad in (("train", True), ("eval", False), ("eval", True)):
        ours.train(mode == "train")
        ref.train(mode == "train")
        with torch.set_grad_enabled(grad):
            label = f"{mode}, {'autograd' if grad else 'no_grad'}"
            print(f"  {label:15s} tritonbn {per_call_us(ours, x, calls):6.1f} us   "
                  f"torch {per_call_us(ref, x, calls):6.1f} us")

if __name__ == "__main__":
    main()
