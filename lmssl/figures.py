"""Pictures a run leaves behind, written atomically: a reader never sees half a PNG."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, out_png: Path) -> Path:
    """Lay out, write next to ``out_png`` and move into place (a reader never sees half a PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def plot_reconstructions(images, hidden, reconstruction, mean: list[float], std: list[float], out_png: Path,
                         title: str) -> Path:
    """Three rows: the images ``(B, C, H, W)`` (normalised by ``mean``/``std``), what the
    encoder saw (``hidden (B, 1, H, W)`` pixels grey), the reconstructions. Saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def show(x):  # (C, H, W) normalised -> (H, W, 3) in [0, 1]
        x = (x.detach().float().cpu() * s + m).clamp(0, 1)
        return x.expand(3, -1, -1).permute(1, 2, 0).numpy()

    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.6), dpi=110, squeeze=False)
    for i in range(n):
        seen = show(images[i]).copy()
        seen[hidden[i, 0].cpu().numpy()] = 0.5
        for r, (label, pic) in enumerate((("image", show(images[i])), ("visible", seen),
                                          ("reconstruction", show(reconstruction[i])))):
            ax = axes[r][i]
            ax.imshow(pic, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png)


def plot_view_pairs(images_uint8, views, mean: list[float], std: list[float], out_png: Path, title: str,
                    n: int = 8) -> Path:
    """One column per image (the first ``n``): row 0 the original ``images_uint8 (B, C, H, W)``, then one row
    per view (``views``: a list of ``(B, C, s, s)`` tensors normalised by ``mean``/``std``, sizes may differ, as
    DINO's global and local crops do). Greyscale (C = 1) is shown in grey. Saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def rgb(x):  # (C, h, w) in [0, 1] -> (h, w, 3)
        return x.clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy()

    n = min(n, images_uint8.shape[0])
    rows = [("image", [rgb(images_uint8[i].detach().cpu().float() / 255.0) for i in range(n)])]
    rows += [(f"view {v + 1}", [rgb(view[i].detach().float().cpu() * s + m) for i in range(n)])
             for v, view in enumerate(views)]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.3 * len(rows) + 0.4), dpi=110, squeeze=False)
    for r, (label, pics) in enumerate(rows):
        for i, pic in enumerate(pics):
            ax = axes[r][i]
            ax.imshow(pic, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, Path(out_png))


def _denormalised(images, mean: list[float], std: list[float]):
    """``(B, C, H, W)`` normalised -> a function of ``i`` giving image ``i`` as ``(H, W, 3)`` in [0, 1]."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def show(i: int):
        x = (images[i].detach().float().cpu() * s + m).clamp(0, 1)
        return x.expand(3, -1, -1).permute(1, 2, 0).numpy()

    return show


def plot_attention_maps(images, maps, mean: list[float], std: list[float], out_png: Path, title: str) -> Path:
    """One column per image: row 0 the image ``(B, C, H, W)`` (normalised by ``mean``/``std``),
    then one row per attention head (``maps (B, heads, gh, gw)``, each map scaled to its own
    maximum and drawn over the image), and the mean over heads last. Saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    show = _denormalised(images, mean, std)
    maps = maps.detach().float().cpu()
    B, heads = maps.shape[:2]
    H, W = images.shape[-2:]
    up = torch.nn.functional.interpolate(maps, size=(H, W), mode="nearest")  # (B, heads, H, W)
    rows = [f"head {h + 1}" for h in range(heads)] + (["mean"] if heads > 1 else [])
    fig, axes = plt.subplots(1 + len(rows), B, figsize=(1.3 * B, 1.3 * (1 + len(rows)) + 0.4), dpi=110,
                             squeeze=False)
    for i in range(B):
        pic = show(i)
        layers = list(up[i]) + ([up[i].mean(dim=0)] if heads > 1 else [])
        for r in range(1 + len(rows)):
            ax = axes[r][i]
            ax.imshow(pic, vmin=0, vmax=1, interpolation="nearest")
            if r > 0:
                a = layers[r - 1]
                ax.imshow((a / a.max().clamp_min(1e-12)).numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel("image" if r == 0 else rows[r - 1], fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, Path(out_png))


def plot_jepa_blocks(images, context, targets, mean: list[float], std: list[float], out_png: Path, title: str,
                     predicted=None) -> Path:
    """I-JEPA's masks over the images: one column per image ``(B, C, H, W)`` (normalised by
    ``mean``/``std``); row 0 the image, row 1 the context the encoder sees (``context (B, H, W)``
    bool pixels; the rest greyed out), row 2 the target blocks (``targets (B, M, H, W)`` bool, one
    colour per block, overlaps showing the later block). ``predicted (B,)`` floats, optional: a
    number printed under each column (e.g. the prediction error). Saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    show = _denormalised(images, mean, std)
    B, M = targets.shape[:2]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(3, B, figsize=(1.3 * B, 4.3), dpi=110, squeeze=False)
    for i in range(B):
        pic = show(i)
        seen = pic.copy()
        hidden = ~context[i].cpu().numpy()
        seen[hidden] = 0.2 * seen[hidden] + 0.4  # what the encoder does not see: faded to grey
        blocks = pic.copy()
        for m in range(M):
            where = targets[i, m].cpu().numpy()
            blocks[where] = 0.45 * blocks[where] + 0.55 * np.array(colours(m % 10)[:3])
        for r, (label, p) in enumerate((("image", pic), ("context", seen), (f"{M} targets", blocks))):
            ax = axes[r][i]
            ax.imshow(p, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
        if predicted is not None:
            axes[2][i].set_xlabel(f"{float(predicted[i]):.3f}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, Path(out_png))
