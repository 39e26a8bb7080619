"""image_data: folders of images (any size and mode), the cache, CIFAR-10's python format, MNIST at
32 px and load_dataset. Everything on small files written into tmp_path, except the two tests that
read the shared data (GAN_DATA_DIR; skipped with a message when it is not set)."""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import subprocess
import random
import shutil
import tempfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import gan_utils as gu
from gan import image_data as idt
from gan.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    img.save(path, **kw)
    return path


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def private_user_cache(tmp_path, monkeypatch):
    """The user cache directory of every test is its own (never ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / idt.USER_CACHE_SUBDIR


@pytest.fixture
def counting_decoder(monkeypatch):
    """Counts calls of image_data.decode_image (still decoding)."""
    calls = []
    real = idt.decode_image

    def decode(path, size):
        calls.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(idt, "decode_image", decode)
    return calls


def shared_data_root() -> Path | None:
    value = os.environ.get("GAN_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------

def test_flat_folder(tmp_path):
    folder = tmp_path / "faces"
    for i in range(3):
        save(folder / f"{i}.png", rgb(40, 40, i))
    (folder / "notes.txt").write_text("not an image")
    save(folder / ".hidden.png", rgb(40, 40))
    s = idt.load_image_folder(folder, 16, progress=False)
    assert s.images.shape == (3, 3, 16, 16) and s.images.dtype == torch.uint8
    assert s.labels is None and s.class_names is None and len(s) == 3
    assert s.source == str(folder.resolve())


def test_class_subfolders_sorted_and_labelled(tmp_path):
    folder = tmp_path / "pets"
    for cls, n in (("dog", 2), ("cat", 3), ("emu", 1)):
        for i in range(n):
            save(folder / cls / f"{i:02d}.png", rgb(20, 20, i))
    save(folder / ".trash" / "x.png", rgb(20, 20))  # hidden: not a class
    first = idt.load_image_folder(folder, 8, progress=False)
    assert first.class_names == ["cat", "dog", "emu"]
    assert first.labels.tolist() == [0, 0, 0, 1, 1, 2] and first.labels.dtype == torch.int64
    # The cache lies beside the folder, not in it: nothing new inside, so no new class for any tool.
    assert idt.beside_cache_path(folder, 8).is_file() and idt.beside_cache_path(folder, 8).parent == tmp_path
    assert sorted(p.name for p in folder.iterdir()) == [".trash", "cat", "dog", "emu"]
    second = idt.load_image_folder(folder, 8, progress=False)
    assert second.class_names == first.class_names and torch.equal(second.images, first.images)
    from torchvision import datasets  # what a user's other code would do with the same folder
    assert datasets.ImageFolder(str(folder), allow_empty=True).classes == [".trash", "cat", "dog", "emu"]


def test_any_size_and_mode_gives_rgb_squares(tmp_path):
    folder = tmp_path / "mixed"
    save(folder / "a_rgb_wide.png", rgb(20, 50))
    rgba = np.zeros((90, 7, 4), np.uint8)  # fully transparent: composited on white
    save(folder / "b_rgba_tall.png", rgba, "RGBA")
    grey = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    save(folder / "c_grey.png", grey, "L")
    pal = Image.fromarray(rgb(30, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "d_palette.png", transparency=0)
    save(folder / "e_16bit.png", np.full((33, 33), 32896, np.uint16))  # mid-grey in 16 bits (I;16)
    Image.fromarray(rgb(40, 30)).convert("CMYK").save(folder / "f_cmyk.JPG")  # upper-case extension
    save(folder / "g.webp", rgb(25, 25))
    save(folder / "h.bmp", rgb(25, 26))
    save(folder / "i_la.png", np.dstack([grey[:10, :10], np.full((10, 10), 255, np.uint8)]), "LA")
    assert Image.open(folder / "e_16bit.png").mode.startswith("I")  # really a 16-bit file

    s = idt.load_image_folder(folder, 12, progress=False)
    assert s.images.shape == (9, 3, 12, 12) and s.images.dtype == torch.uint8
    by_name = dict(zip(sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")), s.images))
    for name in ("c_grey.png", "e_16bit.png", "i_la.png"):  # greyscale: three equal channels
        img = by_name[name]
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]), name
    assert (by_name["b_rgba_tall.png"] == 255).all()  # transparent -> white
    assert (by_name["e_16bit.png"].int() - 128).abs().max() <= 1  # scaled from 16 bits, not clipped to 255


def test_centre_crop_keeps_the_middle(tmp_path):
    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, :30], wide[:, 30:60], wide[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    save(tmp_path / "w" / "wide.png", wide)
    save(tmp_path / "t" / "tall.png", wide.transpose(1, 0, 2).copy())
    for sub in ("w", "t"):
        for size in (8, 64):  # down and up
            img = idt.load_image_folder(tmp_path / sub, size, progress=False).images[0]
            assert (img[1] == 255).all() and (img[0] == 0).all() and (img[2] == 0).all(), (sub, size)


def test_same_size_images_are_unchanged(tmp_path):
    pixels = rgb(16, 16)
    save(tmp_path / "f" / "x.png", pixels)
    img = idt.load_image_folder(tmp_path / "f", 16, progress=False).images[0]
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(pixels))


def test_truncated_jpeg_is_named_with_the_count_of_fine_ones(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    for i in range(3):
        save(folder / f"ok{i}.jpg", rgb(32, 32, i))
    data = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(data, "JPEG")
    (folder / "broken.jpg").write_bytes(data.getvalue()[:-100])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone's global setting
    with pytest.raises(DataError) as err:
        idt.load_image_folder(folder, 16, progress=False)
    msg = str(err.value)
    assert "broken.jpg" in msg and "other 3 were fine" in msg and "re-save" in msg
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    assert not idt.beside_cache_path(folder, 8).exists()  # nothing written before the error


def test_not_an_image_despite_extension(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "fake.png").write_text("hello")
    save(tmp_path / "f" / "real.png", rgb(8, 8))
    with pytest.raises(DataError, match=r"fake\.png.*other 1 were fine"):
        idt.load_image_folder(tmp_path / "f", 8, progress=False)


def test_empty_missing_and_file_instead_of_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        idt.load_image_folder(tmp_path / "empty", 8)
    with pytest.raises(DataError, match="does not exist"):
        idt.load_image_folder(tmp_path / "nowhere", 8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        idt.load_image_folder(tmp_path / "file.png", 8)


def test_folder_without_known_images_lists_extensions_and_names(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.gif"):
        (folder / name).write_text("x")
    with pytest.raises(DataError) as err:
        idt.load_image_folder(folder, 8)
    msg = str(err.value)
    assert all(ext in msg for ext in idt.IMAGE_EXTENSIONS) and "a.txt" in msg and "c.gif" in msg


def test_folder_of_splits_gets_a_hint(tmp_path):
    save(tmp_path / "data" / "train" / "cat" / "0.png", rgb(8, 8))
    with pytest.raises(DataError, match="train/ and test/"):
        idt.load_image_folder(tmp_path / "data", 8)


def eps_bytes() -> bytes:
    """A small valid EPS file (Pillow writes it without Ghostscript; reading it would start gs)."""
    out = io.BytesIO()
    Image.fromarray(rgb(8, 8)).save(out, "EPS")
    assert out.getvalue().startswith(b"%!PS")
    return out.getvalue()


@pytest.fixture
def programs_started(monkeypatch):
    """Records every external program started through subprocess (and Ghostscript's own entry), with
    Ghostscript claimed to be installed, so that a reader that would start one does, here."""
    from PIL import EpsImagePlugin

    started = []

    def record(name):
        def start(*args, **kwargs):
            started.append((name, args))
            raise OSError("no external program may start in this test")
        return start

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, record(name))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", record("Ghostscript"))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    return started


def test_postscript_named_png_is_refused_without_starting_ghostscript(tmp_path, programs_started):
    folder = tmp_path / "f"
    save(folder / "ok.png", rgb(8, 8))
    (folder / "x.png").write_bytes(eps_bytes())
    with pytest.raises(DataError) as err:
        idt.load_image_folder(folder, 8, progress=False)
    assert programs_started == []
    msg = str(err.value)
    assert "x.png (a PostScript (EPS/PS) file)" in msg and "other 1 were fine" in msg
    assert "Only these formats are read" in msg and all(f in msg for f in idt.IMAGE_FORMATS)
    with pytest.raises(idt.ImageFormatRefused, match=r"x\.png is a PostScript .* Convert it to PNG or JPEG"):
        idt.decode_image(folder / "x.png", 8)  # alone, too: the message names the file and the fix
    assert programs_started == []
    assert "EPS" not in idt.IMAGE_FORMATS and "PDF" not in idt.IMAGE_FORMATS


def test_mislabelled_images_of_accepted_formats_still_load(tmp_path, programs_started):
    folder = tmp_path / "f"
    save(folder / "a_png.jpg", rgb(16, 16, 1), format="PNG")  # a PNG named .jpg
    frames = [Image.fromarray(rgb(16, 16, i)) for i in range(3)]
    frames[0].save(folder / "b_animated_gif.png", save_all=True, append_images=frames[1:])
    save(folder / "c_tiff.bmp", rgb(16, 16, 2), format="TIFF")
    frames[0].save(folder / "d_mpo.jpg", "MPO", save_all=True, append_images=frames[1:2])  # camera 3D JPEG
    assert Image.open(folder / "d_mpo.jpg").format == "MPO"
    s = idt.load_image_folder(folder, 16, progress=False)
    assert s.images.shape == (4, 3, 16, 16) and programs_started == []
    assert torch.equal(s.images[0].permute(1, 2, 0), torch.from_numpy(rgb(16, 16, 1)))  # PNG is lossless


def test_symlink_loop_is_skipped_with_a_note(tmp_path, capsys):
    folder = make_folder(tmp_path / "f", 2)
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    os.symlink("nowhere.png", folder / "dangling.png")  # skipped silently, as before
    s = idt.load_image_folder(folder, 8, progress=False)
    assert len(s) == 2
    out = capsys.readouterr().out
    assert f"skipping {folder / 'loop_a.png'}" in out and f"skipping {folder / 'loop_b.png'}" in out
    assert "link loop" in out and "dangling" not in out
    classes = tmp_path / "c"
    save(classes / "cat" / "0.png", rgb(8, 8))
    os.symlink("self.png", classes / "cat" / "self.png")  # one level down too
    assert len(idt.load_image_folder(classes, 8, progress=False)) == 1
    assert f"skipping {classes / 'cat' / 'self.png'}" in capsys.readouterr().out


def check_unreadable_folder_message(folder: Path, blocked: Path) -> None:
    with pytest.raises(DataError) as err:
        idt.load_image_folder(folder, 8, progress=False)
    msg = str(err.value)
    assert f"cannot list the folder {blocked}" in msg and "chmod -R u+rX" in msg and "`dataset`" in msg


NOBODY = 65534  # root reads a chmod 000 folder all the same: as root, the check runs as this user


def run_as_nobody(check) -> str:
    """`check()` in a forked child that has become user nobody; '' if it passed, else its error. (A
    fork, not a new interpreter: this Python may live where nobody cannot read, e.g. under /root.)"""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery past this point, only os._exit
        os.close(read_end)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            check()
            status, report = 0, b""
        except BaseException as exc:  # noqa: BLE001 -- anything is reported to the parent
            status, report = 1, f"{type(exc).__name__}: {exc}".encode()
        os.write(write_end, report)
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return "" if os.waitstatus_to_exitcode(status) == 0 else report or f"exit status {status}"


def test_unreadable_class_folder_names_it(tmp_path):
    root = os.geteuid() == 0
    # As root the folder goes where nobody may reach it (tmp_path's parents are root's, mode 700).
    base = Path(tempfile.mkdtemp(prefix="unreadable-")) if root else tmp_path
    folder = base / "pets"
    for cls in ("cat", "dog"):
        save(folder / cls / "0.png", rgb(8, 8))
    (folder / "dog").chmod(0o000)
    try:
        if root:
            base.chmod(0o755)
            assert run_as_nobody(lambda: check_unreadable_folder_message(folder, folder / "dog")) == ""
        else:
            check_unreadable_folder_message(folder, folder / "dog")
    finally:
        (folder / "dog").chmod(0o755)
        if root:
            shutil.rmtree(base)


@pytest.mark.parametrize("which", ["class folder", "dataset folder"])
def test_unreadable_folder_names_it_even_as_root(tmp_path, monkeypatch, which):
    folder = tmp_path / "pets"
    for cls in ("cat", "dog"):
        save(folder / cls / "0.png", rgb(8, 8))
    blocked = folder / "dog" if which == "class folder" else folder
    real = os.scandir

    def scandir(path="."):  # what os.scandir does on a chmod 000 folder for anyone but root
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    check_unreadable_folder_message(folder, blocked)
    if which == "dataset folder":  # load_dataset lists it first, to look for train/ and test/
        with pytest.raises(DataError, match="cannot list the folder"):
            idt.load_dataset(str(folder), tmp_path, 8, progress=False)


def test_images_beside_class_folders_are_refused_with_both_counts(tmp_path, counting_decoder):
    folder = tmp_path / "mixed"
    make_folder(folder, 3)
    for cls in ("cat", "dog"):
        for i in range(5):
            save(folder / cls / f"{i}.png", rgb(8, 8, i))
    with pytest.raises(DataError) as err:
        idt.load_image_folder(folder, 8, progress=False)
    msg = str(err.value)
    assert "holds 3 images directly and 10 more in 2 class subfolders (cat: 5, dog: 5)" in msg
    assert "Move the 3 top-level images into a subfolder" in msg and "`dataset` parameter at one of" in msg
    assert counting_decoder == [] and not idt.beside_cache_path(folder, 8).exists()
    # Subfolders without images do not make it ambiguous: still one flat set.
    flat = make_folder(tmp_path / "flat", 3)
    (flat / "notes").mkdir()
    (flat / "notes" / "readme.txt").write_text("x")
    assert len(idt.load_image_folder(flat, 8, progress=False)) == 3


def test_too_few_images_for_a_batch():
    idt.check_enough_images(64, 64)
    with pytest.raises(DataError) as err:
        idt.check_enough_images(10, 64, "the folder x")
    msg = str(err.value)
    assert "the folder x has 10 images" in msg and "`batch_size`" in msg and "64" in msg


def test_too_few_real_images_for_the_scores_are_refused_with_the_way_out():
    idt.check_real_sets(4, 4, from_test_split=True, final_evaluation=True)
    idt.check_real_sets(2, 0, from_test_split=False, final_evaluation=False)  # no final evaluation: FD only
    with pytest.raises(DataError, match=r"\(reference images: 3\), where each needs at least 4\. .*test/ split.*eval_samples = 0"):
        idt.check_real_sets(3, 10, from_test_split=True, final_evaluation=True)
    with pytest.raises(DataError, match=r"reference images: 3, real training images to score: 3\).*at least 12 images"):
        idt.check_real_sets(3, 3, from_test_split=False, final_evaluation=True)
    with pytest.raises(DataError, match=r"\(reference images: 1\), where each needs at least 2\..*\.$"):
        idt.check_real_sets(1, 0, from_test_split=True, final_evaluation=False)


def test_image_size_is_checked(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        idt.load_image_folder(tmp_path, 4)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def make_folder(root: Path, n: int = 3) -> Path:
    for i in range(n):
        save(root / f"{i}.png", rgb(20, 20, i))
    return root


def test_cache_is_reused_without_decoding(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "f")
    first = idt.load_image_folder(folder, 8, progress=False)
    assert idt.beside_cache_path(folder, 8).is_file()

    def fail(*_):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(idt, "decode_image", fail)
    again = idt.load_image_folder(folder, 8, progress=False)
    assert torch.equal(again.images, first.images)
    with pytest.raises(DataError, match="decoded although"):  # another size is another cache
        idt.load_image_folder(folder, 16, progress=False)


@pytest.mark.parametrize("change", ["touch", "replace", "add", "remove"])
def test_stale_cache_is_rebuilt(tmp_path, counting_decoder, change):
    folder = make_folder(tmp_path / "f")
    idt.load_image_folder(folder, 8, progress=False)
    counting_decoder.clear()
    target = folder / "1.png"
    if change == "touch":
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "replace":  # a new file with a new mtime (same size and mtime: test_restored_mtime_...)
        save(target, np.full((20, 20, 3), 7, np.uint8))
    elif change == "add":
        save(folder / "3.png", rgb(20, 20, 3))
    else:
        target.unlink()
    s = idt.load_image_folder(folder, 8, progress=False)
    assert counting_decoder, "the stale cache was used"
    assert len(s) == {"add": 4, "remove": 2}.get(change, 3)
    if change == "replace":
        assert (s.images[1] == 7).all()
    counting_decoder.clear()
    idt.load_image_folder(folder, 8, progress=False)  # and the rebuilt cache is then used
    assert not counting_decoder


def test_read_only_folder_caches_in_the_user_cache(tmp_path, private_user_cache, counting_decoder):
    # Runs as root too: the writability check honours the permission bits, which root's writes ignore.
    parent = tmp_path / "shared"
    folder = make_folder(parent / "ro")
    parent.chmod(0o555)  # the cache's first place is the folder's parent
    try:
        idt.load_image_folder(folder, 8, progress=False)
        assert not idt.beside_cache_path(folder, 8).exists()
        cached = list(private_user_cache.glob("ro-*-8px.pt"))
        assert len(cached) == 1
        counting_decoder.clear()
        idt.load_image_folder(folder, 8, progress=False)
        assert not counting_decoder
    finally:
        parent.chmod(0o755)


def test_failed_write_falls_back_too(tmp_path, private_user_cache, monkeypatch):
    """A folder that claims to be writable but refuses the write (e.g. a read-only mount)."""
    folder = make_folder(tmp_path / "f")
    real = idt.write_cache_file

    def refuse_inside(path, blob, mode):
        if path == idt.beside_cache_path(folder, 8):
            raise PermissionError(13, "Permission denied", str(path))
        real(path, blob, mode)

    monkeypatch.setattr(idt, "write_cache_file", refuse_inside)
    idt.load_image_folder(folder, 8, progress=False)
    assert len(list(private_user_cache.glob("f-*-8px.pt"))) == 1


def test_explicit_cache_dir(tmp_path):
    folder = make_folder(tmp_path / "f")
    idt.load_image_folder(folder, 8, cache_dir=tmp_path / "mine", progress=False)
    assert len(list((tmp_path / "mine").glob("f-*-8px.pt"))) == 1
    assert not idt.beside_cache_path(folder, 8).exists()


def test_corrupt_cache_is_ignored_with_a_note(tmp_path, capsys, counting_decoder):
    folder = make_folder(tmp_path / "f")
    first = idt.load_image_folder(folder, 8, progress=False)
    cache = idt.beside_cache_path(folder, 8)
    cache.write_bytes(cache.read_bytes()[:200])
    counting_decoder.clear()
    capsys.readouterr()
    s = idt.load_image_folder(folder, 8, progress=False)
    assert torch.equal(s.images, first.images) and counting_decoder
    assert "ignoring unreadable image cache" in capsys.readouterr().out
    counting_decoder.clear()
    idt.load_image_folder(folder, 8, progress=False)
    assert not counting_decoder


def test_cache_with_foreign_objects_is_refused(tmp_path, capsys):
    folder = make_folder(tmp_path / "f")
    cache = idt.beside_cache_path(folder, 8)
    torch.save({"format": idt.CACHE_FORMAT, "key": Path("x")}, cache)  # not loadable weights_only
    idt.load_image_folder(folder, 8, progress=False)
    assert "ignoring unreadable image cache" in capsys.readouterr().out


@pytest.mark.parametrize("size", [20, 64])  # a whole-file sample (< 8 KiB), and first and last 4 KiB
def test_restored_mtime_replacement_is_noticed(tmp_path, counting_decoder, size):
    folder = tmp_path / "f"
    for i in range(3):
        save(folder / f"{i}.bmp", rgb(size, size, i))  # BMP: the byte size depends on the pixel count alone
    idt.load_image_folder(folder, 8, progress=False)
    target = folder / "1.bmp"
    before = target.stat()
    save(target, np.full((size, size, 3), 7, np.uint8))  # as `cp -p`, `rsync -t` or `tar x` would leave it:
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    counting_decoder.clear()
    s = idt.load_image_folder(folder, 8, progress=False)
    assert counting_decoder, "the stale cache was used"
    assert (s.images[1] == 7).all()


def planted(cache: Path, change: str) -> None:
    """Rewrite our own cache with the right key but tensors that do not fit the listing."""
    blob = torch.load(cache, weights_only=True)
    if change == "shape":  # 64 px images for the 32 px cache, and 7 of them for 3 files
        blob["images"] = torch.zeros(7, 3, 64, 64, dtype=torch.uint8)
    elif change == "dtype":
        blob["images"] = blob["images"].float()
    else:
        blob["labels"] = torch.tensor([2, 1, 0, 0])
    idt.write_cache_file(cache, blob, 0o600)


@pytest.mark.parametrize("change", ["shape", "dtype", "labels"])
def test_cache_with_the_right_key_but_misfit_tensors_is_ignored(tmp_path, capsys, counting_decoder, change):
    folder = tmp_path / "pets"
    for cls, n in (("cat", 2), ("dog", 1)):
        for i in range(n):
            save(folder / cls / f"{i}.png", rgb(20, 20, i))
    first = idt.load_image_folder(folder, 32, progress=False)
    planted(idt.beside_cache_path(folder, 32), change)
    counting_decoder.clear()
    capsys.readouterr()
    s = idt.load_image_folder(folder, 32, progress=False)
    assert counting_decoder and torch.equal(s.images, first.images) and s.labels.tolist() == [0, 0, 1]
    out = capsys.readouterr().out
    assert f"ignoring image cache {idt.beside_cache_path(folder, 32)}" in out and "rebuilding it" in out
    assert {"shape": "(7, 3, 64, 64)", "dtype": "torch.float32", "labels": "labels are not"}[change] in out


def test_cache_of_another_user_is_ignored_and_left_alone(tmp_path, capsys, counting_decoder, monkeypatch,
                                                         private_user_cache):
    folder = make_folder(tmp_path / "f")
    first = idt.load_image_folder(folder, 8, progress=False)
    beside = idt.beside_cache_path(folder, 8)
    theirs = beside.read_bytes()
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 4242)  # tests cannot chown: we become someone else
    counting_decoder.clear()
    capsys.readouterr()
    s = idt.load_image_folder(folder, 8, progress=False)
    assert counting_decoder and torch.equal(s.images, first.images)
    assert f"ignoring image cache {beside}: it belongs to another user (uid {me})" in capsys.readouterr().out
    assert beside.read_bytes() == theirs  # not replaced: ours went to the next place
    assert len(list(private_user_cache.glob("f-*-8px.pt"))) == 1


def test_cache_that_others_may_write_is_ignored(tmp_path, capsys, counting_decoder):
    folder = make_folder(tmp_path / "f")
    idt.load_image_folder(folder, 8, progress=False)
    cache = idt.beside_cache_path(folder, 8)
    cache.chmod(0o666)
    counting_decoder.clear()
    capsys.readouterr()
    idt.load_image_folder(folder, 8, progress=False)
    assert counting_decoder and "others may write to it" in capsys.readouterr().out
    assert cache.stat().st_mode & 0o777 == 0o644  # rebuilt with the folder's read bits


@pytest.mark.parametrize("folder_mode, cache_mode", [(0o700, 0o600), (0o750, 0o640), (0o755, 0o644),
                                                     (0o777, 0o644)])
def test_cache_is_no_more_readable_than_its_folder(tmp_path, private_user_cache, folder_mode, cache_mode):
    folder = make_folder(tmp_path / "f")
    folder.chmod(folder_mode)
    old = os.umask(0)  # the mode is the folder's, whatever the umask
    try:
        idt.load_image_folder(folder, 8, progress=False)
        idt.load_image_folder(folder, 8, cache_dir=tmp_path / "mine", progress=False)
    finally:
        os.umask(old)
        folder.chmod(0o755)
    assert idt.beside_cache_path(folder, 8).stat().st_mode & 0o777 == cache_mode
    assert [p.stat().st_mode & 0o777 for p in (tmp_path / "mine").glob("f-*-8px.pt")] == [cache_mode]


def test_old_cache_format_counts_as_stale(tmp_path, counting_decoder):
    folder = make_folder(tmp_path / "f")
    idt.load_image_folder(folder, 8, progress=False)
    cache = idt.beside_cache_path(folder, 8)
    blob = torch.load(cache, weights_only=True)
    blob["format"] = "image-folder-cache/1"
    idt.write_cache_file(cache, blob, 0o644)
    counting_decoder.clear()
    idt.load_image_folder(folder, 8, progress=False)
    assert counting_decoder and torch.load(cache, weights_only=True)["format"] == idt.CACHE_FORMAT


# --------------------------------------------------------------------------------------------
# CIFAR-10 python format, MNIST, load_dataset
# --------------------------------------------------------------------------------------------

class Python2StylePickler(pickle._Pickler):
    """Pickles the way the official CIFAR-10 files were written (Python 2, numpy 1, protocol 2): byte
    strings as BINSTRING, which load as str under encoding="latin1", and numpy's array
    reconstruction named numpy.core.multiarray. Python 3's protocol 2 would write bytes as calls of
    _codecs.encode instead, which the official files never hold."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes):
        n = len(obj)
        opcode = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")
        self.write(opcode + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def python2_style_pickle(obj) -> bytes:
    out = io.BytesIO()
    Python2StylePickler(out, protocol=2).dump(obj)
    return out.getvalue()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust_fake_cifar(monkeypatch, folder: Path) -> None:
    """The md5 check's seam: the fake batch files of `folder` count as the published ones."""
    monkeypatch.setattr(idt, "CIFAR10_MD5", {p.name: md5_of(p) for p in folder.iterdir()})


def write_tiny_cifar(data_dir: Path, monkeypatch=None, n: int = 4, style: str = "python3") -> dict:
    """CIFAR-10's python format as torchvision reads it, with n images per batch file, pickled by
    Python 3 (bytes keys, b"data") or like the official files (style "python2": they load with str
    keys); both work. With `monkeypatch`, the files' md5s replace the published ones (they are fakes)."""
    folder = data_dir / idt.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    dump = (lambda obj, f: f.write(python2_style_pickle(obj))) if style == "python2" else pickle.dump
    rng = np.random.default_rng(0)
    batches = {}
    for name in (*idt.CIFAR10_TRAIN_FILES, *idt.CIFAR10_TEST_FILES):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                  b"filenames": [f"{i}.png".encode() for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        names = [c.encode() for c in CIFAR10_CLASSES]  # str from the official file, bytes from Python 3
        dump({b"num_cases_per_batch": n, b"label_names": names, b"num_vis": 3072}, f)
    if monkeypatch is not None:
        trust_fake_cifar(monkeypatch, folder)
    return batches


@pytest.mark.parametrize("style", ["python3", "python2"])
def test_cifar10_python_format(tmp_path, monkeypatch, style):
    batches = write_tiny_cifar(tmp_path, monkeypatch, n=4, style=style)
    train, test = idt.load_cifar10(tmp_path, download=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.class_names == CIFAR10_CLASSES == test.class_names
    assert train.labels.tolist() == sum((batches[n][1] for n in idt.CIFAR10_TRAIN_FILES), [])
    data = batches["data_batch_2"][0]
    image = train.images[4]  # the first of data_batch_2
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major.
    assert image[0, 0, 1] == data[0, 1] and image[1, 0, 0] == data[0, 1024] and image[2, 31, 31] == data[0, 3071]


def test_cifar10_missing_and_download_failing(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(idt.urllib.request, "urlopen", offline)
    started = time.perf_counter()
    with pytest.raises(DataError) as err:
        idt.load_cifar10(tmp_path / "data", download=True)
    assert time.perf_counter() - started < 5
    msg = str(err.value)
    assert "downloading it failed" in msg and "no network here" in msg and "GAN_DATA_DIR" in msg
    assert str((tmp_path / "data").resolve()) in msg and "folder of images" in msg
    assert [p.name for p in (tmp_path / "data").iterdir()] == []  # no half download left behind
    with pytest.raises(DataError, match="downloading is off"):
        idt.load_cifar10(tmp_path / "other", download=False)


def test_cifar10_corrupt_batch(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path, monkeypatch)
    (tmp_path / idt.CIFAR10_FOLDER / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3 is not the official CIFAR-10 file"):
        idt.load_cifar10(tmp_path, download=False)
    trust_fake_cifar(monkeypatch, tmp_path / idt.CIFAR10_FOLDER)  # past the md5 check: the unpickling fails
    with pytest.raises(DataError, match="data_batch_3 cannot be read as a CIFAR-10 pickle.*truncated or corrupt"):
        idt.load_cifar10(tmp_path, download=False)


class RunsACommand:
    """A pickle that runs a shell command when loaded (what a planted batch file would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("md5_trusted", [False, True])  # refused by the md5, and by the unpickler behind it
def test_planted_cifar_pickle_is_never_run(tmp_path, monkeypatch, md5_trusted):
    write_tiny_cifar(tmp_path, monkeypatch)
    marker = tmp_path / "the-pickle-ran"
    batch = tmp_path / idt.CIFAR10_FOLDER / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({b"data": RunsACommand(f"touch {marker}"), b"labels": []}, f)
    if md5_trusted:
        trust_fake_cifar(monkeypatch, batch.parent)
    with pytest.raises(DataError) as err:
        idt.load_cifar10(tmp_path, download=False)
    assert not marker.exists()
    msg = str(err.value)
    assert f"{batch} is not the official CIFAR-10 file" in msg and f"Delete {batch.parent}/" in msg
    assert ("posix.system" in msg or "nt.system" in msg) if md5_trusted else "md5" in msg


def test_cifar_file_with_the_wrong_md5_is_refused_with_the_fix(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path)  # fakes: their md5s are not the published ones
    unpickled = []
    monkeypatch.setattr(idt._CifarUnpickler, "load", lambda self: unpickled.append(1))
    with pytest.raises(DataError) as err:
        idt.load_cifar10(tmp_path, download=False)
    folder = tmp_path / idt.CIFAR10_FOLDER
    msg = str(err.value)
    assert f"{folder / 'batches.meta'} is not the official CIFAR-10 file (md5 {md5_of(folder / 'batches.meta')}" in msg
    assert f"expected {idt.CIFAR10_MD5['batches.meta']}" in msg and f"Delete {folder}/" in msg
    assert "`data_dir`" in msg and unpickled == []  # refused before unpickling


def test_published_cifar_md5s_are_torchvisions():
    from torchvision.datasets import CIFAR10
    published = dict(CIFAR10.train_list + CIFAR10.test_list) | {CIFAR10.meta["filename"]: CIFAR10.meta["md5"]}
    assert idt.CIFAR10_MD5 == published and idt.CIFAR10_TGZ_MD5 == CIFAR10.tgz_md5


@pytest.mark.parametrize("pickled", ["python2", "protocol 4", "protocol 5"])
def test_restricted_unpickler_loads_plain_numpy_batches(pickled):
    batch = {b"data": rgb(2, 3072 // 3).reshape(2, 3072), b"labels": [3, 1], b"batch_label": b"x"}
    raw = (python2_style_pickle(batch) if pickled == "python2"
           else pickle.dumps(batch, protocol=int(pickled[-1])))
    if pickled == "protocol 5":  # numpy's out-of-band buffers name numpy._core.numeric._frombuffer
        with pytest.raises(idt._NotOfficial, match="_frombuffer"):
            idt._CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
        return
    loaded = idt._CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    key = (lambda k: k.decode()) if pickled == "python2" else (lambda k: k)  # Python 2 strs load as str
    assert np.array_equal(loaded[key(b"data")], batch[b"data"]) and loaded[key(b"data")].dtype == np.uint8
    assert loaded[key(b"labels")] == [3, 1]


class CutMidBody(io.BytesIO):
    """An HTTP body that ends early: http.client raises IncompleteRead, which is no OSError."""

    def read(self, n=-1):
        if self.tell() >= 2000:
            raise http.client.IncompleteRead(b"", 5000)
        return super().read(min(n if n and n > 0 else 1000, 1000))


def test_cifar_download_cut_mid_body_gives_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(idt.urllib.request, "urlopen", lambda url, timeout=None: CutMidBody(b"x" * 9000))
    with pytest.raises(DataError) as err:
        idt.load_cifar10(tmp_path / "data", download=True)
    assert "downloading it failed (IncompleteRead" in str(err.value)
    assert [p.name for p in (tmp_path / "data").iterdir()] == []  # no half download left behind


def test_mnist32(data_dir):
    train, test = idt.load_mnist32(data_dir, download=False)
    assert train.images.shape == (50000, 1, 32, 32) and test.images.shape == (10000, 1, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.shape == (50000,)
    assert (train.images[:, :, :2] == 0).all() and (train.images[:, :, :, -2:] == 0).all()
    assert train.class_names == [str(d) for d in range(10)]


def test_to_model_range_and_resize():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat(2, 3, 4, 2)  # (2, 3, 8, 4)... any shape
    y = gu.to_model_range(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    imgs = torch.full((3, 3, 32, 32), 200, dtype=torch.uint8)
    assert idt.resize_images(imgs, 32) is imgs
    big = idt.resize_images(imgs, 64)
    assert big.shape == (3, 3, 64, 64) and big.dtype == torch.uint8 and (big == 200).all()


def test_load_dataset_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        idt.load_dataset("imagenet", tmp_path, 32)
    assert "'cifar10', 'mnist'" in str(err.value) and "imagenet" in str(err.value)

    make_folder(tmp_path / "flat")
    train, test = idt.load_dataset("flat", tmp_path, 16, progress=False)  # relative to the cwd
    assert len(train) == 3 and test is None and train.images.shape[-1] == 16

    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                save(tmp_path / "split" / split / cls / f"{i}.png", rgb(10, 10, i))
    train, test = idt.load_dataset(str(tmp_path / "split"), tmp_path, 8, progress=False)
    assert (len(train), len(test)) == (6, 4) and train.class_names == test.class_names == ["a", "b"]

    # test/ with other classes: its images are still the reference, without labels
    save(tmp_path / "split" / "test" / "c" / "0.png", rgb(10, 10))
    train, test = idt.load_dataset(str(tmp_path / "split"), tmp_path, 8, progress=False)
    assert (len(train), len(test)) == (6, 5) and train.class_names == ["a", "b"]
    assert test.labels is None and test.class_names is None


@pytest.mark.parametrize("train_name, test_name", [("train", "val"), ("Train", "Test"), ("train", "validation"),
                                                   ("TRAIN", None)])
def test_split_folders_are_not_mistaken_for_classes(tmp_path, train_name, test_name, capsys):
    for split, n in ((train_name, 3), (test_name, 2)):
        for cls in ("a", "b"):
            for i in range(n if split else 0):
                save(tmp_path / "d" / split / cls / f"{i}.png", rgb(10, 10, i))
    train, test = idt.load_dataset(str(tmp_path / "d"), tmp_path, 8, progress=False)
    assert len(train) == 6 and train.class_names == ["a", "b"]  # not two classes "train" and "val"
    if test_name:
        assert len(test) == 4 and test.class_names == ["a", "b"]
    else:  # train/ alone: no test split, and the run says where the reference comes from
        assert test is None and "no test/ (or val/)" in capsys.readouterr().out


def test_a_class_named_train_beside_other_classes_stays_a_class(tmp_path):
    for cls in ("apple", "train", "tulip"):  # CIFAR-100 has a class "train"
        save(tmp_path / "c100" / cls / "0.png", rgb(10, 10))
    train, test = idt.load_dataset(str(tmp_path / "c100"), tmp_path, 8, progress=False)
    assert test is None and train.class_names == ["apple", "train", "tulip"] and len(train) == 3


def test_load_dataset_cifar10(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path, monkeypatch)
    train, test = idt.load_dataset("cifar10", tmp_path, 64, download=False)
    assert train.images.shape == (20, 3, 64, 64) and test.images.shape == (4, 3, 64, 64)
    # CIFAR-10 kept as image folders <data_dir>/cifar10/{train,test} (as on the shared data).
    jpeg_root = tmp_path / "jpeg"
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES[:2]:
            save(jpeg_root / "cifar10" / split / cls / "0000.jpg", rgb(32, 32))
    train, test = idt.load_dataset("cifar10", jpeg_root, 32, progress=False, download=False)
    assert train.class_names == CIFAR10_CLASSES[:2] and len(test) == 2


# --------------------------------------------------------------------------------------------
# The shared data
# --------------------------------------------------------------------------------------------

def test_shared_cifar10_folders(tmp_path):
    root = shared_data_root()
    if root is None or not (root / "cifar10" / "test").is_dir():
        pytest.skip("needs GAN_DATA_DIR pointing at a directory with cifar10/train and cifar10/test "
                    f"image folders (GAN_DATA_DIR={os.environ.get('GAN_DATA_DIR')!r})")
    assert sorted(p.name for p in (root / "cifar10" / "train").iterdir() if p.is_dir()) == CIFAR10_CLASSES
    picked = []
    for cls in ("cat", "ship"):  # 100 files each, copied: the shared copy is only ever read
        names = sorted(os.listdir(root / "cifar10" / "test" / cls))
        for name in random.Random(0).sample(names, 100):
            (tmp_path / "sample" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "cifar10" / "test" / cls / name, tmp_path / "sample" / cls / name)
            picked.append((cls, name))
    s = idt.load_image_folder(tmp_path / "sample", 32, progress=False)
    assert s.images.shape == (200, 3, 32, 32) and s.class_names == ["cat", "ship"]
    assert s.labels.bincount().tolist() == [100, 100]
    cls, name = sorted(picked)[0]  # 32x32 files come out exactly as PIL decodes them
    direct = np.array(Image.open(root / "cifar10" / "test" / cls / name).convert("RGB"))
    assert torch.equal(s.images[0].permute(1, 2, 0), torch.from_numpy(direct))
