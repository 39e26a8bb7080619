"""The notebooks' first helper: data preprocessing, per-epoch logging, image grids and animations.

* Preprocessing: pixels to the models' range [-1, 1] and back, and the epoch's shuffled minibatches.
* Logging: the epoch's mean losses and the line printed after it, training time that survives
  resumes, peak memory, the library versions a run records.
* Pictures: image grids (saved and shown), the training animation, latent interpolation, samples.

The rest of the plumbing is in the `gan` package (its `__init__` lists what is where).
"""

from __future__ import annotations

import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gan.runs import atomic_write_bytes, epoch_grid_paths, grid_epoch

# --------------------------------------------------------------------------------------------
# Preprocessing: pixel ranges and the epoch's minibatches
# --------------------------------------------------------------------------------------------


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0-255) -> float32 in [-1, 1], the range of the generator's tanh; shape kept.
    A NumPy array is copied first: MNIST's are read-only views of the file's bytes."""
    x = torch.as_tensor(np.array(images_uint8) if isinstance(images_uint8, np.ndarray) else images_uint8)
    return x.float().div_(127.5).sub_(1.0)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> [0, 1] (for image grids and the Parzen window estimate)."""
    return (x + 1.0) / 2.0


def epoch_permutation(n: int, seed: int, epoch: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The order of the training images in `epoch`: a permutation that depends only on (seed, epoch).

    Its own generator, so resuming at any epoch reproduces the order exactly, whatever else
    consumed random numbers before.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def minibatches(x: torch.Tensor, batch_size: int, seed: int, epoch: int):
    """Yield the epoch's shuffled minibatches of `x` (drops the last incomplete batch)."""
    order = epoch_permutation(len(x), seed, epoch, x.device)
    for start in range(0, len(x) - batch_size + 1, batch_size):
        yield x[order[start:start + batch_size]]


# --------------------------------------------------------------------------------------------
# Logging: the epoch's means and line, training time, memory, versions
# --------------------------------------------------------------------------------------------


def epoch_means(sums: torch.Tensor, steps: int) -> dict:
    """Per-epoch averages from train_step's running sums [D loss, D(x), D(G(z)), G loss, G steps]
    (this .tolist() is the host sync the training loop makes every log_every steps)."""
    loss_d, d_x, d_gz, loss_g, g_steps = sums.tolist()
    return {"d_loss": loss_d / steps, "g_loss": loss_g / max(g_steps, 1), "d_x": d_x / steps, "d_g_z": d_gz / steps}


def epoch_summary(row: dict) -> str:
    """The line printed after each epoch: losses, D's outputs, the quick scores, training time. A
    folder of images without the classifier's classes (faces, say) has an FD but no classifier score."""
    scores = "".join(f"  {label} {row[key]:.2f}" for key, label in (("fd", "FD"), ("score", "score")) if key in row)
    return (f"epoch {int(row['epoch']):3d}  D loss {row['d_loss']:.3f}  G loss {row['g_loss']:.3f}  "
            f"D(x) {row['d_x']:.2f}  D(G(z)) {row['d_g_z']:.2f}{scores}  [{row['train_seconds']:.0f} s]")


class Stopwatch:
    """Training wall time that survives resumes: time before this session plus time since start()."""

    def __init__(self, elapsed_before: float = 0.0):
        self.before, self.started = elapsed_before, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.started is not None:
            self.before, self.started = self.elapsed(), None

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def library_versions() -> dict:
    """Versions that decide whether a run can be repeated."""
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


# --------------------------------------------------------------------------------------------
# Pictures: grids, the training animation, latent walks, samples
# --------------------------------------------------------------------------------------------


def grid_image(images: torch.Tensor, nrow: int = 8, scale: int = 2) -> Image.Image:
    """Model-range images -> one PIL grid, `nrow` per row: flat MNIST digits (N, 784) or images
    (N, C, H, W) with C = 1 (a grayscale grid) or C = 3 (an RGB grid)."""
    from torchvision.utils import make_grid
    x = images.detach().float().cpu()
    x = to_unit_range(x.reshape(-1, 1, 28, 28) if x.dim() == 2 else x).clamp_(0, 1)
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    pixels = (grid.numpy() * 255).round().astype(np.uint8)
    img = (Image.fromarray(pixels[0], mode="L") if x.shape[1] == 1  # one channel suffices: grey digits
           else Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB"))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Image.Image:
    """Save a grid of model-range images as a PNG (atomically) and return it."""
    img = grid_image(images, nrow=nrow)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return img


def label_image(img: Image.Image, text: str) -> Image.Image:
    """Return `img` with a white strip on top carrying `text` (e.g. the epoch of a GIF frame)."""
    from PIL import ImageDraw
    white, black = (255, 0) if img.mode == "L" else ((255, 255, 255), (0, 0, 0))
    out = Image.new(img.mode, (img.width, img.height + 14), white)
    out.paste(img, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill=black)
    return out


def save_gif(frame_paths: list, path: str | os.PathLike, ms_per_frame: int = 200, labels=None) -> int:
    """Animate PNG frames (in the given order) into a looping GIF; returns the frame count.

    No frames (a resumed run with nothing left to train, grids deleted): writes nothing, returns 0.
    """
    if not frame_paths:
        return 0
    frames = [Image.open(p, formats=("PNG",)) for p in frame_paths]  # the grids are PNGs: no other reader runs
    mode = "L" if all(f.mode == "L" for f in frames) else "RGB"  # grey digits, or colour images
    frames = [f.convert(mode) for f in frames]
    if labels is not None:
        frames = [label_image(f, t) for f, t in zip(frames, labels)]
    buffer = io.BytesIO()
    # The last frame lingers so the final digits can be read before the loop restarts.
    durations = [ms_per_frame] * (len(frames) - 1) + [max(1500, ms_per_frame)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=durations)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return len(frames)


def save_progress_gif(run_dir: str | os.PathLike) -> int:
    """`progress.gif` in the run directory: its per-epoch grids, each labelled with its epoch.
    Returns the number of frames (0, writing nothing, when the run has no grids)."""
    frames = epoch_grid_paths(run_dir)
    labels = [f"epoch {grid_epoch(p)}" for p in frames]
    return save_gif(frames, Path(run_dir) / "progress.gif", labels=labels)


def slerp(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation from z0 to z1 (1-D tensors) in `steps` points, both ends included.

    Gaussian latents concentrate near a sphere; a straight line between two of them passes through
    low-norm points the generator rarely saw, so slerp keeps the path on the shell.
    """
    t = torch.linspace(0, 1, steps, device=z0.device).unsqueeze(1)
    cos = torch.dot(z0 / z0.norm(), z1 / z1.norm()).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:  # (nearly) parallel: slerp degenerates to a straight line
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


@torch.no_grad()
def generate_images(generator: torch.nn.Module, n: int, latent_dim: int, seed: int | None = None) -> torch.Tensor:
    """n samples of `generator` in eval mode (BatchNorm uses its running statistics), 1,000 at a time.

    With a seed the latents come from their own random generator (the same images every call, the
    training's random stream untouched); without one, from the global stream."""
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    z = torch.randn(n, latent_dim, device=device, generator=rng)
    return torch.cat([generator.eval()(chunk) for chunk in z.split(1000)])
