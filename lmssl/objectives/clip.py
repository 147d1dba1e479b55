"""CLIP (Radford et al. 2021): contrastive image-text pretraining on two towers of the shared core.

Image tower: the ViT every image method uses (``model:``, e.g. ``preset: vit_tiny``), pooled at
its class token (``clip.image_pool=mean``: the patch mean). CLIP's ViT normalises its input
tokens before the first block (``ln_pre``): set ``model.embedding_norm=true``, as the recipes do,
for a run that exports to ``CLIPModel``. Text tower: the causal :class:`~lmssl.models.TextBackbone`
GPT uses (``clip.text:``, a model section of its own with the same presets, e.g. ``preset:
gpt_tiny``), pooled at the end-of-text token (:func:`end_of_text_index`). Each pooled vector goes
through a bias-free linear projection to ``clip.embed_dim`` and is L2-normalised; the logits are
cosine similarities times a learned scale ``exp(logit_scale)`` (initialised at
``1 / clip.init_temperature``, clamped to at most ``clip.max_logit_scale``).

The loss (:func:`clip_loss`) is the symmetric cross-entropy of the paper's pseudo-code: every
image must pick out its caption among all the captions of the *global* batch, and every caption
its image; the embeddings are gathered from every process with the gradient-keeping all-gather
(:func:`lmssl.losses.gather_with_grad`), so one process and several give the same loss and
gradients (tested with 2 processes).

Views: a light one (``clip.views=crop``: a random resized crop covering ``vision.crop_min_scale``
to all of the image, flipped when ``vision.hflip``); ``none`` trains on the plain image.

Evaluation (every ``train.eval_every`` steps, on the held-out pairs; :mod:`lmssl.data.pairs`):
zero-shot classification of the held-out images among their classes (prompts
``clip.template.format(class name)``; the bundled emoji: 255 held-out emoji whose names never
occur in a training caption) against chance, and image-to-text and text-to-image recall@1/5.
``report`` draws held-out images with their top-3 zero-shot labels (``zero_shot.png``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmssl.config import ModelConfig, RunConfig
from lmssl.errors import UserError
from lmssl.losses import LearnedTemperature, gather_with_grad, info_nce_with_accuracy, rank_offset
from lmssl.models import TextBackbone, eval_mode
from lmssl.models.flops import transformer_flops_per_token
from lmssl.models.vision import VisionBackbone, image_backbone
from lmssl.objectives import Objective, register


def _text_tower() -> ModelConfig:
    from lmssl.models.presets import PRESETS

    return ModelConfig(preset="gpt_tiny", **PRESETS["gpt_tiny"])


@dataclass
class ClipConfig:
    """The ``clip:`` section of a recipe. The image tower is the run's ``model:`` section; the
    text tower is ``clip.text``, a model section of its own (presets and overrides as in
    ``model:``, e.g. ``clip.text.preset=gpt_tiny clip.text.n_layers=2``)."""

    # the text tower: a causal TextBackbone (vocab_size 0: taken from the tokenizer; its
    # max_positions bounds data.block_size, the caption length)
    text: ModelConfig = field(default_factory=_text_tower)
    embed_dim: int = 256  # width of the shared space: both bias-free projections map to it (paper: 512-1024)
    init_temperature: float = 0.07  # the logit scale starts at 1 / this (paper: 0.07)
    max_logit_scale: float = 100.0  # the logit scale is clamped to at most this (paper: 100)
    image_pool: str = "cls"  # how the image tower pools: cls (the class token, CLIP's) | mean (the patch states)
    views: str = "crop"  # crop: random resized crop (vision.crop_min_scale .. 1) and flip (vision.hflip) | none
    template: str = "a photo of a {}"  # zero-shot prompt; {} is the class name (the emoji recipe: "{}", the bare name)


def end_of_text_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, end_id: int) -> torch.Tensor:
    """``(B, T)`` -> ``(B,)`` the position each caption is pooled at: its first end-of-text
    token among the real (mask 1) positions, else its last real position. With right padding
    that is the last real token; left padding works the same, since padding is never chosen,
    even when the pad id is the end-of-text id. It is what ``CLIPTextModel`` reads (the first
    ``eos_token_id`` of the row) whenever the padding is not the end-of-text id on the left."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    first_end = torch.where((input_ids == end_id) & real, pos, T).amin(dim=1)
    last_real = torch.where(real, pos, -1).amax(dim=1).clamp_min(0)
    return torch.where(first_end < T, first_end, last_real)


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, temperature: torch.Tensor | float,
              gather: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of paired, L2-normalised ``image_embeds`` and ``text_embeds`` ``(B, E)``.

    Row ``i`` of both is one pair. With ``gather`` (and ``torch.distributed`` initialised) the
    keys are the embeddings of all ``W`` processes, ``(W B, E)``, gathered with gradient; the
    queries stay local. Returns ``(loss, image-to-text accuracy, text-to-image accuracy)``:
    ``loss = (CE(images -> captions) + CE(captions -> images)) / 2``, each the mean over this
    process's rows, of logits ``query @ keys.T / temperature``; the accuracies are the
    detached fractions of queries whose partner scores highest."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"clip_loss: image_embeds {tuple(image_embeds.shape)} and text_embeds "
                         f"{tuple(text_embeds.shape)} must have the same shape (B, E): row i of both is one pair")
    B = image_embeds.shape[0]
    if gather:
        all_images, all_texts, offset = gather_with_grad(image_embeds), gather_with_grad(text_embeds), rank_offset(B)
    else:
        all_images, all_texts, offset = image_embeds, text_embeds, 0
    target = torch.arange(B, device=image_embeds.device) + offset  # (B,) where each partner sits among the keys
    i2t, i2t_acc = info_nce_with_accuracy(image_embeds, all_texts, target, temperature, normalize=False)
    t2i, t2i_acc = info_nce_with_accuracy(text_embeds, all_images, target, temperature, normalize=False)
    return (i2t + t2i) / 2, i2t_acc, t2i_acc


