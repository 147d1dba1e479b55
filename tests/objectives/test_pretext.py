"""The classic pretext tasks: rotation, jigsaw, relative patch position, and colourisation.

Their labels are uniform over the classes and a function of the sample position only; each
transformation is really applied and can be undone from its label (rotating back recovers the
image, unshuffling the tiles recovers the grid, the neighbour lies at the labelled offset); the
jigsaw permutation set is the greedy maximal-Hamming-distance set, stored with the run; the
colouriser's input is the image's lightness and its targets the image's colours. Training through
the real loop is in test_conformance.py, host reads in tests/train/test_host_reads.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmssl import objectives
from lmssl.config import load_config
from lmssl.errors import UserError
from lmssl.objectives.colorization import ab_bins, from_cells, soft_encode, to_cells
from lmssl.objectives.jigsaw import GRID, _all_permutations, hamming_permutations
from lmssl.objectives.relative_position import NEIGHBOURS
from lmssl.objectives.rotation import rotate_quarter_turns
from tests.conftest import ROOT

SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "monitor.online_probe=false"]
RECIPES = {"rotation": "rotation_tiny", "jigsaw": "jigsaw_tiny", "relative_position": "relpos_tiny",
           "colorization": "colorization_cifar10"}


def build(name: str, *extra: str):
    quick = ["jigsaw.permutations=30"] if name == "jigsaw" else []  # a smaller set is quicker to choose
    cfg = load_config(ROOT / "recipes" / f"{RECIPES[name]}.yaml", SMALL + quick + list(extra))
    torch.manual_seed(0)
    return objectives.build(cfg, None)


def coded_images(n: int, size: int = 28) -> torch.Tensor:
    """Float images ``(n, 1, size, size)`` whose every pixel holds a different value (its position,
    plus an offset per image), so that a cut square names exactly where it came from."""
    grid = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
    return grid + 10_000.0 * torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)


def within_3_sigma(labels: torch.Tensor, classes: int) -> None:
    """Every class's count within 3 binomial standard deviations of ``n / classes``."""
    n = labels.numel()
    counts = torch.bincount(labels.reshape(-1), minlength=classes).double()
    assert counts.numel() == classes and labels.min() >= 0
    p = 1.0 / classes
    sigma = math.sqrt(n * p * (1 - p))
    worst = (counts - n * p).abs().max().item()
    assert worst <= 3 * sigma, f"a class is {worst:.0f} draws off the uniform {n * p:.0f} (3 sigma = {3 * sigma:.0f})"


POSITIONS = torch.arange(-4000, 16000)  # held-out positions are negative


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("name,extra,classes", [("rotation", (), 4), ("relative_position", (), 8),
                                                ("jigsaw", ("jigsaw.permutations=10",), 10)])
def test_labels_are_uniform(name, extra, classes):
    obj = build(name, *extra)
    draws = obj.draw(POSITIONS)
    within_3_sigma(draws["label"], classes)
    assert obj.num_classes == classes


def test_rotation_copies_cover_distinct_turns():
    obj = build("rotation", "rotation.rotations_per_image=4")
    labels = obj.draw(POSITIONS)["label"]  # (n, 4)
    assert (labels.sort(dim=1).values == torch.arange(4)).all()  # all four turns of every image
    within_3_sigma(labels[:, 0], 4)


def test_offsets_and_jitter_are_uniform():
    jig = build("jigsaw").draw(POSITIONS)  # cell 9, tile 7: jitter 0..2; 28 - 27: offset 0..1
    within_3_sigma(jig["jitter"], 3)
    within_3_sigma(jig["offset"], 2)
    rel = build("relative_position")
    d = rel.draw(POSITIONS)
    step = rel.rp.patch + rel.rp.gap
    # the neighbour's displacement from the centre, minus the layout step, is the jitter difference,
    # the difference of two uniforms on -1..1: a triangular distribution on -2..2
    rc = torch.tensor(NEIGHBOURS)[d["label"]]
    dy = d["top"][:, 1] - d["top"][:, 0] - (rc[:, 0] - 1) * step
    counts = torch.bincount(dy + 2, minlength=5).double() / len(dy)
    assert torch.allclose(counts, torch.tensor([1, 2, 3, 2, 1], dtype=torch.float64) / 9, atol=0.01)


