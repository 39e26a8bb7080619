"""Colour image data for the DCGAN notebook: a dataset as one uint8 tensor, decoded once.

Three sources, one result (`ImageSet`: uint8 images (N, C, S, S) on the CPU, labels, class names):

* `load_image_folder(folder, image_size)`: any folder of PNG/JPEG/WebP/BMP files, flat or with one
  level of class subfolders (e.g. anime faces, or CIFAR-10 exported as JPEGs). Every image is
  converted to RGB, centre-cropped to a square and resized with an antialiased filter. Decoding
  tens of thousands of files takes a while, so the result is cached (see "Cache" below).
* `load_cifar10(data_dir)`: CIFAR-10 in torchvision's python format (`cifar-10-batches-py/`),
  downloaded when missing.
* `load_mnist32(data_dir)`: MNIST (via mnist_data) zero-padded to 32x32, one channel.

`load_dataset(dataset, data_dir, image_size)` picks one of them from a notebook parameter.

The images stay uint8 (a quarter of float32's memory, 150 MB for CIFAR-10's 50,000 training
images at 32 px); the training loop slices a minibatch (`gan_utils.minibatches`) and converts only
that batch to the model range [-1, 1] (`gan_utils.to_model_range`).

Cache
-----
A folder's decoded tensor is stored next to it, as the hidden file `.<foldername>.gan-cache-<S>px.pt`
in the folder's parent: beside the data, so that it is found wherever the data is, but never inside
the folder, where torchvision's `ImageFolder` (and other tools that list a folder) would take a cache
directory for a class. When the parent is not writable (shared, read-only data: no write permission
bits, a read-only file system, or a failed write) the cache goes to the user cache directory,
`$XDG_CACHE_HOME/gan-notebooks/` (default `~/.cache/gan-notebooks/`), as
`<foldername>-<hash of the folder's absolute path>-<S>px.pt`. An explicit `cache_dir` replaces
both places. The cache is keyed by a hash of the relative path, byte size, mtime_ns and a content
sample of every image file (the whole file up to 8 KiB, else its first and last 4 KiB), the image
size and this module's preprocessing version (CACHE_FORMAT): adding, removing, resizing, touching or
rewriting any image makes it stale, even when a copy (`cp -p`, `rsync -t`, `tar x`) restored the
old size and mtime, and a stale cache is rebuilt, never used. A change to the middle of a file over
8 KiB that keeps its size and mtime is not seen: delete the cache after such an edit.
A cache is trusted only when it is owned by the current user and writable by no one else (on
POSIX; another user could otherwise plant one with the right key) and its tensors fit the listing:
uint8 images (N, 3, S, S) for the N files and the size asked for, the same file names, labels and
class names. Any other cache is ignored with a one-line note and rebuilt; another user's cache is
never replaced (the rebuilt one goes to the next place, usually the user cache directory). Caches
are written atomically (temporary file, then os.replace) with the folder's read permissions and
write permission for the owner alone (a 700 folder gives a 600 cache, a 755 one a 644 cache), and
read with `torch.load(weights_only=True)` (they hold only tensors, strings and ints).
Delete the `.<foldername>.gan-cache-*` files (or the user cache directory) to reclaim the space.

Formats
-------
An image is opened only as one of IMAGE_FORMATS (JPEG, PNG, WebP, BMP, GIF, TIFF, PPM: Pillow's
readers for these run no external program), whatever its name says: a PostScript file named
`x.png` would otherwise make Pillow start Ghostscript on it. A file in another format is refused
with a DataError naming it (it was listed as an image, so skipping it would silently shrink the
dataset).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import shlex
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gan import mnist_data
from gan.errors import DataError, ParameterError
from gan.settings import FD_MIN_SAMPLES, KNN_MIN_SAMPLES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The formats Pillow may read a listed file as, whatever its extension: raster formats whose readers
# never start an external program (EPS/PS would run Ghostscript). "JPEG" covers MPO (camera
# multi-picture JPEGs): Pillow's JPEG reader returns those itself, and "MPO" is no format to open by.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
DATASETS = ("cifar10", "mnist")
CACHE_SUFFIX = ".gan-cache"
USER_CACHE_SUBDIR = "gan-notebooks"
# Bump when decoding/cropping/resizing changes: old caches then count as stale.
CACHE_FORMAT = "image-folder-cache/2"
# Bytes of each image file hashed into the cache key: files up to twice this are hashed whole (all of
# CIFAR-10's 1-2 KiB JPEGs), larger ones by their first and last CONTENT_SAMPLE bytes.
CONTENT_SAMPLE = 4096

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"  # as in torchvision.datasets.CIFAR10
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
# The published md5 of each file of the archive (as in torchvision.datasets.CIFAR10), checked before
# a file is unpickled. Tests that build small fake batches replace this dict.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


@dataclass
class ImageSet:
    """One split of a dataset, decoded.

    images: uint8 (N, C, S, S) on the CPU, C = 3 (RGB) except for MNIST (C = 1).
    labels: int64 (N,) indexing `class_names`, or None (a flat folder has no classes).
    class_names: list of str, or None.
    source: where the images came from (a path, in words).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.images)


