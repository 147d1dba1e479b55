"""Multi-view augmentation: counter-based draws, torchvision's crop sampling, kornia ops with the papers'
conventions, per-position determinism, and no host reads while the views are cut."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from lmssl.data import views as V
from lmssl.data.views import (ViewSpec, ViewTransform, byol_views, counter_uniform, dino_views, mae_views,
                              simclr_views, vicreg_views)
from tests.train.test_host_reads import HostReads

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def splitmix_finaliser(z: int) -> int:
    """Reference: splitmix64's finaliser on unsigned 64-bit Python integers."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_uniform(seed: int, position: int, stream: int, k: int) -> float:
    key = splitmix_finaliser(splitmix_finaliser(seed + GAMMA) ^ ((stream + GAMMA) & MASK))
    h = splitmix_finaliser(key ^ (position & MASK))
    return (splitmix_finaliser(h + (k + 1) * GAMMA) >> 11) / 2 ** 53


def images(B: int, C: int = 3, S: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, C, S, S), dtype=torch.uint8, generator=g)


def normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    return (x.float() / 255 - m) / s


MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
FULL = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0)  # the whole image, no flip


# ----------------------------------------------------------------------------------------- counter_uniform


def test_counter_uniform_matches_the_unsigned_reference_bit_for_bit():
    """int64 wrap-around products and masked shifts reproduce the unsigned algorithm, negatives included."""
    positions = [0, 1, 7, 2 ** 31, 2 ** 40 + 3, 2 ** 62 + 5, -1, -12345]
    u = counter_uniform(42, torch.tensor(positions), 5, 6)
    ref = torch.tensor([[reference_uniform(42, p, 5, k) for k in range(6)] for p in positions], dtype=torch.float64)
    assert u.dtype == torch.float64 and u.shape == (len(positions), 6)
    assert torch.equal(u, ref)


def test_counter_uniform_is_deterministic_and_independent_of_the_batch():
    pos = torch.tensor([3, 99, 12, 4000, 7])
    a = counter_uniform(1, pos, 0, 16)
    assert torch.equal(a, counter_uniform(1, pos.clone(), 0, 16))
    for i, p in enumerate(pos.tolist()):  # alone, and in a different batch in another order
        assert torch.equal(counter_uniform(1, torch.tensor([p]), 0, 16)[0], a[i])
    other = torch.tensor([7, 5000, 99, 3, 1, 2])
    b = counter_uniform(1, other, 0, 16)
    assert torch.equal(b[0], a[4]) and torch.equal(b[2], a[1]) and torch.equal(b[3], a[0])


def test_counter_uniform_is_near_uniform_and_streams_differ():
    u = counter_uniform(0, torch.arange(20000), 0, 4)
    assert ((u >= 0) & (u < 1)).all()
    flat = u.flatten().sort().values
    N = flat.numel()
    assert abs(flat.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / N)
    ecdf = torch.arange(1, N + 1, dtype=torch.float64) / N
    ks = torch.maximum((ecdf - flat).abs(), (flat - (ecdf - 1 / N)).abs()).max().item()
    assert ks < 1.63 / math.sqrt(N)  # Kolmogorov-Smirnov at the 1% level
    # neighbouring positions and columns are uncorrelated
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1].item()) < 0.03
    assert abs(torch.corrcoef(u[:, :2].T)[0, 1].item()) < 0.03
    pos = torch.arange(64)
    s0, s1, other_seed = (counter_uniform(0, pos, 0, 8), counter_uniform(0, pos, 1, 8),
                          counter_uniform(1, pos, 0, 8))
    assert (s0 != s1).all() and (s0 != other_seed).all()


def test_counter_uniform_rejects_bad_positions():
    with pytest.raises(ValueError, match="integers"):
        counter_uniform(0, torch.zeros(3), 0, 2)
    with pytest.raises(ValueError, match="1-D"):
        counter_uniform(0, torch.zeros(2, 2, dtype=torch.long), 0, 2)


# ----------------------------------------------------------------------------------------- crops


