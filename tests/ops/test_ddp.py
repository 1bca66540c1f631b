"""tritonbn's layers inside DistributedDataParallel: two ranks over Gloo
(tests/ops/ddp_worker.py: CPU tensors through the Triton interpreter, also on a GPU
machine), uneven slices of one batch, two SGD steps of a conv net with two BatchNorms.

BatchNorm2d, plain and with the fused ReLU, must train as torch's BatchNorm2d does under
DDP on the same rank: same outputs, all-reduced gradients, running statistics (DDP
broadcasts rank 0's buffers before each forward) and num_batches_tracked; and the ranks
must hold the same gradients, bit for bit, so DDP's all-reduce saw every parameter's
gradient, the kernels' backward included.

SyncBatchNorm inside DDP is not run: DDP refuses SyncBatchNorm layers in CPU modules
(torch's own check), and no machine here has two GPUs. tests/ops/test_sync_batch_norm.py
runs tritonbn.SyncBatchNorm's collectives over Gloo without DDP.
"""
import torch

from tests.ops.ranks import run_ranks

ROWS = [3, 5]
STEPS = 2
# fp32 against torch's fp32 layers: the differences seen here are about 1e-6; a gradient
# that missed DDP's average (half of it, or the other rank's) is off by far more.
TOL = dict(rtol=1e-4, atol=1e-4)


def _run_ranks(tmp_path) -> list[dict]:
    n = sum(ROWS)
    data = dict(x=torch.randn(STEPS, n, 3, 6, 6) * 2 + 1, g=torch.randn(STEPS, n, 4, 6, 6),
                rows=ROWS, lr=0.1)
    return run_ranks("ddp_worker.py", data, tmp_path)


def _assert_close(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    for k in ref:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], ref[k]), (what, k, got[k], ref[k])
        else:
            torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m: f"{what} {k}: {m}")


def test_layers_train_under_ddp_as_torch_layers(tmp_path):
    ranks = _run_ranks(tmp_path)
    torch_layer = "torch.nn.modules.batchnorm.BatchNorm2d"
    for rank in ranks:
        assert torch_layer in rank["torch"]["layers"]
        for name in ("tritonbn", "tritonbn_fused_relu"):
            assert "tritonbn.modules.BatchNorm2d" in rank[name]["layers"]
            assert torch_layer not in rank[name]["layers"]
            for s, (got, ref) in enumerate(zip(rank[name]["steps"], rank["torch"]["steps"])):
                what = f"{name} step {s}"
                torch.testing.assert_close(got["output"], ref["output"], **TOL, msg=what)
                _assert_close(got["grads"], ref["grads"], what)
                _assert_close(got["state"], ref["state"], what)
    for name in ranks[0]:
        for s in range(STEPS):
            for k, grad in ranks[0][name]["steps"][s]["grads"].items():
                assert torch.equal(grad, ranks[1][name]["steps"][s]["grads"][k]), (name, s, k)
