"""Loss-curve plot of the training CLI: the training loss of every run of one invocation overlaid
(raw per step, faint, and an exponential moving average on top), written as a PNG with matplotlib's
Agg backend so that it works without a display.
"""

from __future__ import annotations

from pathlib import Path


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (Adam's correction, so the start is not pulled to 0)."""
    out, m = [], 0.0
    for i, v in enumerate(values, 1):
        m = beta * m + (1.0 - beta) * v
        out.append(m / (1.0 - beta**i))
    return out


def plot_losses(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, run in enumerate(runs):
        curve = run["loss_curve"]
        steps = range(1, len(curve) + 1)
        color = f"C{i % 10}"
        beta = min(0.98, 1.0 - 1.0 / max(2.0, len(curve) / 50.0))
        ax.plot(steps, curve, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, ema(curve, beta), color=color, linewidth=1.8, label=run["recipe"])
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
