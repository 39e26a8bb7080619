"""MNIST on disk and in memory: found, downloaded or refused, verified, and held as tensors.

torchvision's layout (`<data_dir>/MNIST/raw/`, the `.gz` files or unpacked ones), each file checked
against its official md5 and its header; a download tries each mirror with a deadline and writes
atomically. `load_mnist` gives the paper's split (50,000 train, 10,000 validation, 10,000 test) as
tensors on the training device, scaled to [-1, 1]. The data location is a setting (the notebook's
`data_dir`, the environment variable GAN_DATA_DIR): nothing here knows where a machine keeps it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gan.errors import DataError
from gan.runs import new_file_replacing, remove_dead_temp_files
from gan_utils import to_model_range

DATA_DIR_ENV = "GAN_DATA_DIR"  # environment variable that overrides the notebook's default data_dir


MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


@dataclass(frozen=True)
class IdxFile:
    """One MNIST file: its unpacked name, the official md5 of its `.gz`, its IDX header, and the
    official md5 of the unpacked file (a file of the right size and header can still hold wrong
    pixels or labels: only the checksum proves the content)."""

    name: str
    gz_md5: str
    magic: int  # 2051 for images (uint8, 3 dims), 2049 for labels (uint8, 1 dim)
    count: int
    md5: str = ""  # of the unpacked file; "" skips the check

    @property
    def size(self) -> int:
        """Exact byte size of the unpacked file: header plus payload."""
        if self.magic == 2051:
            return 16 + self.count * 28 * 28
        return 8 + self.count


MNIST_FILES = {
    "train_images": IdxFile("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 2051, 60000,
                            "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": IdxFile("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432", 2049, 60000,
                            "a25bea736e30d166cdddb491f175f624"),
    "test_images": IdxFile("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3", 2051, 10000,
                           "2646ac647ad5339dbf082846283269ea"),
    "test_labels": IdxFile("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c", 2049, 10000,
                           "27ae3e4e09519cfbb04c329615203637"),
}


# The paper's split (Goodfellow et al. 2014, and the pylearn2 code behind it): the first 50,000
# training images train, the last 10,000 are the validation set, the 10,000 test images are only
# used for final numbers.
N_TRAIN = 50000


def md5_of_file(path: Path) -> str:
    """Hex md5 of a file's bytes, read in 1 MiB blocks (the checksum MNIST and CIFAR-10 publish)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _how_to_point_elsewhere() -> str:
    return (
        f"Point the notebook's `data_dir` parameter (or the {DATA_DIR_ENV} environment variable) at "
        "a directory that holds MNIST/raw/ in torchvision's layout, e.g. "
        f"`{DATA_DIR_ENV}=/path/to/data` or `papermill ... -p data_dir /path/to/data`."
    )


def parse_idx(raw: bytes, spec: IdxFile, source: Path) -> np.ndarray:
    """Check an IDX file's size and header against `spec` and return its payload as uint8."""
    if len(raw) != spec.size:
        raise DataError(
            f"{source} is {len(raw):,} bytes, expected {spec.size:,}: the file is truncated or is "
            f"not {spec.name}. Delete it so it can be downloaded again, or replace it."
        )
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic != spec.magic or count != spec.count:
        raise DataError(
            f"{source} has IDX header (magic {magic}, count {count}), expected (magic {spec.magic}, "
            f"count {spec.count}): the file is corrupt or is not {spec.name}. Delete it so it can "
            "be downloaded again, or replace it."
        )
    if spec.magic == 2051:
        rows, cols = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
        if (rows, cols) != (28, 28):
            raise DataError(f"{source} holds {rows}x{cols} images, expected 28x28: the file is corrupt.")
        return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, 28, 28)
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def check_mnist_content(array: np.ndarray, spec: IdxFile, source: Path) -> None:
    """Refuse a file whose header is right but whose content cannot be MNIST: labels outside 0-9,
    or images that are all one value. Says what is wrong, where the md5 check would only say "wrong"."""
    redo = f"Delete {source} so it is downloaded (or read from its .gz) again, or replace it."
    if spec.magic == 2049 and array.size and int(array.max()) > 9:
        raise DataError(f"{source} holds labels up to {int(array.max())}; MNIST labels are 0-9: the "
                        f"file is corrupt. {redo}")
    if spec.magic == 2051 and array.size and int(array.max()) == int(array.min()):
        raise DataError(f"{source} holds images whose pixels are all {int(array.min())}: the file is "
                        f"corrupt. {redo}")


class _DeadlinePassed(TimeoutError):
    """A download was still running when the overall deadline came."""


