"""mnist_data: MNIST loading: the paper's split, verified files, clear errors, safe downloads."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import gan_utils as gu
from gan import errors
from gan import mnist_data
from conftest import RAW_NAMES, listing

TEST_IMAGES = mnist_data.MNIST_FILES["test_images"].name
TEST_LABELS = mnist_data.MNIST_FILES["test_labels"].name


@pytest.fixture(scope="module")
def splits(data_dir):
    return mnist_data.load_mnist(data_dir, download=False)


@pytest.fixture(scope="module")
def arrays(data_dir):
    return mnist_data.load_mnist_arrays(data_dir, download=False)


def no_network(*args, **kwargs):
    raise AssertionError("the test must not touch the network")


# ------------------------------------------------------------------------------------------------
# The split and the tensors
# ------------------------------------------------------------------------------------------------

def test_split_sizes_and_shapes(splits):
    assert splits.train_x.shape == (50_000, 784)
    assert splits.val_x.shape == (10_000, 784)
    assert splits.test_x.shape == (10_000, 784)
    assert splits.train_y.shape == (50_000,)
    assert splits.val_y.shape == (10_000,)
    assert splits.test_y.shape == (10_000,)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_images_float32_in_exact_range(splits, split):
    x = getattr(splits, f"{split}_x")
    assert x.dtype == torch.float32
    # uint8 0 maps to exactly -1 and 255 to exactly +1 (both occur in every split)
    assert x.min().item() == -1.0
    assert x.max().item() == 1.0


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_labels_are_digits(splits, split):
    y = getattr(splits, f"{split}_y")
    assert y.dtype == torch.int64
    assert y.min().item() == 0 and y.max().item() == 9
    assert torch.bincount(y, minlength=10).min().item() > 500  # every digit present in quantity


def test_split_is_the_papers(splits, arrays):
    # train = first 50,000 of the training file, val = its last 10,000, test = the test file
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    assert torch.equal(splits.train_x, gu.to_model_range(train_images[:50_000]).flatten(1))
    assert torch.equal(splits.val_x, gu.to_model_range(train_images[50_000:]).flatten(1))
    assert torch.equal(splits.test_x, gu.to_model_range(arrays["test_images"]).flatten(1))
    assert torch.equal(splits.train_y, torch.as_tensor(train_labels[:50_000].astype(np.int64)))
    assert torch.equal(splits.val_y, torch.as_tensor(train_labels[50_000:].astype(np.int64)))
    assert torch.equal(splits.test_y, torch.as_tensor(arrays["test_labels"].astype(np.int64)))


def test_to_model_range_values():
    x = gu.to_model_range(np.array([[[0, 255], [127, 128]]], dtype=np.uint8))
    assert x.shape == (1, 2, 2) and x.dtype == torch.float32  # the shape is kept; load_mnist flattens
    x = x.flatten(1)
    assert x[0, 0].item() == -1.0 and x[0, 1].item() == 1.0
    assert abs(x[0, 2].item() + 1 / 255) < 1e-6 and abs(x[0, 3].item() - 1 / 255) < 1e-6
    assert torch.allclose(gu.to_unit_range(x), torch.tensor([[0.0, 1.0, 127 / 255, 128 / 255]]))


def test_train_subset_keeps_val_and_test(data_dir, splits):
    small = mnist_data.load_mnist(data_dir, train_subset=1000, download=False)
    assert small.train_x.shape == (1000, 784) and small.train_y.shape == (1000,)
    assert torch.equal(small.train_x, splits.train_x[:1000])
    assert torch.equal(small.train_y, splits.train_y[:1000])
    assert torch.equal(small.val_x, splits.val_x) and torch.equal(small.test_x, splits.test_x)
    # more than the training set, or 0, means all 50,000
    assert mnist_data.load_mnist(data_dir, train_subset=10 ** 6, download=False).train_x.shape == (50_000, 784)
    assert mnist_data.load_mnist(data_dir, train_subset=0, download=False).train_x.shape == (50_000, 784)


# ------------------------------------------------------------------------------------------------
# Minibatches
# ------------------------------------------------------------------------------------------------

def batch_indices(n, batch_size, seed, epoch):
    # each row of x is its own index, so a batch tells which images it holds
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return [b[:, 0].long().tolist() for b in gu.minibatches(x, batch_size, seed, epoch)]


def test_minibatches_full_batches_each_image_at_most_once():
    batches = batch_indices(103, 10, seed=0, epoch=0)
    assert len(batches) == 10  # 103 // 10: the incomplete last batch is dropped
    assert all(len(b) == 10 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == len(seen) == 100  # no image twice
    assert set(seen) <= set(range(103))


def test_minibatches_exact_multiple_covers_everything():
    batches = batch_indices(64, 16, seed=3, epoch=5)
    assert sorted(i for b in batches for i in b) == list(range(64))


def test_minibatches_order_depends_only_on_seed_and_epoch():
    assert batch_indices(200, 20, seed=1, epoch=4) == batch_indices(200, 20, seed=1, epoch=4)
    torch.manual_seed(123)  # the global generator must not matter (resuming reproduces the order)
    a = batch_indices(200, 20, seed=1, epoch=4)
    torch.randn(1000)
    assert a == batch_indices(200, 20, seed=1, epoch=4)
    assert batch_indices(200, 20, seed=1, epoch=4) != batch_indices(200, 20, seed=1, epoch=5)
    assert batch_indices(200, 20, seed=1, epoch=4) != batch_indices(200, 20, seed=2, epoch=4)
    flat = [i for b in batch_indices(200, 20, seed=1, epoch=0) for i in b]
    assert flat != list(range(200))  # actually shuffled


def test_minibatches_are_rows_of_x(splits):
    x = splits.train_x[:256]
    order = gu.epoch_permutation(256, seed=7, epoch=2)
    batches = list(gu.minibatches(x, 64, seed=7, epoch=2))
    assert len(batches) == 4
    assert torch.equal(torch.cat(batches), x[order])


# ------------------------------------------------------------------------------------------------
# Missing, truncated and corrupt files
# ------------------------------------------------------------------------------------------------

def test_missing_files_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    root = tmp_path / "empty"
    (root / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(errors.DataError) as info:
        mnist_data.load_mnist(root, download=False)
    msg = str(info.value)
    assert str((root / "MNIST" / "raw").resolve()) in msg
    for name in RAW_NAMES:
        assert name in msg
    assert "GAN_DATA_DIR" in msg and "data_dir" in msg
    assert listing(root) == {}  # nothing created


def test_missing_directory_without_download_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    root = tmp_path / "nowhere"
    with pytest.raises(errors.DataError) as info:
        mnist_data.ensure_mnist(root, download=False)
    assert "nowhere" in str(info.value) and "GAN_DATA_DIR" in str(info.value)
    assert not root.exists()


def test_one_missing_file_is_named(make_mnist_copy, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    msg = load_error_leaving_dir_untouched(root)
    assert f"missing {TEST_LABELS}" in msg
    assert "GAN_DATA_DIR" in msg and "data_dir" in msg


def test_truncated_unpacked_file(make_mnist_copy):
    root = make_mnist_copy(plain=True)
    path = root / "MNIST" / "raw" / TEST_IMAGES
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    msg = load_error_leaving_dir_untouched(root)
    assert str(path) in msg
    assert "truncated" in msg


def load_error_leaving_dir_untouched(root, download=False):
    """load_mnist must fail with a DataError and leave the directory as it was; returns the message."""
    before = listing(root)
    with pytest.raises(errors.DataError) as info:
        mnist_data.load_mnist(root, download=download)
    assert listing(root) == before  # nothing written, nothing deleted, no .part file left
    return str(info.value)


def overwrite_bytes(path, offset, data):
    """Damage a copied file in place: `data` replaces the bytes at `offset`, the size stays."""
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_corrupt_idx_header(make_mnist_copy):
    root = make_mnist_copy(plain=True)
    path = root / "MNIST" / "raw" / TEST_LABELS
    overwrite_bytes(path, 0, (2051).to_bytes(4, "big"))  # a labels file claiming to hold images: same size, bad magic
    msg = load_error_leaving_dir_untouched(root)
    assert str(path) in msg and "header" in msg


def test_corrupt_image_dimensions(make_mnist_copy):
    root = make_mnist_copy(plain=True, names=[TEST_IMAGES])
    path = root / "MNIST" / "raw" / TEST_IMAGES
    overwrite_bytes(path, 8, (14).to_bytes(4, "big") + (56).to_bytes(4, "big"))  # 14x56: same byte count, wrong shape
    with pytest.raises(errors.DataError) as info:
        mnist_data.read_mnist_file(path.parent, mnist_data.MNIST_FILES["test_images"])
    assert str(path) in str(info.value) and "28x28" in str(info.value)


def test_gz_with_wrong_md5(make_mnist_copy):
    root = make_mnist_copy(plain=False, gz=True)
    path = root / "MNIST" / "raw" / (TEST_LABELS + ".gz")
    middle = path.stat().st_size // 2
    overwrite_bytes(path, middle, bytes([path.read_bytes()[middle] ^ 0xFF]))  # one flipped byte
    msg = load_error_leaving_dir_untouched(root)
    assert str(path) in msg and "md5" in msg


def test_gz_only_gives_the_same_arrays(make_mnist_copy, arrays):
    root = make_mnist_copy(plain=False, gz=True)
    before = listing(root)
    from_gz = mnist_data.load_mnist_arrays(root, download=False)
    assert set(from_gz) == set(arrays)
    for key in arrays:
        assert from_gz[key].dtype == np.uint8
        assert np.array_equal(from_gz[key], arrays[key]), key
    assert listing(root) == before  # read in memory: nothing unpacked next to the .gz


def test_unpacked_file_wins_over_gz(make_mnist_copy, arrays):
    # a good unpacked file next to a damaged .gz: the unpacked one is read, the .gz never opened
    root = make_mnist_copy(plain=True, gz=True, names=[TEST_LABELS])
    gz = root / "MNIST" / "raw" / (TEST_LABELS + ".gz")
    gz.write_bytes(b"garbage")
    labels = mnist_data.read_mnist_file(gz.parent, mnist_data.MNIST_FILES["test_labels"])
    assert np.array_equal(labels, arrays["test_labels"])


# ------------------------------------------------------------------------------------------------
# Downloads (from a local mirror: a file:// URL, or a fake urlopen)
# ------------------------------------------------------------------------------------------------

def real_gz_bytes(data_dir: Path, name: str) -> bytes:
    raw = data_dir / "MNIST" / "raw"
    if (raw / (name + ".gz")).is_file():
        return (raw / (name + ".gz")).read_bytes()
    pytest.skip(f"{raw / (name + '.gz')} is not in the shared copy; the download tests serve it")


@pytest.fixture
def local_mirror(tmp_path, data_dir):
    """A directory serving the real test-labels .gz, and its file:// URL (with trailing slash)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / (TEST_LABELS + ".gz")).write_bytes(real_gz_bytes(data_dir, TEST_LABELS))
    return mirror, mirror.as_uri() + "/"