def reference_crop(u: list[float], H: int, W: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, one sample at a time, on the same uniforms."""
    for t in range(10):
        area = H * W * (scale[0] + (scale[1] - scale[0]) * u[t])
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(lo + (hi - lo) * u[10 + t])
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(u[20 + t] * (H - h + 1)), int(u[30 + t] * (W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


@pytest.mark.parametrize("in_size,scale,ratio", [((32, 32), (0.08, 1.0), (3 / 4, 4 / 3)),
                                                 ((40, 24), (0.5, 1.0), (3 / 4, 4 / 3)),
                                                 ((24, 40), (0.9, 1.0), (2.0, 3.0))])
def test_crop_boxes_follow_torchvision_sampling(in_size, scale, ratio):
    """The vectorised tries give torchvision's box for every sample, the centre-crop fallback included."""
    H, W = in_size
    u = counter_uniform(3, torch.arange(500), 0, 40)
    box = V.random_resized_crop_boxes(u, in_size, scale, ratio)
    assert box.shape == (500, 4, 2) and box.dtype == torch.float32
    for b in range(500):
        top, left, h, w = reference_crop(u[b].tolist(), H, W, scale, ratio)
        want = torch.tensor([[left, top], [left + w - 1, top], [left + w - 1, top + h - 1], [left, top + h - 1]],
                            dtype=torch.float32)
        assert torch.equal(box[b], want), b


def test_crop_areas_and_aspect_ratios_fall_in_range():
    S = 224
    spec = ViewSpec(64, crop_scale=(0.08, 1.0))
    box = ViewTransform([spec], MEAN, STD, 0).draw(torch.arange(4000), (S, S))["views"][0]["box"]
    w = box[:, 2, 0] - box[:, 0, 0] + 1
    h = box[:, 2, 1] - box[:, 0, 1] + 1
    assert (box[:, 0] >= 0).all() and (box[:, 2, 0] <= S - 1).all() and (box[:, 2, 1] <= S - 1).all()
    tol = 1 / w + 1 / h  # w and h are rounded to whole pixels
    area = w * h / S ** 2
    assert (area >= 0.08 * (1 - 2 * tol)).all() and (area <= 1.0).all()
    assert area.min() < 0.1 and area.max() > 0.9  # the range is covered
    aspect = w / h
    assert (aspect >= 3 / 4 * (1 - tol)).all() and (aspect <= 4 / 3 * (1 + tol)).all()
    # box corners in kornia order: top-left, top-right, bottom-right, bottom-left
    assert torch.equal(box[:, 0, 1], box[:, 1, 1]) and torch.equal(box[:, 1, 0], box[:, 2, 0])
    assert torch.equal(box[:, 2, 1], box[:, 3, 1]) and torch.equal(box[:, 3, 0], box[:, 0, 0])


def test_full_image_crop_returns_the_normalised_input():
    for C in (3, 1):
        x = images(6, C)
        mean, std = MEAN[:C], STD[:C]
        vt = ViewTransform([ViewSpec(32, **FULL)], mean, std, seed=0)
        params = vt.draw(torch.arange(6), (32, 32))
        assert torch.equal(params["views"][0]["box"][0], torch.tensor([[0., 0.], [31., 0.], [31., 31.], [0., 31.]]))
        (y,) = vt.apply(x, params)
        assert y.shape == (6, C, 32, 32) and y.dtype == torch.float32
        torch.testing.assert_close(y, normalised(x, mean, std), atol=1e-5, rtol=0)
        torch.testing.assert_close(vt.plain(x, 32), normalised(x, mean, std), atol=1e-5, rtol=0)


def test_full_image_crop_to_another_size_is_a_bilinear_resize():
    x = images(4)
    vt = ViewTransform([ViewSpec(16, **FULL)], MEAN, STD, seed=0)
    (y,) = vt.apply(x, vt.draw(torch.arange(4), (32, 32)))
    want = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, normalised(want * 255, MEAN, STD), atol=1e-5, rtol=0)


