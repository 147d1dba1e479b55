"""Two CPU processes (gloo) against one process on the whole batch.

Gradient convention checked here (see lmssl/losses/distributed.py): each rank returns
the mean NT-Xent over its own 2b rows, with negatives gathered from both ranks.
- mean over ranks of the rank losses == the single-process loss on the whole batch;
- the gradient a rank gets for its shard == W x the matching slice of the
  single-process gradient (it is the gradient of the *sum* of the rank losses);
- after DDP's averaging, parameter gradients == the single-process ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from _dist_util import run_workers
from lmssl.losses import nt_xent

WORLD = 2
N, D_IN, D = 8, 6, 5  # global pairs, input width, embedding width
TEMPERATURE = 0.3
WORKER = Path(__file__).with_name("_nt_xent_dist_worker.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Write the fixed batch, run the 2-process worker once, return inputs and outputs."""
    workdir = tmp_path_factory.mktemp("nt_xent_dist")
    g = torch.Generator().manual_seed(0)
    inp = {
        "x1": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
        "x2": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
        "weight": torch.randn(D, D_IN, generator=g, dtype=torch.float64) / D_IN**0.5,
        "bias": torch.randn(D, generator=g, dtype=torch.float64),
        "z1": torch.randn(N, D, generator=g, dtype=torch.float64),
        "z2": torch.randn(N, D, generator=g, dtype=torch.float64),
        "w": torch.randn(N, D, generator=g, dtype=torch.float64),
        "temperature": TEMPERATURE,
    }
    torch.save(inp, workdir / "inputs.pt")
    outs = run_workers(WORKER, workdir, WORLD)
    return inp, outs


def _shard(t: torch.Tensor, r: int) -> torch.Tensor:
    b = t.shape[0] // WORLD
    return t[r * b : (r + 1) * b]


def test_gather_with_grad_values_offsets_and_grads(run):
    inp, outs = run
    b = N // WORLD
    for r, out in enumerate(outs):
        assert out["rank_offset"] == r * b
        torch.testing.assert_close(out["gathered"], inp["z1"], rtol=0, atol=0)
        # Both ranks weight the gathered tensor by w, so d(sum of rank losses)/d shard = W * w[rows].
        torch.testing.assert_close(out["gather_grad"], WORLD * _shard(inp["w"], r))


def test_nt_xent_loss_matches_single_process(run):
    inp, outs = run
    z1, z2 = inp["z1"], inp["z2"]
    ref = nt_xent(z1, z2, TEMPERATURE)
    ref_rows = nt_xent(z1, z2, TEMPERATURE, reduction="none")  # (2N,): z1 rows, then z2 rows
    torch.testing.assert_close(torch.stack([o["loss"] for o in outs]).mean(), ref, rtol=1e-10, atol=1e-12)
    for r, out in enumerate(outs):
        expected_rows = torch.cat([_shard(ref_rows[:N], r), _shard(ref_rows[N:], r)])
        torch.testing.assert_close(out["rows"], expected_rows, rtol=1e-10, atol=1e-12)
        # Without gather each rank only sees its own negatives: a different, local loss.
        local = nt_xent(_shard(z1, r), _shard(z2, r), TEMPERATURE)
        torch.testing.assert_close(out["loss_no_gather"], local)
        assert not torch.allclose(out["loss_no_gather"], out["loss"])


def test_nt_xent_shard_gradients_are_world_times_single_process_slice(run):
    inp, outs = run
    z1 = inp["z1"].clone().requires_grad_(True)
    z2 = inp["z2"].clone().requires_grad_(True)
    g1, g2 = torch.autograd.grad(nt_xent(z1, z2, TEMPERATURE), (z1, z2))
    for r, out in enumerate(outs):
        torch.testing.assert_close(out["grad_z1"], WORLD * _shard(g1, r), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out["grad_z2"], WORLD * _shard(g2, r), rtol=1e-9, atol=1e-12)


def test_ddp_parameter_gradients_match_single_process(run):
    inp, outs = run
    model = nn.Linear(D_IN, D).double()
    with torch.no_grad():
        model.weight.copy_(inp["weight"])
        model.bias.copy_(inp["bias"])
    nt_xent(model(inp["x1"]), model(inp["x2"]), TEMPERATURE).backward()
    for out in outs:
        torch.testing.assert_close(out["ddp_weight_grad"], model.weight.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out["ddp_bias_grad"], model.bias.grad, rtol=1e-9, atol=1e-12)
