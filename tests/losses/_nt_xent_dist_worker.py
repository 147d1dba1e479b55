"""Two-process worker for tests/losses/test_losses_distributed.py (not a test itself).

Usage, once per rank (the test starts WORLD_SIZE of them, like torchrun would):
    python _nt_xent_dist_worker.py WORKDIR WORLD_SIZE RANK

Reads WORKDIR/inputs.pt (written by the test), joins a CPU gloo process group through
the file store WORKDIR/store, takes this rank's shard of the batch, and writes what it computed to
WORKDIR/rank{RANK}.pt for the test to compare with one process. Separate interpreters
rather than forked children: fork after torch has started its thread pools can hang.
"""

from __future__ import annotations

import faulthandler
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmssl.losses import gather_with_grad, nt_xent, nt_xent_with_accuracy, rank_offset


def _run(rank: int, world: int, workdir: str) -> None:
    faulthandler.dump_traceback_later(60, exit=True)  # a hang prints its stack, then exits
    torch.set_num_threads(1)
    # a file store, not a TCP one: no rank hosts it, so no rank's exit can pull it from under another
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(workdir) / 'store'}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60)
    )
    try:
        inp = torch.load(Path(workdir) / "inputs.pt")
        n = inp["z1"].shape[0]
        b = n // world
        rows = slice(rank * b, (rank + 1) * b)
        t = inp["temperature"]
        out: dict[str, object] = {"rank_offset": rank_offset(b)}

        # 1. gather_with_grad itself: every rank applies the same weighting w to the
        #    gathered tensor, so the summed-loss gradient on the shard is world * w[rows].
        x = inp["z1"][rows].clone().requires_grad_(True)
        gathered = gather_with_grad(x)
        (out["gather_grad"],) = torch.autograd.grad((gathered * inp["w"]).sum(), x)
        out["gathered"] = gathered.detach()

        # 2. nt_xent on embedding shards: loss, per-row losses, accuracy, shard gradients.
        z1 = inp["z1"][rows].clone().requires_grad_(True)
        z2 = inp["z2"][rows].clone().requires_grad_(True)
        loss, acc = nt_xent_with_accuracy(z1, z2, t, gather=True)
        out["loss"], out["accuracy"] = loss.detach(), acc
        out["grad_z1"], out["grad_z2"] = torch.autograd.grad(loss, (z1, z2))
        out["rows"] = nt_xent(z1, z2, t, reduction="none").detach()
        out["loss_no_gather"] = nt_xent(z1, z2, t, gather=False).detach()

        # 3. Real DDP over a linear encoder: one forward on both views (as SimCLR does),
        #    DDP averages parameter gradients across ranks during backward.
        model = nn.Linear(inp["weight"].shape[1], inp["weight"].shape[0]).double()
        with torch.no_grad():
            model.weight.copy_(inp["weight"])
            model.bias.copy_(inp["bias"])
        ddp = DistributedDataParallel(model)
        z = ddp(torch.cat([inp["x1"][rows], inp["x2"][rows]]))  # (2b, D)
        p1, p2 = z.chunk(2)
        nt_xent(p1, p2, t).backward()
        out["ddp_weight_grad"] = model.weight.grad.clone()
        out["ddp_bias_grad"] = model.bias.grad.clone()

        torch.save(out, Path(workdir) / f"rank{rank}.pt")
        dist.barrier()  # both ranks done with every collective before either tears down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    workdir, world, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _run(rank, world, workdir)
