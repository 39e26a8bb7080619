"""gan_utils.py: pixel ranges, minibatches, the per-epoch line, the stopwatch, image grids, GIFs,
latent walks and seeded samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gan_utils as gu
from gan import vanilla_gan as method


def test_epoch_summary_with_and_without_the_classifier_score():
    row = {"epoch": 3, "d_loss": 1.3, "g_loss": 0.8, "d_x": 0.53, "d_g_z": 0.47, "train_seconds": 27.4}
    assert gu.epoch_summary(row) == "epoch   3  D loss 1.300  G loss 0.800  D(x) 0.53  D(G(z)) 0.47  [27 s]"
    assert gu.epoch_summary({**row, "fd": 1.234, "score": 8.9}).endswith("FD 1.23  score 8.90  [27 s]")
    # a folder of faces: Frechet distance on the classifier's features, but no classes to score
    assert gu.epoch_summary({**row, "fd": 12.5}).endswith("0.47  FD 12.50  [27 s]")


def test_grid_image_size():
    img = gu.grid_image(torch.zeros(64, 784))  # 8 per row, 2 px padding, scale 2
    assert img.mode == "L"
    assert img.size == ((8 * 30 + 2) * 2, (8 * 30 + 2) * 2)
    assert gu.grid_image(torch.zeros(64, 1, 28, 28), scale=1).size == (242, 242)
    assert gu.grid_image(torch.zeros(20, 784), nrow=10, scale=1).size == (302, 62)


def test_grid_image_pixel_values():
    x = torch.stack([torch.full((784,), -1.0), torch.full((784,), 1.0)])
    img = gu.grid_image(x, nrow=2, scale=1)
    assert img.getpixel((2 + 14, 2 + 14)) == 0       # -1 -> black
    assert img.getpixel((32 + 14, 2 + 14)) == 255    # +1 -> white
    assert img.getpixel((0, 0)) == 255               # white padding


def test_save_grid_writes_png(tmp_path):
    path = tmp_path / "grid.png"
    returned = gu.save_grid(torch.rand(64, 784) * 2 - 1, path)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (484, 484)
        assert np.array_equal(np.asarray(img.convert("L")), np.asarray(returned))


@pytest.fixture
def three_frames(tmp_path):
    paths = []
    for k, value in enumerate([-1.0, 0.0, 1.0]):  # black, grey, white digits
        paths.append(tmp_path / f"epoch_{k + 1:03d}.png")
        gu.save_grid(torch.full((64, 784), value), paths[-1])
    return paths


def gif_frames(path):
    with Image.open(path) as img:
        frames = []
        for k in range(img.n_frames):
            img.seek(k)
            frames.append((img.convert("L").getpixel((30, 30)), img.info.get("duration")))
        return img.n_frames, frames


def test_save_gif_frames_in_order(tmp_path, three_frames):
    assert gu.save_gif(three_frames, tmp_path / "a.gif") == 3
    n, frames = gif_frames(tmp_path / "a.gif")
    assert n == 3
    assert [v for v, _ in frames] == [0, 128, 255]
    assert frames[-1][1] >= 1500 and frames[0][1] == 200  # the last frame lingers
    gu.save_gif(three_frames[::-1], tmp_path / "b.gif")
    assert [v for v, _ in gif_frames(tmp_path / "b.gif")[1]] == [255, 128, 0]


def test_save_gif_with_labels(tmp_path, three_frames):
    assert gu.save_gif(three_frames, tmp_path / "l.gif", labels=["epoch 1", "epoch 2", "epoch 3"]) == 3
    with Image.open(tmp_path / "l.gif") as img:
        assert img.n_frames == 3 and img.size == (484, 484 + 14)


def test_save_gif_without_frames_writes_nothing(tmp_path):
    # a resumed run with nothing left to train has no new grids: no GIF, no crash
    assert gu.save_gif([], tmp_path / "x.gif") == 0
    assert not (tmp_path / "x.gif").exists()


def test_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(100, generator=g), 1.3 * torch.randn(100, generator=g)
    path = gu.slerp(z0, z1, 9)
    assert path.shape == (9, 100)
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)
    norms = path.norm(dim=1)
    lo, hi = min(z0.norm(), z1.norm()), max(z0.norm(), z1.norm())
    assert ((norms >= lo - 1e-4) & (norms <= hi + 1e-4)).all()
    # unlike a straight line, which dips towards the origin between two near-orthogonal vectors
    assert norms[4] > ((z0 + z1) / 2).norm() * 1.2


def test_slerp_parallel_vectors():
    z = torch.randn(10)
    path = gu.slerp(z, 2 * z, 5)
    assert torch.isfinite(path).all()
    assert torch.allclose(path[0], z) and torch.allclose(path[-1], 2 * z)


def test_stopwatch_accumulates():
    clock = gu.Stopwatch(10.0)
    assert clock.elapsed() == 10.0
    clock.start()
    clock.stop()
    first = clock.elapsed()
    assert first >= 10.0
    assert clock.elapsed() == first  # stopped: does not advance


def test_generate_images_is_seeded_and_leaves_the_global_stream_alone():
    torch.manual_seed(0)
    G = method.Generator(16, batchnorm=True).train()
    state = torch.get_rng_state()
    a = gu.generate_images(G, 1500, 16, seed=7)  # more than one chunk of 1,000
    b = gu.generate_images(G, 1500, 16, seed=7)
    assert a.shape == (1500, 784) and torch.equal(a, b) and not G.training
    assert torch.equal(torch.get_rng_state(), state)