def test_flip_flips():
    x = images(5)
    vt = ViewTransform([ViewSpec(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=1.0)], MEAN, STD, 0)
    (y,) = vt.apply(x, vt.draw(torch.arange(5), (32, 32)))
    torch.testing.assert_close(y, torch.flip(normalised(x, MEAN, STD), dims=[-1]), atol=1e-5, rtol=0)
    # a crop is mirrored within its box: the flipped view is the unflipped view, flipped
    spec = dict(crop_scale=(0.3, 0.6))
    plain = ViewTransform([ViewSpec(20, hflip_p=0.0, **spec)], MEAN, STD, 0)
    flipped = ViewTransform([ViewSpec(20, hflip_p=1.0, **spec)], MEAN, STD, 0)
    a = plain.apply(x, plain.draw(torch.arange(5), (32, 32)))[0]
    b = flipped.apply(x, flipped.draw(torch.arange(5), (32, 32)))[0]
    torch.testing.assert_close(b, torch.flip(a, dims=[-1]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- determinism


def test_views_depend_on_the_position_only():
    """The same position gets the same views in batches of different composition and order."""
    specs = [ViewSpec(24, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grey_p=0.2,
                      blur_p=p, solarize_p=q) for p, q in ((1.0, 0.0), (0.5, 0.5))]  # BYOL's, at 24 px
    vt = ViewTransform(specs, MEAN, STD, seed=7)
    pool = images(12, S=32, seed=1)  # image i sits at position 100 + i
    a_pos = torch.tensor([100, 103, 105, 108])
    b_pos = torch.tensor([111, 105, 101, 100, 108, 104])
    a = vt.apply(pool[a_pos - 100], vt.draw(a_pos, (32, 32)))
    b = vt.apply(pool[b_pos - 100], vt.draw(b_pos, (32, 32)))
    for view_a, view_b in zip(a, b):
        for i, j in ((0, 3), (2, 1), (3, 4)):  # positions 100, 105, 108
            torch.testing.assert_close(view_a[i], view_b[j], atol=1e-5, rtol=0)
    pa, pb = vt.draw(a_pos, (32, 32)), vt.draw(b_pos, (32, 32))
    for va, vb in zip(pa["views"], pb["views"]):
        for key in va:
            assert torch.equal(va[key][2], vb[key][1]), key


def test_different_positions_and_views_differ():
    vt = ViewTransform(simclr_views(32), MEAN, STD, seed=0)
    p = vt.draw(torch.arange(256), (32, 32))["views"]
    boxes = p[0]["box"].reshape(256, -1)
    assert len({tuple(r.tolist()) for r in boxes}) > 200  # distinct crops
    assert not torch.equal(p[0]["box"], p[1]["box"])  # the two views are drawn independently
    assert not torch.equal(ViewTransform(simclr_views(32), MEAN, STD, seed=1).draw(torch.arange(256), (32, 32))
                           ["views"][0]["box"], p[0]["box"])  # another seed, other crops


def test_probabilities_match_the_spec():
    spec = ViewSpec(32, hflip_p=0.5, jitter_p=0.8, brightness=0.4, grey_p=0.2, blur_p=0.3, solarize_p=0.1)
    n = 4000
    p = ViewTransform([spec], MEAN, STD, seed=3).draw(torch.arange(n), (32, 32))["views"][0]
    for key, prob in (("flip", 0.5), ("jitter", 0.8), ("grey", 0.2), ("blur", 0.3), ("solarize", 0.1)):
        frac = p[key].float().mean().item()
        assert abs(frac - prob) < 3 * math.sqrt(prob * (1 - prob) / n), (key, frac)
    # factors: torchvision's ranges, identity where not jittered
    b = p["brightness"]
    assert ((b >= 0.6) & (b <= 1.4)).all() and (b[~p["jitter"]] == 1).all()
    assert (p["contrast"] == 1).all() and (p["hue"] == 0).all()  # strength 0: identity
    s = p["sigma"]
    assert ((s >= 0.1) & (s <= 2.0)).all()
    perms = p["order"].sort(dim=1).values
    assert torch.equal(perms, torch.arange(4).expand(n, 4))  # a permutation per sample
    assert len({tuple(r) for r in p["order"].tolist()}) == 24


# ----------------------------------------------------------------------------------------- the ops


def jittered(spec_kwargs, x):
    spec = ViewSpec(x.shape[-1], **FULL, jitter_p=1.0, **spec_kwargs)
    vt = ViewTransform([spec], [0.0] * x.shape[1], [1.0] * x.shape[1], seed=0)
    params = vt.draw(torch.arange(x.shape[0]), tuple(x.shape[-2:]))
    return vt.apply(x, params)[0], params["views"][0]


def test_brightness_multiplies_and_contrast_blends_with_the_grey_mean():
    x = images(8)
    xf = x.float() / 255
    y, p = jittered(dict(brightness=0.5), x)
    torch.testing.assert_close(y, (xf * p["brightness"][:, None, None, None]).clamp(0, 1), atol=1e-5, rtol=0)
    y, p = jittered(dict(contrast=0.5), x)
    grey_mean = (0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]).mean((-2, -1))[:, None, None, None]
    c = p["contrast"][:, None, None, None]
    torch.testing.assert_close(y, (c * xf + (1 - c) * grey_mean).clamp(0, 1), atol=1e-5, rtol=0)


def test_saturation_blends_with_grey_and_hue_is_in_turns():
    x = images(8)
    xf = x.float() / 255
    y, p = jittered(dict(saturation=0.7), x)
    grey = (0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2])[:, None]
    s = p["saturation"][:, None, None, None]
    torch.testing.assert_close(y, (s * xf + (1 - s) * grey).clamp(0, 1), atol=1e-5, rtol=0)
    # half a turn of hue takes pure red to cyan (torchvision's hue units, not kornia's radians)
    red = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 255
    spec = ViewSpec(32, **FULL, jitter_p=1.0, hue=0.5)
    vt = ViewTransform([spec], [0.0] * 3, [1.0] * 3, seed=0)
    params = vt.draw(torch.tensor([0]), (32, 32))
    params["views"][0]["hue"][:] = 0.5
    y = vt.apply(red, params)[0]
    torch.testing.assert_close(y[0, :, 5, 5], torch.tensor([0.0, 1.0, 1.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("random_order", [True, False])
def test_jitter_applies_each_samples_ops_in_its_own_order(random_order):
    """The staged, batched jitter equals applying the four kornia ops one sample at a time in its order."""
    from kornia.enhance import (adjust_contrast, adjust_contrast_with_mean_subtraction, adjust_hue,
                                adjust_saturation_with_gray_subtraction)

    x = images(32, S=16)
    y, p = jittered(dict(brightness=0.6, contrast=0.6, saturation=0.6, hue=0.2, jitter_random_order=random_order), x)
    ops = [lambda z, f: adjust_contrast(z, f), adjust_contrast_with_mean_subtraction,
           adjust_saturation_with_gray_subtraction, lambda z, f: adjust_hue(z, 2 * math.pi * f)]
    names = ["brightness", "contrast", "saturation", "hue"]
    orders = len({tuple(r) for r in p["order"].tolist()})
    assert orders > 10 if random_order else orders == 1
    for b in range(32):
        z = x[b:b + 1].float() / 255
        for op in p["order"][b].tolist():
            z = ops[op](z, p[names[op]][b:b + 1])
        torch.testing.assert_close(y[b:b + 1], z, atol=1e-5, rtol=0)


def test_grey_blur_and_solarize():
    x = images(64)
    spec = ViewSpec(32, **FULL, grey_p=0.5, blur_p=0.5, solarize_p=0.5)
    vt = ViewTransform([spec], [0.0] * 3, [1.0] * 3, seed=0)
    params = vt.draw(torch.arange(64), (32, 32))
    p = params["views"][0]
    y = vt.apply(x, params)[0]
    xf = x.float() / 255
    untouched = ~(p["grey"] | p["blur"] | p["solarize"])
    assert untouched.any() and torch.allclose(y[untouched], xf[untouched], atol=1e-5)
    g = p["grey"]
    assert torch.allclose(y[g][:, 0], y[g][:, 1]) and torch.allclose(y[g][:, 1], y[g][:, 2])
    assert not torch.allclose(y[~g][:, 0], y[~g][:, 1])
    only_solarized = p["solarize"] & ~p["grey"] & ~p["blur"]
    want = torch.where(xf >= 0.5, 1 - xf, xf)
    torch.testing.assert_close(y[only_solarized], want[only_solarized], atol=1e-5, rtol=0)
    only_blurred = p["blur"] & ~p["grey"] & ~p["solarize"]
    assert only_blurred.any()
    blurred, orig = y[only_blurred], xf[only_blurred]
    assert blurred.std() < orig.std()  # smoother
    torch.testing.assert_close(blurred.mean((-2, -1)), orig.mean((-2, -1)), atol=0.02, rtol=0)


def test_greyscale_input_skips_colour_ops_and_keeps_brightness_and_contrast():
    x = images(32, C=1, S=28)
    vt = ViewTransform(simclr_views(28), [0.286], [0.353], seed=0)
    params = vt.draw(torch.arange(32), (28, 28))
    out = vt.apply(x, params)
    assert [tuple(v.shape) for v in out] == [(32, 1, 28, 28)] * 2 and all(torch.isfinite(v).all() for v in out)
    y, p = jittered(dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.3), images(8, C=1))
    assert not torch.allclose(y, images(8, C=1).float() / 255)  # brightness and contrast did apply


def test_dino_multi_resolution_shapes():
    specs = dino_views(32, 16, n_local=4)
    vt = ViewTransform(specs, MEAN, STD, seed=0)
    x = images(6, S=40)
    out = vt.apply(x, vt.draw(torch.arange(6), (40, 40)))
    assert [tuple(v.shape) for v in out] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 4
    assert vt.plain(x, 24).shape == (6, 3, 24, 24)


def test_presets_carry_the_papers_parameters():
    (mae,) = mae_views(32)
    assert mae.crop_scale == (0.2, 1.0) and mae.hflip_p == 0.5 and not mae.jitters and mae.blur_p == 0
    big, small = simclr_views(224), simclr_views(32)
    assert (big[0].brightness, big[0].hue, big[0].jitter_p, big[0].grey_p, big[0].blur_p) == (0.8, 0.2, 0.8, 0.2, 0.5)
    assert big[0].kernel_size == 23
    assert (small[0].brightness, small[0].hue, small[0].blur_p) == (0.4, 0.1, 0.0)
    b = byol_views(224)
    assert [v.blur_p for v in b] == [1.0, 0.1] and [v.solarize_p for v in b] == [0.0, 0.2]
    assert (b[0].brightness, b[0].contrast, b[0].saturation, b[0].hue) == (0.4, 0.4, 0.2, 0.1)
    assert [v.blur_p for v in byol_views(32)] == [0.0, 0.0] and byol_views(32)[1].solarize_p == 0.2
    assert [(v.blur_p, v.solarize_p) for v in vicreg_views(96)] == [(1.0, 0.0), (0.1, 0.2)]  # the authors' code
    d = dino_views(224, 96, 8)
    assert len(d) == 10 and d[0].crop_scale == (0.4, 1.0) and d[2].crop_scale == (0.05, 0.4)
    assert [v.blur_p for v in d[:3]] == [1.0, 0.1, 0.5] and [v.solarize_p for v in d[:3]] == [0.0, 0.2, 0.0]
    assert dino_views(32, 16, 2)[0].crop_scale == (0.25, 1.0) and dino_views(32, 16, 2)[2].blur_p == 0.0


# ----------------------------------------------------------------------------------------- contracts


def test_apply_makes_no_host_reads():
    every_op = [ViewSpec(24, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grey_p=0.5,
                         blur_p=0.5, solarize_p=0.5)]
    cases = [(simclr_views(28), 1, 28), (every_op, 3, 32), (dino_views(32, 16, 2), 3, 32)]
    for specs, C, S in cases:
        vt = ViewTransform(specs, MEAN[:C], STD[:C], seed=0)
        x = images(8, C=C, S=S)
        params = vt.draw(torch.arange(8), (S, S))
        vt.apply(x, params)  # first call: the per-device mean/std are made
        with HostReads() as reads:
            vt.apply(x, params)
            vt.plain(x, S // 2 + 1)  # a downscale, antialiased
            vt.plain(x, S * 2)
        assert not reads.seen, f"host reads while cutting views: {dict(reads.seen)}"


def test_the_host_read_watch_sees_a_read_inside_apply(monkeypatch):
    from kornia.enhance import solarize

    def reading_solarize(x, thresholds):
        float(x.max())  # what a careless check does
        return solarize(x, thresholds)

    monkeypatch.setattr("kornia.enhance.solarize", reading_solarize)
    vt = ViewTransform([ViewSpec(32, solarize_p=0.5)], MEAN, STD, seed=0)
    x = images(4)
    params = vt.draw(torch.arange(4), (32, 32))
    with HostReads() as reads:
        vt.apply(x, params)
    assert sum(reads.seen.values()) >= 1


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="crop_scale"):
        ViewSpec(32, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="probability"):
        ViewSpec(32, grey_p=1.5)
    with pytest.raises(ValueError, match="hue"):
        ViewSpec(32, hue=0.7)
    with pytest.raises(ValueError, match="odd"):
        ViewSpec(32, blur_kernel=4)
    vt = ViewTransform(mae_views(16), MEAN, STD, seed=0)
    params = vt.draw(torch.arange(4), (32, 32))
    with pytest.raises(ValueError, match="uint8"):
        vt.apply(images(4).float(), params)
    with pytest.raises(ValueError, match="channels"):
        vt.apply(images(4, C=1), params)
    with pytest.raises(ValueError, match="draw the params"):
        vt.apply(images(5), params)
    with pytest.raises(ValueError, match="integer"):
        vt.draw(torch.zeros(4), (32, 32))


def test_the_transform_pickles_for_worker_processes():
    vt = ViewTransform(simclr_views(32), MEAN, STD, seed=5)
    vt.apply(images(2), vt.draw(torch.arange(2), (32, 32)))
    again = pickle.loads(pickle.dumps(vt))
    a, b = vt.draw(torch.arange(9), (32, 32)), again.draw(torch.arange(9), (32, 32))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a["views"], b["views"]) for k in x)


def test_plot_view_pairs_writes_a_png(tmp_path):
    from lmssl.figures import plot_view_pairs

    for C in (1, 3):
        vt = ViewTransform(dino_views(32, 16, 1), MEAN[:C], STD[:C], seed=0)
        x = images(10, C=C)
        out = vt.apply(x, vt.draw(torch.arange(10), (32, 32)))
        path = plot_view_pairs(x, out, MEAN[:C], STD[:C], tmp_path / f"views{C}.png", "views", n=4)
        assert path.exists() and path.stat().st_size > 1000