def _is_timeout(exc: BaseException) -> bool:
    """A socket timeout, bare or wrapped by urllib (a connect timeout arrives as URLError(reason=timeout))."""
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def _download(url: str, dest: Path, md5: str, timeout: float, deadline: float | None = None,
              report: Callable[[str], None] = print) -> None:
    """Download to a `.part` file beside `dest`, check the md5, then rename: never half a file.

    `timeout` bounds the connection and each read, so a mirror that accepts and then says nothing
    fails after it; `deadline` (a time.monotonic() value) bounds the whole file, so a mirror that
    trickles a byte at a time fails too. Progress goes to `report` every few seconds.
    """
    with new_file_replacing(dest, suffix=".part") as (out, tmp):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            headers = getattr(response, "headers", None)
            size = int(headers.get("Content-Length") or 0) if headers is not None else 0
            got, last_report = 0, time.monotonic()
            # HTTP: read1 returns what has arrived, so the deadline is checked after every packet;
            # read(n) would wait for n bytes, forever from a mirror that trickles.
            read = response.read1 if isinstance(response, http.client.HTTPResponse) else response.read
            for block in iter(lambda: read(1 << 16), b""):
                out.write(block)
                got += len(block)
                if deadline is not None and time.monotonic() > deadline:
                    raise _DeadlinePassed(f"not finished by the download deadline ({got:,} bytes received)")
                if time.monotonic() - last_report > 3:
                    report(f"  {got / 1e6:.1f}" + (f" of {size / 1e6:.1f}" if size else "") + " MB")
                    last_report = time.monotonic()
        out.flush()
        if md5_of_file(tmp) != md5:
            raise DataError(f"{url} downloaded with the wrong md5; try again later or another mirror.")


