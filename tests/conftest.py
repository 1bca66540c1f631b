"""Test set-up shared by the whole suite.

One suite, two back-ends: on a machine with a CUDA GPU the tests run the compiled Triton
kernels on the GPU; without one, TRITON_INTERPRET=1 is set here, before anything imports
triton, and the same tests run the kernels through the Triton interpreter on CPU tensors.
Autotuning is off by default (the fixed default configs: quick and deterministic); the
autotuning tests switch it on themselves.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITONBN_AUTOTUNE", "0")

import tritonbn  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where the kernels run: 'cuda' on a GPU runner, 'cpu' (Triton interpreter) otherwise."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["single_pass", "split"])
def kernel_path(request, monkeypatch) -> str:
    """Runs a test twice: as shipped (the single-pass kernel serves every shape it fits,
    which is most small test shapes) and with TRITONBN_FUSED=0 (the split reductions serve
    every shape), so both kernel paths meet the same checks."""
    monkeypatch.setenv("TRITONBN_FUSED", "1" if request.param == "single_pass" else "0")
    return request.param


@pytest.fixture
def kernel_launches(monkeypatch) -> dict:
    """Counts kernel launches by kernel name (launch._launch), for tests that check which
    kernels ran."""
    import tritonbn.kernels.launch as launch

    counts: dict[str, int] = {}
    real = launch._launch

    def counting(name, *args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return real(name, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", counting)
    return counts
