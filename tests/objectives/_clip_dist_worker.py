"""Two-process worker for tests/objectives/test_clip.py (not a test itself).

Usage, once per rank (see ``tests/losses/_dist_util.py``): ``python _clip_dist_worker.py WORKDIR
WORLD_SIZE RANK``. Builds the test's small CLIP (same seed on every rank, so the same weights),
wraps it in DDP, runs the training forward (the gathered loss) on this rank's shard of the batch in
WORKDIR/inputs.pt, backpropagates, and saves the loss, the accuracies and every parameter gradient
(averaged over ranks by DDP) to WORKDIR/rank{RANK}.pt.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from tests.losses._dist_util import process_group, worker_args
from tests.objectives.test_clip import small_clip


def main() -> None:
    workdir, world, rank = worker_args()
    with process_group(workdir, world, rank):
        inp = torch.load(workdir / "inputs.pt")
        model = small_clip().train()
        b = inp["images"].shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        batch = {k: v[rows] for k, v in inp.items()}
        ddp = DistributedDataParallel(model)
        loss, metrics = ddp(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "metrics": {k: v.detach() for k, v in metrics.items()}, "grads": grads},
                   workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