def shuffled(s: ImageSet, seed: int = 0) -> ImageSet:
    """The same images in a fixed random order (a seeded permutation), labels along."""
    order = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))
    return ImageSet(s.images[order], None if s.labels is None else s.labels[order], s.class_names, s.source)


def subset(s: ImageSet, n: int) -> ImageSet:
    """The first `n` images (all of them when there are fewer)."""
    return ImageSet(s.images[:n], None if s.labels is None else s.labels[:n], s.class_names, s.source)


def check_enough_images(n: int, batch_size: int, what: str = "the training set") -> None:
    """Raise DataError when `n` images do not fill one batch of `batch_size` (an epoch would be empty)."""
    if n < batch_size:
        raise DataError(
            f"{what} has {n:,} image{'s' if n != 1 else ''}, fewer than one batch: the `batch_size` "
            f"parameter is {batch_size:,}, so an epoch would have no complete batch. Lower "
            f"`batch_size` to at most {n:,}, or add images."
        )


def check_real_sets(n_reference: int, n_real: int, from_test_split: bool, final_evaluation: bool) -> None:
    """Raise DataError when the real images the scores compare with are too few, before training
    rather than at its end: the reference's covariance (the Frechet distance, every epoch) needs
    FD_MIN_SAMPLES images, and the final evaluation's precision and recall (k-nearest neighbours)
    need KNN_MIN_SAMPLES in the reference and as many real training images scored as samples."""
    need = max(FD_MIN_SAMPLES, KNN_MIN_SAMPLES if final_evaluation else 0)
    short = [f"{name}: {n:,}" for name, n, used in (("reference images", n_reference, True),
                                                    ("real training images to score", n_real, final_evaluation))
             if used and n < need]
    if not short:
        return
    where = ("the folder's test/ split holds the reference images: add images to it (or remove test/, "
             "and the last third of the training images are the reference)" if from_test_split else
             f"without a test/ split the last third of the training images are the reference: use a "
             f"folder of at least {3 * need} images")
    raise DataError(f"too few real images for the scores ({', '.join(short)}), where each needs at least "
                    f"{need}. {where[0].upper() + where[1:]}"
                    + ("; or set eval_samples = 0 to skip the final evaluation." if final_evaluation else "."))


# --------------------------------------------------------------------------------------------
# Folders of images
# --------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _unlistable(path, exc: OSError) -> DataError:
    return DataError(f"cannot list the folder {path} ({exc.strerror or exc}). Make it readable "
                     f"(chmod -R u+rX {shlex.quote(str(path))}, or ask its owner), move it out of the "
                     "dataset folder, or point the `dataset` parameter at another folder.")


