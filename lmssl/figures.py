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
