"""Zero-shot classification with a CLIP run: ``lmssl zero-shot RUN_DIR``.

Each label becomes a caption (``--template``, default the run's ``clip.template``: ``"{}"``,
the bare name, for the bundled recipe), the text tower embeds it, and every image is scored against
every label by the cosine similarity of the two embeddings times the run's logit scale; a
softmax over the labels gives the probabilities printed (the top ``--top`` per image).

    lmssl zero-shot runs/clip_tiny                                   # held-out emoji, their own classes
    lmssl zero-shot runs/clip_tiny --labels "cat face,dog face,red heart" photo1.png photo2.png
    lmssl zero-shot runs/clip_tiny --labels "a,b,c" --template "an emoji of {}"

Without IMAGES the run's held-out images are classified (``--limit`` of them); without
``--labels`` among the run's held-out classes, and the accuracy against their true class is
printed beside chance. ``--picture`` draws the images with their top-3 labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lmssl.errors import UserError


@torch.no_grad()
def zero_shot_probabilities(objective, images: torch.Tensor, labels: list[str], template: str | None = None,
                            label_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``images (N, C, L, L)`` -> ``(N, K)`` probabilities over the ``K`` labels: a softmax
    of the scaled cosine similarities, as ``CLIPModel``'s ``logits_per_image`` give them."""
    if label_embeds is None:
        label_embeds = objective.class_embeds(labels, template)  # (K, E)
    images = objective.embed_images(images)  # (N, E)
    scale = float(objective.logit_scale())
    return (scale * images @ label_embeds.T).softmax(dim=1)


def plot_zero_shot(images: torch.Tensor, probs: torch.Tensor, labels: list[str], out_png: Path, title: str,
                   truth: list[int] | None = None, top: int = 3) -> Path:
    """One panel per image (uint8 ``(N, C, L, L)``): the image, its true label above it when
    ``truth`` gives one, and below it its ``top`` labels by probability (``probs (N, K)``), the
    true one in green, the others in grey. Saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmssl.figures import save_figure

    n = images.shape[0]
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.45 * rows + 0.4), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes[i // cols][i % cols]
        img = images[i].detach().cpu().float() / 255.0
        ax.imshow(img.expand(3, -1, -1).permute(1, 2, 0).numpy(), interpolation="nearest")
        if truth is not None and truth[i] >= 0:
            ax.set_title(_short(labels[truth[i]], 34), fontsize=7, pad=3)
        p, idx = probs[i].topk(min(top, probs.shape[1]))
        for r, (q, j) in enumerate(zip(p.tolist(), idx.tolist())):
            right = truth is not None and j == truth[i]
            ax.text(0.5, -0.08 - 0.17 * r, f"{_short(labels[j], 30)}  {q:.0%}", transform=ax.transAxes,
                    ha="center", va="top", fontsize=6.5, color="tab:green" if right else "0.35",
                    fontweight="bold" if right else "normal")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.02, hspace=0.95, wspace=0.3)
    return save_figure(fig, Path(out_png))


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def load_images(paths: list[str], cfg) -> torch.Tensor:
    """Image files -> uint8 ``(N, C, L, L)``, decoded as the run's training images were."""
    import numpy as np

    from lmssl.data.images import decode_image

    v = cfg.vision
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"image '{p}' not found; pass image files after RUN_DIR")
        try:
            out.append(decode_image({"path": p}, v.channels, v.load_size or v.image_size))
        except Exception as e:  # PIL raises many types for files that are not images
            raise UserError(f"could not read the image '{p}' ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.stack(out))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a CLIP run directory (the train.output_dir of `lmssl pretrain "
                        "recipes/clip_tiny.yaml`)")
    parser.add_argument("images", nargs="*", help="image files to classify (default: the run's held-out images)")
    parser.add_argument("--labels", default="", help='comma-separated class names, e.g. "cat,dog,red heart" '
                        "(default: the run's held-out classes)")
    parser.add_argument("--template", default=None, help='prompt with {} for the label, e.g. "a photo of a {}" '
                        "(default: the run's clip.template)")
    parser.add_argument("--top", type=int, default=3, help="labels printed per image (default 3)")
    parser.add_argument("--limit", type=int, default=12, help="held-out images shown when no IMAGES are given "
                        "(the accuracy is over all of them; default 12)")
    parser.add_argument("--picture", default=None, help="also draw the images with their top-3 labels to this PNG")


def run(args: argparse.Namespace) -> int:
    from lmssl.data.pairs import held_out_pairs
    from lmssl.runs import load_run

    objective, cfg, tokenizer = load_run(args.run_dir)
    if not hasattr(objective, "class_embeds"):
        raise UserError(f"{args.run_dir} is a '{cfg.objective}' run; zero-shot classification needs an image-text run "
                        "(objective: clip)")
    template = args.template if args.template is not None else cfg.clip.template
    if "{}" not in template:
        raise UserError(f"--template must hold {{}} where the label goes, got '{template}'")
    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else []
    if args.labels and not labels:
        raise UserError('--labels holds no label; give comma-separated names, e.g. --labels "cat,dog"')
    truth = None
    if args.images:
        if not labels:
            raise UserError("classifying your own images needs --labels (comma-separated class names)")
        images, names = load_images(args.images, cfg), list(args.images)
    else:
        held = held_out_pairs(cfg, tokenizer, limit=0)
        if not labels:
            if not held.classes:
                raise UserError("the run's held-out pairs have no class labels; pass --labels")
            labels, truth_all = held.classes, held.labels
            valid = truth_all >= 0
            probs = zero_shot_probabilities(objective, held.images[valid], labels, template)
            accuracy = float((probs.argmax(dim=1) == truth_all[valid]).float().mean())
            print(f"zero-shot accuracy on {int(valid.sum())} held-out images among {len(labels)} classes: "
                  f"{accuracy:.2%} (chance {1 / len(labels):.2%}), prompt '{template}'")
        step = max(1, len(held.images) // max(1, args.limit))
        pick = torch.arange(0, len(held.images), step)[: args.limit]
        images = held.images[pick]
        names = [held.captions[i] for i in pick.tolist()]
        truth = held.labels[pick].tolist() if held.classes and labels == held.classes else None
    probs = zero_shot_probabilities(objective, images, labels, template)
    k = max(1, min(args.top, len(labels)))
    for i, name in enumerate(names):
        p, idx = probs[i].topk(k)
        guesses = ", ".join(f"{labels[j]} ({q:.1%})" for q, j in zip(p.tolist(), idx.tolist()))
        print(f"{name if args.images else _short(name, 48)}: {guesses}")
    if args.picture:
        path = plot_zero_shot(images, probs, labels, Path(args.picture), f"zero-shot: {args.run_dir}, '{template}'",
                              truth=truth, top=3)
        print(f"picture: {path}")
    return 0