def _listing(folder, note_loops: bool = True) -> list[tuple[os.DirEntry, str]]:
    """The non-hidden entries of `folder` sorted by name, as (entry, "file" or "dir"). Anything else
    (FIFOs, devices, sockets, dangling links) is left out silently, a symbolic link loop with a
    one-line note naming it (unless `note_loops` is False). DataError naming the folder when it
    cannot be listed."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:  # PermissionError from a chmod 000 folder, or an I/O error
        raise _unlistable(folder, exc) from None
    out = []
    for e in entries:
        try:
            kind = "file" if e.is_file() else "dir" if e.is_dir() else None
        except OSError as exc:  # a link loop raises ELOOP here, where a dangling link gives False
            if note_loops:
                print(f"note: skipping {e.path}: {exc.strerror or exc} (a symbolic link loop?)")
            continue
        if kind is not None:
            out.append((e, kind))
    return out


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist. Check the path (the `dataset` "
                        "parameter), or use 'cifar10' or 'mnist'.")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder of images. Give the folder that holds the "
                        "images (or their class subfolders).")


def _scan(folder: Path) -> tuple[list[tuple[str, int, int]], list[int] | None, list[str] | None]:
    """The images of `folder`: ([(relative path, size, mtime_ns)], labels, class_names), sorted.

    Images directly in the folder make it flat (subfolders without images are then ignored); otherwise
    each non-hidden subfolder holding images is a class. Raises DataError when there are none, and
    when there are both (which of the two is meant cannot be guessed, and either guess would quietly
    train on the wrong images).
    """
    _check_folder(folder)
    entries = _listing(folder)
    top_files = [e for e, kind in entries if kind == "file"]
    subdirs = [e for e, kind in entries if kind == "dir"]
    images = [e for e in top_files if _is_image(e.name)]
    files, labels, class_names, others, empty = [], [], [], [], []
    for d in subdirs:
        inside = _listing(d.path)
        found = [e for e, kind in inside if kind == "file" and _is_image(e.name)]
        others += [f"{d.name}/{e.name}" for e, kind in inside if not (kind == "file" and _is_image(e.name))]
        if not found:
            empty.append(d.name)
            continue
        for e in found:
            files.append((f"{d.name}/{e.name}", *_size_mtime(e)))
            labels.append(len(class_names))
        class_names.append(d.name)
    if images and files:
        _refuse_mixed(folder, len(images), class_names, labels)
    if images:
        return [(e.name, *_size_mtime(e)) for e in images], None, None
    if files:
        if empty:
            print(f"note: subfolders without images ignored: {', '.join(empty)}")
        return files, labels, class_names
    if not top_files and not subdirs:
        raise DataError(f"image folder {folder} is empty. Put the images (or one subfolder of images "
                        "per class) in it, or point the `dataset` parameter at another folder.")
    seen = [e.name for e in top_files] + others
    hint = ""
    if subdirs and others and not top_files:
        hint = (" Its subfolders hold only further subfolders or other files: point the `dataset` "
                "parameter at the folder whose subfolders hold the images (or at the one that holds "
                "train/ and test/).")
    raise DataError(
        f"no images of a known type in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case, "
        f"directly in it or one level down in class subfolders; found "
        f"{', '.join(seen[:5]) if seen else 'only subfolders: ' + ', '.join(d.name for d in subdirs[:5])}"
        f"{', ...' if len(seen) > 5 else ''}).{hint} Convert the images to PNG or JPEG, or point "
        "the `dataset` parameter at the folder that holds them."
    )


def _refuse_mixed(folder: Path, n_top: int, class_names: list[str], labels: list[int]) -> None:
    """DataError for a folder holding images both directly and in class subfolders, with both counts."""
    counts = np.bincount(labels, minlength=len(class_names))
    per_class = ", ".join(f"{c}: {n:,}" for c, n in zip(class_names[:5], counts[:5].tolist()))
    raise DataError(
        f"{folder} holds {n_top:,} image{'s' if n_top != 1 else ''} directly and {len(labels):,} more in "
        f"{len(class_names)} class subfolder{'s' if len(class_names) != 1 else ''} ({per_class}"
        f"{', ...' if len(class_names) > 5 else ''}): it is not clear whether it is one flat set or one "
        f"subfolder per class. Move the {n_top:,} top-level image{'s' if n_top != 1 else ''} into a "
        "subfolder (a class of their own) or out of the folder, or point the `dataset` parameter at "
        "one of the subfolders."
    )


def _size_mtime(entry: os.DirEntry) -> tuple[int, int]:
    st = entry.stat()
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def _truncated_images_refused():
    """PIL's ImageFile.LOAD_TRUNCATED_IMAGES off inside the block (whatever someone set globally),
    so a truncated file raises instead of being silently padded with grey; restored afterwards."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (dropping alpha would show whatever
    colour the fully transparent pixels happen to store, often black or junk); 16- and 32-bit
    integer greyscale is scaled from the 16-bit range (PIL's own conversion clips at 255, which
    turns almost every 16-bit image white); float greyscale is clipped to [0, 255]."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class ImageFormatRefused(DataError):
    """A listed image file is in none of IMAGE_FORMATS; `kind` says what it is, in a few words."""

    def __init__(self, path, kind: str):
        self.kind = kind
        super().__init__(f"{path} is {kind}, not one of the image formats read here "
                         f"({', '.join(IMAGE_FORMATS)}; readers of others, like PostScript's, run external "
                         "programs). Convert it to PNG or JPEG, or delete it.")


def _what_it_is(path) -> str:
    """A few words on what a file that no accepted reader recognises holds, from its first bytes
    (read here, never by Pillow's other readers)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):  # text, or DOS binary, EPS header
        return "a PostScript (EPS/PS) file"
    if head.startswith(b"%PDF"):
        return "a PDF file"
    return "not an image in a known format"


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file -> uint8 array (S, S, 3): EXIF orientation applied, converted to RGB (see
    `_to_rgb`), the largest centred square cropped, resized to S x S.

    Resizing uses PIL's LANCZOS filter, which is antialiased (its support widens with the
    downscaling factor, so fine detail is averaged instead of aliased into moire and jagged edges
    that the GAN would learn), and the sharpest of PIL's filters. reducing_gap=3.0 lets PIL first
    shrink large images by an integer factor (cheap box filter) down to 3x the target before the
    LANCZOS pass: much faster on large photos, and per PIL's documentation indistinguishable from
    fair resampling at that gap. An image already S x S is copied unchanged.
    Only IMAGE_FORMATS are tried (module docstring, "Formats"): ImageFormatRefused for a file in
    none of them; otherwise raises whatever PIL raises for unreadable or truncated files.
    """
    try:
        opened = Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ImageFormatRefused(path, _what_it_is(path)) from None
    with opened as img:
        img.load()  # decodes everything: a truncated file raises here
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # Cropped first: resize(box=...) would blend in pixels from outside the square at its edges.
        square = img.crop((left, top, left + side, top + side))
        out = square.resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        return np.array(out, dtype=np.uint8)  # writable (np.asarray of a PIL image is read-only)


