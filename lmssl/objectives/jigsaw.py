"""Jigsaw puzzles (Noroozi and Favaro, 2016): cut an image into a 3 x 3 grid of tiles, shuffle the
tiles by one of ``N`` permutations, and recognise which permutation it was.

The puzzle
----------
From each image's augmented view (a random resized crop of ``vision.crop_min_scale``-100% of the area
and a flip, :func:`lmssl.data.views.mae_views`) a square of ``3 * jigsaw.cell`` pixels is taken at a
random offset and divided into 3 x 3 cells; from each cell a tile of ``jigsaw.tile`` pixels is cut at
a random offset inside it (the paper: a 225-pixel crop, 75-pixel cells, 64-pixel tiles; here, for 28-px
images, 27 = 3 x 9-pixel cells and 7-pixel tiles, resized to ``jigsaw.input_size`` = 8 pixels, two
4 x 4 patches a side for the ViT). The tiles are fed in the order of a permutation ``p`` of the
permutation set: input slot ``i`` holds the tile of grid cell ``p[i]`` (cells numbered in reading order),
so putting input tile ``i`` back at cell ``p[i]`` restores the grid.

Each tile goes through the shared backbone on its own (the paper's siamese "context-free network": nine
towers with shared weights), pooled to ``h_i``; the nine features are concatenated in input order and a
classifier (:class:`lmssl.models.heads.MLPHead`) predicts the permutation's index among ``N``, with
cross-entropy. Chance is ``1 / N``.

The permutation set
-------------------
Not all 9! = 362,880 orders: ``jigsaw.permutations`` of them, chosen by the paper's greedy algorithm for
a maximal Hamming distance (:func:`hamming_permutations`): start from a uniformly drawn permutation,
then repeatedly add the remaining permutation whose summed Hamming distance to those already chosen is
largest, so that any two puzzles of the set differ in many tile positions (in the paper's ablation,
sets of a larger average distance gave better features). Ties, which the paper leaves open, go to the
larger minimum distance to the chosen ones, then to a seeded random draw. The set is drawn from
``train.seed`` and kept as a persistent buffer (``permutations``, ``(N, 9)`` int64) in the state dict,
so that resume, ``lmssl probe`` and any reload read the puzzles of the run that made the checkpoint.

Shortcuts, and how each is blocked
----------------------------------
- Edge continuity: adjacent tiles in the image share edges (a line that continues, the same grey on
  both sides) that would solve the puzzle without understanding the object. The tiles are cut with
  random offsets inside their cells (``cell - tile`` pixels of jitter each way), so two neighbouring
  tiles are separated by a gap of 0 to ``2 * (cell - tile)`` pixels (here 0-4, 2 on average, as the
  paper's 0-22 with 11 on average at 225 px), and the gap varies, so no fixed stitching rule works.
  Resizing the tile (7 -> 8 px) resamples it, which blurs what is left of exact pixel continuity.
- Absolute position: each tile is fed to the backbone alone, at its own size, with the same position
  table (a ViT's positions are those of the tile's own small grid; a ResNet's padding is the same for
  every tile), so nothing tells the network where in the image the tile was cut but its content.
- Low-level statistics (the brightness or contrast of a tile betraying its place, e.g. a lighting
  gradient): with ``jigsaw.tile_norm`` (on) every tile is normalised to zero mean and unit variance on
  its own, as in the paper.
- Chromatic aberration, which the paper counters by sometimes turning tiles grey, does not arise on
  greyscale images (the bundled set); on colour data it is not treated here.
- Compared features: the towers share nothing but weights until the classifier, so low-level pixel
  comparisons across tiles cannot happen before each tile has been summarised.

The labels (the permutation index, the square's offset, the per-cell jitter) are drawn on the CPU in
:meth:`Jigsaw.prepare_batch` from a counter keyed by the sample's global position
(:func:`lmssl.data.views.counter_uniform`, as the views are): they do not depend on the batch split, the
process count or a resume. Looking the permutation up in the device buffer, placing and cutting the
tiles are batched tensor ops in :meth:`Jigsaw.forward`, with no host read. Held-out batches are scored
on the plain images. ``features`` is the pooled backbone on the whole plain image (what the tiles'
backbone gives a downstream task); the online probe reads the same, without gradient, when it is on.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lmssl.data.views import counter_uniform
from lmssl.errors import UserError
from lmssl.models.heads import MLPHead
from lmssl.models.vision import image_backbone
from lmssl.objectives import register
from lmssl.objectives._pretext import PretextObjective, cut_squares, draw_ints, resize_squares

STREAM = 0x4A4947  # counter stream of the puzzle draws ("JIG"; the views use streams 0, 1, ...)
GRID = 3  # tiles per side
TILES = GRID * GRID


@dataclass
class JigsawConfig:
    """The ``jigsaw:`` section of a recipe."""

    permutations: int = 100  # N, the classes: size of the maximal-Hamming-distance permutation set (paper: 1000)
    cell: int = 9  # side of each of the 3 x 3 grid cells, pixels of the view (paper: 75 of a 225-px crop)
    tile: int = 7  # side of the tile cut at a random offset inside its cell (paper: 64); cell - tile is the jitter
    input_size: int = 8  # tiles are resized to this side for the backbone (a multiple of vision.patch_size; 0: tile)
    tile_norm: bool = True  # normalise every tile to zero mean and unit variance on its own (the paper's)
    head_hidden: int = 512  # hidden width of the permutation classifier
    head_layers: int = 2  # linear layers of the classifier over the nine concatenated tile features


# ------------------------------------------------------------------------------------- the permutation set


@functools.lru_cache(maxsize=1)
def _all_permutations() -> np.ndarray:
    """Every permutation of the nine tiles in lexicographic order: ``(9!, 9)`` int8."""
    return np.array(list(itertools.permutations(range(TILES))), dtype=np.int8)


@functools.lru_cache(maxsize=8)
def _hamming_permutations(n: int, seed: int) -> np.ndarray:
    every = _all_permutations()
    rng = np.random.default_rng([seed, 0x4A4947])
    total = np.zeros(len(every), np.int64)  # summed Hamming distance to the chosen ones
    nearest = np.full(len(every), TILES + 1, np.int64)  # minimum Hamming distance to the chosen ones
    taken = np.zeros(len(every), bool)
    chosen = [int(rng.integers(len(every)))]  # the paper's uniformly drawn first permutation
    for _ in range(n - 1):
        last = chosen[-1]
        taken[last] = True
        d = (every != every[last]).sum(axis=1)  # (9!,) Hamming distance to the newest one
        total += d
        np.minimum(nearest, d, out=nearest)
        score = total * (TILES + 2) + nearest  # sum first (the paper's criterion), then the minimum
        score[taken] = -1
        best = np.flatnonzero(score == score.max())
        chosen.append(int(best[rng.integers(len(best))]))
    return every[chosen].astype(np.int64)


def hamming_permutations(n: int, seed: int) -> torch.Tensor:
    """Noroozi and Favaro's maximal-Hamming-distance permutation set: ``(n, 9)`` int64, row ``k`` the
    order of the tiles of puzzle ``k`` (a function of ``n`` and ``seed`` only).

    Greedy, as the paper's algorithm: the first permutation is drawn uniformly from all 9!; each next one
    is, among the permutations not chosen yet, one whose summed Hamming distance (tile positions that
    differ) to the chosen ones is largest; ties go to the largest minimum distance to the chosen ones,
    then to a random draw from ``seed``. About 15 ms per permutation on a CPU (the full 9! table is
    scanned each time), cached per ``(n, seed)`` within a process."""
    if not 1 <= n <= len(_all_permutations()):
        raise ValueError(f"the permutation set holds 1 to 9! = 362880 permutations, got {n}")
    return torch.from_numpy(_hamming_permutations(int(n), int(seed)).copy())


# ------------------------------------------------------------------------------------- the objective


@register
class Jigsaw(PretextObjective):
    """Augmented view -> 3 x 3 tiles with gaps and jitter, shuffled -> nine shared-weight backbone
    passes -> concatenated features -> N-way classifier over the permutation set."""

    name = "jigsaw"
    Config = JigsawConfig
    description = "solving 3x3 jigsaw puzzles over a maximal-Hamming-distance permutation set (Noroozi & Favaro)"
    loss_label = "loss (cross-entropy over the permutation set)"
    metric_names = {"accuracy": "jigsaw accuracy (pretext)", "chance": "jigsaw chance (1 / permutations)"}
    recipe = "jigsaw_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "jigsaw.head_hidden=64",
                       "jigsaw.permutations=10")

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=image_backbone(cfg.model, cfg.vision))
        backbone = self.backbone
        self.jig, self.seed = cfg.jigsaw, cfg.train.seed
        self.register_buffer("permutations", hamming_permutations(self.jig.permutations, self.seed))  # (N, 9)
        self.head = MLPHead(TILES * backbone.dim, self.jig.head_hidden, self.jig.permutations, self.jig.head_layers)

    @property
    def num_classes(self) -> int:
        return self.jig.permutations

    @classmethod
    def validate_config(cls, cfg) -> None:
        j, v = cfg.jigsaw, cfg.vision
        if not 2 <= j.permutations <= 362880:
            raise UserError(f"jigsaw.permutations must be 2 to 9! = 362880 (paper: 1000; 100 suits 28-px images), "
                            f"got {j.permutations}")
        if not 1 <= j.tile <= j.cell:
            raise UserError(f"jigsaw.tile ({j.tile}) must be 1 to jigsaw.cell ({j.cell}) pixels: each tile is cut "
                            "inside its cell")
        if GRID * j.cell > v.image_size:
            raise UserError(f"the 3 x 3 grid of jigsaw.cell={j.cell}-pixel cells needs {GRID * j.cell} pixels but "
                            f"vision.image_size is {v.image_size}: lower jigsaw.cell")
        size = j.input_size or j.tile
        if cfg.model.family != "resnet" and size % v.patch_size:
            raise UserError(f"tiles enter the ViT at jigsaw.input_size={size} pixels, not a multiple of "
                            f"vision.patch_size={v.patch_size}: set jigsaw.input_size to one")
        if j.head_layers < 1 or j.head_hidden < 1:
            raise UserError("jigsaw.head_layers and jigsaw.head_hidden must be at least 1")

    # ------------------------------------------------------------------ the puzzle

    def draw(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The puzzles of the samples at global positions ``index (B,)``: ``label (B,)`` (row of the
        permutation set), ``offset (B, 2)`` (top, left of the grid square in the view) and ``jitter
        (B, 9, 2)`` (top, left of each cell's tile inside the cell, cells in reading order), int64."""
        j = self.jig
        u = counter_uniform(self.seed, index, STREAM, 3 + 2 * TILES)  # (B, 21)
        B = u.shape[0]
        return {"label": draw_ints(u[:, 0], j.permutations),
                "offset": draw_ints(u[:, 1:3], self.vision.image_size - GRID * j.cell + 1),
                "jitter": draw_ints(u[:, 3:], j.cell - j.tile + 1).view(B, TILES, 2)}

    def tile_corners(self, puzzle: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left corners ``(top, left)``, each ``(B, 9)``, of the tiles in input order: slot ``i`` holds
        the tile of cell ``perm[i]``, ``perm`` the sample's row of the permutation set (looked up on the
        buffer's device)."""
        device = self.permutations.device
        perm = self.permutations[puzzle["label"].to(device)]  # (B, 9): the cell shown in each input slot
        jitter = puzzle["jitter"].to(device).gather(1, perm[..., None].expand(-1, -1, 2))  # (B, 9, 2)
        offset = puzzle["offset"].to(device)
        cell = self.jig.cell
        top = offset[:, :1] + (perm // GRID) * cell + jitter[..., 0]
        left = offset[:, 1:] + (perm % GRID) * cell + jitter[..., 1]
        return top, left

    def tiles(self, images: torch.Tensor, puzzle: dict[str, torch.Tensor]) -> torch.Tensor:
        """``images (B, C, S, S)`` -> the shuffled tiles the backbone sees, ``(B, 9, C, s, s)`` with
        ``s = jigsaw.input_size`` (or ``jigsaw.tile``), each normalised on its own with ``tile_norm``."""
        top, left = self.tile_corners(puzzle)
        tiles = resize_squares(cut_squares(images, top, left, self.jig.tile), self.jig.input_size or self.jig.tile)
        if self.jig.tile_norm:
            mean = tiles.mean(dim=(2, 3, 4), keepdim=True)
            inv_std = tiles.var(dim=(2, 3, 4), keepdim=True, unbiased=False).add(1e-5).rsqrt()
            tiles = (tiles - mean) * inv_std
        return tiles

    def pretext_logits(self, images: torch.Tensor, draws: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        tiles = self.tiles(images, draws)  # (B, 9, C, s, s)
        B = tiles.shape[0]
        h = self.embed(tiles.flatten(0, 1))  # (B * 9, D): each tile alone through the shared backbone
        return self.head(h.reshape(B, -1)), draws["label"]  # (B, 9 * D) -> (B, N)

    def flops_per_sample(self) -> float:
        """Nine tiles through the backbone, the classifier (forward and backward), and the probe's forward
        pass over the plain image when it is on."""
        head = sum(p.numel() for p in self.head.parameters())
        return TILES * self.backbone_flops(self.jig.input_size or self.jig.tile) + 6.0 * head + self.probe_flops()
