"""Two-process worker for tests/objectives/test_dino.py (not a test itself).

Usage, once per rank (see ``tests/losses/_dist_util.py``): ``python _dino_center_worker.py WORKDIR
WORLD_SIZE RANK``. Builds a small DINO, puts this rank's sum of teacher outputs from WORKDIR/inputs.pt
where a forward pass leaves it, runs the centre update and saves the centre to WORKDIR/rank{RANK}.pt.
"""

from __future__ import annotations

import torch

from lmssl import objectives
from lmssl.config import load_config
from tests.conftest import ROOT
from tests.losses._dist_util import process_group, worker_args


def main() -> None:
    workdir, world, rank = worker_args()
    with process_group(workdir, world, rank):
        inp = torch.load(workdir / "inputs.pt")
        cfg = load_config(ROOT / "recipes" / "dino_tiny.yaml",
                          ["model.dim=32", "model.n_layers=1", "model.n_heads=4", "dino.out_dim=64",
                           "dino.hidden_dim=32", "dino.bottleneck_dim=16"])
        model = objectives.build(cfg, None)
        model._center_sum, model._center_rows = inp["sums"][rank].clone(), inp["rows"]
        model.update_center(torch.zeros(()))
        torch.save({"center": model.center.clone()}, workdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
