"""Two-process worker for tests/losses/test_vicreg_distributed.py (not a test itself).

Usage, once per rank (see ``_dist_util``): ``python _vicreg_dist_worker.py WORKDIR WORLD_SIZE RANK``.
Takes this rank's shard of the batch in WORKDIR/inputs.pt and saves to WORKDIR/rank{RANK}.pt:
VICReg on embedding shards (loss, terms, shard gradients, the loss without gather), VICReg
through a DDP-wrapped linear encoder (parameter gradients), and BYOL through a DDP-wrapped
online encoder with a fixed target encoder (loss, parameter gradients).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _dist_util import process_group, worker_args
from lmssl.losses import byol_loss, vicreg_loss


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def main() -> None:
    workdir, world, rank = worker_args()
    with process_group(workdir, world, rank):
        inp = torch.load(workdir / "inputs.pt")
        b = inp["z1"].shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        out: dict[str, object] = {}

        # 1. VICReg on embedding shards: gathered variance/covariance, local invariance.
        z1 = inp["z1"][rows].clone().requires_grad_(True)
        z2 = inp["z2"][rows].clone().requires_grad_(True)
        loss, terms = vicreg_loss(z1, z2)
        out["loss"], out["terms"] = loss.detach(), terms
        out["grad_z1"], out["grad_z2"] = torch.autograd.grad(loss, (z1, z2))
        out["loss_no_gather"] = vicreg_loss(z1, z2, gather=False)[0].detach()

        # 2. VICReg through a linear encoder under DDP: one forward on both views.
        model = _linear(inp["weight"], inp["bias"])
        ddp = DistributedDataParallel(model)
        p1, p2 = ddp(torch.cat([inp["x1"][rows], inp["x2"][rows]])).chunk(2)  # (b, D) each
        vicreg_loss(p1, p2)[0].backward()
        out["ddp_weight_grad"] = model.weight.grad.clone()
        out["ddp_bias_grad"] = model.bias.grad.clone()

        # 3. BYOL: online encoder under DDP, a fixed (EMA-like) target without gradients.
        online = _linear(inp["weight"], inp["bias"])
        target = _linear(inp["target_weight"], inp["target_bias"])
        ddp_online = DistributedDataParallel(online)
        x = torch.cat([inp["x1"][rows], inp["x2"][rows]])  # (2b, D_IN)
        q1, q2 = ddp_online(x).chunk(2)
        with torch.no_grad():
            t1, t2 = target(x).chunk(2)
        byol = byol_loss(q1, q2, t1, t2)
        byol.backward()
        out["byol_loss"] = byol.detach()
        out["byol_weight_grad"] = online.weight.grad.clone()
        out["byol_bias_grad"] = online.bias.grad.clone()

        torch.save(out, workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
