"""The run's curves with matplotlib: training and validation loss, learning rates, tokens/s.

    plot_training(metrics_rows, "runs/demo/loss_curve.png")

`metrics_rows` are `metrics.jsonl`'s rows: training rows carry `loss`, `lr_<group>` and
`tokens_per_s`; validation rows `val_loss` (and `val_exact_match`). The PNG is written whole
(`conversion.atomic`). matplotlib's Agg backend: no display needed, nothing global changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from conversion.atomic import atomic_file


def plot_training(rows: Sequence[dict], path: str | Path) -> None:
    """Three panels over the step: loss (train, validation), learning rate per group, tokens/s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig = Figure(figsize=(8, 9), layout="constrained")
    FigureCanvasAgg(fig)
    loss, lr, speed = fig.subplots(3, 1, sharex=True)
    loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", color="tab:blue")
    if val:
        loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", color="tab:orange")
    loss.set_ylabel("loss")
    loss.legend()
    loss.grid(alpha=0.3)
    groups = sorted({k for r in train for k in r if k.startswith("lr_")})
    for g in groups:
        lr.plot([r["step"] for r in train if g in r], [r[g] for r in train if g in r], label=g[3:])
    lr.set_ylabel("learning rate")
    lr.set_yscale("log" if groups and all(r[g] > 0 for r in train for g in groups if g in r) else "linear")
    if groups:
        lr.legend()
    lr.grid(alpha=0.3)
    pts = [(r["step"], r["tokens_per_s"]) for r in train if "tokens_per_s" in r]
    speed.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:green")
    speed.set_ylabel("tokens / s (real)")
    speed.set_xlabel("step")
    speed.grid(alpha=0.3)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
