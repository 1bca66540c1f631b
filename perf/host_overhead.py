"""Host (Python) time per call of a tritonbn module, with the kernel launches stubbed out.

CPU-side figure, no GPU needed: it measures what tritonbn's own layers (module, functional,
autograd, launchers) cost per call, next to torch's BatchNorm on the same tiny CPU input
(which includes torch's actual computation). Triton's own launch cost is not included: GPU
mode of perf/report.py measures the real per-call host time with the kernels.

    python perf/host_overhead.py [--calls 2000]   (best of 5 repeats of that many calls)
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


def per_call_us(step, calls: int, repeats: int = 5) -> float:
    """Best of ``repeats`` timings of ``calls`` calls of ``step()``: this figure is a floor,
    and the slower repeats measure other processes on the machine."""
    for _ in range(calls // 10):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


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
    # forward+backward: an input that requires grad, as inside a network (x.grad
    # accumulates, one in-place add per call for both)
    x_grad, dy = x.clone().requires_grad_(), torch.randn_like(x)
    # Training records autograd (forward alone, then with its backward); evaluation runs
    # under no_grad as inference does, and with autograd on (parameters requiring grad), as
    # in a validation loop without no_grad.
    for mode, grad, backward in (("train", True, False), ("train", True, True),
                                 ("eval", False, False), ("eval", True, False)):
        ours.train(mode == "train")
        ref.train(mode == "train")
        with torch.set_grad_enabled(grad):
            label = (f"{mode}, " + ("forward+backward" if backward else
                                    "autograd" if grad else "no_grad"))
            times = [per_call_us((lambda: m(x_grad).backward(dy)) if backward else (lambda: m(x)),
                                 calls) for m in (ours, ref)]
            print(f"  {label:23s} tritonbn {times[0]:6.1f} us   torch {times[1]:6.1f} us")


if __name__ == "__main__":
    main()
