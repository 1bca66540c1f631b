"""Multi-process tests over Gloo on CPU tensors (the Triton interpreter), also run on a GPU
machine: the test starts one worker process per rank on a case file, each worker joins the
group and takes its rows of the batch all ranks share."""
import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_ranks(worker: str, data: dict, tmp_path) -> list[dict]:
    """Runs tests/ops/``worker`` once per rank (``data["rows"]``: the batch rows of each)
    on ``data`` plus the rendezvous and output paths; returns what each rank saved."""
    world = len(data["rows"])
    case_file = str(tmp_path / "case.pt")
    torch.save(dict(data, init=f"file://{tmp_path}/rendezvous", out=str(tmp_path)), case_file)
    env = dict(os.environ, PYTHONPATH=REPO, TRITON_INTERPRET="1")
    script = os.path.join(REPO, "tests", "ops", worker)
    procs = [subprocess.Popen([sys.executable, script, case_file, str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def join(case: dict, rank: int) -> slice:
    """In a worker: joins the Gloo group of ``case``'s ranks and returns this rank's rows
    of the shared batch."""
    rows = case["rows"]
    dist.init_process_group("gloo", init_method=case["init"], rank=rank,
                            world_size=len(rows), timeout=timedelta(seconds=120))
    begin = sum(rows[:rank])
    return slice(begin, begin + rows[rank])


def save(case: dict, rank: int, results: dict) -> None:
    """In a worker: saves ``results`` for run_ranks and leaves the group."""
    torch.save(results, os.path.join(case["out"], f"rank{rank}.pt"))
    dist.destroy_process_group()