@pytest.mark.parametrize("name", ["rotation", "jigsaw", "relative_position"])
def test_draws_depend_on_the_position_only(name):
    """The same positions get the same labels in any batch and order; prepare_batch takes them from
    batch["index"], not from the generator."""
    obj = build(name)
    whole = obj.draw(torch.arange(0, 64))
    part = obj.draw(torch.tensor([40, 3, 17]))
    for key in whole:
        assert torch.equal(part[key], whole[key][[40, 3, 17]]), key
    images = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    batch = {"images": images, "index": torch.tensor([40, 3, 17])}
    a = obj.prepare_batch(batch, torch.Generator().manual_seed(1))[name]
    b = obj.prepare_batch(batch, torch.Generator().manual_seed(2))[name]
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], part[k]) for k in a)
    other_seed = build(name, "train.seed=7").draw(torch.arange(0, 64))["label"]
    assert not torch.equal(other_seed, whole["label"])


# ---------------------------------------------------------------------------------------------- transformations


def test_rotation_is_applied_and_undone_by_its_label():
    x = coded_images(8)
    turns = torch.arange(8) % 4
    y = rotate_quarter_turns(x, turns)
    for i in range(8):
        k = int(turns[i])
        assert torch.equal(y[i], torch.rot90(x[i], k, dims=(1, 2)))  # counter-clockwise k quarter turns
        assert torch.equal(torch.rot90(y[i], -k, dims=(1, 2)), x[i])  # turning back recovers the image exactly
        assert torch.equal(y[i], x[i]) == (k == 0)


def test_rotation_forward_sees_the_turned_images():
    """The backbone input of forward is the plain image turned by the drawn label."""
    obj = build("rotation", "rotation.rotations_per_image=2").eval()
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    batch = obj.prepare_batch({"images": images, "index": torch.arange(6)}, torch.Generator())
    seen = []
    hook = obj.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        obj(batch)
    hook.remove()
    plain = obj.plain_images(batch).repeat_interleave(2, dim=0)
    labels = batch["rotation"]["label"].reshape(-1)
    back = torch.stack([torch.rot90(seen[0][i], -int(labels[i]), dims=(1, 2)) for i in range(12)])
    assert torch.equal(back, plain)


def test_jigsaw_unshuffling_recovers_the_tile_grid():
    obj = build("jigsaw", "jigsaw.permutations=30", "jigsaw.tile=8", "jigsaw.input_size=0", "jigsaw.tile_norm=false")
    x = coded_images(64)
    puzzle = obj.draw(torch.arange(64))
    tiles = obj.tiles(x, puzzle)  # (B, 9, 1, 7, 7) in input (shuffled) order
    perms = obj.permutations[puzzle["label"]]  # (B, 9): input slot i shows cell perm[i]
    cell, t = obj.jig.cell, obj.jig.tile
    for b in range(64):
        grid = torch.empty_like(tiles[b])
        grid[perms[b]] = tiles[b]  # unshuffle: input tile i goes back to cell perm[i]
        oy, ox = puzzle["offset"][b].tolist()
        for c in range(9):
            jy, jx = puzzle["jitter"][b, c].tolist()
            top, left = oy + (c // GRID) * cell + jy, ox + (c % GRID) * cell + jx
            assert torch.equal(grid[c, 0], x[b, 0, top:top + t, left:left + t])  # the cell's own tile, exactly
            assert 0 <= jy <= cell - t and 0 <= jx <= cell - t
    assert tiles.shape == (64, 9, 1, 8, 8)
    shuffled = (perms != torch.arange(9)).any(dim=1)
    assert shuffled.all()  # no puzzle is the identity in this set; the tiles really move


def test_jigsaw_tiles_are_normalised_and_resized():
    obj = build("jigsaw")  # tile 7 -> 8 px, normalised on its own
    views = obj.plain_images({"images": torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)})
    tiles = obj.tiles(views, obj.draw(torch.arange(4)))
    assert tiles.shape == (4, 9, 1, 8, 8)
    assert torch.allclose(tiles.mean(dim=(2, 3, 4)), torch.zeros(4, 9), atol=1e-5)
    assert torch.allclose(tiles.var(dim=(2, 3, 4), unbiased=False), torch.ones(4, 9), atol=1e-3)