def _content_sample(path: str) -> bytes:
    """The bytes of `path` hashed into the cache key: all of it up to 2 * CONTENT_SAMPLE bytes, else
    its first and last CONTENT_SAMPLE. An unreadable file gives a marker instead: the key then
    matches no cache written while it was readable, and decoding names the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(2 * CONTENT_SAMPLE + 1)
            if len(head) <= 2 * CONTENT_SAMPLE:
                return head
            f.seek(-CONTENT_SAMPLE, os.SEEK_END)
            return head[:CONTENT_SAMPLE] + f.read(CONTENT_SAMPLE)
    except OSError as exc:
        return f"<unreadable: errno {exc.errno}>".encode()


def _cache_key(folder: Path, files: list[tuple[str, int, int]], image_size: int) -> str:
    """sha256 of CACHE_FORMAT, the image size and each file's path, size, mtime and content sample
    (module docstring, "Cache"). About a second for CIFAR-10's 50,000 JPEGs once they are in the
    page cache; every file is opened, as a restored mtime hides a rewritten file."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, image_size]).encode())
    base = str(folder) + os.sep  # plain strings: a Path per file costs more than reading it
    for rel, size, mtime_ns in files:
        sample = _content_sample(base + rel)
        name = os.fsencode(rel)  # bytes, also for names that are not valid UTF-8
        # Every field framed by its length, so that no two listings feed the hash the same bytes.
        digest.update(b"%d:%s %d %d %d:" % (len(name), name, size, mtime_ns, len(sample)))
        digest.update(sample)
    return digest.hexdigest()


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/gan-notebooks, or ~/.cache/gan-notebooks."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / USER_CACHE_SUBDIR


def _is_writable_dir(path: Path) -> bool:
    """Whether the cache may be written into `path` (or, when it doesn't exist yet, created in its
    parent). Write permission bits are honoured even for root, who could otherwise write anywhere:
    a folder without any write bit (like the shared, read-only data) is left alone."""
    while not path.exists():
        path = path.parent
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & 0o222) and os.access(path, os.W_OK | os.X_OK)


def cache_paths(folder: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the cache of `folder` at `image_size` may be, in the order tried: `cache_dir` alone when
    given; else beside the folder (`<parent>/.<name>.gan-cache-<S>px.pt`), then the user cache
    directory."""
    folder = Path(folder).resolve()
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    elsewhere_name = f"{folder.name or 'root'}-{tag}-{image_size}px.pt"
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / elsewhere_name]
    elsewhere = user_cache_dir() / elsewhere_name
    if folder.parent == folder:  # the file system's root has no "beside"
        return [elsewhere]
    return [beside_cache_path(folder, image_size), elsewhere]


def beside_cache_path(folder: str | os.PathLike, image_size: int) -> Path:
    """The cache's first place: a hidden file in the folder's parent, named after the folder."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}{CACHE_SUFFIX}-{image_size}px.pt"


def _foreign_owner(st: os.stat_result) -> bool:
    """Whether a file with stat `st` belongs to another user (POSIX; Windows has no uids to compare,
    and the user cache directory there is private to its user)."""
    return hasattr(os, "getuid") and st.st_uid != os.getuid()


def distrust(path: Path) -> str | None:
    """Why the cache at `path` is not to be read, or None: another user could have planted it (their
    own file) or rewritten it (a file others may write to), with a key computed from the listing."""
    st = path.stat()
    if _foreign_owner(st):
        return f"it belongs to another user (uid {st.st_uid}), not to this one (uid {os.getuid()})"
    if hasattr(os, "getuid") and st.st_mode & 0o022:
        return f"others may write to it (mode {stat.filemode(st.st_mode)})"
    return None


def _listing_record(files: list[tuple[str, int, int]], labels: list[int] | None,
                    class_names: list[str] | None) -> dict:
    """What a cache must say about the listing, in the form it is stored in."""
    return {"files": [f[0] for f in files], "labels": list(labels or []), "class_names": list(class_names or [])}


def _misfit(blob: dict, record: dict, image_size: int) -> str | None:
    """Why a cache with the right key does not fit the listing `record` at `image_size`, or None.
    A right key alone is no proof: the tensors are checked before they are handed out."""
    images, labels = blob.get("images"), blob.get("labels")
    want = (len(record["files"]), 3, image_size, image_size)
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == want):
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        return f"it holds images {got} where the folder needs torch.uint8 {want}"
    if blob.get("files") != record["files"]:
        return "its file names are not the folder's"
    if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
            and labels.tolist() == record["labels"]):
        return "its labels are not the folder's"
    if list(blob.get("class_names") or []) != record["class_names"]:
        return "its class names are not the folder's"
    return None