def test_missing_file_is_downloaded_verified_and_renamed(make_mnist_copy, local_mirror, monkeypatch, arrays):
    mirror, url = local_mirror
    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    raw = root / "MNIST" / "raw"
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (url,))
    replaced, hashed = [], []
    real_replace, real_md5 = os.replace, mnist_data.md5_of_file

    def spy_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    def spy_md5(path):
        hashed.append(Path(path))
        return real_md5(path)

    monkeypatch.setattr(gu.os, "replace", spy_replace)
    monkeypatch.setattr(mnist_data, "md5_of_file", spy_md5)
    assert mnist_data.ensure_mnist(root, download=True) == raw
    target = raw / (TEST_LABELS + ".gz")
    assert target.is_file()
    assert hashlib.md5(target.read_bytes()).hexdigest() == mnist_data.MNIST_FILES["test_labels"].gz_md5
    # downloaded to a .part file beside the target, md5 checked on it, then renamed into place
    assert len(replaced) == 1
    src, dst = replaced[0]
    assert dst == target and src.parent == raw and src.name.endswith(".part")
    assert src in hashed
    assert not list(raw.glob("*.part"))
    assert np.array_equal(mnist_data.load_mnist_arrays(root, download=False)["test_labels"], arrays["test_labels"])


def test_downloaded_file_is_readable_by_others(make_mnist_copy, local_mirror, monkeypatch):
    # data_dir may be shared (GAN_DATA_DIR): a download gets the permissions open() would give it
    _, url = local_mirror
    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (url,))
    old = os.umask(0o022)
    try:
        mnist_data.ensure_mnist(root, download=True)
    finally:
        os.umask(old)
    mode = (root / "MNIST" / "raw" / (TEST_LABELS + ".gz")).stat().st_mode & 0o777
    assert mode == 0o644, f"downloaded file has mode {oct(mode)}"


