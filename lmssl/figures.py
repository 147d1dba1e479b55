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
