"""DINO (Caron et al. 2021): self-distillation with no labels. A student network learns to give
the same distribution over prototypes as a momentum teacher, across crops of one image.

Networks. Student: a backbone (:func:`lmssl.models.vision.image_backbone`, a ViT by default)
and :class:`lmssl.models.heads.DINOHead` (a 3-layer GELU MLP, an L2-normalised bottleneck, a
weight-normalised prototype layer whose norm is fixed at 1). Teacher: the same backbone and head,
an exponential moving average of the student's (:func:`lmssl.models.ema.ema_copy`), updated in
``after_step`` with the cosine momentum schedule from ``dino.base_momentum`` (0.996) to
``dino.final_momentum`` (1.0), and not at all after a step the trainer skipped.

Views: DINO's multi-crop (:func:`lmssl.data.views.dino_views`): two global crops of
``dino.global_size`` pixels and ``dino.n_local`` local crops of ``dino.local_size`` pixels (both
multiples of the patch size; the ViT gives other sizes sin-cos positions at fractional
coordinates of the training grid). The teacher sees the global crops only, the student all.

Loss. Teacher outputs are centred and sharpened, student outputs sharpened:
``P_t = softmax((t - c) / tau_t)``, ``log P_s = log_softmax(s / tau_s)``; the loss is the
cross-entropy ``-sum_k P_t log P_s`` averaged over the batch and over every pair (teacher global
crop ``i``, student crop ``j != i``): ``2 * (2 + n_local) - 2`` pairs (:func:`dino_loss`, against
an explicit loop in ``tests/objectives/test_dino.py``).

- Student temperature ``dino.student_temp`` 0.1. Teacher temperature: a linear warm-up from
  ``dino.warmup_teacher_temp`` (0.04) to ``dino.teacher_temp`` (0.07) over
  ``dino.warmup_teacher_temp_steps`` steps, constant after (:func:`teacher_temperature`; the paper
  warms up over 30 epochs: expressed in steps here).
- Centre ``c`` (a buffer, in every checkpoint): ``c <- m c + (1 - m) mean(t)`` with
  ``m = dino.center_momentum`` (0.9), the mean over the teacher outputs of both global crops of the
  *global* batch: the sums of every micro-batch of the step are kept on the device and, with several
  processes, summed by ``all_reduce`` in ``after_step`` before the update. Not moved after a skipped
  step (its teacher outputs may be non-finite).
- Last-layer freeze: for the first ``dino.freeze_last_layer_steps`` steps (the paper: one epoch)
  the prototypes' gradient is multiplied by 0, a flag computed on the device from the step count
  (a buffer). The prototypes stay in the graph, so DDP does not report them unused, and they sit in
  an optimizer group without weight decay, so a zero gradient leaves them exactly unchanged (their
  length is irrelevant to the output: only their directions are used). The optimizer's step counter
  still advances during the freeze (the paper's code sets the gradient to None instead).

The schedules read the step count from a buffer, so the forward pass needs no host value and a
resumed run continues with the same temperature, freeze flag, centre and teacher.

Collapse signals (metrics at every log and evaluation): ``teacher_entropy`` (mean entropy of
``P_t``: ``log K`` when the teacher collapses to the uniform distribution, 0 when it is one-hot),
``teacher_kl`` (mean KL of each ``P_t`` to the batch mean of ``P_t``, the distribution whose logits
the centre tracks: 0 for *any* collapse to a constant output, at most ``log K``), and
``student_kl`` (the loss minus the teacher entropy, the KL from teacher to student that the paper's
collapse study plots). The k-NN, online-probe and embedding-collapse monitors of every image
objective come on top (:mod:`lmssl.objectives._image`); the features they read are the
*teacher's* class token, which the paper found the better network.

Picture (``report``): the last block's attention of the class token over the patches, one map per
head, for 8 held-out images (``attention.png``). SDPA does not return attention probabilities, so
:func:`cls_attention` recomputes the last block's queries and keys from its weights, outside the
training path.

Export: the teacher backbone as ``ViTModel`` through the wildcard ViT converter. ``ViTModel`` maps
exactly (a class token, positions added to the patches, pre-norm blocks, a final LayerNorm; the
sin-cos table is written as its position table) and is the class of the official DINO checkpoints
on the Hub (``facebook/dino-vits16``). ``Dinov2Model`` could be made to agree at the training size
only by exporting its LayerScale vectors as ones, parameters DINO never had that a fine-tuner
would then train, under a config whose other defaults (mask token, SwiGLU, layer scale) describe
DINOv2's recipe, not this one; so ViTModel.

Small batches: users report collapse at batch 32; the paper trains well down to 128 (57.9% k-NN
against 59.9% at 1024, ViT-S for 100 epochs), so ``min_batch`` (128) prints a warning at the start of
a smaller run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmssl.errors import UserError
from lmssl.models import eval_mode
from lmssl.models.ema import cosine_momentum, ema_copy, ema_update_
from lmssl.models.heads import DINOHead
from lmssl.models.vision import VisionBackbone, image_backbone, xavier_patch_init_
from lmssl.objectives import register
from lmssl.objectives._image import ImageObjective


@dataclass
class DINOConfig:
    """The ``dino:`` section of a recipe."""

    out_dim: int = 65536  # prototypes K (paper: 65536)
    hidden_dim: int = 2048  # head MLP width (paper: 2048)
    bottleneck_dim: int = 256  # L2-normalised bottleneck before the prototypes (paper: 256)
    head_layers: int = 3  # linear layers of the head MLP (paper: 3)
    head_batch_norm: bool = False  # batch norm in the head's hidden layers (the official code's use_bn_in_head; off for ViTs)
    n_local: int = 6  # local crops per image (paper: 6 with 2 x 224 + 6 x 96; 10 for its best ViT-S)
    global_size: int = 0  # side of the two global crops in pixels (0: vision.image_size)
    local_size: int = 0  # side of the local crops (0: 96/224 of vision.image_size, rounded to the patch size)
    global_scale: list[float] = field(default_factory=list)  # area range of global crops (empty: dino_views' default)
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])  # area range of local crops (paper)
    student_temp: float = 0.1  # student softmax temperature (paper: 0.1)
    teacher_temp: float = 0.07  # teacher temperature after the warm-up (paper: 0.04-0.07)
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0 (paper: 0.04)
    warmup_teacher_temp_steps: int = 0  # linear warm-up of the teacher temperature (paper: 30 epochs)
    center_momentum: float = 0.9  # EMA of the centre (paper: 0.9)
    base_momentum: float = 0.996  # teacher EMA momentum at step 0 (paper: 0.996)
    final_momentum: float = 1.0  # at the last step (cosine schedule)
    freeze_last_layer_steps: int = 0  # steps with the prototypes frozen (paper: 1 epoch)


# ----------------------------------------------------------------------------- the math, as pure functions


def teacher_temperature(step: int | torch.Tensor, warmup_temp: float, final_temp: float,
                        warmup_steps: int) -> float | torch.Tensor:
    """Linear from ``warmup_temp`` at step 0 to ``final_temp`` at ``warmup_steps``, then constant.
    ``step`` a Python int (a float comes back) or a tensor (computed on its device)."""
    if warmup_steps <= 0:
        return final_temp if not isinstance(step, torch.Tensor) else torch.full((), final_temp, device=step.device)
    if isinstance(step, torch.Tensor):
        progress = (step.float() / warmup_steps).clamp(max=1.0)
    else:
        progress = min(step / warmup_steps, 1.0)
    return warmup_temp + (final_temp - warmup_temp) * progress


def teacher_log_probs(teacher_logits: torch.Tensor, center: torch.Tensor,
                      temperature: float | torch.Tensor) -> torch.Tensor:
    """Centring and sharpening: ``(..., K)`` logits -> ``log softmax((t - c) / temperature)``."""
    return F.log_softmax((teacher_logits.float() - center) / temperature, dim=-1)


def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """DINO's cross-entropy over every (teacher crop, other student crop) pair.

    Args:
        student_logits: ``(V, B, K)``, the student's outputs for V crops, the global crops first.
        teacher_probs: ``(G, B, K)``, the centred, sharpened teacher distributions of the G <= V
            global crops (crop ``g`` of the teacher is crop ``g`` of the student).
        student_temp: the student's temperature.

    Returns:
        scalar: ``mean over pairs (g, v != g) of mean_b sum_k -P_t[g, b, k] log P_s[v, b, k]``.
    """
    if student_logits.dim() != 3 or teacher_probs.dim() != 3 or \
            student_logits.shape[1:] != teacher_probs.shape[1:] or teacher_probs.shape[0] > student_logits.shape[0]:
        raise ValueError(f"student_logits must be (V, B, K) and teacher_probs (G <= V, B, K); got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    V, B, _ = student_logits.shape
    G = teacher_probs.shape[0]
    if V < 2:
        raise ValueError("dino_loss needs at least two crops (a pair)")
    log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (V, B, K)
    ce = -torch.einsum("gbk,vbk->gv", teacher_probs.float(), log_s) / B  # (G, V): one matmul, no (G, V, B, K)
    pairs = 1.0 - torch.eye(G, V, device=ce.device)  # (G, V): 0 on the same-crop pairs
    return (ce * pairs).sum() / (G * V - G)


def teacher_collapse_metrics(teacher_log_p: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(G, B, K)`` teacher log-probabilities -> ``teacher_entropy`` (mean entropy) and
    ``teacher_kl`` (mean KL of each distribution to the mean distribution of its crop's batch)."""
    p = teacher_log_p.exp()
    entropy = -(p * teacher_log_p).sum(-1).mean()
    mean = p.mean(dim=1, keepdim=True)  # (G, 1, K)
    kl = (p * (teacher_log_p - mean.clamp_min(1e-30).log())).sum(-1).mean()
    return {"teacher_entropy": entropy, "teacher_kl": kl}


