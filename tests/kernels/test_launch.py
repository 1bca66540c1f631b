"""Launch plumbing that the kernels' numerics do not show (tests/kernels/test_configs.py
covers the configs, the autotuner and the arrival counters)."""
from __future__ import annotations

import contextlib

import torch

from tritonbn.kernels import launch
from tritonbn.kernels.geometry import make_geometry


def test_launch_switches_to_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: _launch makes the tensors' device
    current for the launch when it is not. CUDA is stubbed here, so this runs on CPU; the
    real thing is tests/test_gpu_large.py::test_input_on_a_device_that_is_not_current
    (two GPUs)."""
    current = [0]
    ran_on = []

    @contextlib.contextmanager
    def device_guard(device):
        saved, current[0] = current[0], torch.device(device).index
        try:
            yield
        finally:
            current[0] = saved

    def launcher(*args, **kwargs):
        ran_on.append(current[0])

    monkeypatch.setattr(launch, "_plan", lambda *a: (launcher, (), {}, None))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    geom = make_geometry(torch.empty(2, 3, 4))
    for index in (1, 0, 1):
        launch._launch("bn_apply_kernel", geom, torch.device("cuda", index), 4, (), {})
    launch._launch("bn_apply_kernel", geom, torch.device("cpu"), 4, (), {})
    assert ran_on == [1, 0, 1, 0]
    assert current[0] == 0


def test_autotuner_consulted_once_per_plan_and_dtypes(device, monkeypatch):
    """With autotuning on, a plan's first launch goes through the autotuner; later launches
    with the same argument dtypes launch the plain kernel with the config it chose (same
    results, bit for bit), and other dtypes (fp16 and bf16 have one element size) go
    through the autotuner again."""
    import tritonbn

    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    tuner, kernel = launch.TUNED["bn_apply_kernel"], launch.RAW["bn_apply_kernel"]
    tuner_runs, kernel_kwargs = [], []
    tuner_run, kernel_run = tuner.run, kernel.run

    def counted_tuner_run(*args, **kwargs):
        tuner_runs.append(1)
        return tuner_run(*args, **kwargs)

    def recorded_kernel_run(*args, **kwargs):
        kernel_kwargs.append(kwargs)
        return kernel_run(*args, **kwargs)

    monkeypatch.setattr(tuner, "run", counted_tuner_run)
    monkeypatch.setattr(kernel, "run", recorded_kernel_run)
    launch.clear_caches()
    try:
        C = 8
        w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
        rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(4, C, 6, 5, device=device, dtype=dtype)
            first = tritonbn.batch_norm(x, rm, rv, w, b)  # evaluation: one apply launch
            assert len(tuner_runs) == 1, dtype
            chosen = dict(tuner.best_config.all_kwargs())
            tuner_runs.clear()
            kernel_kwargs.clear()
            for _ in range(2):
                assert torch.equal(tritonbn.batch_norm(x, rm, rv, w, b), first)
            assert tuner_runs == [] and len(kernel_kwargs) == 2, dtype
            for kwargs in kernel_kwargs:
                assert {k: kwargs[k] for k in chosen} == chosen
    finally:
        launch.clear_caches()