def _download_gz(raw_dir: Path, spec: IdxFile, timeout: float, deadline: float | None = None,
                 silent_mirrors: set | None = None, report: Callable[[str], None] = print) -> str | None:
    """Try each mirror for `spec`'s `.gz`; return None on success, the errors otherwise.

    A mirror that timed out goes into `silent_mirrors` and is not asked for the other files: one
    dead mirror costs one timeout, not one per file.
    """
    silent_mirrors = set() if silent_mirrors is None else silent_mirrors
    errors = []
    for mirror in MNIST_MIRRORS:
        if mirror in silent_mirrors:
            continue
        if deadline is not None and time.monotonic() > deadline:
            errors.append("the download deadline passed before it could be tried")
            break
        report(f"downloading {spec.name}.gz from {mirror} ...")
        try:
            _download(mirror + spec.name + ".gz", raw_dir / (spec.name + ".gz"), spec.gz_md5, timeout,
                      deadline, report)
            return None
        # HTTPException: a mirror that cuts the body short raises http.client.IncompleteRead, which is
        # no OSError; the next mirror is worth a try all the same.
        except (urllib.error.URLError, OSError, http.client.HTTPException, DataError) as exc:
            if _is_timeout(exc):
                silent_mirrors.add(mirror)
                why = exc if isinstance(exc, _DeadlinePassed) else f"did not answer within {timeout:g} s ({exc})"
                exc = f"{why}; not asked again in this run"
            errors.append(f"{mirror}: {exc}")
            report(f"  failed: {errors[-1]}")
    return "; ".join(errors) or f"every mirror had timed out before {spec.name}.gz"


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    """Return `<data_dir>/MNIST/raw` after checking that the path is usable: a file where a directory
    belongs, or a directory that cannot be read, gets a DataError that names it and the fix."""
    root = Path(data_dir).expanduser()
    raw_dir = root / "MNIST" / "raw"
    for part in (root, root / "MNIST", raw_dir):
        if part.exists() and not part.is_dir():
            raise DataError(f"data_dir = {str(root)!r}: {part} is a file, not a directory. "
                            + _how_to_point_elsewhere())
    if raw_dir.is_dir():
        try:
            os.listdir(raw_dir)
        except OSError as exc:
            raise DataError(f"cannot read the directory {raw_dir} ({exc.strerror}): make it readable "
                            f"(chmod -R a+rX {shlex.quote(str(root))}) or use another copy. "
                            + _how_to_point_elsewhere()) from None
    return raw_dir


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, or a DataError naming it when it is a directory or cannot be read."""
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected the MNIST file of that name (some unpacking "
                        "tools make a folder per file): delete or rename it so the file can be read "
                        "from its .gz or downloaded again.")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}): make it readable "
                        f"(chmod a+r {shlex.quote(str(path))}) or delete it so it is downloaded again. "
                        + _how_to_point_elsewhere()) from None


def read_mnist_file(raw_dir: Path, spec: IdxFile) -> np.ndarray:
    """Read one MNIST file from `raw_dir`, verified: the unpacked file if present, else its `.gz`.

    The unpacked file is checked by size, IDX header, content (labels 0-9, pixels not all one
    value) and the official md5 of the unpacked file; the `.gz` by the official md5 first.
    """
    plain, packed = raw_dir / spec.name, raw_dir / (spec.name + ".gz")
    if plain.exists():
        raw = _read_bytes(plain)
        array = parse_idx(raw, spec, plain)
        check_mnist_content(array, spec, plain)
        if spec.md5 and hashlib.md5(raw).hexdigest() != spec.md5:
            raise DataError(
                f"{plain} has the right size and header but not the official content (md5 "
                f"{hashlib.md5(raw).hexdigest()}, expected {spec.md5}): the file is corrupt or "
                f"modified. Delete {plain} so it is read from its .gz or downloaded again, or replace it."
            )
        return array
    compressed = _read_bytes(packed)
    if hashlib.md5(compressed).hexdigest() != spec.gz_md5:
        raise DataError(
            f"{packed} has the wrong md5 (expected {spec.gz_md5}): the download was cut short or "
            "the file is corrupt. Delete it and run again to download it afresh, or replace it."
        )
    # Unpacked in memory only: nothing is written next to the .gz, so nothing can be half-written.
    return parse_idx(gzip.decompress(compressed), spec, packed)


def ensure_mnist(data_dir: str | os.PathLike, download: bool = True, timeout: float = 30.0,
                 deadline_s: float = 900.0, report: Callable[[str], None] = print) -> Path:
    """Return `<data_dir>/MNIST/raw`, downloading any missing `.gz` file into it when allowed.

    Downloads say which mirror they use and how far they got; `timeout` bounds each connection and
    read, `deadline_s` all downloads of this call together. Raises DataError naming the directory,
    the four files, each mirror's failure and the setting to change when files are missing and
    cannot be downloaded.
    """
    raw_dir = check_data_dir(data_dir)
    missing = [s for s in MNIST_FILES.values()
               if not (raw_dir / s.name).exists() and not (raw_dir / (s.name + ".gz")).exists()]
    errors = []
    if missing and download:
        try:
            raw_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            errors.append(f"cannot create {raw_dir}: {exc}")
        else:
            deadline, silent = time.monotonic() + deadline_s, set()
            for spec in missing:
                remove_dead_temp_files(raw_dir / (spec.name + ".gz"), ".part")
                error = _download_gz(raw_dir, spec, timeout, deadline, silent, report)
                if error:
                    errors.append(f"{spec.name}.gz: {error}")
    still_missing = [s.name for s in missing if not (raw_dir / (s.name + ".gz")).exists()]
    if still_missing:
        why = ("downloading failed (" + "; ".join(errors) + ")") if errors else "downloading is off"
        names = ", ".join(s.name for s in MNIST_FILES.values())
        raise DataError(
            f"MNIST is not in {raw_dir.resolve()}: missing {', '.join(still_missing)} "
            f"(each as the file or its .gz; all four are needed: {names}), and {why}. "
            + _how_to_point_elsewhere()
        )
    return raw_dir


def load_mnist_arrays(data_dir: str | os.PathLike, download: bool = True) -> dict[str, np.ndarray]:
    """All four MNIST files as uint8 arrays, keyed like MNIST_FILES."""
    raw_dir = ensure_mnist(data_dir, download=download)
    return {key: read_mnist_file(raw_dir, spec) for key, spec in MNIST_FILES.items()}


@dataclass
class MnistSplits:
    """The paper's split, each image set as one float32 (N, 784) tensor in [-1, 1] on one device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_mnist(data_dir: str | os.PathLike, device: str | torch.device = "cpu",
               train_subset: int = 0, download: bool = True) -> MnistSplits:
    """Load MNIST as the paper split it: train = first 50,000, val = last 10,000, test = 10,000.

    `train_subset` > 0 keeps only the first that many training images (quick tries); validation
    and test sets are never cut, so metrics stay comparable.
    """
    arrays = load_mnist_arrays(data_dir, download=download)
    images, labels = arrays["train_images"], arrays["train_labels"]
    n_train = min(train_subset, N_TRAIN) if train_subset > 0 else N_TRAIN

    def put(a: np.ndarray, as_images: bool) -> torch.Tensor:
        t = to_model_range(a).reshape(len(a), -1) if as_images else torch.as_tensor(a.astype(np.int64))
        return t.to(device)

    return MnistSplits(
        train_x=put(images[:n_train], True), train_y=put(labels[:n_train], False),
        val_x=put(images[N_TRAIN:], True), val_y=put(labels[N_TRAIN:], False),
        test_x=put(arrays["test_images"], True), test_y=put(arrays["test_labels"], False),
    )
