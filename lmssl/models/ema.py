"""Exponential moving averages of a network: the target of BYOL, the teacher of DINO and
I-JEPA, and the schedules of their momentum.

The EMA copy is an ordinary submodule of the objective (its parameters with
``requires_grad=False``), so it moves with the objective to the device, is saved in every
checkpoint (resume stays exact) and gets no gradient. :func:`ema_update_` moves it towards
the online network after each optimizer step, on the device, and not at all after a step
that the trainer skipped (non-finite loss or gradient): the skip flag is a device tensor,
read by arithmetic, never by the host.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that takes no gradient (the EMA target or teacher)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float, skipped: torch.Tensor | None = None) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every parameter, and
    buffers (batch-norm statistics) copied; a no-op where ``skipped`` (0-dim float, 1.0:
    the step was skipped) is set. The two modules must have the same structure."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"ema_update_: target has {len(t_params)} parameters, online {len(o_params)}")
    weight = torch.full((), 1.0 - momentum, device=t_params[0].device) if t_params else None
    if skipped is not None and weight is not None:
        weight = weight * (1.0 - skipped.to(weight.device, weight.dtype))
    if t_params:
        torch._foreach_lerp_(t_params, [o.detach() for o in o_params], weight)
    for tb, ob in zip(target.buffers(), online.buffers()):
        if skipped is None or not tb.is_floating_point():
            tb.copy_(ob)
        else:
            tb.copy_(torch.where(skipped > 0, tb, ob))


def cosine_momentum(step: int, max_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * step / max_steps) + 1) / 2``,
    ``base`` at step 0 rising to ``final`` at the end."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
