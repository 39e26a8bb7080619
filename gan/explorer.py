"""The latent explorer that closes each notebook: sliders that move a few samples along directions of
the latent space, redrawn in place by the averaged generator.

In JupyterLab, Jupyter Notebook or VS Code the sliders are ipywidgets; a headless run (papermill,
`make run`) has nobody to move them, so it shows the same moves as one static strip instead: a row per
direction, from -span to +span. The strip is saved in the run directory either way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

import gan_utils as gu
from gan.runs import atomic_write_bytes

STRIP_NAME = "latent_directions.png"
DIRECTIONS = 3  # sliders: a few directions are enough to see that G maps nearby latents to nearby images
SPAN = 2.5  # how far a slider moves, in units of one latent coordinate's standard deviation
STRIP_STEPS = 9  # images per row of the static strip


def in_jupyter_frontend() -> bool:
    """Whether this kernel was started by a Jupyter server (JupyterLab, Notebook: it sets
    JPY_SESSION_NAME for its kernels) or by VS Code, whose pages draw widgets; papermill and nbclient
    set neither."""
    return "JPY_SESSION_NAME" in os.environ or "VSCODE_PID" in os.environ


def latent_directions(latent_dim: int, n: int, seed: int, device="cpu") -> torch.Tensor:
    """`n` orthonormal directions (n, latent_dim), the same for a seed: QR of a Gaussian matrix, so
    each slider moves along its own axis, unrelated to the others."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(latent_dim, n, generator=generator))
    return q.T.contiguous().to(device)


def moved(base: torch.Tensor, directions: torch.Tensor, amounts) -> torch.Tensor:
    """The latents `base` (N, latent_dim) moved by amounts[i] along directions[i]."""
    shift = torch.as_tensor(amounts, dtype=base.dtype, device=base.device) @ directions
    return base + shift


@torch.no_grad()
def draw(generator: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return generator.eval()(latents)


def strip(generator: torch.nn.Module, base: torch.Tensor, directions: torch.Tensor,
          span: float = SPAN, steps: int = STRIP_STEPS) -> torch.Tensor:
    """Images of one latent `base` (latent_dim,) moved along each direction from -span to +span:
    (len(directions) * steps) images, a row per direction."""
    amounts = torch.linspace(-span, span, steps, device=base.device)
    latents = torch.cat([base + amounts[:, None] * d for d in directions])
    return draw(generator, latents)


def png_bytes(images: torch.Tensor, nrow: int) -> bytes:
    buffer = io.BytesIO()
    gu.grid_image(images, nrow=nrow).save(buffer, format="PNG")
    return buffer.getvalue()


def explorer_widget(generator: torch.nn.Module, base: torch.Tensor, directions: torch.Tensor,
                    span: float = SPAN):
    """An ipywidgets VBox: one slider per direction above the images of `base` moved by the sliders,
    redrawn whenever a slider moves."""
    import ipywidgets as widgets

    sliders = [widgets.FloatSlider(value=0.0, min=-span, max=span, step=0.25, description=f"direction {i + 1}",
                                   continuous_update=True, readout_format=".2f") for i in range(len(directions))]
    image = widgets.Image(format="png", value=png_bytes(draw(generator, base), nrow=len(base)))

    def redraw(_change=None):
        latents = moved(base, directions, [s.value for s in sliders])
        image.value = png_bytes(draw(generator, latents), nrow=len(base))

    for s in sliders:
        s.observe(redraw, names="value")
    return widgets.VBox([*sliders, image])


def explore(generator: torch.nn.Module, latent_dim: int, path: str | os.PathLike, seed: int, device="cpu",
            samples: int = 8, n_directions: int = DIRECTIONS):
    """Save the static strip to `path` and return what to display: the sliders in a Jupyter page, the
    strip in a headless run. `samples` latents are drawn with `seed` (the same each run)."""
    generator_rng = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, latent_dim, generator=generator_rng).to(device)
    directions = latent_directions(latent_dim, n_directions, seed, device)
    strip_png = png_bytes(strip(generator, base[0], directions), nrow=STRIP_STEPS)
    atomic_write_bytes(Path(path), strip_png)
    if in_jupyter_frontend():
        return explorer_widget(generator, base, directions)
    from IPython.display import Image
    return Image(data=strip_png)
