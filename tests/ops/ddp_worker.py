"""One rank of tests/ops/test_ddp.py: a small conv net with BatchNorms wrapped in
DistributedDataParallel over Gloo (CPU tensors, Triton interpreter, also on a GPU
machine), two SGD steps on this rank's slice of a batch shared by all ranks, once per
variant; saves each step's output, gradients and state.

    python tests/ops/ddp_worker.py CASE_FILE RANK
CASE_FILE (tests/ops/ranks.py's): x, g [steps, N, 3, H, W] fp32 (inputs, loss weights),
rows (rows per rank), lr.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import tritonbn  # noqa: E402
from tests.ops import ranks  # noqa: E402


def net() -> nn.Module:
    """conv -> BatchNorm -> ReLU -> conv -> BatchNorm (cumulative average), the same
    weights wherever it is built."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                         nn.BatchNorm2d(4, momentum=None))


VARIANTS = {
    "torch": net,
    "tritonbn": lambda: tritonbn.convert_model(net()),
    "tritonbn_fused_relu": lambda: tritonbn.convert_model(net(), fuse_relu=True),
}


def train(model: nn.Module, case: dict, part: slice) -> list[dict]:
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=case["lr"])
    steps = []
    for x, g in zip(case["x"], case["g"]):
        opt.zero_grad(set_to_none=True)
        y = ddp(x[part])
        (y * g[part]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        steps.append(dict(output=y.detach().clone(), grads=grads,
                          state={k: v.clone() for k, v in model.state_dict().items()}))
    return steps


def main(case_file: str, rank: int) -> None:
    case = torch.load(case_file)
    part = ranks.join(case, rank)
    results = {}
    for name, build in VARIANTS.items():
        model = build()
        results[name] = dict(layers=sorted({type(m).__module__ + "." + type(m).__name__
                                            for m in model.modules()}),
                             steps=train(model, case, part))
    ranks.save(case, rank, results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
