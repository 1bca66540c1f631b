"""One rank of tests/ops/test_sync_batch_norm.py: runs tritonbn.SyncBatchNorm on its slice
of a batch shared by all ranks, over Gloo on CPU tensors through the Triton interpreter,
and saves what it computed.

    python tests/ops/sync_worker.py CASE_FILE RANK
CASE_FILE (tests/ops/ranks.py's): x, dy [N, C, ...] fp32, weight, bias, rows (rows per
rank), dtype, channels_last, momentum; optionally z (a residual like x) and relu (the
layer's fused ReLU).
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import tritonbn  # noqa: E402
from tests.ops import ranks  # noqa: E402


def main(case_file: str, rank: int) -> None:
    case = torch.load(case_file)
    part = ranks.join(case, rank)
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    x = case["x"][part].to(case["dtype"]).contiguous(memory_format=fmt).requires_grad_()
    dy = case["dy"][part].to(case["dtype"]).contiguous(memory_format=fmt)
    z = case.get("z")
    if z is not None:
        z = z[part].to(case["dtype"]).contiguous(memory_format=fmt).requires_grad_()
    residual = () if z is None else (z,)

    bn = tritonbn.SyncBatchNorm(x.shape[1], momentum=case["momentum"])
    bn.fused_relu = case.get("relu", False)
    with torch.no_grad():
        bn.weight.copy_(case["weight"])
        bn.bias.copy_(case["bias"])
    steps = []
    for _ in range(2):
        y = bn(x, *residual)
        (y * dy).sum().backward()
        steps.append(dict(output=y.detach(), grad_input=x.grad, grad_weight=bn.weight.grad,
                          grad_bias=bn.bias.grad, channels_last=y.is_contiguous(
                              memory_format=torch.channels_last),
                          grad_residual=None if z is None else z.grad))
        x.grad = bn.weight.grad = bn.bias.grad = None
        if z is not None:
            z.grad = None
    results = dict(steps=steps, running_mean=bn.running_mean.clone(),
                   running_var=bn.running_var.clone(),
                   num_batches_tracked=bn.num_batches_tracked.clone())
    bn.eval()
    with torch.no_grad():
        results["eval_output"] = bn(x, *residual)
    bn.train()
    # create_graph=True must raise, not give gradients without a graph
    try:
        torch.autograd.grad((bn(x, *residual) * dy).sum(), x, create_graph=True)
        results["double_backward"] = "no error"
    except RuntimeError as e:
        results["double_backward"] = str(e)
    ranks.save(case, rank, results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
