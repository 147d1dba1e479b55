"""Run logs that always work offline: one JSON object per logged step, and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmssl.figures import save_figure


class JsonlLog:
    """Append-only ``log.jsonl``; on resume, entries after the resumed step are dropped so
    the curve continues as if the run had never stopped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in read_log(path) if line.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                continue
    return rows


# held-out accuracies drawn beside the loss when a run logs them (the image monitors)
ACCURACY_CURVES = {"eval_knn_accuracy": "k-NN (held-out)", "eval_probe_accuracy": "online linear probe (held-out)"}


def plot_loss_curve(log_path: Path, out_png: Path, title: str, ylabel: str = "loss (nats/token)") -> Path | None:
    """Training loss (and held-out loss where evaluated) against step, as a PNG; beside it,
    the monitors' held-out accuracies when the run logs them (image objectives)."""
    rows = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("kind", "train") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: [(r["step"], r[key]) for r in rows if key in r] for key, name in ACCURACY_CURVES.items()}
    curves = {name: points for name, points in curves.items() if points}
    if curves:
        fig, (ax, acc) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
        for name, points in curves.items():
            acc.plot(*zip(*points), "o-", label=name, lw=1.5)
        acc.set_xlabel("step")
        acc.set_ylabel("accuracy")
        acc.set_title("monitors (labels read by the monitors only)")
        acc.grid(alpha=0.3)
        acc.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png)
