"""LARS: SGD with momentum and a per-tensor trust ratio (You, Gitman & Ginsburg 2017), the
optimizer of SimCLR, BYOL, Barlow Twins and VICReg at large batch sizes.

For every tensor ``w`` with gradient ``g`` in an adapted group, one step is::

    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)     (1 when ||w|| = 0 or ||g|| = 0)
    d     = trust * (g + wd * w)
    buf   = momentum * buf + d                           (buf starts at 0)
    w     = w - lr * buf

so the step of each layer is about ``lr * eta * ||w||`` whatever the scale of its gradient. A
group with ``lars_exclude=True`` (biases and norm scales, as all four papers do) takes a plain
momentum-SGD step: ``trust = 1`` and no weight decay, whatever its ``weight_decay`` says.

The denominator is the one in You et al. and in NVIDIA's, solo-learn's and lightly's PyTorch
implementations (``||g|| + wd ||w||``); SimCLR's and VICReg's code use ``||g + wd w||`` instead,
which is never larger (equal when ``g`` and ``w`` point the same way); with the papers' weight
decays (about 1e-6) the two differ negligibly. Momentum is torch-SGD style (``lr`` applied after the buffer), as in the
PyTorch implementations; SimCLR's TensorFlow code folds ``lr`` into the buffer, which differs
only while ``lr`` changes.

The trust coefficient defaults to ``eta=0.001``, the value of the LARS paper and of SimCLR,
BYOL, Barlow Twins and VICReg (ImageNet, batch 2048-4096). solo-learn's CIFAR recipes use
``eta=0.02`` together with their ``clip_lr`` option (NVIDIA LARC's clip mode, not provided here:
each tensor's learning rate becomes ``min(trust, lr)`` instead of ``lr * trust``), so their 0.02
is not a value to copy here. The papers' other
settings: ``momentum=0.9``; SimCLR ``lr = 0.3 * B / 256``, ``weight_decay=1e-6``; BYOL
``lr = 0.2 * B / 256``, ``weight_decay=1.5e-6``.

Skipping a step on the device: set ``optimizer.found_inf`` to a 0-dim float tensor (non-zero =
skip) before ``step()``; parameters and momentum buffers are then left bit-identical, NaN
gradients included (a weight that is exactly ``-0.0`` may come back as ``+0.0``), and the host
never reads the flag. A skipped first step creates the momentum buffers, as zeros, which is
the state an unskipped first step starts from. This is the contract of torch's fused
AdamW, and ``torch.amp.GradScaler`` drives it: with ``_step_supports_amp_scaling`` the scaler
sets ``found_inf`` and ``grad_scale`` (gradients are divided by it here, out of place) instead
of unscaling and reading the flag on the host. The caller removes ``found_inf`` afterwards.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def pick(skip: torch.Tensor, if_skipped: float, otherwise: float, like: torch.Tensor) -> torch.Tensor:
    """0-dim tensor on ``like``'s device and dtype: ``if_skipped`` where ``skip`` else ``otherwise``
    (no host read of ``skip``)."""
    return torch.where(skip, torch.full((), if_skipped, dtype=like.dtype, device=like.device),
                       torch.full((), otherwise, dtype=like.dtype, device=like.device))


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling over momentum SGD (see the module docstring for the update).

    Args:
        params: tensors or parameter groups, e.g. :func:`lmssl.objectives.decay_groups`.
        lr: learning rate (the schedule scales it as usual).
        momentum: momentum of the update buffer, in ``[0, 1)``; 0 keeps no buffer.
        weight_decay: L2 coefficient added to the gradient of adapted groups.
        eta: trust coefficient.
        eps: added to the trust ratio's denominator.

    Per group, ``lars_exclude=True`` turns off both the trust ratio and weight decay.
    """

    _step_supports_amp_scaling = True  # reads ``grad_scale`` and ``found_inf`` set by torch.amp.GradScaler

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 eps: float = 1e-8) -> None:
        checks = [("lr", lr, lr >= 0), ("momentum", momentum, 0 <= momentum < 1),
                  ("weight_decay", weight_decay, weight_decay >= 0), ("eta", eta, eta > 0), ("eps", eps, eps >= 0)]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"LARS {name}={value} is out of range (lr, weight_decay, eps >= 0; "
                                 f"0 <= momentum < 1; eta > 0)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; skipped on the device when
        ``self.found_inf`` is set and non-zero."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # (device, dtype) -> params
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LARS does not support sparse gradients; use dense gradients "
                                     "(e.g. nn.Embedding(sparse=False))")
                buckets[(p.device, p.dtype)].append(p)
            for (device, _), params in buckets.items():
                skip = None if found_inf is None else found_inf.to(device, non_blocking=True) != 0  # 0-dim bool
                scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
                self.update(group, params, skip, scale)
        return loss

    def update(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None,
               grad_scale: torch.Tensor | None) -> None:
        """The update of one group's tensors that share a device and dtype. Gradients are read,
        never written; one parameter-sized temporary ``d`` is the only allocation (on a CPU each
        fresh allocation costs several times the arithmetic it holds)."""
        grads = [p.grad for p in params]
        wd = 0.0 if group["lars_exclude"] else group["weight_decay"]
        if grad_scale is None:
            d = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]  # g + wd * w
        else:  # torch.amp.GradScaler: unscale out of place
            inv_scale = grad_scale.reciprocal().to(grads[0].dtype)  # a power of 2: exact
            d = torch._foreach_mul(grads, inv_scale)
            if wd:
                torch._foreach_add_(d, params, alpha=wd)
        if not group["lars_exclude"]:
            w_norm = torch.stack(torch._foreach_norm(params))  # (n,)
            g_norm = torch.stack(torch._foreach_norm(grads))  # (n,)
            if grad_scale is not None:
                g_norm = g_norm * inv_scale
            trust = torch.where((w_norm > 0) & (g_norm > 0),
                                group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                torch.ones_like(w_norm))  # (n,)
            torch._foreach_mul_(d, list(trust.unbind(0)))  # d = trust * (g + wd * w)
        if skip is not None:  # NaN or inf gradients included: d = -0.0 on a skipped step (x + -0.0 is x)
            for x in d:
                x.masked_fill_(skip, -0.0)
        u = d
        if group["momentum"]:
            u = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                u.append(state["momentum_buffer"])
            # buf = momentum * buf + d; on a skipped step buf * 1 + -0.0, the same bits
            momentum = group["momentum"] if skip is None else pick(skip, 1.0, group["momentum"], d[0])
            torch._foreach_mul_(u, momentum)
            torch._foreach_add_(u, d)
        if skip is None:
            torch._foreach_add_(params, u, alpha=-group["lr"])
        else:  # w + u * (-lr * keep) with keep = 0 on a skipped step: the same value (u is finite)
            neg_lr = pick(skip, 0.0, -group["lr"], d[0])
            torch._foreach_addcmul_(params, u, [neg_lr] * len(u))