def test_relative_position_neighbour_is_at_the_labelled_offset():
    obj = build("relative_position", "relative_position.input_size=0", "vision.patch_size=2")  # 6-px patches as cut
    rp = obj.rp
    x = coded_images(200)
    d = obj.draw(torch.arange(200))
    step, j, p = rp.patch + rp.gap, rp.jitter, rp.patch
    rc = torch.tensor(NEIGHBOURS)[d["label"]] - 1  # (B, 2): the neighbour's row, column offset in cells
    dy = d["top"][:, 1] - d["top"][:, 0]
    dx = d["left"][:, 1] - d["left"][:, 0]
    assert ((dy - rc[:, 0] * step).abs() <= 2 * j).all() and ((dx - rc[:, 1] * step).abs() <= 2 * j).all()
    # the direction is the label's: the sign of the displacement along each axis
    assert ((rc[:, 0] == 0) | (torch.sign(dy) == rc[:, 0])).all()
    assert ((rc[:, 1] == 0) | (torch.sign(dx) == rc[:, 1])).all()
    # the patches never touch: a gap of at least gap - 2 * jitter pixels along the offset axis
    apart = torch.maximum(dy.abs() * (rc[:, 0] != 0), dx.abs() * (rc[:, 1] != 0)) - p
    assert (apart >= rp.gap - 2 * j).all() and (apart >= 1).all()
    assert d["top"].min() >= 0 and (d["top"] + p).max() <= 28 and d["left"].min() >= 0 and (d["left"] + p).max() <= 28
    from lmssl.objectives._pretext import cut_squares

    pair = cut_squares(x, d["top"], d["left"], p)  # (B, 2, 1, p, p)
    for b in range(0, 200, 17):
        for k in range(2):
            top, left = int(d["top"][b, k]), int(d["left"][b, k])
            assert torch.equal(pair[b, k, 0], x[b, 0, top:top + p, left:left + p])


# ---------------------------------------------------------------------------------------------- the permutation set


def greedy_choices_hold(perms: np.ndarray) -> None:
    """Recheck the greedy criterion from scratch with one distance matrix: every permutation after the
    first has the largest summed Hamming distance to those before it among all not yet chosen, and the
    largest minimum distance among those ties."""
    every = _all_permutations()
    D = (every[:, None, :] != perms[None, :, :].astype(np.int8)).sum(-1)  # (9!, n)
    sums, mins = np.cumsum(D, axis=1), np.minimum.accumulate(D, axis=1)
    rows = [int(np.flatnonzero((every == p).all(1))[0]) for p in perms]
    for t in range(1, len(perms)):
        free = np.ones(len(every), bool)
        free[rows[:t]] = False
        best_sum = sums[free, t - 1].max()
        assert sums[rows[t], t - 1] == best_sum, f"step {t}: summed distance below the best remaining"
        tied = free & (sums[:, t - 1] == best_sum)
        assert mins[rows[t], t - 1] == mins[tied, t - 1].max(), f"step {t}: tie not broken by the minimum"


def test_hamming_permutation_set():
    a = hamming_permutations(30, seed=0)
    assert a.shape == (30, 9) and a.dtype == torch.int64
    assert (a.sort(dim=1).values == torch.arange(9)).all()  # permutations of the nine tiles
    assert len({tuple(p) for p in a.tolist()}) == 30  # distinct
    assert torch.equal(a, hamming_permutations(30, seed=0))  # deterministic for a seed
    b = hamming_permutations(30, seed=1)
    assert not torch.equal(a, b)  # the first permutation is drawn at random, as in the paper
    greedy_choices_hold(a.numpy())
    for perms in (a, b):
        d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
        pairs = d[torch.triu(torch.ones(30, 30, dtype=torch.bool), 1)]
        # what the greedy set reaches (measured: average 8.255 for any seed, minimum 5 or 6 at N = 30;
        # the largest possible distance is 9, and the paper's 1000-permutation set averages 8.00)
        assert pairs.float().mean() > 8.2 and pairs.min() >= 5
    # the identity is not forced in: the paper's algorithm starts from a random permutation
    assert not (a == torch.arange(9)).all(dim=1).any()


def test_permutation_set_is_stored_with_the_run():
    obj = build("jigsaw", "jigsaw.permutations=30")
    state = obj.state_dict()
    assert torch.equal(state["permutations"], hamming_permutations(30, seed=obj.seed))
    other = build("jigsaw", "jigsaw.permutations=30", "train.seed=3")
    assert not torch.equal(other.permutations, obj.permutations)
    other.load_state_dict(state)  # a reload (resume, probe, export) reads the run's own set
    assert torch.equal(other.permutations, obj.permutations)


def test_config_errors_are_one_line():
    for name, bad in [("jigsaw", "jigsaw.cell=10"), ("jigsaw", "jigsaw.input_size=6"), ("jigsaw", "jigsaw.tile=10"),
                      ("relative_position", "relative_position.gap=1"),
                      ("relative_position", "relative_position.patch=8"),
                      ("rotation", "rotation.rotations_per_image=5"), ("colorization", "colorization.stride=3")]:
        with pytest.raises(UserError) as err:
            load_config(ROOT / "recipes" / f"{RECIPES[name]}.yaml", [bad])
        assert "\n" not in str(err.value), str(err.value)
    # the bundled greyscale images with the colour recipe: one line that says RGB is needed
    with pytest.raises(UserError, match="colorization needs RGB images") as err:
        load_config(ROOT / "recipes" / "colorization_cifar10.yaml",
                    ["vision.channels=1", "vision.mean=[0.286104]", "vision.std=[0.353251]", "data.dataset="])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- colourisation