def _read_cache(path: Path, key: str, record: dict, image_size: int) -> torch.Tensor | None:
    """The images of the cache at `path` when it exists, is trusted (`distrust`), matches `key` and
    fits the listing `record` (`_misfit`); None otherwise, with a one-line note unless it is simply
    missing or stale."""
    if not path.is_file():
        return None
    try:
        reason = distrust(path)
        if reason is None:
            # mmap: only the small header is read to compare keys; the images are copied out if it fits.
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
                raise ValueError("not an image cache of this project")
            if blob["key"] != key:
                return None  # stale: rebuilt by the caller
            reason = _misfit(blob, record, image_size)
            if reason is None:
                return blob["images"].clone()
    except Exception as exc:  # truncated zip, refused pickle, missing keys: rebuild it
        first_line = str(exc).splitlines()[0][:150] if str(exc) else ""
        print(f"note: ignoring unreadable image cache {path} ({type(exc).__name__}: {first_line}); rebuilding it")
        return None
    print(f"note: ignoring image cache {path}: {reason}; rebuilding it")
    return None


def _cache_mode(folder: Path) -> int:
    """The cache's permissions: readable by whoever may read the folder (the cache shows its images),
    writable by its owner alone (a cache others may write to is not trusted). 700 -> 600, 755 -> 644."""
    return (folder.stat().st_mode & 0o444) | 0o200


def write_cache_file(path: Path, blob: dict, mode: int = 0o600) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: never half a cache. The file
    gets `mode` before it takes the final name, so it is never readable by more than that."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _decode_all(folder: Path, files: list[tuple[str, int, int]], image_size: int, progress: bool) -> np.ndarray:
    """Every file decoded (decode_image) into one uint8 array (N, 3, S, S); DataError naming the
    files that cannot be read."""
    from tqdm.auto import tqdm

    # Channels first from the start: one copy of the images in memory, not a second for a transpose.
    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    failed, refused = [], False
    with _truncated_images_refused():
        for i, (rel, _, _) in enumerate(tqdm(files, desc=f"decoding {folder.name}", unit="img",
                                            disable=not progress, mininterval=0.5)):
            try:
                out[i] = decode_image(folder / rel, image_size).transpose(2, 0, 1)
            except ImageFormatRefused as exc:  # the long message is said once, below, not per file
                failed.append(f"{rel} ({exc.kind})")
                refused = True
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                failed.append(f"{rel} ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    if failed:
        fine = len(files) - len(failed)
        raise DataError(
            f"{len(failed)} of the {len(files):,} images in {folder} could not be read "
            f"(unreadable, truncated or not what its extension says): {'; '.join(failed[:5])}"
            f"{'; ...' if len(failed) > 5 else ''}. The other {fine:,} were fine. Delete "
            f"{'this file' if len(failed) == 1 else 'these files'}, or re-save {'it' if len(failed) == 1 else 'them'} with an image "
            "editor (e.g. open and save as PNG), then run again."
            + (f" Only these formats are read, whatever a file's name says: {', '.join(IMAGE_FORMATS)} (the "
               "readers of others, like PostScript's, run external programs)." if refused else "")
        )
    return out


def load_image_folder(folder: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True, use_cache: bool = True) -> ImageSet:
    """Every image of `folder` as one ImageSet: uint8 (N, 3, S, S), S = `image_size`.

    The folder is flat (images directly in it: labels None) or holds one subfolder per class
    (class = subfolder name, sorted; labels index into class_names), not both. Files ending in
    .png, .jpg, .jpeg, .webp or .bmp (any case) are images, read only as IMAGE_FORMATS (module
    docstring, "Formats"); other files, hidden files and the cache are ignored. Any size and mode:
    converted to RGB with transparency composited on white, centre-cropped to a square, resized
    with LANCZOS (see `decode_image`). Files are taken in sorted order, so the result is the same
    on every machine. Cached (module docstring); `use_cache=False` neither reads nor writes a cache.
    A tqdm bar shows the decoding unless `progress=False`.

    Raises ParameterError for an image_size below 8, and DataError (before anything is written)
    when the folder is missing, unreadable, empty, holds no image of a known type, holds images both
    directly and in subfolders, or holds images that cannot be read or are in a refused format (all
    of them named, with the count of the fine ones).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ParameterError(f"image_size must be an integer >= 8 (e.g. 32 or 64), got {image_size!r}")
    folder = Path(folder).expanduser()
    files, labels, class_names = _scan(folder)
    label_tensor = torch.tensor(labels, dtype=torch.int64) if labels is not None else None
    candidates = cache_paths(folder, image_size, cache_dir) if use_cache else []
    key = _cache_key(folder, files, image_size) if candidates else ""
    record = _listing_record(files, labels, class_names)
    for path in candidates:
        cached = _read_cache(path, key, record, image_size)
        if cached is not None:  # labels and class names from the listing, which the cache was checked against
            return ImageSet(cached, label_tensor, class_names, str(folder.resolve()))

    pixels = _decode_all(folder, files, image_size, progress)
    images = torch.from_numpy(pixels)
    if candidates:
        blob = {"format": CACHE_FORMAT, "key": key, "images": images,
                "labels": torch.tensor(record["labels"], dtype=torch.int64),
                "class_names": record["class_names"], "files": record["files"]}
        _store(blob, candidates, cache_dir is not None, _cache_mode(folder))
    return ImageSet(images, label_tensor, class_names, str(folder.resolve()))


def _store(blob: dict, candidates: list[Path], explicit: bool, mode: int) -> Path | None:
    """Write the cache to the first candidate that can take it, never over another user's file; a
    note (not an error) when none can."""
    errors = []
    for path in candidates:
        if not explicit and not _is_writable_dir(path.parent):
            errors.append(f"{path.parent}: not writable")
            continue
        try:
            if path.exists() and _foreign_owner(path.stat()):  # replacing it would destroy their file
                errors.append(f"{path}: belongs to another user")
                continue
            write_cache_file(path, blob, mode)
            return path
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    print(f"note: could not write the image cache ({'; '.join(errors)}); the images will be decoded "
          "again next time. Pass cache_dir= a writable folder to keep them.")
    return None


# --------------------------------------------------------------------------------------------
# CIFAR-10 in torchvision's python format
# --------------------------------------------------------------------------------------------

def _cifar_where(data_dir) -> str:
    return (f"Point `data_dir` (or the {mnist_data.DATA_DIR_ENV} environment variable) at a directory holding "
            f"{CIFAR10_FOLDER}/ (torchvision's CIFAR-10 python format, from {CIFAR10_URL}), or at one "
            "holding cifar10/train/ and cifar10/test/ image folders, or set `dataset` to a folder of "
            "images instead of 'cifar10'.")


def _numpy_reconstruct():
    """numpy's array-rebuilding function, whatever module this numpy keeps it in (numpy.core before
    2.0, numpy._core since): taken from an array's own pickle recipe."""
    return np.empty(0).__reduce__()[0]