def recall_at(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """``similarity (N, N)``, row ``i``'s match in column ``i`` -> {k: fraction of rows whose
    match is among their ``k`` highest columns}."""
    match = similarity.diagonal()[:, None]  # (N, 1)
    rank = (similarity > match).sum(dim=1)  # (N,) columns strictly above the match
    return {k: float((rank < k).float().mean()) for k in ks}


@register
class CLIP(Objective):
    """Image tower + text tower + projections + learned scale -> symmetric InfoNCE over the global batch."""

    name = "clip"
    modality = "image_text"
    Config = ClipConfig
    description = "contrastive image-text pretraining (CLIP): images and their captions in one space"
    loss_label = "loss (symmetric InfoNCE, nats)"
    metric_names = {"i2t_accuracy": "image finds its caption in the batch", "t2i_accuracy":
                    "caption finds its image in the batch", "zero_shot_accuracy": "zero-shot accuracy",
                    "zero_shot_chance": "zero-shot chance", "i2t_r1": "image-to-text recall@1",
                    "i2t_r5": "image-to-text recall@5", "t2i_r1": "text-to-image recall@1",
                    "t2i_r5": "text-to-image recall@5"}
    recipe = "clip_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "clip.text.dim=64",
                       "clip.text.n_layers=2", "clip.text.n_heads=4", "clip.embed_dim=32")

    def __init__(self, cfg: RunConfig, tokenizer) -> None:
        super().__init__()
        from lmssl.data.pairs import text_specials

        c = cfg.clip
        self.clip, self.vision = c, cfg.vision
        self.block_size, self.micro_batch = cfg.data.block_size, cfg.train.micro_batch_size
        self.backbone = image_backbone(cfg.model, cfg.vision)  # the image tower
        self.text = TextBackbone(c.text)  # the text tower
        self.image_projection = nn.Linear(self.backbone.dim, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text.dim, c.embed_dim, bias=False)
        for proj in (self.image_projection, self.text_projection):  # CLIP's: std width ** -0.5
            nn.init.normal_(proj.weight, 0.0, proj.in_features ** -0.5)
        # logit_scale = log(1 / temperature) in [0, log(max_logit_scale)], as open_clip clamps it
        self.temperature = LearnedTemperature(c.init_temperature, 1.0 / c.max_logit_scale, 1.0)
        self.views = self.view_transform(cfg)
        self.tokenizer = tokenizer
        self.end_id = text_specials(tokenizer)[1]

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer) -> CLIP:
        text = cfg.clip.text
        if text.vocab_size and text.vocab_size != len(tokenizer):
            raise UserError(f"clip.text.vocab_size={text.vocab_size} does not match the tokenizer's {len(tokenizer)} "
                            f"tokens ({cfg.data.tokenizer}); set clip.text.vocab_size=0 to take it from the tokenizer")
        text.vocab_size = len(tokenizer)
        return cls(cfg, tokenizer)

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        c, t = cfg.clip, cfg.clip.text
        checks = [
            (cfg.model.family in ("vit", "resnet"), f"clip's image tower is a ViT (model.family=vit) or a ResNet, got "
                                                    f"model.family={cfg.model.family}"),
            (c.embed_dim >= 1, f"clip.embed_dim must be at least 1, got {c.embed_dim}"),
            (0 < c.init_temperature <= 1, f"clip.init_temperature must be in (0, 1], got {c.init_temperature}"),
            (c.max_logit_scale >= 1 / c.init_temperature if c.init_temperature > 0 else False,
             f"clip.max_logit_scale={c.max_logit_scale} must be at least 1 / clip.init_temperature"),
            (c.image_pool in ("cls", "mean"), f"clip.image_pool must be cls or mean, got '{c.image_pool}'"),
            (c.views in ("crop", "none"), f"clip.views must be crop or none, got '{c.views}'"),
            ("{}" in c.template, f"clip.template must hold {{}} where the class name goes, got '{c.template}'"),
            (t.n_layers >= 1 and t.n_heads >= 1 and t.dim % t.n_heads == 0,
             f"clip.text.dim={t.dim} must be a multiple of clip.text.n_heads={t.n_heads} (and n_layers >= 1)"),
            (cfg.data.block_size <= t.max_positions,
             f"data.block_size={cfg.data.block_size} (the caption length) is larger than clip.text.max_positions="
             f"{t.max_positions}; lower the one or raise the other"),
            (t.norm in ("layernorm", "rmsnorm") and t.norm_position in ("pre", "post"),
             "clip.text.norm must be layernorm or rmsnorm and clip.text.norm_position pre or post"),
            (t.positions in ("learned", "rope", "sincos", "none"),
             f"clip.text.positions must be learned, rope, sincos or none, got '{t.positions}'"),
            (t.activation in ("gelu", "gelu_tanh", "silu", "relu"),
             f"clip.text.activation must be gelu, gelu_tanh, silu or relu, got '{t.activation}'"),
            (0.0 <= t.dropout < 1.0, f"clip.text.dropout must be in [0, 1), got {t.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    # ------------------------------------------------------------------ views

    @staticmethod
    def view_transform(cfg: RunConfig):
        """The :class:`~lmssl.data.views.ViewTransform` of the run: one light view (crop and flip)."""
        from lmssl.data import views

        v = cfg.vision
        spec = views.ViewSpec(v.image_size, crop_scale=(v.crop_min_scale, 1.0), hflip_p=0.5 if v.hflip else 0.0)
        return views.ViewTransform([spec], v.mean, v.std, cfg.train.seed)

    @classmethod
    def make_views(cls, cfg: RunConfig):
        """The views whose parameters the data pipeline draws per pair (None: ``clip.views=none``)."""
        return cls.view_transform(cfg) if cfg.clip.views == "crop" else None

    def plain_images(self, batch) -> torch.Tensor:
        """Unaugmented images ``(B, C, S, S)``, ``S = vision.image_size``, normalised."""
        return self.views.plain(batch["images"], self.vision.image_size)

    def view_images(self, batch) -> torch.Tensor:
        """The training view of each image (its plain version in eval mode or without views)."""
        if self.training and "views" in batch:
            return self.views.apply(batch["images"], batch["views"])[0]
        return self.plain_images(batch)

    # ------------------------------------------------------------------ towers

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, C, S, S)`` -> the image tower's pooled state ``(B, D_image)``."""
        return self.backbone.pooled(images, self.clip.image_pool)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Captions ``(B, T)`` -> the text tower's state at the end-of-text token ``(B, D_text)``
        (:func:`end_of_text_index`); the tower reads causally."""
        h = self.text(input_ids, attention_mask, is_causal=True)  # (B, T, D_text)
        idx = end_of_text_index(input_ids, attention_mask, self.end_id)  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), idx]

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> L2-normalised embeddings ``(B, E)``."""
        return F.normalize(self.image_projection(self.encode_image(images)), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Captions -> L2-normalised embeddings ``(B, E)``."""
        return F.normalize(self.text_projection(self.encode_text(input_ids, attention_mask)), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """``()`` the clamped ``exp(logit_scale)`` the similarities are multiplied by."""
        return 1.0 / self.temperature()

    def features(self, batch) -> torch.Tensor:
        """The image tower's pooled state of the unaugmented image (a batch without images:
        the text tower's state at the end-of-text token)."""
        if "images" in batch:
            return self.encode_image(self.plain_images(batch))
        return self.encode_text(batch["input_ids"], batch.get("attention_mask"))

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = self.image_embeds(self.view_images(batch))  # (B, E)
        txt = self.text_embeds(batch["input_ids"], batch.get("attention_mask"))  # (B, E)
        temperature = self.temperature()
        # the held-out loss is each process's own: every process evaluates the same batches
        loss, i2t, t2i = clip_loss(img, txt, temperature, gather=self.training)
        return loss, {"loss": loss.detach(), "i2t_accuracy": i2t, "t2i_accuracy": t2i,
                      "logit_scale": (1.0 / temperature).detach()}

    def flops_per_sample(self) -> float:
        """One pair, forward and backward: the image tower on one view, the text tower on
        ``data.block_size`` tokens (an upper bound: batches are cut to their longest caption),
        both projections, and this sample's rows and columns of the two similarity matrices."""
        from lmssl.models.vision import forward_flops
        from lmssl.objectives._image import vit_flops

        size = self.vision.image_size
        if isinstance(self.backbone, VisionBackbone):
            image = vit_flops(self.backbone, size)
        else:
            device = next(self.backbone.parameters()).device
            image = 3.0 * forward_flops(self.backbone, torch.zeros(2, self.vision.channels, size, size, device=device))
        T = self.block_size
        text = T * transformer_flops_per_token(replace(self.text.cfg, vocab_size=0), self.text.num_params(), T)
        proj = 6.0 * (self.image_projection.weight.numel() + self.text_projection.weight.numel())
        return image + text + proj + 6.0 * 2 * self.micro_batch * self.clip.embed_dim

    # ------------------------------------------------------------------ zero-shot and retrieval

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 images ``(N, C, L, L)`` -> L2-normalised embeddings ``(N, E)`` float32 on the CPU (eval mode)."""
        device = next(self.parameters()).device
        with eval_mode(self):
            return torch.cat([self.image_embeds(self.plain_images({"images": x.to(device)})).float().cpu()
                              for x in images.split(batch_size)])

    @torch.no_grad()
    def embed_captions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       batch_size: int = 256) -> torch.Tensor:
        """Tokenized captions ``(N, T)`` -> L2-normalised embeddings ``(N, E)`` float32 on the CPU (eval mode)."""
        device = next(self.parameters()).device
        with eval_mode(self):
            return torch.cat([self.text_embeds(i.to(device), m.to(device)).float().cpu()
                              for i, m in zip(input_ids.split(batch_size), attention_mask.split(batch_size))])

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Strings -> L2-normalised embeddings ``(N, E)``, tokenized as the training captions were."""
        from lmssl.data.pairs import encode_captions

        ids, mask = encode_captions(self.tokenizer, texts, self.block_size)
        return self.embed_captions(ids, mask, batch_size)

    def class_embeds(self, classes: list[str], template: str | None = None) -> torch.Tensor:
        """One L2-normalised embedding per class name: its prompt ``template.format(name)``."""
        template = template or self.clip.template
        return self.embed_texts([template.format(name) for name in classes])

    @torch.no_grad()
    def eval_metrics(self, ev: dict[str, float], data, log) -> dict[str, float]:
        """Zero-shot accuracy (top-1, top-5) of the held-out images among the held-out classes,
        beside chance, and image-to-text / text-to-image recall@1 and @5 of the held-out pairs."""
        held = getattr(data, "held_out", None)
        if held is None or len(held.images) == 0:
            return {}
        self._held_out = held  # the end-of-run picture draws from the same pairs
        images = self.embed_images(held.images)  # (N, E)
        texts = self.embed_captions(held.input_ids, held.attention_mask)  # (N, E)
        similarity = images @ texts.T  # (N, N)
        i2t, t2i = recall_at(similarity), recall_at(similarity.T)
        out = {"i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5],
               "retrieval_chance": 1.0 / len(images)}
        labelled = held.labels >= 0
        if held.classes and bool(labelled.any()):
            scores = images[labelled] @ self.class_embeds(held.classes).T  # (N', K)
            top = scores.topk(min(5, len(held.classes)), dim=1).indices  # (N', 5)
            truth = held.labels[labelled][:, None]
            out["zero_shot_accuracy"] = float((top[:, :1] == truth).any(dim=1).float().mean())
            out["zero_shot_top5"] = float((top == truth).any(dim=1).float().mean())
            out["zero_shot_chance"] = 1.0 / len(held.classes)
        return out

    def begin(self, data, out_dir) -> str:
        held = getattr(data, "held_out", None)
        if held is None or not held.classes:
            return ""
        return (f"zero-shot: {int((held.labels >= 0).sum())} held-out images among {len(held.classes)} classes "
                f"(chance {1 / len(held.classes):.2%}), prompt '{self.clip.template}'")

    @torch.no_grad()
    def report(self, tokenizer, eval_batches, cfg: RunConfig, out_dir: Path) -> str:
        """``zero_shot.png``: held-out images with their top-3 zero-shot labels and probabilities."""
        from lmssl.zero_shot import plot_zero_shot, zero_shot_probabilities

        held = getattr(self, "_held_out", None)
        if held is None or not held.classes:
            return ""
        pick = torch.nonzero(held.labels >= 0).flatten()[:: max(1, int((held.labels >= 0).sum()) // 12)][:12]
        probs = zero_shot_probabilities(self, held.images[pick], held.classes)  # (12, K)
        path = plot_zero_shot(held.images[pick], probs, held.classes, Path(out_dir) / "zero_shot.png",
                              f"clip: held-out images, top-3 of {len(held.classes)} unseen classes "
                              f"('{self.clip.template}')", truth=held.labels[pick].tolist())
        right = sum(int(probs[i].argmax()) == int(held.labels[j]) for i, j in enumerate(pick.tolist()))
        return f"zero-shot picture: {path} ({right} of {len(pick)} shown right)"

