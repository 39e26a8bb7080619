"""The figures both notebooks draw after training: losses, quality over time, real next to generated.

Each function draws one figure, saves it as a PNG into the run directory and shows it (inline in
Jupyter; headless runs only save it). They read the history rows the training loop writes to
metrics.csv.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import gan_utils as gu
from gan.runs import atomic_write_bytes


def _save_and_show(fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(Path(path), buffer.getvalue())  # replaces a link planted there, never writes through it
    plt.show()


# (D loss, D's output) where G's samples cannot be told from real images (D(x) = D(G(z)) for every
# image), for each game: BCE D = 1/2 and loss 2 log 2; hinge score 0 and loss 2; least squares 1/2 and 1/4.
EQUILIBRIUM = {"bce": (2 * math.log(2), 0.5), "hinge": (2.0, 0.0), "least_squares": (0.25, 0.5)}


def plot_training(history: list[dict], path: str | os.PathLike, loss: str = "bce") -> None:
    """Losses and D's outputs per epoch (probabilities in the BCE game, raw scores in the others), with
    their values at the game's equilibrium."""
    epochs_axis = [row["epoch"] for row in history]
    d_loss_there, d_out_there = EQUILIBRIUM[loss]
    fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(11, 3.5))
    for key, label in (("d_loss", "D loss"), ("g_loss", "G loss")):
        ax_loss.plot(epochs_axis, [row[key] for row in history], label=label)
    ax_loss.axhline(d_loss_there, color="grey", ls=":", label="D loss at equilibrium")
    for key, label in (("d_x", "D(x)"), ("d_g_z", "D(G(z))")):
        ax_d.plot(epochs_axis, [row[key] for row in history], label=label)
    ax_d.axhline(d_out_there, color="grey", ls=":")
    for ax, title in ((ax_loss, "losses"), (ax_d, "discriminator outputs")):
        ax.set(xlabel="epoch", title=title)
        ax.legend()
    _save_and_show(fig, path)


def plot_quality(history: list[dict], path: str | os.PathLike, real_score: float | None,
                 class_names: list[str] | None, real_label: str = "real test images") -> bool:
    """Frechet distance per epoch, the classifier score against training wall time (when the run
    first reached a quality level) and the share of each predicted class (a class fading out is mode
    collapse). Without class names (a folder of other images) only the Frechet distance is drawn.
    Returns False, drawing nothing, when the history has no per-epoch scores."""
    rows = [row for row in history if "fd" in row]
    if not rows:
        return False
    panels = 3 if class_names else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    epochs_axis = [row["epoch"] for row in rows]
    ax_fd = axes[0, 0]
    ax_fd.plot(epochs_axis, [row["fd"] for row in rows], color="C3")
    ax_fd.set(xlabel="epoch", ylabel="Frechet distance (lower is better)", yscale="log", title="Frechet distance")
    if class_names:
        # A run resumed on data with these classes after epochs on data without them (a folder of
        # faces, say) has FD-only rows at first: the class panels start where the scores do.
        rows = [row for row in rows if "score" in row]
        epochs_axis = [row["epoch"] for row in rows]
        ax_time, ax_share = axes[0, 1], axes[0, 2]
        ax_time.plot([row["train_seconds"] / 60 for row in rows], [row["score"] for row in rows], marker=".")
        if real_score is not None:
            ax_time.axhline(real_score, color="grey", ls=":", label=real_label)
            ax_time.legend()
        ax_time.set(xlabel="training wall time (min)", ylabel="classifier score", title="score over time")
        shares = torch.tensor([[row[f"frac_{c}"] for c in range(len(class_names))] for row in rows]).T
        ax_share.stackplot(epochs_axis, shares, labels=class_names)
        ax_share.set(xlabel="epoch", ylabel="share of samples", ylim=(0, 1), title="predicted class shares")
        ax_share.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: keeps the bands visible
    _save_and_show(fig, path)
    return True


def show_side_by_side(left: torch.Tensor, right: torch.Tensor, titles, path: str | os.PathLike) -> None:
    """Two image grids next to each other (e.g. real test images and samples), saved and shown."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, images, title in zip(axes, (left, right), titles):
        ax.imshow(gu.grid_image(images, scale=1), cmap="gray")  # cmap applies to grey grids only
        ax.set_title(title)
        ax.axis("off")
    _save_and_show(fig, path)