# The only globals the official CIFAR-10 pickles (Python 2, protocol 2) and Python 3's default
# protocol name: numpy's array reconstruction and the two types it rebuilds. Anything else is refused
# before it is imported, so a planted pickle cannot reach os.system or any other callable.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _NotOfficial(Exception):
    """Raised inside unpickling for a global the official files do not use; turned into a DataError."""


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only dicts, lists, strings, numbers and numpy arrays."""

    def find_class(self, module: str, name: str):
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise _NotOfficial(f"it asks for {module}.{name}, which the official CIFAR-10 files never do")
        return allowed()


def _check_md5(path: Path) -> None:
    """DataError unless `path` has the published md5 of its name (CIFAR10_MD5): checked before the file
    is unpickled, as unpickling runs whatever a pickle asks for (the restricted unpickler is the
    second line of defence)."""
    expected = CIFAR10_MD5.get(path.name)
    try:
        actual = mnist_data.md5_of_file(path)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}): make it readable, or delete "
                        f"{path.parent} so CIFAR-10 is downloaded again.") from None
    if actual != expected:
        raise DataError(f"{path} is not the official CIFAR-10 file (md5 {actual}, expected {expected}): it is "
                        f"corrupt or was replaced, and is not unpickled. Delete {path.parent}/ so that it is "
                        "downloaded again, or point `data_dir` at another copy of CIFAR-10.")


def _unpickle(path: Path) -> dict:
    """One CIFAR pickle, md5-checked first (`_check_md5`), then read like torchvision does (encoding
    "latin1": they were written by Python 2) by an unpickler that builds nothing but plain data and
    numpy arrays. Keys come back as str from the official files and as bytes from files written by
    Python 3: both are accepted."""
    _check_md5(path)
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="latin1").load()
    except _NotOfficial as exc:
        raise DataError(f"{path} is not the official CIFAR-10 file ({exc}): it was not loaded. Delete "
                        f"{path.parent}/ so that it is downloaded again.") from None
    except Exception as exc:
        raise DataError(f"{path} cannot be read as a CIFAR-10 pickle ({type(exc).__name__}: {exc}): it "
                        f"is truncated or corrupt. Delete {path.parent} so it can be downloaded again.") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (not a dict). Delete {path.parent} so it can "
                        "be downloaded again.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_cifar10_split(folder: str | os.PathLike, names, class_names: list[str]) -> ImageSet:
    """Concatenate CIFAR-10 batch files `names` of `folder` into an ImageSet (N, 3, 32, 32)."""
    folder = Path(folder)
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name)
        data, lab = batch.get("data"), batch.get("labels")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32 and lab is not None and len(lab) == len(data)):
            raise DataError(f"{folder / name} is not a CIFAR-10 batch (expected 'data' uint8 rows of "
                            "3072 and as many 'labels'). Delete the folder so it can be downloaded again.")
        lab = np.asarray(lab, dtype=np.int64)
        if len(lab) and (lab.min() < 0 or lab.max() >= len(class_names)):
            raise DataError(f"{folder / name} has labels outside 0..{len(class_names) - 1}: corrupt.")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # rows are R, G, B planes
        labels.append(torch.from_numpy(lab))
    return ImageSet(torch.cat(images), torch.cat(labels), list(class_names), f"CIFAR-10 {folder}")


def _download_cifar10(data_dir: Path, timeout: float) -> None:
    """Download the official archive (md5-checked) and unpack it to <data_dir>/cifar-10-batches-py,
    by way of temporary names so that an interrupted download leaves nothing half-done."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix="cifar-10-python.", suffix=".tar.gz.part")
    unpack = None
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
        if digest.hexdigest() != CIFAR10_TGZ_MD5:
            raise DataError(f"{CIFAR10_URL} downloaded with the wrong md5; try again later.")
        unpack = Path(tempfile.mkdtemp(dir=data_dir, prefix=".cifar-unpack-"))
        with tarfile.open(tmp, "r:gz") as archive:
            archive.extractall(unpack, filter="data")
        os.replace(unpack / CIFAR10_FOLDER, data_dir / CIFAR10_FOLDER)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if unpack is not None:
            import shutil
            shutil.rmtree(unpack, ignore_errors=True)


