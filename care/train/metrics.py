"""Training metrics: the JSONL log and the loss / learning-rate figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from care.io import atomic_path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return rows


def truncate_after(path: Path, step: int) -> None:
    """On resume, forget log lines past the checkpoint we continue from (they will be logged again)."""
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def plot_curves(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path | None:
    """Train/eval loss and learning rate against step, side by side (like the papers' figures)."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], marker="o", ms=3, label="train loss")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="s", ms=4,
                 label="validation loss")
        best = min(evals, key=lambda r: r["eval_loss"])
        ax1.annotate(f"best {best['eval_loss']:.3f}", (best["step"], best["eval_loss"]),
                     textcoords="offset points", xytext=(4, 8), fontsize=8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("Loss")
    ax1.grid(alpha=0.3)
    ax1.legend()
    lr = [r for r in train if "learning_rate" in r]
    if lr:
        ax2.plot([r["step"] for r in lr], [r["learning_rate"] for r in lr], color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.set_title("Learning rate")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
