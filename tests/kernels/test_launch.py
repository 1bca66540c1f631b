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

    monkeypatch.setattr(launch, "_plan", lambda *a: (launcher, (), {}))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    geom = make_geometry(torch.empty(2, 3, 4))
    for index in (1, 0, 1):
        launch._launch("bn_apply_kernel", geom, torch.device("cuda", index), 4, (), {})
    launch._launch("bn_apply_kernel", geom, torch.device("cpu"), 4, (), {})
    assert ran_on == [1, 0, 1, 0]
    assert current[0] == 0
