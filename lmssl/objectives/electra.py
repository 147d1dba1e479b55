"""ELECTRA (Clark et al. 2020): replaced-token detection against a small masked-LM generator.

A *generator*, a narrow masked LM, fills ~15% of masked positions with tokens **sampled**
from its softmax (not its argmax); a *discriminator* reads the result and predicts, for
every token, whether it differs from the original. Both are the shared
:class:`~lmssl.models.TextBackbone` (of one layout, below), and they share their
embeddings (tokens, positions, token types and the embedding LayerNorm, those the layout
has), as in the paper. Each network maps the shared
``model.embedding_dim``-wide embeddings to its own width with its own linear layer
(``embed_project``, ELECTRA's ``embeddings_project``). The loss is

    ``MLM(generator) + electra.disc_weight (50) x BCE(discriminator)``

The replacements are integer ids drawn without gradient, so the detection loss reaches the
generator only through the shared embeddings: the generator's own weights (blocks,
projection, head) learn from its MLM loss alone, and the discriminator's own weights from
the detection loss alone.

Everything random is drawn on the CPU in :meth:`Electra.prepare_batch` from the loop's
generator: the masked positions (``bernoulli_token_mask``), which of them show ``<mask>``
(``mlm_corrupt``: ELECTRA's 85%, the rest keep their token, no random ones) and one
uniform number per masked position. ``forward`` samples replacement ``n`` as the token
where the generator's cumulative softmax first exceeds ``u_n`` (inverse-CDF sampling: the
same distribution as the Gumbel-max trick of the original code, with one number per
position instead of one per vocabulary entry), so it never reads a device value on the
host, and a resumed run replays the same replacements. A sampled token equal to the
original is *not* replaced: the discriminator's label is exactly ``token != original``.

Sizes (the paper's Table 6 and ``configure_pretraining.py``): the generator is as deep as
the discriminator, and its hidden size, MLP width and head count are ``generator_size``
times the discriminator's (1/4 for ELECTRA-Small, 1/3 for Base; note that the released
ELECTRA-Small checkpoint's generator is full width, as the authors' README says).
ELECTRA-Small's embeddings are 128 wide under a 256-wide discriminator.

Layouts: ``model.family: electra`` (``recipes/electra_tiny.yaml``) is BERT's post-LayerNorm
network, the paper's; ``model.family: modernbert`` (``recipes/electra_modernbert_tiny.yaml``)
is ModernBERT's pre-norm one (the network of ``mlm_tiny``), which leaves the unigram plateau
within a CPU budget where the post-norm discriminator does not (recipes/README.md).

Export: with the ELECTRA layout, the discriminator as ``ElectraForPreTraining``
(``AutoModelForPreTraining``; ``AutoModel`` gives ``ElectraModel``,
``AutoModelForSequenceClassification`` adds a fresh classifier), the generator as
``ElectraForMaskedLM`` in ``generator/``, both checked; with the ModernBERT layout, the
discriminator's body as ``ModernBertModel`` (no ModernBERT class holds the detector or a
generator narrower than the embeddings; both stay in the checkpoint).
``features`` are the discriminator's final states, mean-pooled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmssl.config import ModelConfig, RunConfig
from lmssl.errors import UserError
from lmssl.masking import IGNORE_INDEX, bernoulli_token_mask, masked_positions, mlm_corrupt, select_masked
from lmssl.models import LMHead, TextBackbone, eval_mode
from lmssl.models.flops import transformer_flops_per_token
from lmssl.models.transformer import mlp_hidden
from lmssl.nn.mlp import ACTIVATIONS
from lmssl.objectives import Objective, mean_pool, register
from lmssl.objectives.mlm import MaskingSpec

SHARED_EMBEDDINGS = ("tokens", "positions", "token_types", "embed_norm")  # TextBackbone modules both networks use


@dataclass
class ElectraConfig:
    """The ``electra:`` section of a recipe."""

    generator_size: float = 0.25  # generator hidden size, MLP width and heads as a fraction of the discriminator's (paper: Small 1/4, Base 1/3)
    generator_layers: float = 1.0  # generator depth as a fraction of the discriminator's (paper: 1)
    disc_weight: float = 50.0  # loss = generator MLM + disc_weight x replaced-token detection (paper: 50)
    mask_rate: float = 0.15  # fraction of tokens the generator predicts, and may replace (paper: 0.15)
    mask_token_prob: float = 0.85  # of those, shown to the generator as <mask>; the rest keep their token (paper: 0.85)
    temperature: float = 1.0  # softmax temperature of the generator's samples (paper: 1)
    report_examples: int = 2  # held-out passages shown with replacements and detections at the end


def generator_config(m: ModelConfig, e: ElectraConfig) -> ModelConfig:
    """The generator's model config: the discriminator's, ``generator_size`` times as wide
    (hidden size, MLP width, heads of the discriminator's head size) and ``generator_layers``
    times as deep, reading the discriminator's embeddings (``embedding_dim``)."""
    head_size = m.dim // m.n_heads
    dim = max(1, round(m.dim * e.generator_size))
    heads = max(1, dim // head_size)
    if dim % heads:
        raise UserError(f"electra.generator_size={e.generator_size} gives a {dim}-wide generator, not a multiple of "
                        f"the head size {head_size}; pick a size that is")
    return dataclasses.replace(m, preset="", dim=dim, n_heads=heads, n_kv_heads=0,
                               mlp_hidden=max(1, round(mlp_hidden(m) * e.generator_size)),
                               n_layers=max(1, round(m.n_layers * e.generator_layers)),
                               embedding_dim=m.embedding_dim or m.dim)


class DetectionHead(nn.Module):
    """ELECTRA's discriminator head: ``(..., dim) -> (...)`` logits of "replaced" (dense,
    the model's activation, dense to one value)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.act = ACTIVATIONS[cfg.activation]
        self.out = nn.Linear(cfg.dim, 1)
        for layer in (self.dense, self.out):
            nn.init.normal_(layer.weight, 0.0, cfg.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.dense(h))).squeeze(-1)


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits (N, V)`` from ``softmax(logits / temperature)``, by
    inverse-CDF sampling with ``u (N,)`` uniform in [0, 1): the first column whose
    cumulative probability exceeds ``u``. Columns of probability 0 are never drawn. ``(N,)``."""
    probs = torch.softmax(logits.detach().float() / temperature, dim=-1)  # (N, V)
    cdf = probs.cumsum(dim=-1)  # (N, V), non-decreasing
    target = u.to(cdf)[:, None] * cdf[:, -1:]  # (N, 1): scaled by the total, which rounding leaves near 1
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)


@register
class Electra(Objective):
    """Generator + discriminator with shared embeddings; ``batch`` -> MLM + weighted detection loss.

    ``backbone`` is the discriminator (what export, features and fine-tuning read),
    ``detector`` its head; ``generator`` and ``generator_head`` are the masked LM, whose
    vocabulary projection is the shared token embedding.
    """

    name = "electra"
    modality = "text"
    Config = ElectraConfig
    description = "replaced-token detection (ELECTRA: a discriminator spots the tokens a small masked-LM generator replaced)"
    loss_label = "loss (MLM + 50 x detection, nats)"
    metric_names = {"accuracy": "replaced-token detection accuracy", "precision": "precision of 'replaced'",
                    "recall": "recall of 'replaced'", "mlm_accuracy": "generator masked-token accuracy"}
    recipe = "electra_tiny"
    smoke_overrides = ("model.dim=64", "model.embedding_dim=32", "model.n_layers=2", "model.n_heads=2",
                       "model.max_positions=64", "data.block_size=32", "electra.generator_size=0.5",
                       "electra.report_examples=1")

    def __init__(self, cfg: ModelConfig, electra: ElectraConfig | None = None, spec: MaskingSpec | None = None,
                 block_size: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.electra = electra if electra is not None else ElectraConfig()
        self.spec = spec
        self.block_size = block_size or cfg.max_positions
        self.gen_cfg = generator_config(cfg, self.electra)
        self.backbone = TextBackbone(cfg)  # the discriminator
        self.detector = DetectionHead(cfg)
        self.generator = TextBackbone(self.gen_cfg)
        for name in SHARED_EMBEDDINGS:  # one set of embeddings for both (the generator's own are dropped)
            setattr(self.generator, name, getattr(self.backbone, name))
        self.generator_head = LMHead(self.gen_cfg, self.backbone.tokens)  # decoder tied to the shared tokens
        self._cpu_special_ids = torch.tensor(spec.special_ids if spec else (), dtype=torch.long)

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        e, m = cfg.electra, cfg.model
        checks = [
            (0.0 < e.mask_rate < 1.0, f"electra.mask_rate must be in (0, 1), got {e.mask_rate}"),
            (0.0 <= e.mask_token_prob <= 1.0, f"electra.mask_token_prob must be in [0, 1], got {e.mask_token_prob}"),
            (e.generator_size > 0, f"electra.generator_size must be positive, got {e.generator_size}"),
            (e.generator_layers > 0, f"electra.generator_layers must be positive, got {e.generator_layers}"),
            (e.disc_weight >= 0, f"electra.disc_weight must be >= 0, got {e.disc_weight}"),
            (e.temperature > 0, f"electra.temperature must be positive, got {e.temperature}"),
            (m.head_transform, "electra needs model.head_transform=true: the generator's head maps its width to the "
                               "embeddings' (ELECTRA's generator_predictions)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        generator_config(m, e)

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer) -> Electra:
        cls.validate_config(cfg)
        return cls(cfg.model, cfg.electra, MaskingSpec.from_tokenizer(tokenizer, "token"), cfg.data.block_size)

    # ------------------------------------------------------------------ the two networks

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Discriminator states ``(B, T) -> (B, T, dim)``, bidirectional."""
        return self.backbone(input_ids, attention_mask, token_type_ids, is_causal=False)

    def discriminator_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T) -> (B, T)`` logits of "this token was replaced" (ElectraForPreTraining's)."""
        return self.detector(self.hidden(input_ids, attention_mask))

    def generator_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every position: ``(B, T) -> (B, T, vocab_size)`` (ElectraForMaskedLM's)."""
        h = self.generator(input_ids, attention_mask, is_causal=False)  # (B, T, gen dim)
        return self.generator_head(h)[..., : self.cfg.vocab_size]

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the discriminator's final states over the real tokens: ``(B, dim)``."""
        mask = batch.get("attention_mask")
        return mean_pool(self.hidden(batch["input_ids"], mask), mask)

    # ------------------------------------------------------------------ masking (CPU)

    def prepare_batch(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """CPU side: the generator's input (``input_ids``, masked), the ``original_ids``, the
        ``labels`` (-100 off the mask), the masked positions (``masked_index (N,)``, flat
        into ``B * T``) and the sampling numbers (``sample_u (N,)``), all from ``generator``."""
        if self.spec is None:
            raise ValueError("this Electra has no masking spec; build it with Electra.build(cfg, tokenizer)")
        e, batch = self.electra, dict(batch)
        ids, attn = batch["input_ids"], batch.get("attention_mask")
        chosen = bernoulli_token_mask(ids, e.mask_rate, generator, self._cpu_special_ids, attn)  # (B, T)
        batch["input_ids"], batch["labels"] = mlm_corrupt(
            ids, chosen, generator, mask_token_id=self.spec.mask_token_id, vocab_size=self.spec.vocab_size,
            special_ids=self._cpu_special_ids, mask_prob=e.mask_token_prob, random_prob=0.0)
        batch["original_ids"] = ids
        batch["masked_index"] = masked_positions(chosen)  # (N,)
        batch["sample_u"] = torch.rand(batch["masked_index"].shape, generator=generator)  # (N,)
        return batch

    # ------------------------------------------------------------------ forward

    def masked_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator at the masked positions of a prepared batch: ``(logits (N, V) float32,
        targets (N,))``."""
        h = self.generator(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                           is_causal=False)  # (B, T, gen dim)
        h_sel, y = select_masked(h, batch["labels"], IGNORE_INDEX, batch["masked_index"])  # (N, gen dim), (N,)
        return self.generator_head(h_sel)[:, : self.cfg.vocab_size].float(), y

    @torch.no_grad()
    def replace(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator's input and labels: ``original_ids`` with a token sampled from
        ``logits (N, V)`` (with the batch's ``sample_u``) at every masked position, and
        ``replaced (B, T)`` bool, exactly "differs from the original" (a sampled token equal
        to the original is not a replacement). Without gradient: the samples are ids."""
        original, index = batch["original_ids"], batch["masked_index"]
        sampled = sample_from_logits(logits, batch["sample_u"], self.electra.temperature)  # (N,)
        corrupted = original.reshape(-1).index_copy(0, index.to(original.device), sampled.to(original.dtype))
        corrupted = corrupted.view(original.shape)  # (B, T)
        return corrupted, corrupted != original

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "sample_u" not in batch:
            raise ValueError("the batch has no masks; pass it through Electra.prepare_batch first")
        attn, types = batch.get("attention_mask"), batch.get("token_type_ids")

        # generator: masked LM at the masked positions only
        logits, y = self.masked_logits(batch)  # (N, V), (N,)
        n = torch.full((), float(batch["masked_index"].numel()), device=logits.device)  # a shape: known on the host
        mlm_loss = F.cross_entropy(logits, y, reduction="sum") / n.clamp(min=1)

        # replacements: sampled without gradient; a sample equal to the original is no replacement
        corrupted, replaced = self.replace(batch, logits)  # (B, T), (B, T)

        # discriminator: replaced or not, at every real token
        d_logits = self.detector(self.hidden(corrupted, attn, types))  # (B, T)
        w = attn.to(d_logits.dtype) if attn is not None else torch.ones_like(d_logits)  # (B, T)
        tokens = w.sum()
        target = replaced.to(d_logits.dtype)
        disc_loss = (F.binary_cross_entropy_with_logits(d_logits, target, reduction="none") * w).sum() / tokens.clamp(min=1)
        loss = mlm_loss + self.electra.disc_weight * disc_loss

        with torch.no_grad():
            flagged = (d_logits > 0).to(w.dtype) * w  # (B, T)
            positives = target * w
            caught = flagged * target
            metrics = {
                "loss": loss.detach(), "mlm_loss": mlm_loss.detach(), "disc_loss": disc_loss.detach(),
                "mlm_accuracy": (logits.argmax(dim=-1) == y).float().sum() / n.clamp(min=1),
                "accuracy": ((flagged == positives).to(w.dtype) * w).sum() / tokens.clamp(min=1),
                "precision": caught.sum() / flagged.sum().clamp(min=1),
                "recall": caught.sum() / positives.sum().clamp(min=1),
                "replaced_fraction": positives.sum() / tokens.clamp(min=1),
                # counts per batch, from which eval_metrics pools precision and recall exactly
                "replaced_tokens": positives.sum(), "flagged_tokens": flagged.sum(), "caught_tokens": caught.sum(),
            }
        return loss, metrics

    def eval_metrics(self, ev: dict[str, float], data, log) -> dict[str, float]:
        """Precision and recall of "replaced" pooled over the held-out batches (their
        per-batch mean weighs a batch with few replacements as much as any other)."""
        return {"precision": ev["caught_tokens"] / max(ev["flagged_tokens"], 1e-9) if ev["flagged_tokens"] else 0.0,
                "recall": ev["caught_tokens"] / max(ev["replaced_tokens"], 1e-9) if ev["replaced_tokens"] else 0.0}

    # ------------------------------------------------------------------ cost

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per input token: both networks forward and backward, the generator's
        vocabulary projection only at the ``mask_rate`` masked positions, none for the discriminator."""
        m, g = self.cfg, self.gen_cfg
        width = m.embedding_dim or m.dim
        disc = transformer_flops_per_token(m, self.backbone.num_params(), seq_len) - 6.0 * m.dim * m.vocab_size
        disc += 6.0 * sum(p.numel() for p in self.detector.parameters())
        gen = transformer_flops_per_token(g, self.generator.num_params(), seq_len) - 6.0 * g.dim * g.vocab_size
        gen += 6.0 * self.electra.mask_rate * (g.dim * width + width * m.vocab_size)
        return disc + gen

    def flops_per_sample(self) -> float:
        return self.block_size * self.flops_per_token(self.block_size)

    # ------------------------------------------------------------------ end-of-run picture

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[dict[str, torch.Tensor]], cfg: RunConfig, out_dir: Path) -> str:
        """Held-out passages as the discriminator saw them: each replaced token as
        ``[original->sample]``, marked ``!`` where the discriminator flagged it; tokens it
        flagged that were not replaced are marked ``?``."""
        count = self.electra.report_examples
        if count <= 0 or not eval_batches:
            return ""
        device = next(self.parameters()).device
        rows = eval_batches[0]["input_ids"][:count, :48]
        batch = self.prepare_batch({"input_ids": rows}, torch.Generator().manual_seed(cfg.train.seed))
        batch = {k: v.to(device) for k, v in batch.items()}
        with eval_mode(self):
            corrupted, _ = self.replace(batch, self.masked_logits(batch)[0])
            flagged = self.discriminator_logits(corrupted) > 0
        original = batch["original_ids"]
        lines = ["replaced-token detection on held-out text ([original->generator's sample], ! flagged by the "
                 "discriminator, ? flagged but not replaced)"]
        for r in range(corrupted.shape[0]):
            pieces = []
            for t in range(corrupted.shape[1]):
                o, c, f = int(original[r, t]), int(corrupted[r, t]), bool(flagged[r, t])
                word = tokenizer.decode([o])
                if c != o:
                    pieces.append(f"{_lead(word)}[{word.strip()}->{tokenizer.decode([c]).strip()}]{'!' if f else ''}")
                else:
                    pieces.append(word + ("?" if f else ""))
            lines.append(f"{r + 1:>2}. " + "".join(pieces).replace("\n", " ").strip())
        return "\n".join(lines)


def _lead(piece: str) -> str:
    return piece[: len(piece) - len(piece.lstrip())]
