"""VICReg and BYOL with two CPU processes (gloo) against one process on the whole batch.

Gradient convention checked here (derivation in lmssl/losses/vicreg.py): each rank
computes the variance and covariance on the embeddings gathered from both ranks and the
invariance on its own pairs.
- mean over ranks of the rank losses == the single-process loss; the variance and
  covariance terms are the single-process ones on every rank;
- the gradient a rank gets for its shard == W x the matching slice of the
  single-process gradient, for the gathered terms and the local invariance alike;
- after DDP's averaging, parameter gradients == the single-process ones.
BYOL needs no gather: the mean of the per-rank means is the global mean, and DDP's
average gives the single-process parameter gradients.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from _dist_util import run_workers
from lmssl.losses import byol_loss, vicreg_loss

WORLD = 2
N, D_IN, D = 8, 6, 5  # global pairs, input width, embedding width
WORKER = Path(__file__).with_name("_vicreg_dist_worker.py")
TOL = dict(rtol=1e-10, atol=1e-12)
# Column scales on both sides of VICReg's gamma = 1, so the variance hinge is active on some
# dimensions and idle on others (the test then covers the variance gradient too).
SCALES = torch.tensor([0.3, 0.5, 2.0, 3.0, 0.6], dtype=torch.float64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Write the fixed batch, run the 2-process worker once, return inputs and outputs."""
    workdir = tmp_path_factory.mktemp("vicreg_dist")
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    z1 = randn(N, D) * SCALES
    inp = {
        "x1": randn(N, D_IN),
        "x2": randn(N, D_IN),
        "weight": randn(D, D_IN) / D_IN**0.5 * SCALES[:, None],
        "bias": randn(D),
        "target_weight": randn(D, D_IN) / D_IN**0.5,
        "target_bias": randn(D),
        "z1": z1,
        "z2": z1 + 0.5 * randn(N, D) * SCALES,
    }
    torch.save(inp, workdir / "inputs.pt")
    return inp, run_workers(WORKER, workdir, WORLD)


def _shard(t: torch.Tensor, r: int) -> torch.Tensor:
    b = t.shape[0] // WORLD
    return t[r * b : (r + 1) * b]


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(D_IN, D).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def test_vicreg_loss_and_terms_match_single_process(run):
    inp, outs = run
    z1, z2 = inp["z1"], inp["z2"]
    ref, ref_terms = vicreg_loss(z1, z2)
    std = torch.cat([z1, z2]).std(0)
    assert (std < 1).any() and (std > 1).any()  # the hinge is active on some dimensions only
    torch.testing.assert_close(torch.stack([o["loss"] for o in outs]).mean(), ref, **TOL)
    torch.testing.assert_close(torch.stack([o["terms"]["invariance"] for o in outs]).mean(),
                               ref_terms["invariance"], **TOL)
    for r, out in enumerate(outs):
        # Batch statistics over the global batch: the same values on every rank.
        torch.testing.assert_close(out["terms"]["variance"], ref_terms["variance"], **TOL)
        torch.testing.assert_close(out["terms"]["covariance"], ref_terms["covariance"], **TOL)
        torch.testing.assert_close(out["terms"]["invariance"],
                                   vicreg_loss(_shard(z1, r), _shard(z2, r))[1]["invariance"], **TOL)
        # Without gather each rank takes the statistics over its own 4 rows: a different loss.
        local = vicreg_loss(_shard(z1, r), _shard(z2, r), gather=False)[0]
        torch.testing.assert_close(out["loss_no_gather"], local, **TOL)
        assert not torch.allclose(out["loss_no_gather"], out["loss"])


def test_vicreg_shard_gradients_are_world_times_single_process_slice(run):
    inp, outs = run
    z1 = inp["z1"].clone().requires_grad_(True)
    z2 = inp["z2"].clone().requires_grad_(True)
    g1, g2 = torch.autograd.grad(vicreg_loss(z1, z2)[0], (z1, z2))
    for r, out in enumerate(outs):
        torch.testing.assert_close(out["grad_z1"], WORLD * _shard(g1, r), **TOL)
        torch.testing.assert_close(out["grad_z2"], WORLD * _shard(g2, r), **TOL)


def test_vicreg_ddp_parameter_gradients_match_single_process(run):
    inp, outs = run
    model = _linear(inp["weight"], inp["bias"])
    p1, p2 = model(inp["x1"]), model(inp["x2"])
    std = torch.cat([p1, p2]).detach().std(0)
    assert (std < 1).any() and (std > 1).any()
    vicreg_loss(p1, p2)[0].backward()
    for out in outs:
        torch.testing.assert_close(out["ddp_weight_grad"], model.weight.grad, **TOL)
        torch.testing.assert_close(out["ddp_bias_grad"], model.bias.grad, **TOL)


def test_byol_ddp_parameter_gradients_match_single_process(run):
    inp, outs = run
    online = _linear(inp["weight"], inp["bias"])
    target = _linear(inp["target_weight"], inp["target_bias"])
    with torch.no_grad():
        t1, t2 = target(inp["x1"]), target(inp["x2"])
    ref = byol_loss(online(inp["x1"]), online(inp["x2"]), t1, t2)
    ref.backward()
    torch.testing.assert_close(torch.stack([o["byol_loss"] for o in outs]).mean(), ref.detach(), **TOL)
    for out in outs:
        torch.testing.assert_close(out["byol_weight_grad"], online.weight.grad, **TOL)
        torch.testing.assert_close(out["byol_bias_grad"], online.bias.grad, **TOL)
