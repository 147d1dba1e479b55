"""Contrastive predictive coding for text (van den Oord, Li and Vinyals, 2018).

A block of ``T`` tokens is cut into ``S = T / L`` segments of ``L = cpc.segment_len``
tokens. Three parts, all built from the shared core:

- ``encoder``: a bidirectional :class:`~lmssl.models.TextBackbone` (``cpc.encoder_layers``
  deep, positions ``0 .. L-1`` inside a segment) reads each segment on its own; the
  mean of its hidden states is the segment's latent ``z_t``.
- ``context``: a causal :class:`~lmssl.models.Transformer` (``model.n_layers`` deep, its
  own segment positions) over ``z_1 .. z_S`` gives ``c_t``, a summary of segments ``<= t``.
- ``predictors``: one linear map ``W_k`` per offset ``k = 1 .. K`` (``cpc.prediction_steps``);
  ``W_k c_t`` must pick out ``z_{t+k}`` among candidate latents with InfoNCE
  (:func:`lmssl.losses.info_nce_with_accuracy`).

The score of candidate ``z_j`` for the prediction made at time ``t`` is the paper's
bilinear ``(W_k c_t) . z_j``, with the latent L2-normalised and the product divided by
``cpc.temperature``; the prediction is not normalised (its length is the model's
confidence) and ``W_k`` starts at zero, so an untrained model predicts the uniform
distribution. This matters: with both sides normalised (cosine similarity), the only way
for the loss to shed the variance of scores that carry no information yet is to make all
latents equal, and on text it does so within a few dozen steps (``z_std`` -> 0, loss stuck
at ``log(candidates)``); here a ``W_k`` that has nothing to predict simply stays small.
With an unnormalised prediction the temperature acts as the scale of the logits (how fast
they can grow), not as a bound on them.

Candidates (``cpc.negatives``):

- ``batch``: every latent of every sequence and time step in the batch, gathered from all
  processes with :func:`lmssl.losses.gather_with_grad` (``W * B * S`` candidates);
- ``sequence``: the ``S`` latents of the query's own sequence (the other time steps are
  the negatives), which forces the prediction to use order, not only topic.

Either way the positive ``z_{t+k}`` is among the candidates, so chance accuracy is
``1 / candidates``. The loss is the mean over offsets of the per-offset InfoNCE (the
paper sums them; the mean keeps the loss on the scale of one InfoNCE).

Module layout: ``encoder`` is a stock ``TextBackbone`` whose config
(:attr:`CPC.encoder_cfg`: ``model.*`` with ``n_layers=cpc.encoder_layers``,
``causal=False``, ``max_positions=L``) describes it completely, so it can be exported as a
``transformers`` backbone on its own (``bert`` family -> ``BertModel``); ``backbone`` is
an alias of it for code that looks for that name. The context network and predictors are
CPC-only.

Padding (unpacked data): a batch with an ``attention_mask`` is padded on the right up to
a multiple of ``L``; a segment with no real token is never a query nor a positive (it
stays among the candidates as an easy negative, which keeps shapes equal across
processes), and pooling averages real tokens only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmssl.config import ModelConfig, RunConfig
from lmssl.errors import UserError
from lmssl.losses import gather_with_grad, info_nce_with_accuracy, rank_offset
from lmssl.models import TextBackbone, Transformer, eval_mode, init_weights
from lmssl.nn import LearnedPositions, sincos_positions
from lmssl.models.flops import transformer_flops_per_token
from lmssl.objectives import Objective, register

NEGATIVES = ("batch", "sequence")


@dataclass
class CPCConfig:
    """The ``cpc:`` section of a recipe."""

    segment_len: int = 8  # tokens per segment; each segment becomes one latent z_t
    encoder_layers: int = 2  # layers of the bidirectional segment encoder
    prediction_steps: int = 4  # K: predict z_{t+1} .. z_{t+K}
    temperature: float = 0.1  # InfoNCE temperature
    negatives: str = "batch"  # batch: all other (sequence, time) latents | sequence: other times of the same sequence


def check_cpc_config(model: ModelConfig, cpc: CPCConfig, block_size: int) -> None:
    """One clear :class:`UserError` for a CPC setting that cannot work with this block size."""
    L, K = cpc.segment_len, cpc.prediction_steps
    if L < 1:
        raise UserError(f"cpc.segment_len must be at least 1, got {L}")
    if block_size % L:
        lower, upper = block_size // L * L, (block_size // L + 1) * L
        raise UserError(f"data.block_size={block_size} is not a multiple of cpc.segment_len={L}; set data.block_size "
                        f"to {upper}" + (f" or {lower}" if lower else "") + " (or pick a segment length that divides it)")
    S = block_size // L
    if not 1 <= K <= S - 1:
        raise UserError(f"cpc.prediction_steps={K} needs at least {K + 1} segments per block, but data.block_size="
                        f"{block_size} / cpc.segment_len={L} gives {S}; lower cpc.prediction_steps or the segment length")
    if cpc.negatives not in NEGATIVES:
        raise UserError(f"cpc.negatives must be batch or sequence, got '{cpc.negatives}'")
    if not cpc.temperature > 0:
        raise UserError(f"cpc.temperature must be > 0, got {cpc.temperature}")
    if cpc.encoder_layers < 1:
        raise UserError(f"cpc.encoder_layers must be at least 1, got {cpc.encoder_layers}")
    if model.max_positions < L:
        raise UserError(f"model.max_positions={model.max_positions} is shorter than cpc.segment_len={L}")


def encoder_config(model: ModelConfig, cpc: CPCConfig) -> ModelConfig:
    """The segment encoder: ``model.*`` with ``cpc.encoder_layers`` layers, bidirectional, ``L`` positions."""
    return dataclasses.replace(model, n_layers=cpc.encoder_layers, causal=False, max_positions=cpc.segment_len)


def context_config(model: ModelConfig, cpc: CPCConfig) -> ModelConfig:
    """The context network: ``model.*`` (depth ``model.n_layers``), causal, one position per segment."""
    return dataclasses.replace(model, causal=True, max_positions=max(1, model.max_positions // cpc.segment_len))


@register
class CPC(Objective):
    """Segment encoder + causal context network + per-offset predictors.

    ``forward(batch)`` with ``batch["input_ids"] (B, T)`` (and optionally
    ``attention_mask (B, T)``) returns the InfoNCE loss and metrics ``loss_k{k}``,
    ``acc_k{k}`` per offset, ``loss``, ``accuracy`` (mean over offsets), ``chance``
    (``1 / candidates``) and ``z_std`` (collapse monitor, see :func:`latent_std`).
    """

    name = "cpc"
    modality = "text"
    Config = CPCConfig
    description = "contrastive predictive coding"
    loss_label = "loss (InfoNCE, nats)"
    recipe = "cpc_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.max_positions=64",
                       "data.block_size=32", "cpc.prediction_steps=2", "optim.lr=3e-3")
    features_description = "mean of the context vectors c_t over the segments holding text"

    def __init__(self, cfg: ModelConfig, cpc: CPCConfig, micro_batch_size: int = 16, block_size: int = 0) -> None:
        super().__init__()
        self.block_size = block_size or cfg.max_positions
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is normally taken from the tokenizer)")
        self.cfg, self.cpc = cfg, cpc
        self.micro_batch_size = micro_batch_size  # only for the FLOP count of the similarity matrix
        self.encoder_cfg = encoder_config(cfg, cpc)
        self.context_cfg = context_config(cfg, cpc)
        D, c = cfg.dim, self.context_cfg
        self.encoder = TextBackbone(self.encoder_cfg)  # (B*S, L) -> (B*S, L, D); initialises itself
        self.context_positions = LearnedPositions(c.max_positions, D) if c.positions == "learned" else None
        if c.positions == "sincos":
            self.register_buffer("context_sincos", sincos_positions(c.max_positions, D), persistent=False)
        self.context = Transformer(c)  # (B, S, D) -> (B, S, D), causal; RoPE (if configured) lives inside
        self.predictors = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(cpc.prediction_steps))
        init_weights(self.context, c)
        for w in self.predictors:  # zero: the untrained model predicts the uniform distribution (see module doc)
            nn.init.zeros_(w.weight)
        if self.context_positions is not None:
            nn.init.normal_(self.context_positions.weight, 0.0, c.init_std)

    @property
    def backbone(self) -> TextBackbone:
        """The segment encoder: the part of a CPC run that exports as a ``transformers`` backbone."""
        return self.encoder

    # ------------------------------------------------------------------ the three parts

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``input_ids (B, T)`` -> ``(z (B, S, D), valid (B, S) bool or None)``.

        Without a mask ``T`` must be a multiple of ``L``; with one, the batch is padded on
        the right to the next multiple and ``valid`` marks segments holding a real token.
        """
        L = self.cpc.segment_len
        B, T = input_ids.shape
        if T % L:
            if attention_mask is None:
                raise ValueError(f"sequence length {T} is not a multiple of cpc.segment_len={L}; set data.block_size "
                                 "to a multiple of it, or pass an attention_mask so the batch can be padded")
            pad = L - T % L
            input_ids = F.pad(input_ids, (0, pad))
            attention_mask = F.pad(attention_mask, (0, pad))
        S = input_ids.shape[1] // L
        segments = input_ids.reshape(B * S, L)  # (B*S, L)
        if attention_mask is None:
            h = self.encoder(segments, is_causal=False)  # (B*S, L, D)
            return h.mean(dim=1).view(B, S, -1), None
        keep = attention_mask.reshape(B * S, L).bool()  # (B*S, L)
        valid = keep.any(dim=1)  # (B*S,)
        # an all-padding segment attends everywhere (no NaN from an empty softmax); it is ignored later
        h = self.encoder(segments, keep | ~valid[:, None], is_causal=False)  # (B*S, L, D)
        w = keep.to(h.dtype)[..., None]  # (B*S, L, 1)
        z = (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B*S, D)
        return z.view(B, S, -1), valid.view(B, S)

    def contextualize(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, S, D)`` -> ``c (B, S, D)``, ``c_t`` seeing ``z_1 .. z_t`` only."""
        S = z.shape[1]
        if S > self.context_cfg.max_positions:
            raise ValueError(f"{S} segments exceed the context network's {self.context_cfg.max_positions} positions "
                             f"(model.max_positions / cpc.segment_len)")
        if self.context_positions is not None:
            z = z + self.context_positions(torch.arange(S, device=z.device))
        elif self.context_cfg.positions == "sincos":
            z = z + self.context_sincos[:S].to(z.dtype)
        return self.context(z, is_causal=True)

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        check_cpc_config(cfg.model, cfg.cpc, cfg.data.block_size)

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer) -> CPC:
        check_cpc_config(cfg.model, cfg.cpc, cfg.data.block_size)
        return cls(cfg.model, cfg.cpc, cfg.train.micro_batch_size, cfg.data.block_size)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Frozen features: ``input_ids (B, T)`` -> ``(B, D)``, see :meth:`context_features`."""
        return self.context_features(batch["input_ids"], batch.get("attention_mask"))

    def flops_per_sample(self) -> float:
        return self.block_size * self.flops_per_token(self.block_size)

    def context_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Frozen features for probing: ``(B, T) -> (B, D)``, the mean of the context vectors
        ``c_t`` over the segments that hold text.

        The mean rather than the last ``c_S``: every ``c_t`` was trained to summarise the
        text so far, and averaging them weighs the whole passage evenly instead of leaning on
        one position (on the bundled genre task the mean also probes better than ``c_S``).
        """
        z, valid = self.encode(input_ids, attention_mask)
        c = self.contextualize(z)  # (B, S, D)
        if valid is None:
            return c.mean(dim=1)
        w = valid.to(c.dtype)[..., None]  # (B, S, 1)
        return (c * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)

    # ------------------------------------------------------------------ loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.compute(batch, gather=True)

    def compute(self, batch: dict[str, torch.Tensor], gather: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` with the all-gather of ``batch`` negatives optional: ``gather=False``
        keeps this process's candidates only (for code that runs on one process, such as
        :meth:`report`; the gather is a collective that every process must join)."""
        z, valid = self.encode(batch["input_ids"], batch.get("attention_mask"))  # (B, S, D), (B, S)
        c = self.contextualize(z)  # (B, S, D)
        B, S, D = z.shape
        zn = F.normalize(z, dim=-1)  # (B, S, D) targets on the unit sphere
        preds = [predictor(c[:, : max(S - k, 0)]) for k, predictor in enumerate(self.predictors, start=1)]
        losses, accs, candidates = predictive_nce(preds, zn, self.cpc.temperature, self.cpc.negatives, valid, gather)
        metrics: dict[str, torch.Tensor] = {}
        for k, (loss_k, acc_k) in enumerate(zip(losses, accs), start=1):
            metrics[f"loss_k{k}"] = loss_k.detach()
            metrics[f"acc_k{k}"] = acc_k.detach()
        loss = torch.stack(losses).mean()
        metrics["loss"] = loss.detach()
        metrics["accuracy"] = torch.stack(accs).mean().detach()
        metrics["chance"] = torch.tensor(1.0 / candidates, device=z.device)
        metrics["z_std"] = latent_std(zn.detach().reshape(B * S, D), None if valid is None else valid.reshape(-1))
        return loss, metrics

    # ------------------------------------------------------------------ accounting and report

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per input token (forward + backward): the encoder on ``L``-token
        segments, the context network and predictors on ``S = seq_len / L`` latents (once per
        ``L`` tokens), and the similarity matrix against ``micro_batch_size * S`` candidates."""
        L, K, D = self.cpc.segment_len, self.cpc.prediction_steps, self.cfg.dim
        S = max(1, seq_len // L)
        enc = transformer_flops_per_token(dataclasses.replace(self.encoder_cfg, vocab_size=0),
                                          self.encoder.num_params(), L)
        ctx_params = sum(p.numel() for p in self.context.parameters()) + K * D * D
        ctx = transformer_flops_per_token(dataclasses.replace(self.context_cfg, vocab_size=0), ctx_params, S) / L
        candidates = S if self.cpc.negatives == "sequence" else self.micro_batch_size * S
        queries_per_token = sum(max(S - k, 0) for k in range(1, K + 1)) / seq_len
        return enc + ctx + 6.0 * D * candidates * queries_per_token

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[dict[str, torch.Tensor]], cfg: RunConfig,
               out_dir: Path) -> str:
        """Per-offset held-out accuracy against chance, the collapse monitor, and one
        held-out example: which segment the model ranks first as the next one."""
        if not eval_batches:
            return "cpc: no held-out batches to report on"
        device = next(self.parameters()).device
        sums: dict[str, float] = {}
        with eval_mode(self):
            for batch in eval_batches:
                b = {k: v.to(device) for k, v in batch.items()}
                _, m = self.compute(b, gather=False)  # report runs on the main process only: no collective
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            example = self._example(tokenizer, eval_batches[0]["input_ids"][:1].to(device))
        avg = {k: v / len(eval_batches) for k, v in sums.items()}
        L, K = self.cpc.segment_len, self.cpc.prediction_steps
        T = eval_batches[0]["input_ids"].shape[1]
        lines = [f"CPC on held-out text: {sum(len(b['input_ids']) for b in eval_batches)} blocks of {T} tokens = "
                 f"{math.ceil(T / L)} segments of {L} tokens; negatives: {self.cpc.negatives} "
                 f"(about {1 / avg['chance']:.0f} candidates per query)",
                 f"  {'offset k':<9}{'accuracy':>10}{'chance':>9}{'x chance':>10}{'loss':>8}"]
        for k in range(1, K + 1):
            acc = avg[f"acc_k{k}"]
            lines.append(f"  {k:<9}{acc:>10.1%}{avg['chance']:>9.2%}{acc / avg['chance']:>10.1f}{avg[f'loss_k{k}']:>8.3f}")
        healthy = 1 / math.sqrt(self.cfg.dim)
        lines.append(f"  latent spread z_std {avg['z_std']:.4f} (about {healthy:.4f} = 1/sqrt(dim) when healthy; "
                     "near 0 means the latents collapsed)")
        return "\n".join(lines + example)

    def _example(self, tokenizer, ids: torch.Tensor) -> list[str]:
        """For one held-out block: the segment before a cut, the true next segment, and the
        candidate (from the same block) that the k=1 predictor ranks first."""
        z, _ = self.encode(ids)
        c = self.contextualize(z)
        S = z.shape[1]
        if S < 2:
            return []
        L = self.cpc.segment_len
        t = S // 2 - 1  # a cut in the middle of the block
        scores = F.normalize(z[0], dim=-1) @ self.predictors[0](c[0, t])  # (S,)
        top = int(scores.argmax())
        rank = int((scores > scores[t + 1]).sum()) + 1
        seg = lambda i: repr(tokenizer.decode(ids[0, i * L:(i + 1) * L].tolist()))  # noqa: E731
        return [f"  example (k=1, candidates: the {S} segments of one held-out block):",
                f"    ... {seg(t)}  ->  true next {seg(t + 1)} (ranked {rank} of {S})",
                f"    ranked first: {seg(top)}" + ("  (correct)" if top == t + 1 else "")]


def predictive_nce(preds: list[torch.Tensor], zn: torch.Tensor, temperature: float, negatives: str = "batch",
                   valid: torch.Tensor | None = None, gather: bool = True
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """CPC's InfoNCE for every offset, on :func:`lmssl.losses.info_nce_with_accuracy`.

    Args:
        preds: ``K`` tensors; ``preds[k-1]`` is ``(B, S-k, D)``, the predictions made at
            times ``0 .. S-k-1`` for offset ``k`` (unnormalised: their length is the confidence).
        zn: ``(B, S, D)`` L2-normalised latents; the positive of ``preds[k-1][b, t]`` is ``zn[b, t+k]``.
        temperature: divides the scores ``pred . zn``.
        negatives: ``"batch"``: candidates are all ``B * S`` latents (times ``W`` processes
            with ``gather``); ``"sequence"``: the ``S`` latents of the query's own sequence.
        valid: ``(B, S)`` bool, segments holding text; queries whose own or target segment
            is empty are left out (None: all count).
        gather: all-gather ``batch`` candidates across processes (a collective).

    Returns:
        ``(losses, accuracies, candidates)``: per offset the mean loss and top-1 accuracy
        over its queries (a zero loss that keeps the graph, and accuracy 0, when an offset
        has none), and the number of candidates each query is ranked among.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    B, S, D = zn.shape
    if negatives == "batch":
        keys, offset = zn.reshape(B * S, D), 0  # (B*S, D)
        if gather:
            keys, offset = gather_with_grad(keys), rank_offset(B * S)  # (W*B*S, D), this rank's rows at `offset`
        candidates = keys.shape[0]
    else:
        candidates = S
    rows = torch.arange(B, device=zn.device)[:, None]  # (B, 1)
    losses, accs = [], []
    for k, pred in enumerate(preds, start=1):
        n = pred.shape[1]  # S - k query times
        target_t = torch.arange(k, k + n, device=zn.device)  # (S-k,)
        use = None if valid is None else valid[:, :n] & valid[:, k:k + n]  # (B, S-k)
        zero = (pred.sum() * 0.0, torch.zeros((), device=zn.device))
        if negatives == "batch":
            pos = (offset + rows * S + target_t[None, :]).reshape(-1)  # (B*(S-k),) index among the keys
            q = pred.reshape(-1, D)  # (B*(S-k), D)
            if use is not None:
                q, pos = q[use.reshape(-1)], pos[use.reshape(-1)]
            loss, acc = info_nce_with_accuracy(q, keys, pos, temperature, normalize=False) if len(q) else zero
        else:  # one InfoNCE per sequence: its own S latents are the candidates
            total, hits, count = zero[0], zero[1], 0
            for b in range(B):
                q, pos = pred[b], target_t
                if use is not None:
                    q, pos = q[use[b]], pos[use[b]]
                if len(q):
                    lb, ab = info_nce_with_accuracy(q, zn[b], pos, temperature, normalize=False, reduction="sum")
                    total, hits, count = total + lb, hits + ab * len(q), count + len(q)
            loss, acc = (total / count, hits / count) if count else zero
        losses.append(loss)
        accs.append(acc)
    return losses, accs, candidates


def latent_std(zn: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Collapse monitor: mean over dimensions of the std over rows of L2-normalised latents
    ``zn (N, D)``. About ``1/sqrt(D)`` when latents spread over the sphere, 0 when they all
    coincide. ``valid (N,)`` selects the rows that count."""
    if valid is not None:
        zn = zn[valid]
    if zn.shape[0] < 2:
        return torch.zeros((), device=zn.device)
    return zn.float().std(dim=0).mean()