def test_download_into_missing_directory(tmp_path, data_dir, monkeypatch):
    # an empty data_dir: all four files come from the mirror, and the loaded data are right
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in RAW_NAMES:
        (mirror / (name + ".gz")).write_bytes(real_gz_bytes(data_dir, name))
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (mirror.as_uri() + "/",))
    root = tmp_path / "fresh"
    splits = mnist_data.load_mnist(root, download=True)
    assert splits.train_x.shape == (50_000, 784) and splits.test_x.shape == (10_000, 784)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(n + ".gz" for n in RAW_NAMES)


def test_download_with_wrong_content_leaves_nothing(make_mnist_copy, tmp_path, monkeypatch):
    bad = tmp_path / "bad_mirror"
    bad.mkdir()
    (bad / (TEST_LABELS + ".gz")).write_bytes(gzip.compress(b"not mnist at all"))
    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (bad.as_uri() + "/",))
    msg = load_error_leaving_dir_untouched(root, download=True)  # no .part file, no half file under the final name
    assert "md5" in msg and TEST_LABELS in msg


def test_bad_mirror_falls_back_to_the_next(make_mnist_copy, local_mirror, tmp_path, monkeypatch, arrays):
    _, good_url = local_mirror
    bad = tmp_path / "bad_mirror"
    bad.mkdir()
    (bad / (TEST_LABELS + ".gz")).write_bytes(b"\x1f\x8b truncated")
    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", (bad.as_uri() + "/", good_url))
    labels = mnist_data.load_mnist_arrays(root, download=True)["test_labels"]
    assert np.array_equal(labels, arrays["test_labels"])
    assert not list((root / "MNIST" / "raw").glob("*.part"))


