"""Multi-view image augmentation: per-sample parameters drawn on the CPU, applied in batches on the device.

Every image objective (MAE, SimCLR, BYOL, VICReg, DINO multi-crop, ...) turns a batch of images into one or
more randomly augmented *views*. This module does that in two steps:

1. :meth:`ViewTransform.draw` ``(index (B,) int64, in_size) -> params``: the augmentation parameters of every
   sample and view, drawn on the CPU (cheap enough for DataLoader worker processes).
2. :meth:`ViewTransform.apply` ``(images uint8 (B, C, H, W), params) -> [view (B, C, S, S) float32, ...]``: the
   views, computed with kornia's functional ops batched over the whole batch, on whatever device the images
   are on, with no host read of a device value.

Why the parameters are drawn here, and not by kornia.augmentation
----------------------------------------------------------------
``index`` is each image's *global sample position* in the run (:mod:`lmssl.data.batches`). A parameter is a
function of ``(seed, position, view number, parameter slot)`` only: :func:`counter_uniform` hashes those four
integers into a uniform number (splitmix64, vectorised over int64 tensors). A sample therefore gets the same
views whatever the batch it lands in, however many processes share the run, and after a resume: nothing
depends on a generator's state. torch's global generator, and kornia.augmentation's samplers (which draw from
it per batch), cannot give that; and calling kornia's ``forward_parameters`` once per sample with a seeded
generator cost 0.84 ms a call here, far too slow. So we draw the parameters ourselves, vectorised, and apply
them with kornia's functional API.

The pipeline of one view (the order of SimCLR's and BYOL's torchvision recipes)
-------------------------------------------------------------------------------
- Random resized crop, sampled exactly as torchvision's ``RandomResizedCrop``: area fraction uniform in
  ``crop_scale``, aspect ratio log-uniform in ``crop_ratio``, up to 10 tries (all 10 drawn at once, the first
  that fits is taken), else the centre crop. The box is stored in kornia's corner order. The crop, the resize
  to ``size`` and the horizontal flip are one batched affine warp (``kornia.geometry.transform.warp_affine``,
  bilinear, ``align_corners=False``: output pixel ``i`` samples the crop at ``x1 + (i + 0.5) * w / S - 0.5``,
  as a resize of the cropped image does; the flip mirrors that map). ``warp_affine`` measured faster than
  ``crop_and_resize`` (which solves a perspective system per sample) on this CPU. No antialiasing: the
  images are small.
- Colour jitter with probability ``jitter_p``, as torchvision's ``ColorJitter``: factors uniform in
  ``[max(0, 1 - s), 1 + s]`` (hue: uniform in ``[-h, h]``), applied in a random order per sample. kornia's
  conventions differ from torchvision's, so the ops are mapped:

  ======================  ==============================================================================
  torchvision             kornia
  ======================  ==============================================================================
  brightness (multiply)   ``adjust_contrast`` (kornia's *contrast* multiplies the pixels and clips;
                          kornia's ``adjust_brightness`` *adds* the factor, which is not the papers' op)
  contrast (blend with    ``adjust_contrast_with_mean_subtraction`` (blend with the mean of the grey image)
  the grey mean)
  saturation              ``adjust_saturation_with_gray_subtraction`` (blend with the grey image; kornia's
                          ``adjust_saturation`` scales HSV saturation instead)
  hue (fraction of a      ``adjust_hue`` (radians): ``2 * pi * hue``
  turn, in [-0.5, 0.5])
  ======================  ==============================================================================

  The random order without indexing subsets of the batch: every stage applies each cheap op (brightness,
  contrast, saturation) to the whole batch with its factor replaced by the identity (1) where that op is not
  the sample's op at that stage. Hue is expensive (RGB -> HSV -> RGB), so it runs once: the cheap ops ranked
  before it run in a first pass, those after it in a second.
- Greyscale with probability ``grey_p`` (``kornia.color.rgb_to_grayscale``, 0.299/0.587/0.114, copied to the
  three channels).
- Gaussian blur with probability ``blur_p``: sigma uniform in ``blur_sigma``, a kernel of about 10% of the view
  size (odd, at least 3), one kernel per sample (``kornia.filters.get_gaussian_kernel1d`` +
  ``filter2d_separable``, reflect padding). ``kornia.filters.gaussian_blur2d`` is not used: it checks
  ``bool((sigma > 0).all())`` on the sigma tensor, a host read when sigma is on the device.
- Solarisation with probability ``solarize_p``: pixels at or above 0.5 become ``1 - x``
  (``kornia.enhance.solarize`` with a per-sample threshold; 2.0, which nothing reaches, leaves a sample as it is).
- Normalisation by ``mean`` / ``std``.

A sample that skips an op gets the op's output replaced by its input with ``torch.where`` over the batch: the
ops always run on the whole batch, so the device never waits on the host to learn which samples to process.
An op that a view's spec switches off (probability 0, or a zero strength) is not run at all. Greyscale
inputs (C = 1) skip the ops that need RGB (saturation, hue, greyscale); brightness and contrast still apply.

Speed (this CPU: 2 cores shared with other jobs, torch 2.13, kornia 0.9.0; B = 256; medians of repeated runs,
the range over several runs)
-------------------------------------------------------------------------------------------------------------
- ``draw``, SimCLR's two views: 1.2 ms (MAE's one view: 0.6 ms). It avoids torch's sqrt/exp/round/floor,
  which took about 12 ms a call even on (256, 10) tensors on this busy host (a threaded vector-math path).
- ``apply``, one intra-op thread (``torch.set_num_threads(1)``; with two threads on this contended CPU every
  op waited for a time slice and ran up to ten times slower):

  - 28x28 greyscale -> two 28-px SimCLR views: 11-14 ms.
  - 32x32 RGB -> two 32-px SimCLR views: 74-102 ms (54-72 ms with ``jitter_random_order=False``). Of one
    view's ~40 ms, kornia's hue (RGB -> HSV -> RGB) is ~22 ms, the other three jitter ops in their six
    masked stages ~15 ms, the crop ~3 ms.
  - MAE's view, 32x32 RGB: 4-8 ms; BYOL's two 64-px views with blur: 0.4-0.8 s (the jitter is most of it).

  On a GPU each op is a few kernel launches over the whole batch.

Parameters (``draw``'s output): ``{"views": [view_params, ...]}``, one dict per :class:`ViewSpec`, all CPU
tensors (nested dicts and lists of tensors only, so :func:`lmssl.data.batches.to_device` moves them;
:meth:`ViewTransform.apply` moves them itself, non-blocking, when they are not on the images' device):

========================  ===============  ======================================================================
key                       shape, dtype     meaning
========================  ===============  ======================================================================
``box``                   (B, 4, 2) f32    crop corners (x, y) in input pixels, kornia order: top-left,
                                           top-right, bottom-right, bottom-left; inclusive, so the crop is
                                           ``x2 - x1 + 1`` pixels wide
``flip``                  (B,) bool        mirror left-right
``jitter``                (B,) bool        colour jitter applied
``brightness``            (B,) f32         multiplicative factor (1 where not jittered)
``contrast``              (B,) f32         blend factor with the grey mean (1 where not jittered)
``saturation``            (B,) f32         blend factor with the grey image (1 where not jittered)
``hue``                   (B,) f32         hue shift in turns, in [-0.5, 0.5] (0 where not jittered)
``order``                 (B, 4) i64       jitter op at each stage (0 brightness, 1 contrast, 2 saturation,
                                           3 hue), a permutation per sample, as torchvision's ``fn_idx``
``grey``                  (B,) bool        converted to greyscale
``blur``                  (B,) bool        blurred
``sigma``                 (B,) f32         blur sigma in output pixels (drawn for every sample)
``solarize``              (B,) bool        solarised
========================  ===============  ======================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

# ---------------------------------------------------------------------------------------------------------
# Counter-based uniforms
# ---------------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio in 64 bits)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _as_int64(c: int) -> int:
    """A 64-bit pattern as the signed integer torch stores in an int64 tensor."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on a Python integer (mod 2**64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic: mask off the copied sign bits)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors. Multiplication wraps around mod 2**64 in two's complement, so the
    bit patterns are those of the unsigned algorithm."""
    z = (z ^ _shr(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shr(z, 27)) * _as_int64(_MIX2)
    return z ^ _shr(z, 31)


def counter_uniform(seed: int, positions: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) that depend only on ``(seed, position, stream, k)``.

    ``positions (B,)`` integer -> ``(B, n)`` float64; row ``b``, column ``k`` is a hash of ``(seed,
    positions[b], stream, k)``, so a position's row is the same whatever else is in the batch. The hash:
    ``key = mix(mix(seed + G) ^ (stream + G))`` (Python integers), ``h = mix(key ^ position)``, then
    ``mix(h + (k + 1) * G)`` for ``k < n``: splitmix64's output sequence started from ``h`` (``mix`` is
    splitmix64's finaliser, ``G`` its golden-ratio increment). The top 53 bits give the float.
    """
    if not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(positions)
    if positions.dim() != 1:
        raise ValueError(f"positions must be a 1-D tensor (B,), got shape {tuple(positions.shape)}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be integers (int64 sample positions), got {positions.dtype}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    key = _mix_int(_mix_int(seed + _GAMMA) ^ ((stream + _GAMMA) & _MASK64))
    h = _mix(positions.to(torch.int64) ^ _as_int64(key))  # (B,)
    steps = torch.arange(1, n + 1, dtype=torch.int64, device=positions.device) * _as_int64(_GAMMA)  # (n,)
    z = _mix(h[:, None] + steps[None, :])  # (B, n)
    return _shr(z, 11).to(torch.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------------------------------------
# One view's recipe
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ViewSpec:
    """The recipe of one view. The defaults are a random resized crop and a flip half of the time, everything
    else off: with ``crop_scale=(0.2, 1.0)`` that is MAE's view. Strengths and probabilities follow
    torchvision's conventions (``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur``, ``RandomSolarize``)."""

    size: int  # output side in pixels (views are square)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio (width / height), log-uniform
    hflip_p: float = 0.5  # probability of a left-right flip
    jitter_p: float = 0.0  # probability of colour jitter
    brightness: float = 0.0  # factor uniform in [max(0, 1 - b), 1 + b], multiplies the pixels
    contrast: float = 0.0  # factor uniform in [max(0, 1 - c), 1 + c], blends with the grey mean
    saturation: float = 0.0  # factor uniform in [max(0, 1 - s), 1 + s], blends with the grey image
    hue: float = 0.0  # shift uniform in [-h, h] turns of the hue circle (h <= 0.5)
    jitter_random_order: bool = True  # the four jitter ops in a random order per sample (torchvision, BYOL);
    # False: brightness, contrast, saturation, hue, always (each op runs once instead of in six masked stages)
    grey_p: float = 0.0  # probability of converting to greyscale
    blur_p: float = 0.0  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range, in output pixels
    blur_kernel: int = 0  # blur kernel side (odd, >= 3); 0: about 10% of ``size``
    solarize_p: float = 0.0  # probability of solarising (pixels >= 0.5 become 1 - x)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ViewSpec.size must be a positive number of pixels, got {self.size!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ViewSpec.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ViewSpec.crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("hflip_p", "jitter_p", "grey_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"ViewSpec.{name} is a probability: give a value in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ViewSpec.{name} is a jitter strength: give a value >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ViewSpec.hue is a fraction of the hue circle: give a value in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"ViewSpec.blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        if self.blur_kernel != 0 and (self.blur_kernel < 3 or self.blur_kernel % 2 == 0):
            raise ValueError(f"ViewSpec.blur_kernel must be odd and >= 3 (or 0 for 10% of the size), "
                             f"got {self.blur_kernel}")
        if self.blur_p > 0 and self.kernel_size // 2 >= self.size:
            raise ValueError(f"ViewSpec.blur_kernel {self.kernel_size} is too large for a {self.size}-px view "
                             "(reflect padding needs kernel // 2 < size): lower it or switch blur off (blur_p=0)")

    @property
    def kernel_size(self) -> int:
        """The blur kernel side: ``blur_kernel``, or 10% of ``size`` rounded, made odd, at least 3 (23 at 224 px,
        as SimCLR and BYOL use)."""
        if self.blur_kernel:
            return self.blur_kernel
        k = max(3, round(0.1 * self.size))
        return k if k % 2 else k + 1

    @property
    def jitters(self) -> bool:
        return self.jitter_p > 0 and (self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0)


# Slots of counter_uniform's columns, per view (fixed, so that changing one field of a spec does not move the
# draws of the others).
_TRIES = 10
_AREA, _LOGRATIO, _TOP, _LEFT = 0, 10, 20, 30  # _TRIES columns each
_FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _ORDER = 40, 41, 42, 43, 44, 45, 46  # _ORDER: 4 columns
_GREY, _BLUR, _SIGMA, _SOLARIZE = 50, 51, 52, 53
_SLOTS = 64  # room for later parameters

_BRIGHTNESS_OP, _CONTRAST_OP, _SATURATION_OP, _HUE_OP = 0, 1, 2, 3


def random_resized_crop_boxes(u: torch.Tensor, in_size: tuple[int, int], scale: tuple[float, float],
                              ratio: tuple[float, float]) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` box, vectorised over the batch and the tries.

    ``u (B, 40)`` float64 uniforms (columns: 10 area fractions, 10 log aspect ratios, 10 top offsets, 10 left
    offsets) -> ``(B, 4, 2)`` float32 corners ``(x, y)`` in kornia order (top-left, top-right, bottom-right,
    bottom-left), inclusive pixel coordinates of an ``in_size = (H, W)`` image. Try ``t``: area
    ``H * W * U(scale)``, aspect ``exp(U(log ratio))``, ``w = round(sqrt(area * aspect))``, ``h =
    round(sqrt(area / aspect))``; the first try with ``0 < w <= W`` and ``0 < h <= H`` is placed at a uniform
    integer offset; when none fits, the centre crop (the whole image, or its centre at the nearest allowed
    aspect ratio).
    """
    H, W = in_size
    B = u.shape[0]
    # sqrt, exp, round and floor run through a threaded vector-math path that cost about 12 ms a call on a
    # busy 2-core host, even for these (B, 10) tensors; rsqrt, exp2 and integer conversion do not, so:
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA:_AREA + _TRIES])  # (B, T)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp2((log_lo + (log_hi - log_lo) * u[:, _LOGRATIO:_LOGRATIO + _TRIES]) / math.log(2))  # (B, T)
    wide, tall = area * aspect, area / aspect  # w ** 2, h ** 2 (> 0)
    w = _round_half_even(wide * torch.rsqrt(wide))  # (B, T), Python's round of the square root
    h = _round_half_even(tall * torch.rsqrt(tall))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)  # (B, T)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1) index of the first fit (0 if none)
    any_fit = fits.any(dim=1)  # (B,)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # (B,)
    # uniform integer offsets in [0, H - h] and [0, W - w]: truncation is floor for these non-negative values
    top = (u[:, _TOP:_TOP + _TRIES].gather(1, first)[:, 0] * (H - h + 1)).to(torch.int64).to(torch.float64)
    left = (u[:, _LEFT:_LEFT + _TRIES].gather(1, first)[:, 0] * (W - w + 1)).to(torch.int64).to(torch.float64)
    # the fallback depends only on the input size: Python numbers
    in_ratio = W / H
    if in_ratio < ratio[0]:
        cw, ch = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(H * ratio[1])), H
    else:
        cw, ch = W, H
    w = torch.where(any_fit, w, float(cw))
    h = torch.where(any_fit, h, float(ch))
    top = torch.where(any_fit, top, float((H - ch) // 2))
    left = torch.where(any_fit, left, float((W - cw) // 2))
    x1, y1, x2, y2 = left, top, left + w - 1, top + h - 1
    box = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1),
                       torch.stack([x2, y2], 1), torch.stack([x1, y2], 1)], 1)  # (B, 4, 2)
    return box.to(torch.float32).reshape(B, 4, 2)


def _round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Non-negative ``x`` rounded to the nearest integer, ties to even (Python's and torch.round's rule), as
    float64, without ``torch.round`` (see :func:`random_resized_crop_boxes`)."""
    r = (x + 0.5).to(torch.int64)  # floor(x + 0.5)
    tie_to_odd = ((r.to(x.dtype) - x) == 0.5) & (r % 2 == 1)
    return (r - tie_to_odd.to(torch.int64)).to(torch.float64)


def _jitter_range(s: float, u: torch.Tensor) -> torch.Tensor:
    """``u`` uniforms -> factors uniform in ``[max(0, 1 - s), 1 + s]`` (torchvision's ColorJitter)."""
    lo, hi = max(0.0, 1.0 - s), 1.0 + s
    return lo + (hi - lo) * u


def draw_view_params(spec: ViewSpec, u: torch.Tensor, in_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One view's parameters from its uniforms ``u (B, _SLOTS)`` float64 -> the dict described in the module
    docstring (``box (B, 4, 2)``, flags and factors ``(B,)``, ``order (B, 4)``)."""
    B = u.shape[0]
    jitter = u[:, _JITTER] < spec.jitter_p if spec.jitters else torch.zeros(B, dtype=torch.bool)

    def factor(col: int, strength: float) -> torch.Tensor:
        f = _jitter_range(strength, u[:, col]).to(torch.float32)
        return torch.where(jitter, f, 1.0)

    hue = ((2 * u[:, _HUE] - 1) * spec.hue).to(torch.float32)
    if spec.jitter_random_order:
        order = u[:, _ORDER:_ORDER + 4].argsort(dim=1)  # (B, 4) a uniform random permutation per sample
    else:
        order = torch.arange(4).expand(B, 4).clone()
    lo, hi = spec.blur_sigma
    return {
        "box": random_resized_crop_boxes(u, in_size, spec.crop_scale, spec.crop_ratio),
        "flip": u[:, _FLIP] < spec.hflip_p,
        "jitter": jitter,
        "brightness": factor(_BRIGHT, spec.brightness),
        "contrast": factor(_CONTRAST, spec.contrast),
        "saturation": factor(_SAT, spec.saturation),
        "hue": torch.where(jitter, hue, 0.0),
        "order": order,
        "grey": u[:, _GREY] < spec.grey_p,
        "blur": u[:, _BLUR] < spec.blur_p,
        "sigma": (lo + (hi - lo) * u[:, _SIGMA]).to(torch.float32),
        "solarize": u[:, _SOLARIZE] < spec.solarize_p,
    }


# ---------------------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------------------


class ViewTransform:
    """Views of image batches: ``draw`` per-sample parameters on the CPU, ``apply`` them on the device.

    A plain object, not an ``nn.Module``: it has no parameters or buffers to train, save or move, and it
    pickles small (the per-device mean/std cache is dropped), so DataLoader workers can run ``draw``.

    ``specs``: one :class:`ViewSpec` per view (view ``v`` draws from stream ``v``); ``mean``/``std``: per
    channel, in [0, 1] units (one value per image channel); ``seed``: the run's seed.
    """

    def __init__(self, specs: list[ViewSpec], mean: list[float], std: list[float], seed: int) -> None:
        specs = list(specs)
        if not specs or not all(isinstance(s, ViewSpec) for s in specs):
            raise ValueError("ViewTransform needs a non-empty list of ViewSpec (e.g. simclr_views(32))")
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"mean and std need one value per channel (1 or 3), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.specs = specs
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.seed = int(seed)
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stats"] = {}
        return state

    def __repr__(self) -> str:
        return f"ViewTransform({len(self.specs)} views, sizes {[s.size for s in self.specs]}, seed {self.seed})"

    # -- parameters (CPU) --------------------------------------------------------------------------------

    def draw(self, index: torch.Tensor, in_size: tuple[int, int]) -> dict:
        """Parameters of every view for the samples at global positions ``index (B,)`` int64 (any integers:
        held-out images may use negative ones), of images of ``in_size = (H, W)`` pixels (the size the images
        will have in :meth:`apply`) -> ``{"views": [dict, ...]}`` of CPU tensors (layout: module docstring)."""
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(f"index must be a 1-D integer tensor of sample positions (B,), got "
                             f"{index.dtype} of shape {tuple(index.shape)}")
        H, W = (int(v) for v in in_size)
        if H < 1 or W < 1:
            raise ValueError(f"in_size must be (height, width) in pixels, got {in_size}")
        index = index.to("cpu", torch.int64)
        views = [draw_view_params(spec, counter_uniform(self.seed, index, v, _SLOTS), (H, W))
                 for v, spec in enumerate(self.specs)]
        return {"views": views}

    # -- views (device) ----------------------------------------------------------------------------------

    def apply(self, images: torch.Tensor, params: dict) -> list[torch.Tensor]:
        """``images (B, C, H, W)`` uint8 and ``draw``'s params -> one float32 ``(B, C, size, size)`` view per
        spec, on ``images.device``: scaled to [0, 1], augmented, normalised. Makes no host read of a device
        value (every per-sample choice is a ``torch.where`` over the batch)."""
        from lmssl.data.batches import to_device

        x = self._check_images(images)
        views = params.get("views") if isinstance(params, dict) else None
        if not isinstance(views, (list, tuple)) or len(views) != len(self.specs):
            raise ValueError(f"params must be draw()'s output for {len(self.specs)} views "
                             f"({{'views': [...]}}), got {type(params).__name__}")
        views = to_device(views, images.device)  # a no-op for params already there
        B, C = x.shape[:2]
        out = []
        for v, (spec, p) in enumerate(zip(self.specs, views)):
            if tuple(p["box"].shape) != (B, 4, 2):
                raise ValueError(f"view {v}: params box has shape {tuple(p['box'].shape)}, expected ({B}, 4, 2): "
                                 "draw the params for this batch")
            y = crop_resize_flip(x, p["box"], p["flip"], spec.size)  # (B, C, S, S)
            if spec.jitters:
                y = color_jitter(y, p, spec)
            if spec.grey_p > 0 and C == 3:
                from kornia.color import rgb_to_grayscale

                y = torch.where(p["grey"][:, None, None, None], rgb_to_grayscale(y).expand_as(y), y)
            if spec.blur_p > 0:
                y = torch.where(p["blur"][:, None, None, None], gaussian_blur(y, p["sigma"], spec.kernel_size), y)
            if spec.solarize_p > 0:
                from kornia.enhance import solarize

                y = solarize(y, torch.where(p["solarize"], 0.5, 2.0).to(y.dtype))  # 2.0: never reached
            out.append(self._normalise(y))
        return out

    def plain(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """``images (B, C, H, W)`` uint8 -> ``(B, C, size, size)`` float32, normalised, not augmented (evaluation,
        features): the largest centred square, resized (bilinear, antialiased) only when it is not already
        ``size`` pixels."""
        x = self._check_images(images)
        H, W = x.shape[-2:]
        side = min(H, W)
        top, left = (H - side) // 2, (W - side) // 2
        x = x[..., top:top + side, left:left + side]
        if side != size:  # torch's antialiased bilinear (kornia's resize antialiases with gaussian_blur2d, which
            # reads its sigma on the host)
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=side > size)
        return self._normalise(x)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> float32 in [0, 1], after checking the layout."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
            what = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else \
                type(images).__name__
            raise ValueError(f"images must be a uint8 tensor (B, C, H, W), got {what}")
        if images.shape[1] != len(self.mean):
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {len(self.mean)} values: "
                             "give one mean and std per channel")
        return images.to(torch.float32).div_(255.0)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` in [0, 1] -> ``(x - mean) / std`` per channel. mean and std are copied to a device
        once and kept (no host-to-device copy per call)."""
        key = (x.device, x.dtype)
        if key not in self._stats:
            self._stats[key] = (torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None],
                                torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None])
        m, s = self._stats[key]
        return (x - m) / s


# ---------------------------------------------------------------------------------------------------------
# The ops, batched (pure functions of tensors)
# ---------------------------------------------------------------------------------------------------------


def crop_affine(box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Source-to-output pixel affine of crop + resize to ``size`` + optional mirror.

    ``box (B, 4, 2)`` kornia-order corners, ``flip (B,)`` bool -> ``(B, 2, 3)``. With ``w = x2 - x1 + 1``:
    ``i = (x - x1 + 0.5) * size / w - 0.5``, i.e. output pixel ``i`` samples ``x1 + (i + 0.5) * w / size - 0.5``
    (a bilinear resize with ``align_corners=False``); flipped: ``size - 1 - i``. Same for y, unflipped.
    """
    x1, y1 = box[:, 0, 0], box[:, 0, 1]
    w = box[:, 2, 0] - x1 + 1
    h = box[:, 2, 1] - y1 + 1
    ax, ay = size / w, size / h
    bx, by = (0.5 - x1) * ax - 0.5, (0.5 - y1) * ay - 0.5
    ax = torch.where(flip, -ax, ax)
    bx = torch.where(flip, (size - 1) - bx, bx)
    zero = torch.zeros_like(ax)
    return torch.stack([torch.stack([ax, zero, bx], 1), torch.stack([zero, ay, by], 1)], 1)  # (B, 2, 3)


def crop_resize_flip(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """``x (B, C, H, W)`` float -> ``(B, C, size, size)``: each sample's box, resized (bilinear) and mirrored
    where ``flip``, as one batched ``kornia.geometry.transform.warp_affine`` (border padding: samples just
    outside the image take the edge pixel, as a resize's clamped indices do)."""
    from kornia.geometry.transform import warp_affine

    M = crop_affine(box.to(x.dtype), flip, size)
    return warp_affine(x, M, (size, size), mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, p: dict[str, torch.Tensor], spec: ViewSpec) -> torch.Tensor:
    """torchvision-style colour jitter of ``x (B, C, h, w)`` in [0, 1] -> same shape, each sample's ops in the
    order ``p["order"]`` (op per stage). Factors are the identity where a sample is not jittered. Ops needing
    RGB (saturation, hue) are skipped for C = 1; ops with strength 0 are not run."""
    from kornia.enhance import (adjust_contrast, adjust_contrast_with_mean_subtraction, adjust_hue,
                                adjust_saturation_with_gray_subtraction)

    rgb = x.shape[1] == 3
    enabled = [op for op, on in ((_BRIGHTNESS_OP, spec.brightness > 0), (_CONTRAST_OP, spec.contrast > 0),
                                 (_SATURATION_OP, spec.saturation > 0 and rgb), (_HUE_OP, spec.hue > 0 and rgb))
               if on]
    if not enabled:
        return x
    factors = {_BRIGHTNESS_OP: p["brightness"], _CONTRAST_OP: p["contrast"], _SATURATION_OP: p["saturation"]}
    kornia_op = {_BRIGHTNESS_OP: adjust_contrast,  # kornia's contrast multiplies: torchvision's brightness
                 _CONTRAST_OP: adjust_contrast_with_mean_subtraction,
                 _SATURATION_OP: adjust_saturation_with_gray_subtraction}
    jittered = p["jitter"][:, None, None, None]

    def hue(y: torch.Tensor) -> torch.Tensor:  # RGB -> HSV -> RGB is not exact: keep the unjittered as they are
        return torch.where(jittered, adjust_hue(y, (2 * math.pi) * p["hue"].to(y.dtype)), y)

    if not spec.jitter_random_order:  # draw() made every order 0, 1, 2, 3: each op once
        for op in enabled:
            x = hue(x) if op == _HUE_OP else kornia_op[op](x, factors[op].to(x.dtype))
        return x
    stage = p["order"].argsort(dim=1)  # (B, 4): the stage of each op in the sample's permutation
    # rank of each enabled op among the enabled ones (B,), so that skipped ops leave no empty stages
    rank = {op: sum((stage[:, q] < stage[:, op]).to(torch.int64) for q in enabled if q != op)
            if len(enabled) > 1 else torch.zeros_like(stage[:, 0]) for op in enabled}
    cheap = [op for op in enabled if op != _HUE_OP]

    def stage_ops(y: torch.Tensor, active) -> torch.Tensor:
        # every cheap op on the whole batch, its factor the identity where the op is not active for a sample
        for op in cheap:
            y = kornia_op[op](y, torch.where(active(op), factors[op], 1.0).to(y.dtype))
        return y

    n = len(enabled)
    if _HUE_OP not in enabled:
        for s in range(n):
            x = stage_ops(x, lambda op: rank[op] == s)
        return x
    k = rank[_HUE_OP]  # (B,)
    for s in range(n - 1):  # ops ranked before hue
        x = stage_ops(x, lambda op: (rank[op] == s) & (rank[op] < k))
    x = hue(x)
    for s in range(1, n):  # ops ranked after hue
        x = stage_ops(x, lambda op: (rank[op] == s) & (rank[op] > k))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``x (B, C, h, w)`` -> same shape, blurred with one Gaussian of ``sigma (B,)`` per sample (separable
    ``kernel_size`` taps, reflect padding)."""
    from kornia.filters import filter2d_separable, get_gaussian_kernel1d

    kernel = get_gaussian_kernel1d(kernel_size, sigma.to(x.dtype)[:, None])  # (B, k)
    return filter2d_separable(x, kernel, kernel, border_type="reflect")


# ---------------------------------------------------------------------------------------------------------
# Presets: the papers' parameters, scaled for small images
# ---------------------------------------------------------------------------------------------------------
#
# Scaling rules for small images (all presets): crop scales and jitter strengths are the papers' (they are
# relative); the blur kernel is 10% of the view's side, as the papers' 23 px at 224 px; blur is switched off
# for views under 64 px (SimCLR's own CIFAR-10 setting, and solo-learn's and lightly's CIFAR configs: at
# 32 px a sigma of up to 2 px wipes out the image), keeping every other op.

_SMALL = 64  # views under this many pixels get no blur


def _blur_p(p: float, size: int) -> float:
    return p if size >= _SMALL else 0.0


def mae_views(size: int, min_scale: float = 0.2) -> list[ViewSpec]:
    """MAE (He et al. 2022, main_pretrain.py): RandomResizedCrop(scale=(0.2, 1.0)) + horizontal flip, nothing
    else."""
    return [ViewSpec(size, crop_scale=(min_scale, 1.0), hflip_p=0.5)]


def simclr_views(size: int, strength: float | None = None) -> list[ViewSpec]:
    """SimCLR (Chen et al. 2020, appendix A): two views from one distribution. Crop (0.08, 1), ratio 3/4-4/3,
    flip 0.5; colour jitter with p = 0.8 of brightness/contrast/saturation 0.8 s and hue 0.2 s; greyscale
    p = 0.2; blur p = 0.5, sigma U(0.1, 2.0), kernel 10% of the side. ImageNet uses s = 1; the CIFAR-10
    experiments (appendix B.9) use s = 0.5 and no blur. ``strength`` (s) defaults to 1 at 64 px and above,
    0.5 below; blur only at 64 px and above."""
    s = strength if strength is not None else (1.0 if size >= _SMALL else 0.5)
    spec = ViewSpec(size, crop_scale=(0.08, 1.0), hflip_p=0.5, jitter_p=0.8, brightness=0.8 * s,
                    contrast=0.8 * s, saturation=0.8 * s, hue=min(0.5, 0.2 * s), grey_p=0.2,
                    blur_p=_blur_p(0.5, size), blur_sigma=(0.1, 2.0))
    return [spec, replace(spec)]


def _byol_like(size: int, blur: tuple[float, float], solarize: tuple[float, float],
               scale: tuple[float, float] = (0.08, 1.0)) -> list[ViewSpec]:
    """Two views with BYOL's crop, flip and jitter (0.4/0.4/0.2/0.1, p = 0.8), greyscale p = 0.2, and per-view
    blur and solarisation probabilities."""
    return [ViewSpec(size, crop_scale=scale, hflip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4,
                     saturation=0.2, hue=0.1, grey_p=0.2, blur_p=_blur_p(b, size), blur_sigma=(0.1, 2.0),
                     solarize_p=s) for b, s in zip(blur, solarize)]


def byol_views(size: int) -> list[ViewSpec]:
    """BYOL (Grill et al. 2020, appendix B, table 6): crop (0.08, 1), flip 0.5, colour jitter p = 0.8 with
    brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, greyscale p = 0.2; asymmetric views: blur p = 1.0
    and 0.1 (sigma U(0.1, 2.0), 23 px at 224), solarisation p = 0.0 and 0.2. Under 64 px: no blur, solarisation
    kept."""
    return _byol_like(size, blur=(1.0, 0.1), solarize=(0.0, 0.2))


def vicreg_views(size: int) -> list[ViewSpec]:
    """VICReg (Bardes et al. 2022) follows BYOL's augmentations; the authors' released code
    (``augmentations.py``) keeps BYOL's asymmetric blur (p = 1.0 / 0.1) and solarisation (0.0 / 0.2), and
    so does this preset. Under 64 px: no blur."""
    return _byol_like(size, blur=(1.0, 0.1), solarize=(0.0, 0.2))


def dino_views(global_size: int, local_size: int, n_local: int,
               global_scale: tuple[float, float] | None = None,
               local_scale: tuple[float, float] = (0.05, 0.4)) -> list[ViewSpec]:
    """DINO multi-crop (Caron et al. 2021, main_dino.py ``DataAugmentationDINO``): two global crops of
    ``global_scale`` (default (0.4, 1); (0.25, 1) for global crops under 64 px, where a 0.4 lower bound leaves
    too little variety between the two views), then ``n_local`` local crops of ``local_scale`` (0.05, 0.4);
    all with flip 0.5, colour jitter p = 0.8 (0.4/0.4/0.2/0.1), greyscale p = 0.2. Blur: global 1 p = 1.0,
    global 2 p = 0.1, locals p = 0.5; solarisation: global 2 only, p = 0.2. Views under 64 px: no blur.
    Order: [global 1, global 2, local 1, ..., local n_local]."""
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    if global_scale is None:
        global_scale = (0.4, 1.0) if global_size >= _SMALL else (0.25, 1.0)
    globals_ = _byol_like(global_size, blur=(1.0, 0.1), solarize=(0.0, 0.2), scale=global_scale)
    local = _byol_like(local_size, blur=(0.5,), solarize=(0.0,), scale=local_scale)[0]
    return globals_ + [replace(local) for _ in range(n_local)]
