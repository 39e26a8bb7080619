"""gan/explorer.py: the latent explorer's directions, strip and sliders (the browser test moves them in
JupyterLab; here the widget's own redraw is driven from Python)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from gan import explorer, vanilla_gan


@pytest.fixture
def generator():
    torch.manual_seed(0)
    return vanilla_gan.Generator(16, [32])


def test_directions_are_orthonormal_and_the_same_for_a_seed():
    d = explorer.latent_directions(16, 3, seed=5)
    assert d.shape == (3, 16)
    assert torch.allclose(d @ d.T, torch.eye(3), atol=1e-5)
    assert torch.equal(d, explorer.latent_directions(16, 3, seed=5))
    assert not torch.equal(d, explorer.latent_directions(16, 3, seed=6))


def test_moved_shifts_every_latent_by_the_weighted_directions():
    base, d = torch.zeros(4, 16), explorer.latent_directions(16, 3, seed=0)
    out = explorer.moved(base, d, [1.0, 0.0, -2.0])
    assert torch.allclose(out, (d[0] - 2 * d[2]).expand(4, 16))


def test_the_strip_has_a_row_per_direction_from_minus_to_plus_span(generator):
    d = explorer.latent_directions(16, 3, seed=0)
    base = torch.randn(16)
    images = explorer.strip(generator, base, d, span=2.0, steps=5)
    assert images.shape == (15, 784)
    with torch.no_grad():
        assert torch.allclose(images[2], generator.eval()(base[None])[0], atol=1e-6)  # the middle: not moved
        assert torch.allclose(images[5 + 4], generator(base[None] + 2.0 * d[1])[0], atol=1e-6)


def test_headless_it_saves_and_shows_the_strip(generator, tmp_path, monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.delenv("VSCODE_PID", raising=False)
    shown = explorer.explore(generator, 16, tmp_path / explorer.STRIP_NAME, seed=1)
    saved = (tmp_path / explorer.STRIP_NAME).read_bytes()
    assert shown.data == saved  # an IPython Image of the strip
    # 3 rows of 9 digits of 28 px with 2 px padding, drawn at twice the size.
    assert Image.open(io.BytesIO(saved)).size == (2 * (9 * 30 + 2), 2 * (3 * 30 + 2))


def test_in_a_jupyter_page_the_sliders_redraw_the_picture(generator, tmp_path, monkeypatch):
    monkeypatch.setenv("JPY_SESSION_NAME", "Vanilla_GAN.ipynb")
    box = explorer.explore(generator, 16, tmp_path / explorer.STRIP_NAME, seed=1, samples=4)
    *sliders, image = box.children
    assert len(sliders) == explorer.DIRECTIONS and (tmp_path / explorer.STRIP_NAME).is_file()
    still = image.value
    sliders[0].value = 1.5
    assert image.value != still
    sliders[0].value = 0.0
    assert image.value == still  # back where it started: the same latents, the same picture
    import ipywidgets
    ipywidgets.Widget.close_all()  # now (sliders, image, their layouts and styles), not at interpreter exit,
    # when closing them prints "ImportError: sys.meta_path is None" for each