# ----------------------------------------------------------------------------- the objective


@register
class DINO(ImageObjective):
    """Student (backbone, DINO head) on every crop matches the centred, sharpened EMA teacher on the global crops."""

    name = "dino"
    Config = DINOConfig
    description = "self-distillation with no labels: a student matches its momentum teacher across crops (DINO)"
    loss_label = "loss (teacher -> student cross-entropy, all crop pairs)"
    metric_names = {"teacher_entropy": "teacher entropy", "teacher_kl": "teacher KL to its batch mean",
                    "student_kl": "KL(teacher || student)"}
    recipe = "dino_tiny"
    # the centre almost fixed in the 4-step smoke run: at initialisation every image gets nearly the same
    # teacher output, so the first centre updates flatten the teacher (its entropy, part of the loss, rises
    # towards log K) faster than the student can learn; with the centre held, the loss that falls is the
    # student's part (KL(teacher || student))
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "dino.out_dim=256",
                       "dino.hidden_dim=64", "dino.bottleneck_dim=32", "dino.n_local=2",
                       "dino.freeze_last_layer_steps=1", "dino.warmup_teacher_temp_steps=0",
                       "dino.center_momentum=0.99")
    min_batch = 128  # the paper's batch-size table: 57.9% k-NN at 128, 59.9% at 1024 (ViT-S, 100 epochs)

    def __init__(self, cfg) -> None:
        student = image_backbone(cfg.model, cfg.vision)
        super().__init__(cfg, student.dim)
        c = self.dino = cfg.dino
        self.max_steps = cfg.train.max_steps
        self.global_size, self.local_size = self.crop_sizes(cfg)
        self.student = student
        if isinstance(student, VisionBackbone):
            xavier_patch_init_(student)  # before the EMA copy: both start from it
        self.head = DINOHead(student.dim, c.hidden_dim, c.bottleneck_dim, c.out_dim, c.head_layers, c.head_batch_norm)
        self.teacher = ema_copy(self.student)
        self.teacher_head = ema_copy(self.head)
        self.register_buffer("center", torch.zeros(c.out_dim))  # (K,)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # optimizer steps so far
        self._center_sum: torch.Tensor | None = None  # teacher output sums of this step's micro-batches (K,)
        self._center_rows = 0

    @property
    def backbone(self):
        """The teacher's backbone: what the monitors, the probe and the export read."""
        return self.teacher

    @classmethod
    def build(cls, cfg, tokenizer=None) -> DINO:
        return cls(cfg)

    @classmethod
    def crop_sizes(cls, cfg) -> tuple[int, int]:
        """``(global, local)`` crop sides in pixels."""
        c, v = cfg.dino, cfg.vision
        size = c.global_size or v.image_size
        if c.local_size:
            return size, c.local_size
        return size, max(v.patch_size, round(v.image_size * 96 / 224 / v.patch_size) * v.patch_size)

    @classmethod
    def validate_config(cls, cfg) -> None:
        c = cfg.dino
        size, local = cls.crop_sizes(cfg)
        if cfg.model.family != "resnet":
            p = cfg.vision.patch_size
            for name, s in (("global_size", size), ("local_size", local)):
                if s % p:
                    raise UserError(f"dino.{name}={s} must be a multiple of vision.patch_size={p}")
        if c.n_local < 0:
            raise UserError(f"dino.n_local must be 0 or more, got {c.n_local}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(c, name) <= 0:
                raise UserError(f"dino.{name} must be positive, got {getattr(c, name)}")
        if not 0.0 <= c.center_momentum < 1.0:
            raise UserError(f"dino.center_momentum must be in [0, 1), got {c.center_momentum}")
        if not 0.0 <= c.base_momentum <= c.final_momentum <= 1.0:
            raise UserError(f"dino needs 0 <= base_momentum <= final_momentum <= 1, got {c.base_momentum} and "
                            f"{c.final_momentum}")
        for name in ("global_scale", "local_scale"):
            r = getattr(c, name)
            if r and not (len(r) == 2 and 0 < r[0] <= r[1] <= 1):
                raise UserError(f"dino.{name} must be [min, max] with 0 < min <= max <= 1, got {r}")
        if c.out_dim < 1 or c.bottleneck_dim < 1 or c.hidden_dim < 1 or c.head_layers < 1:
            raise UserError("dino.out_dim, hidden_dim, bottleneck_dim and head_layers must be positive")

    @classmethod
    def make_views(cls, cfg):
        from lmssl.data.views import ViewTransform, dino_views

        c, v = cfg.dino, cfg.vision
        size, local = cls.crop_sizes(cfg)
        specs = dino_views(size, local, c.n_local, tuple(c.global_scale) if c.global_scale else None,
                           tuple(c.local_scale))
        return ViewTransform(specs, v.mean, v.std, cfg.train.seed)

    # ------------------------------------------------------------------ schedules (device side)

    def teacher_temp(self) -> torch.Tensor:
        """The teacher temperature of the current step (0-dim, on the device)."""
        c = self.dino
        return teacher_temperature(self.steps_done, c.warmup_teacher_temp, c.teacher_temp,
                                   c.warmup_teacher_temp_steps)

    def prototype_grad(self) -> torch.Tensor | None:
        """0.0 while the prototypes are frozen, 1.0 after (on the device); None: never frozen."""
        if self.dino.freeze_last_layer_steps <= 0:
            return None
        return (self.steps_done >= self.dino.freeze_last_layer_steps).float()

    def momentum(self, step: int) -> float:
        return cosine_momentum(step, self.max_steps, self.dino.base_momentum, self.dino.final_momentum)

    # ------------------------------------------------------------------ training

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = self.view_images(batch)  # [global 1, global 2, local 1, ...], (B, C, s, s) each
        B = views[0].shape[0]
        globals_ = torch.cat(views[:2])  # (2B, C, S, S)
        feats = [self.student.pooled(globals_, "cls")]  # (2B, D)
        if len(views) > 2:
            feats.append(self.student.pooled(torch.cat(views[2:]), "cls"))  # (n_local * B, D)
        student = self.head(torch.cat(feats), self.prototype_grad())  # (V * B, K)
        with torch.no_grad():
            teacher_feats = self.teacher.pooled(globals_, "cls")  # (2B, D)
            teacher = self.teacher_head(teacher_feats).float()  # (2B, K)
            log_p = teacher_log_probs(teacher, self.center, self.teacher_temp()).view(2, B, -1)  # (2, B, K)
        probs = log_p.exp()
        loss = dino_loss(student.view(len(views), B, -1), probs, self.dino.student_temp)
        if self.training:
            self._add_to_center(teacher)
        collapse = teacher_collapse_metrics(log_p)
        entropy = collapse["teacher_entropy"]
        probe_loss, probe_metrics = self.probe_step(teacher_feats[:B], batch)
        metrics = {"loss": loss.detach(), **collapse, "student_kl": loss.detach() - entropy, **probe_metrics}
        return loss + probe_loss, metrics

    def _add_to_center(self, teacher: torch.Tensor) -> None:
        """Keep this micro-batch's sum of teacher outputs ``(2B, K)`` for the centre update."""
        s = teacher.detach().sum(dim=0)  # (K,)
        self._center_sum = s if self._center_sum is None else self._center_sum + s
        self._center_rows += teacher.shape[0]

    @torch.no_grad()
    def update_center(self, skipped: torch.Tensor | None = None) -> None:
        """``center <- m center + (1 - m) mean`` over this step's teacher outputs of every process
        (summed by ``all_reduce`` when distributed); unchanged where ``skipped`` is set."""
        if self._center_sum is None:
            return
        total, rows = self._center_sum, self._center_rows
        self._center_sum, self._center_rows = None, 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = total.clone()
            dist.all_reduce(total)
            rows *= dist.get_world_size()
        m = self.dino.center_momentum
        new = self.center * m + (total / rows) * (1.0 - m)
        if skipped is not None:
            new = torch.where(skipped.to(new.device) > 0, self.center, new)
        self.center.copy_(new)

    def after_step(self, step: int, skipped: torch.Tensor) -> None:
        """Teacher towards the student (not after a skipped step), the centre, the step count."""
        m = self.momentum(step)
        ema_update_(self.teacher, self.student, m, skipped)
        ema_update_(self.teacher_head, self.head, m, skipped)
        self.update_center(skipped)
        self.steps_done.fill_(step + 1)

    def param_groups(self, optim) -> list[dict]:
        """The base groups, with the prototypes moved to a group without weight decay (a frozen,
        zero gradient then leaves them exactly unchanged; decay would only shrink their length)."""
        protos = self.head.prototypes
        groups = super().param_groups(optim)
        for g in groups:
            g["params"] = [p for p in g["params"] if p is not protos]
        groups.append({"params": [protos], "weight_decay": 0.0, "lars_exclude": True})
        return groups

    def flops_per_sample(self) -> float:
        """Student backbone and head on every crop (forward and backward), teacher on the globals (forward)."""
        size, local = self.global_size, self.local_size
        head = sum(p.numel() for p in self.head.parameters())
        crops = [size, size] + [local] * self.dino.n_local
        student = sum(self.backbone_flops(s) for s in crops) + 6.0 * head * len(crops)
        teacher = 2 * (self.backbone_flops(size, backward=False) + 2.0 * head)
        return student + teacher

    # ------------------------------------------------------------------ picture

    @torch.no_grad()
    def report(self, tokenizer, eval_batches, cfg, out_dir) -> str:
        """``attention.png``: the teacher's last-block attention of the class token over the
        patches, per head, on 8 held-out images."""
        from lmssl.figures import plot_attention_maps

        if not eval_batches:
            return "dino: no held-out images for the attention maps"
        if not isinstance(self.backbone, VisionBackbone):
            return "dino: attention maps need a ViT backbone"
        device = next(self.parameters()).device
        images = self.plain_images({"images": torch.cat([b["images"] for b in eval_batches])[:8].to(device)})
        with eval_mode(self):
            maps = cls_attention(self.backbone, images)  # (B, heads, gh, gw)
        path = plot_attention_maps(images, maps, self.vision.mean, self.vision.std, Path(out_dir) / "attention.png",
                                   "dino: class-token attention of the last block (teacher), per head")
        return f"attention maps of {len(images)} held-out images: {path}"


@torch.no_grad()
def cls_attention(backbone: VisionBackbone, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention probabilities from the class token to every patch.

    ``images (B, C, H, W)`` normalised -> ``(B, n_heads, gh, gw)``, each head's map summing to
    at most 1 (the class token's attention to itself is left out). The block's input is caught
    with a forward pre-hook while the backbone runs; its queries and keys are then recomputed from
    the block's own weights, as SDPA does not return the probabilities."""
    block = backbone.core.blocks[-1]
    caught: dict[str, torch.Tensor] = {}
    hook = block.register_forward_pre_hook(lambda module, args: caught.__setitem__("x", args[0]))
    try:
        backbone(images)
    finally:
        hook.remove()
    x = block.norm1(caught["x"]) if block.pre_norm else caught["x"]  # (B, T, dim), T = 1 + N
    attn = block.attn
    B, T, _ = x.shape
    hs, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    q, k, _ = attn.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    q = q.view(B, T, nh, hs).transpose(1, 2)[:, :, :1]  # (B, nh, 1, hs): the class token's query
    k = k.view(B, T, nkv, hs).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hs)
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(hs), dim=-1)  # (B, nh, 1, T)
    gh, gw = images.shape[2] // backbone.vision.patch_size, images.shape[3] // backbone.vision.patch_size
    return probs[:, :, 0, 1:].reshape(B, nh, gh, gw)
