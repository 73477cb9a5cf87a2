"""DistributedDataParallel over the SpliNet layers: 2 CPU processes with gloo (examples/ddp.py's
training loop). After a few steps both ranks hold identical parameters, and the first step's
averaged gradients equal a single process's gradients on the whole batch."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import ddp  # noqa: E402  (examples/ddp.py)


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = ddp.train(rank, world, steps=3, record=True)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_match_one(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, p in outs[0]["params"].items():
        assert torch.equal(p, outs[1]["params"][name]), f"{name} differs between ranks"
    single = ddp.train(0, 1, steps=1, record=True)  # the whole batch in one process
    for name, g in single["grads0"].items():
        torch.testing.assert_close(outs[0]["grads0"][name], g, rtol=1e-5, atol=1e-6)