def colour_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Generated colour images, uint8 ``(n, 3, size, size)``: every 4x4 block one of three colours of
    distinct lightness (dark blue, mid green, light yellow), so colour follows from lightness."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[30, 40, 160], [40, 150, 50], [240, 225, 80]], dtype=torch.uint8)  # (3, 3)
    blocks = torch.randint(0, 3, (n, size // 4, size // 4), generator=g)
    pixels = palette[blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)]  # (n, size, size, 3)
    return pixels.permute(0, 3, 1, 2).contiguous()


def colour_model(*extra: str):
    return build("colorization", "vision.image_size=16", *extra)


def test_colorization_input_is_the_lightness_and_targets_the_colours():
    from kornia.color import lab_to_rgb, rgb_to_lab

    obj = colour_model("colorization.stride=1")
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)  # every pixel its own colour
    plain = obj.plain_images({"images": images})
    rgb = images.float() / 255.0
    lab = obj.lab(plain)
    assert torch.allclose(lab, rgb_to_lab(rgb), atol=1e-3)
    grey = obj.lightness_input(lab) * obj.rgb_std + obj.rgb_mean  # the backbone's input, in [0, 1]
    grey_lab = rgb_to_lab(grey)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    assert torch.allclose(grey_lab[:, 0], lab[:, 0], atol=0.05)  # the same lightness ...
    assert grey_lab[:, 1:].abs().max() < 0.05  # ... and no colour left
    # input lightness + target colours (stride 1: one cell per pixel) give the image back
    target = to_cells(lab[:, 1:], 1, obj.vision.patch_size)  # (B, N, 16, 2)
    restored = lab_to_rgb(torch.cat([grey_lab[:, :1], from_cells(target, obj.vision.patch_size, 1)], dim=1))
    assert (restored - rgb).abs().max() < 0.01
    # the classes: the nearest bin of each target colour is its rounded ab
    idx, w = soft_encode(target, obj.bins, 5, 5.0)
    assert torch.allclose(w.sum(-1), torch.ones_like(w[..., 0])) and (w[..., :-1] >= w[..., 1:] - 1e-6).all()
    nearest = obj.bins[idx[..., 0]]
    assert ((nearest - target).abs() <= 5.0 + 1e-3).all()


def test_colorization_cells_average_each_stride_block():
    lab_ab = torch.randn(2, 2, 16, 16)
    cells = to_cells(lab_ab, 4, 4)  # one cell per 4x4 patch
    assert cells.shape == (2, 16, 1, 2)
    assert torch.allclose(cells[1, 4 * 2 + 3, 0], lab_ab[1, :, 8:12, 12:16].mean(dim=(1, 2)))  # patch (2, 3)
    fine = to_cells(lab_ab, 2, 4)  # 2x2 cells per patch, reading order inside it
    assert torch.allclose(fine[0, 5, 3], lab_ab[0, :, 6:8, 6:8].mean(dim=(1, 2)))  # patch (1, 1), cell (1, 1)
    assert torch.equal(from_cells(to_cells(lab_ab, 1, 4), 4, 1), lab_ab)


def test_ab_bins_cover_the_srgb_gamut():
    bins = ab_bins(10.0)
    assert bins.shape[1] == 2 and 200 < len(bins) < 400  # 261 (Zhang et al. count 313 with their gamut test)
    assert ((bins / 10.0) == torch.round(bins / 10.0)).all()
    assert (bins == 0).all(dim=1).any()  # the greys' bin


def test_colorization_learns_colour_from_lightness():
    """On generated colour images whose colour follows from their lightness, a tiny colouriser beats
    the majority-bin baseline within 25 steps (measured: 66% against 34%). One intra-op thread: these
    small ops ran 15-30x slower with two threads on a loaded 2-core machine (0.6 s against 10-20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        obj = colour_model("model.dim=32", "colorization.stride=4", "vision.crop_min_scale=1.0", "vision.hflip=false")
        opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
        obj.train()
        first = None
        for step in range(25):
            index = torch.arange(step * 32, step * 32 + 32)
            images = colour_images(32, seed=step)
            batch = {"images": images, "index": index, "views": obj.views.draw(index, (16, 16))}
            loss, metrics = obj(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = first if first is not None else metrics
        obj.eval()
        with torch.no_grad():
            _, held_out = obj({"images": colour_images(64, seed=999)})
            feats = obj.features({"images": colour_images(4, seed=5)})
    finally:
        torch.set_num_threads(threads)
    assert held_out["loss"] < 0.7 * first["loss"]
    assert held_out["accuracy"] > held_out["chance"] + 0.2, held_out
    assert feats.shape == (4, 32)
