"""Data-parallel training of a SpliNet classifier with torch's DistributedDataParallel.

Nothing here is specific to splinet_cuda: its layers are ordinary nn.Modules whose fused
kernels sit behind autograd Functions, so DDP's gradient all-reduce works on them as on
nn.Linear (no communication of its own). Run with torchrun, one process per device:

    torchrun --nproc_per_node 2 examples/ddp.py             # CPU processes, gloo
    torchrun --nproc_per_node 8 examples/ddp.py --steps 200  # one per GPU, nccl

Each rank trains on its shard of every batch; after each step all ranks hold the same
parameters (checked at the end).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(HERE))

import splinet_cuda as sc  # noqa: E402


def make_model(width: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    """Lift 2 -> width, a SpliNet layer (tanh, 20 Euler steps, 4 knot intervals, degree 2),
    a linear head: a Peaks-like classifier. The same seed gives the same initial model on
    every rank (DDP also broadcasts rank 0's parameters at construction)."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, width), sc.SplineODE(width, 4, 2, 20, learn_scale=True),
                             nn.Linear(width, classes))


def make_data(n: int = 64, classes: int = 3, seed: int = 1):
    """Points in [-3, 3]^2 labelled by which of `classes` bands of sin(x) + cos(y) they fall in."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen) * 6 - 3
    v = torch.sin(x[:, 0]) + torch.cos(x[:, 1])
    y = torch.bucketize(v, torch.linspace(-2, 2, classes + 1)[1:-1])
    return x, y


def train(rank: int, world: int, *, steps: int = 5, lr: float = 0.05, batch: int = 64, device: str = "cpu",
          record: bool = False) -> Dict[str, object]:
    """The training loop of one rank (the process group already initialised): every step, the
    rank's contiguous shard of the batch. Returns the final parameters and, with ``record``,
    the gradients of the first step (what DDP averaged)."""
    model = make_model().to(device)
    ddp = DDP(model) if dist.is_initialized() else model
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    x, y = make_data(batch)
    shard = slice(rank * batch // world, (rank + 1) * batch // world)
    xs, ys = x[shard].to(device), y[shard].to(device)
    out: Dict[str, object] = {}
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(xs), ys)
        loss.backward()
        if record and step == 0:
            out["grads0"] = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
        opt.step()
    out["params"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    out["loss"] = float(loss.detach())
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    out = train(rank, world, steps=a.steps, batch=a.batch, device=device)
    # Every rank holds the same parameters: compare a checksum.
    flat = torch.cat([v.flatten() for v in out["params"].values()]).to(device)
    sums = [torch.zeros(2, device=device) for _ in range(world)]
    dist.all_gather(sums, torch.stack([flat.sum(), flat.square().sum()]))
    same = all(torch.equal(s, sums[0]) for s in sums)
    if rank == 0:
        print(f"{world} ranks ({'nccl' if cuda else 'gloo'}), {a.steps} steps: loss {out['loss']:.4f}, "
              f"parameters identical on every rank: {same}")
    dist.destroy_process_group()
    if not same:
        raise SystemExit("parameters differ between ranks")
    return out


if __name__ == "__main__":
    main()