class CutResponse(io.BytesIO):
    """A response that delivers some bytes and then the connection drops."""

    def read(self, n=-1):
        data = super().read(n if n and n > 0 else 1000)
        if not data or self.tell() > 2000:
            raise ConnectionResetError("connection reset by peer")
        return data


def test_download_cut_short_leaves_no_part_file(make_mnist_copy, data_dir, monkeypatch):
    payload = real_gz_bytes(data_dir, TEST_LABELS)
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return CutResponse(payload)

    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    before = listing(root)
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    with pytest.raises(errors.DataError) as info:
        mnist_data.load_mnist(root, download=True)
    assert len(calls) == len(mnist_data.MNIST_MIRRORS)  # every mirror tried
    assert all(u.endswith(TEST_LABELS + ".gz") for u in calls)
    msg = str(info.value)
    assert "downloading failed" in msg and "connection reset" in msg
    assert listing(root) == before


class CutMidChunk(io.BytesIO):
    """A response whose chunked body stops mid-chunk: http.client raises IncompleteRead, an
    HTTPException and no OSError."""

    def read(self, n=-1):
        if self.tell() >= 2000:
            raise http.client.IncompleteRead(b"", 1234)
        return super().read(min(n if n and n > 0 else 1000, 1000))


def test_mirror_cutting_a_chunk_short_falls_back_to_the_next(make_mnist_copy, data_dir, monkeypatch, arrays):
    payload = real_gz_bytes(data_dir, TEST_LABELS)
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return CutMidChunk(payload) if url.startswith("https://cut.example/") else io.BytesIO(payload)

    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", ("https://cut.example/", "https://good.example/"))
    reports = []
    mnist_data.ensure_mnist(root, download=True, report=reports.append)
    assert [u.split("/")[2] for u in calls] == ["cut.example", "good.example"]
    assert any("https://cut.example/: IncompleteRead" in r for r in reports)
    labels = mnist_data.read_mnist_file(root / "MNIST" / "raw", mnist_data.MNIST_FILES["test_labels"])
    assert np.array_equal(labels, arrays["test_labels"])


def test_every_mirror_cutting_chunks_names_each_failure(make_mnist_copy, data_dir, monkeypatch):
    payload = real_gz_bytes(data_dir, TEST_LABELS)
    root = make_mnist_copy(names=[n for n in RAW_NAMES if n != TEST_LABELS])
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: CutMidChunk(payload))
    monkeypatch.setattr(mnist_data, "MNIST_MIRRORS", ("https://one.example/", "https://two.example/"))
    msg = load_error_leaving_dir_untouched(root, download=True)  # a DataError, no traceback, no .part file
    assert "downloading failed" in msg
    for mirror in mnist_data.MNIST_MIRRORS:
        assert f"{mirror}: IncompleteRead(0 bytes read, 1234 more expected)" in msg


def test_unreachable_mirrors_give_a_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    root = tmp_path / "d"
    with pytest.raises(errors.DataError) as info:
        mnist_data.ensure_mnist(root, download=True)
    msg = str(info.value)
    assert "no route to host" in msg and "GAN_DATA_DIR" in msg
    for name in RAW_NAMES:
        assert name in msg
    assert listing(root) == {}  # the directory may exist, but holds no file