def load_cifar10(data_dir: str | os.PathLike, download: bool = True, timeout: float = 30) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 (train 50,000, test 10,000) from `<data_dir>/cifar-10-batches-py/`, images uint8
    (N, 3, 32, 32), labels and class names from batches.meta. Downloads the archive (163 MB) when the
    folder is missing and `download` is True; raises DataError saying where to point otherwise."""
    data_dir = Path(data_dir).expanduser()
    folder = data_dir / CIFAR10_FOLDER
    needed = (*CIFAR10_TRAIN_FILES, *CIFAR10_TEST_FILES, "batches.meta")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing and download and not folder.exists():
        try:
            _download_cifar10(data_dir, timeout)
        # HTTPException: a connection cut mid-body raises http.client.IncompleteRead, no OSError.
        except (urllib.error.URLError, OSError, http.client.HTTPException, tarfile.TarError, DataError) as exc:
            raise DataError(f"CIFAR-10 is not in {folder.resolve()} and downloading it failed "
                            f"({type(exc).__name__}: {exc}). " + _cifar_where(data_dir)) from None
        missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        why = "downloading is off" if not download else "the folder exists but is incomplete (delete it to download afresh)"
        where = (f"is not complete in {folder.resolve()}: missing {', '.join(missing)}," if folder.exists()
                 else f"is not in {folder.resolve()} (no such folder),")
        raise DataError(f"CIFAR-10 {where} and {why}. " + _cifar_where(data_dir))
    meta = _unpickle(folder / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{folder / 'batches.meta'} has no label_names: corrupt. Delete {folder} so it can "
                        "be downloaded again.")
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    train = read_cifar10_split(folder, CIFAR10_TRAIN_FILES, names)
    test = read_cifar10_split(folder, CIFAR10_TEST_FILES, names)
    train.source, test.source = f"CIFAR-10 train ({folder})", f"CIFAR-10 test ({folder})"
    return train, test


# --------------------------------------------------------------------------------------------
# MNIST at 32x32, and choosing a dataset
# --------------------------------------------------------------------------------------------

def load_mnist32(data_dir: str | os.PathLike, download: bool = True) -> tuple[ImageSet, ImageSet]:
    """MNIST as uint8 (N, 1, 32, 32): the 28x28 digits zero-padded by 2 pixels on each side (so a
    DCGAN's 32 -> 16 -> 8 -> 4 stack fits). Train = the first 50,000 training images (the paper's
    split, mnist_data.N_TRAIN), test = the 10,000 test images; labels kept."""
    arrays = mnist_data.load_mnist_arrays(data_dir, download=download)

    def split(images: np.ndarray, labels: np.ndarray, what: str) -> ImageSet:
        padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]
        return ImageSet(torch.from_numpy(padded.copy()), torch.from_numpy(labels.astype(np.int64)),
                        [str(d) for d in range(10)], f"MNIST {what} ({Path(data_dir).expanduser()})")

    return (split(arrays["train_images"][:mnist_data.N_TRAIN], arrays["train_labels"][:mnist_data.N_TRAIN], "train"),
            split(arrays["test_images"], arrays["test_labels"], "test"))


def resize_images(images: torch.Tensor, image_size: int, batch_size: int = 1000) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, S, S), bicubic with antialiasing (a plain copy when the size
    already fits). For square inputs (the built-in datasets); folders are resized when decoded."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    out = [F.interpolate(chunk.float(), size=(image_size, image_size), mode="bicubic", antialias=True,
                         align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for chunk in images.split(batch_size)]
    return torch.cat(out)


def _resized(s: ImageSet, image_size: int) -> ImageSet:
    return ImageSet(resize_images(s.images, image_size), s.labels, s.class_names, s.source)


def load_dataset(dataset: str, data_dir: str | os.PathLike, image_size: int, *, cache_dir=None,
                 progress: bool = True, download: bool = True) -> tuple[ImageSet, ImageSet | None]:
    """(train, test or None) for the notebook's `dataset` parameter:

    * "cifar10": `<data_dir>/cifar-10-batches-py/` (load_cifar10); failing that, image folders
      `<data_dir>/cifar10/train/` and `<data_dir>/cifar10/test/` when both exist (this is how some
      machines keep CIFAR-10, as JPEGs: nearly but not exactly the same pixels); failing that, it is
      downloaded into data_dir. Resized when image_size != 32.
    * "mnist": load_mnist32, one channel, resized when image_size != 32.
    * anything else: a folder (~ expanded; relative to the current directory). With a `train/`
      subfolder, that is the training set and `test/` (or `val/`, `valid/`, `validation/`; any case),
      if there is one, the test set; otherwise the whole folder is train and test is None.

    The names "cifar10" and "mnist" win over folders of the same name (write "./mnist" for those).
    """
    name = str(dataset)
    if name.lower() == "cifar10":
        data_dir = Path(data_dir).expanduser()
        jpeg = data_dir / "cifar10"
        if not (data_dir / CIFAR10_FOLDER).exists() and (jpeg / "train").is_dir() and (jpeg / "test").is_dir():
            return _folder_splits(jpeg / "train", jpeg / "test", image_size, cache_dir, progress)
        train, test = load_cifar10(data_dir, download=download)
        return _resized(train, image_size), _resized(test, image_size)
    if name.lower() == "mnist":
        train, test = load_mnist32(data_dir, download=download)
        return _resized(train, image_size), _resized(test, image_size)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"dataset={name!r} is neither a known dataset nor an existing folder "
            f"({folder.resolve()} {'is a file' if folder.exists() else 'does not exist'}). Choose one of "
            f"{', '.join(repr(d) for d in DATASETS)}, or give the path of a folder of images (flat, with one "
            "subfolder per class, or with train/ and test/ subfolders)."
        )
    train_dir, test_dir = _split_folders(folder)
    if train_dir is None:
        return load_image_folder(folder, image_size, cache_dir=cache_dir, progress=progress), None
    if test_dir is None:
        print(f"note: {folder} has {train_dir.name}/ but no test/ (or val/): {train_dir.name}/ is the training set, "
              "and the last third of it the reference the scores compare with.")
        return load_image_folder(train_dir, image_size, cache_dir=cache_dir, progress=progress), None
    return _folder_splits(train_dir, test_dir, image_size, cache_dir, progress)


TEST_SPLIT_NAMES = ("test", "val", "valid", "validation")  # in this order of preference


def _split_folders(folder: Path) -> tuple[Path | None, Path | None]:
    """`folder`'s train/ and test/ (or val/, valid/, validation/) subfolders, any case; None where
    there is none. Without this, train/ and val/ would be read as two classes and both trained on.
    A train/ without a test split beside other subfolders is a class, not a split (CIFAR-100 has a
    class "train")."""
    # Loops are noted by _scan, which lists the folder again: saying it here too would say it twice.
    subdirs = {e.name.lower(): Path(e.path) for e, kind in _listing(folder, note_loops=False) if kind == "dir"}
    train, test = subdirs.get("train"), next((subdirs[n] for n in TEST_SPLIT_NAMES if n in subdirs), None)
    if train is None or (test is None and len(subdirs) > 1):
        return None, None
    return train, test


def _folder_splits(train_dir: Path, test_dir: Path, image_size: int, cache_dir, progress: bool) -> tuple[ImageSet, ImageSet]:
    train = load_image_folder(train_dir, image_size, cache_dir=cache_dir, progress=progress)
    test = load_image_folder(test_dir, image_size, cache_dir=cache_dir, progress=progress)
    if train.class_names != test.class_names:  # the test images are the reference, used without labels
        print(f"note: {test_dir} has other classes than {train_dir} ({test.class_names} against "
              f"{train.class_names}); its images are the reference all the same, its labels are not used.")
        test = ImageSet(test.images, None, None, test.source)
    return train, test
