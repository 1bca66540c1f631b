"""Host (Python) time per call of a tritonbn module, the kernels' own run stubbed out.

CPU-side figures, no GPU needed. Autotuning is on, as by default; each kernel's ``run``
(compiling and launching on a GPU, interpreting on CPU) does nothing. So the figures are
what tritonbn's layers (module, functional, autograd, launchers) and triton.autotune's
dispatch cost per call. Next to them:

* the same with every launch sent through triton.autotune, which rebuilds its key from
  every argument each time (what launch._plan's memory of the autotuner's choice saves);
* torch's BatchNorm on the same tiny CPU input, which includes torch's actual computation.

Triton's own launch (argument binding, the driver call) is not included: GPU mode of
perf/report.py measures the real per-call host time.

    python perf/host_overhead.py [--calls 2000]   (best of 5 repeats of that many calls)
"""
import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the kernel path (stubbed below)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import tritonbn  # noqa: E402
from tritonbn.kernels import launch  # noqa: E402


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


REMEMBER = launch._remember_choice


def through_autotuner_every_time(on: bool) -> None:
    """Whether launches forget the autotuner's choice (launch._remember_choice) and ask it
    again each time."""
    launch._remember_choice = (lambda *args: None) if on else REMEMBER
    launch.clear_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    calls = ap.parse_args().calls
    for kernel in launch.RAW.values():  # kernel[grid] and the autotuners call kernel.run
        kernel.run = lambda *args, **kwargs: None
    launch.clear_caches()
    x = torch.randn(2, 64, 4, 4)
    ours, ref = tritonbn.BatchNorm2d(64), torch.nn.BatchNorm2d(64)
    # forward+backward: an input that requires grad, as inside a network (x.grad
    # accumulates, one in-place add per call for both)
    x_grad, dy = x.clone().requires_grad_(), torch.randn_like(x)
    print("CPU-side host time per call, input 2x64x4x4 (tritonbn: kernels' run stubbed out, "
          "autotuning on; torch: computing on CPU)")
    print(f"  {'call':23s} {'tritonbn':>10s} {'every launch via autotune':>26s} {'torch':>9s}")
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
            times = []
            for m, every_time in ((ours, False), (ours, True), (ref, False)):
                through_autotuner_every_time(every_time)
                step = (lambda: m(x_grad).backward(dy)) if backward else (lambda: m(x))
                times.append(per_call_us(step, calls))
            through_autotuner_every_time(False)
            print(f"  {label:23s} {times[0]:7.1f} us {times[1]:23.1f} us {times[2]:6.1f} us")


if __name__ == "__main__":
    main()
