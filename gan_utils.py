"""Everything `Vanilla_GAN.ipynb` should not have to show.

Data (MNIST in torchvision's layout, verified, held as one tensor per split), parameter checks,
run directories, seeding and device choice, per-epoch logging, image grids and animations,
checkpoints (atomic, `weights_only` loading), the generator's `torch.export`, and the plumbing around
the notebook's training loop (sampling, matmul precision, latent interpolation, stopping safely on a
signal, reading the notebook's own cells for the scripts). The method itself (networks, losses, the
training step, the EMA and its BatchNorm recalibration) is defined in the notebook, not here.

No module-level state: every function takes what it needs and returns what it makes. The one
exception is the registry of run-directory locks this process holds (see claim_run_dir).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import errno
import glob
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

try:  # POSIX: run directories are locked with flock; elsewhere they are not (see RunDirLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

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


class DataError(RuntimeError):
    """MNIST is missing, truncated or corrupt. The message says which file and what to do."""


def _md5(path: Path) -> str:
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


def _ordinary_file_mode() -> int:
    """The mode open() would give a new file (0o666 less the umask): mkstemp's files are 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
    with _new_file_replacing(dest, suffix=".part") as (out, tmp):
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
        if _md5(tmp) != md5:
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
        except (urllib.error.URLError, OSError, DataError) as exc:
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


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> float32 (N, 784) in [-1, 1], the range of the generator's tanh."""
    x = torch.as_tensor(np.array(images_uint8) if isinstance(images_uint8, np.ndarray) else images_uint8)
    x = x.reshape(len(x), -1).float()
    return x.div_(127.5).sub_(1.0)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model-range images in [-1, 1] -> [0, 1] (pixels as the paper's Parzen code sees them)."""
    return (x + 1.0) / 2.0


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
        t = to_model_range(a) if as_images else torch.as_tensor(a.astype(np.int64))
        return t.to(device)

    return MnistSplits(
        train_x=put(images[:n_train], True), train_y=put(labels[:n_train], False),
        val_x=put(images[N_TRAIN:], True), val_y=put(labels[N_TRAIN:], False),
        test_x=put(arrays["test_images"], True), test_y=put(arrays["test_labels"], False),
    )


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
# Parameters, run directory, device, seeding
# --------------------------------------------------------------------------------------------

class ParameterError(ValueError):
    """A notebook parameter has a value it cannot take. The message names it and what is allowed."""


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _non_negative_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_number(v):
    return _non_negative_number(v) and v > 0


def _unit_interval_open(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def _is_bool(v):
    return isinstance(v, bool)


def _is_str(v):
    return isinstance(v, str)


# The values of torch.set_float32_matmul_precision (notebook parameter `matmul_precision`), and "auto":
# chosen by the hardware (gan_speed.resolve_matmul_precision).
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")

# name -> (check, the allowed values in words). The notebook's parameters cell holds the defaults.
PARAMETER_RULES = {
    "data_dir": (_is_str, "a directory path (string) that holds or will hold MNIST/raw/"),
    "run_dir": (_is_str, "a directory path (string), or '' for runs/<date-time>/"),
    "device": (lambda v: v in ("auto", "cpu", "mps") or (isinstance(v, str) and v.startswith("cuda")),
               "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    # NumPy's seed must fit 32 bits (np.random.seed(2**32) raises), so seed_everything could not take more.
    "seed": (lambda v: _non_negative_int(v) and v < 2 ** 32, "an integer from 0 to 2**32-1 (4294967295)"),
    "epochs": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "train_subset": (_non_negative_int, "0 (all 50,000 training images) or a positive integer"),
    "latent_dim": (_positive_int, "an integer >= 1"),
    "g_batchnorm": (_is_bool, "True or False"),
    "d_dropout": (_unit_interval_open, "a number in [0, 1)"),
    "g_loss": (lambda v: v in ("non_saturating", "minimax"), "'non_saturating' or 'minimax'"),
    "d_steps": (_positive_int, "an integer >= 1"),
    "label_smoothing": (lambda v: _unit_interval_open(v) and v < 0.5, "a number in [0, 0.5)"),
    "r1_gamma": (_non_negative_number, "a number >= 0; 0 turns the penalty off"),
    "r1_every": (_positive_int, "an integer >= 1 (steps)"),
    "lr_g": (_positive_number, "a number > 0"),
    "lr_d": (_positive_number, "a number > 0"),
    "beta1": (_unit_interval_open, "a number in [0, 1)"),
    "ema_decay": (_unit_interval_open, "a number in [0, 1); 0 turns the EMA off"),
    "checkpoint_every": (_positive_int, "an integer >= 1 (epochs)"),
    "resume": (_is_str, "'' or the path of a checkpoint.pt"),
    "overwrite": (_is_bool, "True or False; True deletes the previous run in run_dir first"),
    "metrics_every": (_non_negative_int, "0 (off) or an integer >= 1 (epochs)"),
    "metrics_samples": (_positive_int, "an integer >= 1"),
    "eval_samples": (_non_negative_int, "0 (skip the final evaluation) or an integer >= 1"),
    "log_every": (_positive_int, "an integer >= 1 (steps)"),
    "matmul_precision": (lambda v: v in MATMUL_PRECISIONS, "'auto', 'highest', 'high' or 'medium'"),
    "cuda_graphs": (_is_bool, "True or False; True replays the training step as CUDA graphs on a CUDA GPU"),
}

# DCGAN.ipynb's parameters: the same names where the meaning is the same, its own for the data and
# the convolutional networks (g_batchnorm and d_dropout are not settings there).
DCGAN_PARAMETER_RULES = {
    **{k: v for k, v in PARAMETER_RULES.items() if k not in ("g_batchnorm", "d_dropout")},
    "dataset": (lambda v: isinstance(v, str) and bool(v), "'cifar10', 'mnist' or the path of a folder of images"),
    "data_dir": (_is_str, "a directory path (string) where 'cifar10' and 'mnist' are found or downloaded"),
    "train_subset": (_non_negative_int, "0 (every training image) or a positive integer"),
    "image_size": (lambda v: v in (32, 64), "32 or 64 (pixels)"),
    "g_width": (_positive_int, "an integer >= 1 (channels of G's last hidden layer)"),
    "d_width": (_positive_int, "an integer >= 1 (channels of D's first layer)"),
}


# Parameters that older versions of the notebook had: name -> why it went and what to use instead.
# A papermill `-p` with one of them is refused with this reason; a checkpoint that recorded one still
# resumes (retired_settings() says what no longer applies).
RETIRED_PARAMETERS = {
    "amp": "bfloat16 autocast had no measured gain over matmul_precision = 'medium', which stays",
    "compile": "torch.compile trained slower than eager, on our CPU and on an H100 (docs/experiments.md)",
    "beta1_g": "one beta1 now sets both networks' Adam beta1",
    "beta1_d": "one beta1 now sets both networks' Adam beta1",
    "beta2_g": "Adam's beta2 is fixed at 0.999 (0.99 changed little; docs/experiments.md)",
    "beta2_d": "Adam's beta2 is fixed at 0.999 (0.99 changed little; docs/experiments.md)",
}


def retired_settings(checkpoint_config: dict, config: dict) -> list[str]:
    """Notes for resuming a checkpoint made before some parameters were retired: one for each retired
    setting it recorded with a value other than what training now does."""
    now = {"amp": False, "compile": False, "beta1_g": config["beta1"], "beta1_d": config["beta1"],
           "beta2_g": 0.999, "beta2_d": 0.999}
    return [f"note: this checkpoint was trained with {name} = {checkpoint_config[name]!r}, a setting that "
            f"no longer exists ({why}); training continues with {now[name]!r}."
            for name, why in RETIRED_PARAMETERS.items()
            if name in checkpoint_config and checkpoint_config[name] != now[name]]


def parameters_from(namespace: dict, rules: dict = PARAMETER_RULES) -> dict:
    """Pick the notebook's parameters (the names in `rules`) out of `namespace` (its globals())."""
    missing = [name for name in rules if name not in namespace]
    if missing:
        raise ParameterError(f"the parameters cell does not define {', '.join(missing)}; "
                             "restore them from the repository's copy of the notebook.")
    return {name: namespace[name] for name in rules}


def injected_parameters(history: list[str]) -> dict:
    """The names and values papermill injected, read from the kernel's input history (`In`).

    parameters_from() picks known names only, so a misspelt `-p epoch 5` would otherwise be
    silently ignored; validate_parameters() rejects the unknown name with a did-you-mean.
    """
    import ast
    injected = [src for src in history if src.lstrip().startswith("# Parameters")]
    if not injected:
        return {}
    values = {}
    for node in ast.parse(injected[-1]).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                values[node.targets[0].id] = ast.unparse(node.value)
    return values


def validate_parameters(config: dict, rules: dict = PARAMETER_RULES) -> None:
    """Check every parameter against `rules` before any work; one error lists each bad one and what
    it may be."""
    problems = []
    for name, value in config.items():
        if name in RETIRED_PARAMETERS:
            problems.append(f"{name} is no longer a parameter: {RETIRED_PARAMETERS[name]}; drop it")
            continue
        if name not in rules:
            close = difflib.get_close_matches(name, rules, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown parameter {name!r}{hint}")
            continue
        check, allowed = rules[name]
        if not check(value):
            problems.append(f"{name} = {value!r} is not allowed: use {allowed}")
    if config.get("resume") and not Path(config["resume"]).expanduser().is_file():
        problems.append(f"resume = {config['resume']!r}: no such file; use '' to start afresh or "
                        "the path of a run's checkpoint.pt")
    if problems:
        raise ParameterError("bad parameters:\n  - " + "\n  - ".join(problems))


# The minimum sample counts of the metrics (gan_metrics), found by reading the code and trying:
# the Frechet distance needs a covariance (torch.cov of 1 sample is NaN and eigh then fails), and
# precision/recall look up each point's k-th nearest neighbour besides itself (topk(k + 1), k = 3).
FD_MIN_SAMPLES = 2
KNN_MIN_SAMPLES = 3 + 1


def validate_against_data(config: dict, n_train: int) -> None:
    """Check the settings that depend on the size of the training set, after loading it and before
    any work. One ParameterError lists every conflict with the range allowed for this data: settings
    that would train nothing (G never updated, the R1 penalty never applied) or crash an epoch later."""
    bs, steps = config["batch_size"], n_train // config["batch_size"]
    data = f"{n_train:,} training images (train_subset = {config.get('train_subset', 0)})"
    min_bs = 2 if config.get("g_batchnorm", True) else 1  # DCGAN's G always has BatchNorm
    problems = []
    if steps == 0:
        problems.append(f"batch_size = {bs} is larger than the training set, {data}: use a batch_size "
                        f"from {min_bs} to {n_train}, or more training images (train_subset = 0 for all)")
    elif bs < min_bs:
        problems.append(f"batch_size = {bs} with g_batchnorm = True: BatchNorm needs at least 2 images "
                        f"per batch; use a batch_size from 2 to {n_train}, or g_batchnorm = False")
    if steps and config["d_steps"] > steps:
        problems.append(f"d_steps = {config['d_steps']} but an epoch has only {steps} steps ({n_train:,} "
                        f"images // batch_size {bs}): G is updated every d_steps steps and would never "
                        f"train; use d_steps from 1 to {steps}, or a smaller batch_size")
    if steps and config.get("r1_gamma", 0) > 0 and config["r1_every"] > steps:
        problems.append(f"r1_every = {config['r1_every']} but an epoch has only {steps} steps: the R1 "
                        f"penalty would never be applied; use r1_every from 1 to {steps}, or r1_gamma = 0 "
                        "to turn it off")
    if config.get("metrics_every") and config["metrics_samples"] < FD_MIN_SAMPLES:
        problems.append(f"metrics_samples = {config['metrics_samples']}: the Frechet distance needs the "
                        f"covariance of at least {FD_MIN_SAMPLES} samples; use metrics_samples >= "
                        f"{FD_MIN_SAMPLES} (2,000 by default: fewer bias it upward), or metrics_every = 0")
    evals = config.get("eval_samples", 0)
    if 0 < evals < KNN_MIN_SAMPLES:
        problems.append(f"eval_samples = {evals}: precision and recall (k-nearest neighbours, k = 3) "
                        f"need at least {KNN_MIN_SAMPLES} samples; use eval_samples >= {KNN_MIN_SAMPLES}, "
                        "or 0 to skip the final evaluation")
    if evals and n_train < 2 * KNN_MIN_SAMPLES:
        problems.append(f"eval_samples = {evals} with only {data}: the final evaluation scores half of "
                        f"the training images as real samples and needs {KNN_MIN_SAMPLES} in each half; "
                        f"use train_subset >= {2 * KNN_MIN_SAMPLES} (or 0 for all), or eval_samples = 0")
    if problems:
        raise ParameterError("settings that do not fit the data:\n  - " + "\n  - ".join(problems))


def nothing_to_train_message(epochs: int, epochs_done: int) -> str | None:
    """What the training cell says when a resumed run already has `epochs` epochs (None otherwise):
    the later cells still run on the loaded models, so a finished run can be re-evaluated."""
    if epochs > epochs_done:
        return None
    return (f"nothing to train: epochs ({epochs}) <= epochs done ({epochs_done}); raise epochs to continue")


# Run directories: one run per directory, one process per run directory.

# What a run writes into its directory besides grids/epoch_*.png: any of them means the directory
# holds a run. The executed notebook (papermill writes it there before the run starts) and the
# lock file are not among them.
RUN_OUTPUTS = ("checkpoint.pt", "config.json", "metrics.csv", "metrics.json", "generator.pt2",
               "progress.gif", "losses.png", "quality.png", "real_vs_generated.png", "interpolation.png")
LOCK_FILE = ".lock"

def resolve_run_dir(run_dir: str, resume: str = "", root: str = "runs") -> Path:
    """The notebook's rule for where a run writes: `run_dir`; else the resumed checkpoint's own
    directory; else runs/<date-time>/. Shared by the notebook and run_notebook.py so they agree."""
    if run_dir:
        return Path(run_dir).expanduser()
    if resume:
        return Path(os.path.dirname(os.path.abspath(Path(resume).expanduser())))
    return Path(root) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_files(run_dir: str | os.PathLike) -> list[Path]:
    """The files of a run in `run_dir` (RUN_OUTPUTS, per-epoch grids); [] when there are none."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        return []
    return [path / n for n in RUN_OUTPUTS if (path / n).exists()] + epoch_grid_paths(path)


def _inside(checkpoint: str | os.PathLike, run_dir: Path) -> bool:
    """True when `checkpoint` lies directly in `run_dir` (resuming that run where it is)."""
    parent = Path(checkpoint).expanduser().absolute().parent
    try:
        return parent.exists() and run_dir.exists() and os.path.samefile(parent, run_dir)
    except OSError:
        return False


def _refuse_other_run(path: Path, resume: str, overwrite: bool) -> None:
    """ParameterError when `path` holds a run that this one would overwrite or mix its files into."""
    files = run_files(path)
    if not files or overwrite or (resume and _inside(resume, path)):
        return
    names = [str(f.relative_to(path)) for f in files]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    replace = "or set overwrite = True, which deletes the old run's checkpoint, metrics and grids first"
    if resume:
        raise ParameterError(
            f"run_dir = {str(path)!r} already holds another run ({shown}), and resume = {str(resume)!r} "
            "is not its checkpoint: the two runs' files would mix. Resume in the checkpoint's own "
            f"directory (run_dir = '' does that) or in a new run_dir; {replace}.")
    checkpoint = path / "checkpoint.pt"
    cont = (f"set resume = {str(checkpoint)!r} (headless: {resume_command(checkpoint)})"
            if checkpoint.is_file() else "there is no checkpoint.pt to resume from")
    raise ParameterError(
        f"run_dir = {str(path)!r} already holds a run ({shown}); a new run there would overwrite its "
        f"checkpoint and mix its files into the new run's. To continue that run, {cont}; to start a "
        f"new run, choose another run_dir ('' for runs/<date-time>/); {replace}.")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _busy_message(path: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    stop = f"stop it (`kill -INT {pid}` saves its checkpoint first), " if pid else "stop it, "
    return (f"run_dir = {str(path)!r} is in use: {who} is running there now (it holds "
            f"{path / LOCK_FILE}). Wait for it to finish, {stop}or choose another run_dir.")


# Locks this process holds, by directory: re-running the notebook's setup cell in the same kernel
# gets the lock it already has instead of being refused by itself. Weak, so a lock nobody keeps is
# released when it is garbage-collected.
_HELD_LOCKS = weakref.WeakValueDictionary()


def _lock_key(path: Path) -> str:
    return os.path.realpath(path)


def _own_lock(path: Path):
    lock = _HELD_LOCKS.get(_lock_key(path))
    return lock if lock is not None and lock.held and lock.pid == os.getpid() else None


def lock_holder(run_dir: str | os.PathLike) -> int | None:
    """The PID of another live process that holds `<run_dir>/.lock` (0 if its PID is unreadable),
    or None when the directory is free or this process holds it. Writes nothing."""
    path = Path(run_dir).expanduser()
    lock_path = path / LOCK_FILE
    if fcntl is None or not lock_path.is_file() or _own_lock(path) is not None:
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:  # a shared lock conflicts with the holder's exclusive one; taken and dropped at once
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunDirLock:
    """This process's claim on a run directory: an exclusive flock on `<run_dir>/.lock`, which holds
    the PID. Keep it in a variable as long as the run writes there (the notebook: the kernel's
    lifetime). The OS drops the lock when the process ends, however it ends (SIGKILL included), so a
    crashed run never leaves a stale lock; release() drops it earlier. The file itself stays:
    deleting a lock file races with a process that has just opened it.
    """

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self.pid, self._fd = Path(run_dir), os.getpid(), fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.pid == os.getpid() and fcntl is not None:  # a forked child must not unlock its parent's lock
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self):
        return f"RunDirLock({str(self.run_dir)!r}, pid={self.pid}, held={self.held})"


def _acquire_lock(path: Path) -> RunDirLock:
    """Lock `path` for this process or raise ParameterError naming the PID that holds it."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, _ordinary_file_mode())
    except OSError as exc:
        raise ParameterError(f"run_dir = {str(path)!r} is not writable ({exc.strerror}): use a "
                             "directory you can write to, or '' for runs/<date-time>/") from None
    if fcntl is None:  # pragma: no cover - no flock on this platform: unlocked, as before
        os.close(fd)
        return RunDirLock(path, None)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise ParameterError(_busy_message(path, pid)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = RunDirLock(path, fd)
    _HELD_LOCKS[_lock_key(path)] = lock
    return lock


def check_run_dir(run_dir: str | os.PathLike, resume: str = "", overwrite: bool = False) -> Path:
    """Refuse, before anything is written, a run directory that is a file, that another live process
    is writing to, or that holds a run this one is not resuming (unless `overwrite`). Writes nothing,
    so it can run first; claim_run_dir() repeats the checks under the lock."""
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ParameterError(f"run_dir = {str(path)!r} is a file, not a directory: use a directory "
                             "path, or '' for runs/<date-time>/")
    pid = lock_holder(path)
    if pid is not None:
        raise ParameterError(_busy_message(path, pid))
    _refuse_other_run(path, resume, overwrite)
    return path


def claim_run_dir(run_dir: str | os.PathLike, resume: str = "", overwrite: bool = False) -> RunDirLock:
    """Make `run_dir` this run's own: create it (with grids/), lock it for this process, and check
    under the lock that it holds no run this one would overwrite; with `overwrite`, delete the old
    run's files first. Call it after the settings, the data and the checkpoint have all been
    checked, so a refused run has changed nothing. Returns the lock: keep it (see RunDirLock).

    `resume` is the resume parameter: a checkpoint inside `run_dir` continues that run there.
    """
    path = check_run_dir(run_dir, resume, overwrite)
    try:
        (path / "grids").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(f"run_dir = {str(path)!r} cannot be created ({exc.strerror}): use a "
                             "directory you can write to, or '' for runs/<date-time>/") from None
    lock = _own_lock(path)
    fresh = lock is None
    lock = lock or _acquire_lock(path)
    try:
        _refuse_other_run(path, resume, overwrite)  # again: nobody else can start there now
        if overwrite:
            clear_run_files(path)
    except BaseException:
        if fresh:
            lock.release()
        raise
    return lock


def clear_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete a run's files (RUN_OUTPUTS, grids, temporary files of dead processes) from `run_dir`;
    other files stay. Returns what was deleted."""
    path = Path(run_dir).expanduser()
    gone = run_files(path)
    for f in gone:
        f.unlink(missing_ok=True)
    for name in RUN_OUTPUTS:
        gone += remove_dead_temp_files(path / name, ".tmp")
    return gone


def remove_grids_after(run_dir: str | os.PathLike, epoch: int) -> list[Path]:
    """Delete grids/epoch_N.png for N > `epoch`: pictures of epochs that a resume or a rollback
    undid, which would otherwise appear in progress.gif. Returns what was deleted."""
    stale = [p for p in epoch_grid_paths(run_dir) if int(p.stem.split("_")[1]) > epoch]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda if available, then mps, then cpu. A device that is not there is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device = {requested!r} but PyTorch sees no CUDA GPU here: use 'auto' or 'cpu'")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ParameterError("device = 'mps' but MPS is not available here: use 'auto' or 'cpu'")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (all devices') generators."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """PyTorch's generator states (CPU and every CUDA device), as tensors a checkpoint can hold."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def library_versions() -> dict:
    """Versions that decide whether a run can be repeated."""
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=str) + "\n").encode())


# --------------------------------------------------------------------------------------------
# Per-epoch log (metrics.csv)
# --------------------------------------------------------------------------------------------

def write_metrics_csv(path: str | os.PathLike, history: list[dict]) -> None:
    """Write the whole per-epoch history as CSV (atomically; columns = union of all keys)."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """Read metrics.csv back as a list of dicts of floats."""
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


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


# --------------------------------------------------------------------------------------------
# Image grids and animations
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
    frames = [Image.open(p) for p in frame_paths]
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
    labels = [f"epoch {int(p.stem.split('_')[1])}" for p in frames]
    return save_gif(frames, Path(run_dir) / "progress.gif", labels=labels)


def epoch_grid_paths(run_dir: str | os.PathLike) -> list[Path]:
    """The per-epoch grid PNGs of a run, in epoch order."""
    return sorted(Path(run_dir, "grids").glob("epoch_*.png"), key=lambda p: int(p.stem.split("_")[1]))


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


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_images(generator: torch.nn.Module, n: int, latent_dim: int, seed: int | None = None) -> torch.Tensor:
    """n samples of `generator` in eval mode (BatchNorm uses its running statistics), 1,000 at a time.

    With a seed the latents come from their own random generator (the same images every call, the
    training's random stream untouched); without one, from the global stream."""
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    z = torch.randn(n, latent_dim, device=device, generator=rng)
    return torch.cat([generator.eval()(chunk) for chunk in z.split(1000)])


def adam_kernel(device: torch.device) -> dict:
    """Adam's fastest implementation here: the fused kernel (all tensors in one pass) on CPU and
    CUDA, the foreach one elsewhere (e.g. MPS). Pass as torch.optim.Adam(..., **adam_kernel(dev))."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) inside the block; the previous setting after it.

    "highest" is plain float32. "high" lets NVIDIA GPUs use TF32; "medium" lets CPUs with AMX (and
    GPUs) compute float32 matmuls in bfloat16 with float32 accumulation: 2-3x faster matmuls, about
    3 significant digits. The notebook trains inside this block and evaluates outside it, so Parzen
    and the Frechet distance always see full float32 matmuls.
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class DivergenceError(RuntimeError):
    """Training produced NaN or inf losses."""


def divergence_message(step: int, epoch: int, config: dict, checkpoint: Path) -> str:
    return (
        f"Training diverged: a loss became NaN or inf in epoch {epoch + 1} (step {step}). The models "
        f"were rolled back to the last completed epoch, saved in {checkpoint}. Look at: lr_d "
        f"(now {config['lr_d']}) and lr_g (now {config['lr_g']}) -- halve them; beta1 "
        f"(now {config['beta1']}); batch_size (now {config['batch_size']}); "
        f"g_loss (now {config['g_loss']!r}; 'non_saturating' is the stable one). Then resume with "
        f"resume={str(checkpoint)!r}."
    )


def _double_quoted(text: str) -> str:
    """`text` quoted for a POSIX shell, in double quotes where that is safe (easier to read)."""
    return f'"{text}"' if not any(c in text for c in '"$`\\!') else shlex.quote(text)


DEFAULT_NOTEBOOK = "Vanilla_GAN.ipynb"  # what `make run` runs unless NOTEBOOK= says otherwise


def notebook_of_run(run_dir: str | os.PathLike) -> str:
    """The notebook that wrote the run in `run_dir` (config.json's "notebook"; MNIST's by default)."""
    try:
        return json.loads(Path(run_dir, "config.json").read_text()).get("notebook", DEFAULT_NOTEBOOK)
    except (OSError, ValueError, AttributeError):
        return DEFAULT_NOTEBOOK


def resume_command(checkpoint: str | os.PathLike) -> str:
    """The shell command that continues a run headless, quoted so that any path works (spaces too):
    make passes PARAMS to the shell unquoted, so the path inside it carries its own quotes."""
    checkpoint = Path(checkpoint)
    params = "-p resume " + shlex.quote(str(checkpoint))
    notebook = notebook_of_run(checkpoint.parent)
    which = "" if notebook == DEFAULT_NOTEBOOK else f"NOTEBOOK={shlex.quote(notebook)} "
    return f"make run {which}RUN_DIR={shlex.quote(str(checkpoint.parent))} PARAMS={_double_quoted(params)}"


def resume_message(checkpoint: Path, epoch: int) -> str:
    checkpoint = Path(checkpoint)
    return (
        f"Saved {checkpoint} after epoch {epoch}. To continue: in Jupyter, run the training cell "
        f"again (or set resume = {str(checkpoint)!r} after a restart); headless, "
        f"`{resume_command(checkpoint)}` (papermill: `-p resume {shlex.quote(str(checkpoint))}`); "
        f"the run continues in {checkpoint.parent}."
    )


def epoch_means(sums: torch.Tensor, steps: int) -> dict:
    """Per-epoch averages from train_step's running sums [D loss, D(x), D(G(z)), G loss, G steps]
    (this .tolist() is the host sync the training loop makes every log_every steps)."""
    loss_d, d_x, d_gz, loss_g, g_steps = sums.tolist()
    return {"d_loss": loss_d / steps, "g_loss": loss_g / max(g_steps, 1), "d_x": d_x / steps, "d_g_z": d_gz / steps}


def epoch_summary(row: dict) -> str:
    """The line printed after each epoch: losses, D's outputs, the quick scores, training time."""
    scores = f"  FD {row['fd']:.2f}  score {row['score']:.2f}" if "fd" in row else ""
    return (f"epoch {int(row['epoch']):3d}  D loss {row['d_loss']:.3f}  G loss {row['g_loss']:.3f}  "
            f"D(x) {row['d_x']:.2f}  D(G(z)) {row['d_g_z']:.2f}{scores}  [{row['train_seconds']:.0f} s]")


def snapshot(config: dict, epoch: int, parts: dict, fixed_noise: torch.Tensor, history: list) -> dict:
    """Everything needed to continue exactly after `epoch`, as a plain dict (what checkpoint.pt holds:
    torch.load(weights_only=True) reads it): the settings, every part's state_dict, the fixed noise,
    the random-number state and the history. Deep copies, so later training cannot change it."""
    return copy.deepcopy({"config": config, "epoch": epoch, **{k: part.state_dict() for k, part in parts.items()},
                          "fixed_noise": fixed_noise, "rng": rng_state(), "history": history})


def roll_back(state: dict, parts: dict, checkpoint_path: Path, run_path: Path) -> tuple[list, int]:
    """Put the models, the random numbers and the files back to the snapshot `state` (after an
    interrupt or a NaN): memory and disk then agree, and re-running the training cell continues from
    there. Returns the snapshot's (history, epoch) for the notebook's variables."""
    for key, part in parts.items():
        # A copy: an optimizer's load_state_dict keeps the given state tensors as its own, so training
        # after the rollback would change the snapshot, and a second rollback to it would be inexact.
        part.load_state_dict(copy.deepcopy(state[key]))
    set_rng_state(state["rng"])
    history = copy.deepcopy(state["history"])
    save_checkpoint(checkpoint_path, state)
    remove_grids_after(run_path, state["epoch"])  # the unfinished epoch's grid, if it was written
    if history:
        write_metrics_csv(Path(run_path) / "metrics.csv", history)
    return history, state["epoch"]


@contextlib.contextmanager
def rolled_back_when_stopped(roll_back_to_last_good: Callable[[], int], checkpoint_path: Path):
    """The training loop's safety net. Ctrl-C, the stop button or SIGTERM (KeyboardInterrupt), and a
    NaN loss (DivergenceError), call `roll_back_to_last_good()` (it returns the epoch it went back
    to), with a second interrupt held until its save is done, then re-raise; an interrupt also
    prints how to resume."""
    with sigterm_as_interrupt():
        try:
            yield
        except KeyboardInterrupt:
            with interrupts_deferred(reraise=False):
                epoch = roll_back_to_last_good()
                print("Interrupted: the unfinished epoch was rolled back. " + resume_message(checkpoint_path, epoch))
            raise
        except DivergenceError:
            with interrupts_deferred(reraise=False):
                roll_back_to_last_good()  # the error's message says which settings to look at
            raise


# --------------------------------------------------------------------------------------------
# Stopping safely: SIGTERM and a second interrupt
# --------------------------------------------------------------------------------------------

def _in_main_thread() -> bool:
    """Python lets only the main thread set signal handlers."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block, SIGTERM (what `kill`, a job scheduler or a closing terminal sends) raises
    KeyboardInterrupt in the main thread, as Ctrl-C does: the training cell's rollback-and-save path
    runs instead of the process dying with the unfinished epoch's work and no checkpoint. The
    previous handler is back after the block. Outside the main thread it does nothing."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred(reraise: bool = True, report: Callable[[str], None] = print):
    """Hold SIGINT and SIGTERM until the block ends: wrap the rollback's save in it, so that a
    second Ctrl-C (or a SIGTERM) cannot cut the checkpoint short and lose the last good epoch.

    Yields the list of signals held. After the block, a held signal is reported, and with `reraise`
    turned into KeyboardInterrupt (unless the block raised already); without it, only reported -- for
    a block that is followed by a `raise` anyway. The previous handlers are back after the block.
    Outside the main thread it holds nothing.
    """
    held = []
    if not _in_main_thread():
        yield held
        return
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held:
        names = " and ".join(dict.fromkeys(signal.Signals(s).name for s in held))
        report(f"{names} arrived while saving; held until the save was complete.")
        if reraise:
            raise KeyboardInterrupt(f"{names} received (held during the save)")


# --------------------------------------------------------------------------------------------
# Checkpoints and export
# --------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "vanilla-gan-checkpoint/1"
# What the notebook's snapshot() puts in a checkpoint: a file without one of them cannot be resumed.
CHECKPOINT_KEYS = ("config", "epoch", "G", "D", "G_ema", "opt_G", "opt_D", "fixed_noise", "rng", "history")
# Settings that fix the networks' shapes: a checkpoint made with other values cannot be loaded.
ARCHITECTURE_KEYS = ("latent_dim", "g_batchnorm")


class CheckpointError(RuntimeError):
    """A file is not a checkpoint of this project, or does not fit the notebook's settings."""


class DiskFullError(OSError):
    """A write failed for lack of space (or quota); the message says which file was left as it was."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_owner(temp: Path, path: Path, suffix: str) -> int | None:
    """The PID in a temporary name `<name>.<pid>.<random><suffix>`; None for other names."""
    middle = temp.name[len(path.name) + 1:-len(suffix)]
    pid = middle.split(".", 1)[0]
    return int(pid) if pid.isdigit() and "." in middle else None


def remove_dead_temp_files(path: str | os.PathLike, suffix: str) -> list[Path]:
    """Delete the temporary files beside `path` (`<name>.<pid>.<random><suffix>`, as
    _new_file_replacing names them) whose process is gone, killed while writing. Those of live
    processes, this one's included, stay: they may be writing right now. Returns what was deleted."""
    path = Path(path)
    stale = []
    for temp in path.parent.glob(f"{glob.escape(path.name)}.*{suffix}"):
        pid = _temp_owner(temp, path, suffix)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            temp.unlink(missing_ok=True)
            stale.append(temp)
    return stale


@contextlib.contextmanager
def _new_file_replacing(path: Path, suffix: str):
    """Yield (file, its path): a new file beside `path`. When the block ends without an error, the
    file is flushed, fsynced, given ordinary permissions and renamed over `path`; on any error it is
    removed. So a crash leaves either the old file or the new one, never half of one.

    Same directory, so the rename is atomic (one filesystem); the directory is fsynced afterwards
    so the rename itself survives a power cut.
    """
    path = Path(path)
    # The PID in the name tells a later cleanup whether the writer is still alive.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _ordinary_file_mode())  # mkstemp makes 0o600; readable by others like any new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half.
    A full disk raises DiskFullError saying that the file was left as it was."""
    path = Path(path)
    try:
        with _new_file_replacing(path, suffix=".tmp") as (f, _):
            f.write(data)
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS or isinstance(exc, DiskFullError):
            raise
        raise DiskFullError(exc.errno, f"{exc.strerror} while writing {path}: the file was left as it "
                            f"was ({_free_space(path.parent)} free there). Free some space, or write "
                            "the run to another disk (run_dir).") from exc


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 1e6:,.1f} MB"
    except OSError:
        return "unknown space"


def _saved_epoch(path: Path) -> int | None:
    """The epoch of the checkpoint at `path`, or None when there is none or it cannot be read."""
    try:
        return load_checkpoint(path, required_keys=("epoch",))["epoch"]
    except (CheckpointError, KeyError, OSError):
        return None


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> Path:
    """Save a plain-dict checkpoint atomically, stamped with this project's format tag.

    On a full disk the previous checkpoint stays, and the DiskFullError says which epoch it holds
    and how to resume from it once there is space.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except DiskFullError as exc:
        raise DiskFullError(exc.errno, _disk_full_message(path, checkpoint.get("epoch"))) from exc
    remove_dead_temp_files(path, ".tmp")  # left by a process killed mid-write
    return path


def _disk_full_message(path: Path, epoch) -> str:
    kept = _saved_epoch(path)
    state = (f"{path} was not changed and still holds epoch {kept}, the last good checkpoint"
             if kept is not None else f"no checkpoint was written to {path}")
    then = (f"then resume from it: `{resume_command(path)}` (in Jupyter: set resume = {str(path)!r})"
            if kept is not None else "then start the run again")
    return (f"No space left on the device while saving the checkpoint of epoch {epoch}: {state}. "
            f"Free some space ({_free_space(path.parent)} free in {path.parent}), {then}.")


def load_checkpoint(path: str | os.PathLike, map_location="cpu", required_keys=CHECKPOINT_KEYS) -> dict:
    """Load a checkpoint with `weights_only=True` (opening it can never run code from it), and check
    that it holds `required_keys`: a tagged file without them would fail later with a bare KeyError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the `resume` parameter.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refused object: the pickle itself is broken
            raise CheckpointError(f"{path} is not a readable checkpoint of this project (its contents "
                                  "cannot be unpickled). Point `resume` at a checkpoint.pt written by "
                                  "Vanilla_GAN.ipynb.") from None
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain data, so it was refused "
            "without running any of it. Checkpoints of this project never do: point `resume` at a "
            "checkpoint.pt written by Vanilla_GAN.ipynb."
        ) from None
    except Exception as exc:  # truncated zip, not a torch file at all
        raise CheckpointError(
            f"{path} is not a readable checkpoint of this project ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Point `resume` at a "
            "checkpoint.pt written by Vanilla_GAN.ipynb."
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this project "
                              f"(no format tag {CHECKPOINT_FORMAT!r}); point `resume` at a "
                              "checkpoint.pt written by Vanilla_GAN.ipynb.")
    missing = [key for key in required_keys if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is a checkpoint of this project but lacks {', '.join(missing)}: "
                              "it is incomplete or was written by other code, and cannot be resumed. "
                              "Point `resume` at another checkpoint.pt, or start afresh with resume=''.")
    return checkpoint


def check_checkpoint_fits(checkpoint_config: dict, config: dict, keys=ARCHITECTURE_KEYS) -> None:
    """Raise CheckpointError listing every architecture setting where checkpoint and notebook differ."""
    diffs = [f"{k}: checkpoint has {checkpoint_config.get(k)!r}, notebook has {config.get(k)!r}"
             for k in keys if checkpoint_config.get(k) != config.get(k)]
    if diffs:
        raise CheckpointError("the checkpoint does not fit the notebook's settings:\n  - "
                              + "\n  - ".join(diffs)
                              + "\nSet these parameters as the checkpoint has them, or start afresh with resume=''.")


def export_generator(generator: torch.nn.Module, latent_dim: int, path: str | os.PathLike,
                     image_shape: tuple = (1, 28, 28)) -> Path:
    """Export the generator with torch.export (eval mode, dynamic batch) to a .pt2 file.

    Load it anywhere with `torch.export.load(path).module()`: noise (N, latent_dim) -> images
    (N, *image_shape) in [-1, 1], for any batch size N >= 1 (no upper bound: memory is the limit).
    """
    # Whatever the generator's output layout (flat 784 pixels for the MLP), (N, C, H, W) images:
    # the layout other tools expect.
    shape = (torch.nn.Flatten(), torch.nn.Unflatten(1, tuple(image_shape)))
    model = torch.nn.Sequential(copy.deepcopy(generator), *shape).cpu().eval()
    example = torch.randn(4, latent_dim)
    batch = torch.export.Dim("batch", min=1)  # an upper bound would be a guard that fails above it
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


# --------------------------------------------------------------------------------------------
# Reading the notebook's own code (so scripts and tests use the same networks, step and defaults)
# --------------------------------------------------------------------------------------------

def notebook_cells_source(notebook: str | os.PathLike, tag: str) -> str:
    """The source of the notebook's code cells carrying `tag`, joined in order."""
    nb = json.loads(Path(notebook).read_text())
    sources = ["".join(c["source"]) for c in nb["cells"]
               if c["cell_type"] == "code" and tag in c.get("metadata", {}).get("tags", [])]
    if not sources:
        raise ValueError(f"{notebook} has no code cell tagged {tag!r}")
    return "\n\n".join(sources)


def notebook_defaults(notebook: str | os.PathLike, rules: dict = PARAMETER_RULES) -> dict:
    """The default hyperparameters: the notebook's `parameters` cell, executed on its own."""
    namespace = {"os": os}
    exec(notebook_cells_source(notebook, "parameters"), namespace)
    return {k: v for k, v in namespace.items() if k in rules}


def load_notebook_definitions(notebook: str | os.PathLike, tag: str = "gan-core") -> dict:
    """Execute the notebook's cells tagged `tag` (class and function definitions only) in a fresh
    namespace and return it: the networks, losses and training step exactly as the notebook defines
    them. The cells see copy, math, torch, nn, F and gu (this module) as the notebook's first cell imports them."""
    import torch.nn.functional as F
    namespace = {"__name__": Path(notebook).stem, "copy": copy, "math": math, "torch": torch, "nn": torch.nn,
                 "F": F, "gu": sys.modules[__name__]}
    exec(compile(notebook_cells_source(notebook, tag), str(notebook), "exec"), namespace)
    return namespace
