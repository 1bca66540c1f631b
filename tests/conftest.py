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
    # A beyond_single_pass case runs on the split path only: as shipped it would run the
    # same kernels again (kernel_path checks that).
    repeats = [item for item in items if item.get_closest_marker("beyond_single_pass")
               and getattr(item, "callspec", None)
               and item.callspec.params.get("kernel_path") == "single_pass"]
    if repeats:
        config.hook.pytest_deselected(items=repeats)
        dropped = set(repeats)
        items[:] = [item for item in items if item not in dropped]
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
def kernel_path(request, monkeypatch):
    """Runs a test twice: as shipped (the single-pass kernel serves every shape it fits,
    which is most small test shapes) and with TRITONBN_FUSED=0 (the split reductions serve
    every shape), so both kernel paths meet the same checks.

    A case marked ``beyond_single_pass`` (shapes the single-pass kernel cannot hold, run
    as shipped by the split kernels anyway) runs once, on the split path, and fails unless
    every phase it ran is one the single-pass kernel would have declined."""
    monkeypatch.setenv("TRITONBN_FUSED", "1" if request.param == "single_pass" else "0")
    if not request.node.get_closest_marker("beyond_single_pass"):
        yield request.param
        return
    import tritonbn.ops.batch_norm as ops
    from tritonbn.kernels import configs

    fits = []
    real = ops.use_fused

    def recording(geom):
        fits.append(configs.fused_fits(geom))
        return real(geom)

    monkeypatch.setattr(ops, "use_fused", recording)
    yield request.param
    assert fits and not any(fits), (
        f"marked beyond_single_pass, but the single-pass kernel fits {fits.count(True)} "
        f"of its {len(fits)} phases: remove the mark")


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
