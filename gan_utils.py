"""Everything `Vanilla_GAN.ipynb` should not have to show, but for the data and the run's files.

Here: minibatches, parameter checks, device choice and seeding, per-epoch logging, image grids and
animations, the plumbing around the notebook's training loop (sampling, matmul precision, latent
interpolation, snapshots and the rollback after an interrupt), the generator's `torch.export`, and
reading the notebook's own cells for the scripts. Elsewhere: MNIST on disk and in memory
(`mnist_data.py`); run directories, checkpoints, atomic writes and stopping safely on a signal
(`run_safety.py`); the quality metrics (`gan_metrics.py`), the step's speed (`gan_speed.py`) and the
closing plots (`gan_plots.py`). The method itself (networks, losses, the training step, the EMA and
its BatchNorm recalibration) is defined in the notebook, not here.

No module-level state: every function takes what it needs and returns what it makes.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mnist_data import to_unit_range
from run_safety import (ParameterError, atomic_write_bytes, epoch_grid_paths, interrupts_deferred, remove_grids_after,
                        resume_message, save_checkpoint, sigterm_as_interrupt)

# --------------------------------------------------------------------------------------------
# Minibatches
# --------------------------------------------------------------------------------------------


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
# Parameters, device, seeding
# --------------------------------------------------------------------------------------------

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


def _layer_widths(v):
    return isinstance(v, (list, tuple)) and len(v) >= 1 and all(_positive_int(w) for w in v)


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
    "g_hidden": (_layer_widths, "a list of hidden-layer widths (integers >= 1), e.g. [256, 512, 1024]; "
                                "in make run's PARAMS: -p g_hidden '[256, 512, 1024]' (papermill itself: -y 'g_hidden: [256, 512, 1024]')"),
    "d_hidden": (lambda v: v == "auto" or _layer_widths(v),
                 "'auto' or a list of hidden-layer widths (integers >= 1), e.g. [1024, 512, 256]; in make run's "
                 "PARAMS: -p d_hidden '[1024, 512, 256]' (papermill itself: -y 'd_hidden: [1024, 512, 256]')"),
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
    "beta2": (_unit_interval_open, "a number in [0, 1)"),
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
# the convolutional networks (the MLPs' g_hidden, d_hidden, g_batchnorm and d_dropout are not settings there).
DCGAN_PARAMETER_RULES = {
    **{k: v for k, v in PARAMETER_RULES.items() if k not in ("g_hidden", "d_hidden", "g_batchnorm", "d_dropout")},
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
    "beta2_g": "one beta2 now sets both networks' Adam beta2",
    "beta2_d": "one beta2 now sets both networks' Adam beta2",
}

# Settings added later, with the value that training had before them: a checkpoint that predates one
# trained with that value (retired_settings() says when it continues with another).
VALUE_BEFORE_SETTING = {"beta2": 0.999}


RUN_BOOKKEEPING = ("resume", "run_dir", "overwrite")  # where a run reads and writes, not how it trains


def settings_changed(checkpoint_config: dict, config: dict) -> dict:
    """{name: (value in the checkpoint, value now)} for each setting that differs, besides where the
    run reads and writes (RUN_BOOKKEEPING: a resume always changes them); a setting added after the
    checkpoint was made counts with the value it trained with (VALUE_BEFORE_SETTING)."""
    saved = {**VALUE_BEFORE_SETTING, **checkpoint_config}
    return {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v and k not in RUN_BOOKKEEPING}


def retired_settings(checkpoint_config: dict, config: dict) -> list[str]:
    """Notes for resuming a checkpoint made before some parameters were retired or added: one for each
    retired setting it recorded with a value other than what training now does, and one for each later
    setting whose value now differs from the one it trained with."""
    now = {"amp": False, "compile": False, "beta1_g": config["beta1"], "beta1_d": config["beta1"],
           "beta2_g": config["beta2"], "beta2_d": config["beta2"]}
    notes = [f"note: this checkpoint was trained with {name} = {checkpoint_config[name]!r}, a setting that "
             f"no longer exists ({why}); training continues with {now[name]!r}."
             for name, why in RETIRED_PARAMETERS.items()
             if name in checkpoint_config and checkpoint_config[name] != now[name]]
    notes += [f"note: this checkpoint predates the {name} setting and was trained with {name} = {before!r}; "
              f"training continues with {name} = {config[name]!r} (set {name} = {before!r} to keep it as it was)."
              for name, before in VALUE_BEFORE_SETTING.items()
              if name not in checkpoint_config and config[name] != before]
    return notes


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


def misspelt_parameters(namespace: dict, rules: dict = PARAMETER_RULES) -> dict:
    """Names in `namespace` (the notebook's globals()) that differ from a parameter only in case, such
    as `lr_D = 1e-4` typed in a new cell: the notebook reads `lr_d`, so it would be ignored without a
    word. validate_parameters() then names each as an unknown parameter and says which one was meant."""
    lowered = {name.lower() for name in rules}
    return {k: v for k, v in namespace.items()
            if k not in rules and not k.startswith("_") and k.lower() in lowered
            and isinstance(v, (bool, int, float, str, list, tuple, type(None)))}


def validate_parameters(config: dict, rules: dict = PARAMETER_RULES) -> None:
    """Check every parameter against `rules` before any work; one error lists each bad one and what
    it may be."""
    problems = []
    for name, value in config.items():
        if name in RETIRED_PARAMETERS:
            problems.append(f"{name} is no longer a parameter: {RETIRED_PARAMETERS[name]}; drop it")
            continue
        if name not in rules:
            close = [r for r in rules if r.lower() == name.lower()] or difflib.get_close_matches(name, rules, n=1)
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


# Settings that the cells before training used once (to load the data, pick the device, claim the
# run directory): changed in a new cell, re-running the training cell alone could not apply them.
SETUP_SETTINGS = ("data_dir", "dataset", "image_size", "train_subset", "device", "run_dir", "resume")


def check_setup_unchanged(applied: dict, config: dict) -> None:
    """ParameterError naming each SETUP_SETTINGS value that differs between `applied` (what the
    earlier cells used) and `config` (the parameters now), instead of training on without them."""
    changed = [f"{k}: {applied[k]!r} -> {config[k]!r}" for k in SETUP_SETTINGS
               if k in applied and k in config and applied[k] != config[k]]
    if changed:
        raise ParameterError(
            "these settings were used by the cells before training, so re-running the training cell "
            f"cannot apply them: {'; '.join(changed)}. Set them back, or restart the kernel and run the "
            "notebook from the top with the new values (to continue this run there, set resume to its "
            "checkpoint).")


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
        switch = "g_batchnorm = True" if "g_batchnorm" in config else "G's BatchNorm"  # DCGAN's has no switch
        problems.append(f"batch_size = {bs} with {switch}: BatchNorm needs at least 2 images per batch; use "
                        f"a batch_size from 2 to {n_train}" + (", or g_batchnorm = False" if "g_batchnorm" in config else ""))
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


def _mps_available() -> bool:
    """Apple's GPU backend (older PyTorch builds lack torch.backends.mps altogether)."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda if available, then mps, then cpu. A device that is not there is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device = {requested!r} but PyTorch sees no CUDA GPU here: use 'auto' or 'cpu'")
    if requested == "mps" and not _mps_available():
        raise ParameterError("device = 'mps' but MPS is not available here: use 'auto' or 'cpu'")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (all devices') generators."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """PyTorch's generator states (CPU, every CUDA device, Apple's MPS), as tensors a checkpoint can
    hold: the noise a run draws on a GPU comes from that GPU's generator."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned. The states go back through the CPU: a checkpoint loaded
    with map_location=<the GPU> holds them on the GPU, where torch.set_rng_state refuses them."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs restores the ones this machine has (the run
        # trains on one); set_rng_state_all would fail on the others.
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"].cpu())


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


def snapshot(config: dict, epoch: int, parts: dict, fixed_noise: torch.Tensor, history: list) -> dict:
    """Everything needed to continue exactly after `epoch`, as a plain dict (what checkpoint.pt holds:
    torch.load(weights_only=True) reads it): the settings, every part's state_dict, the fixed noise,
    the random-number state and the history. Deep copies, so later training cannot change it."""
    return copy.deepcopy({"config": config, "epoch": epoch, **{k: part.state_dict() for k, part in parts.items()},
                          "fixed_noise": fixed_noise, "rng": rng_state(), "history": history})


def restore_training_state(state: dict, parts: dict) -> tuple[list, int]:
    """Load a snapshot or checkpoint `state` into the training parts and the random-number
    generators; returns copies of its (history, epoch). Copies throughout: an optimizer's
    load_state_dict keeps the given state tensors as its own, so training would otherwise change
    `state`, and loading it again (a second rollback, the build cell run again) would be inexact."""
    for key, part in parts.items():
        part.load_state_dict(copy.deepcopy(state[key]))
        if isinstance(part, torch.optim.Optimizer):
            lay_out_like_params(part)
    set_rng_state(state["rng"])
    return copy.deepcopy(state["history"]), state["epoch"]


def lay_out_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give each of the optimizer's state tensors its parameter's memory layout (strides). A model's
    load_state_dict keeps the model's layout, an optimizer's keeps the saved one; the fused Adam kernel
    reads a parameter and its moments element by element in memory order, so a checkpoint written in
    another layout (channels_last on a CPU, not on a GPU, or by an older version) would silently
    pair the wrong numbers. The values are unchanged."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def roll_back(state: dict, parts: dict, checkpoint_path: Path, run_path: Path) -> tuple[list, int]:
    """Put the models, the random numbers and the files back to the snapshot `state` (after an
    interrupt or a NaN): memory and disk then agree, and re-running the training cell continues from
    there. Returns the snapshot's (history, epoch) for the notebook's variables."""
    history, epoch = restore_training_state(state, parts)
    save_checkpoint(checkpoint_path, state)
    remove_grids_after(run_path, epoch)  # the unfinished epoch's grid, if it was written
    if history:
        write_metrics_csv(Path(run_path) / "metrics.csv", history)
    return history, epoch


@contextlib.contextmanager
def rolled_back_when_stopped(roll_back_to_last_good: Callable[[], int], checkpoint_path: Path):
    """The training loop's safety net. Ctrl-C, the stop button or SIGTERM (KeyboardInterrupt), a NaN
    loss (DivergenceError) and any other error in an epoch (a full disk, out of memory) call
    `roll_back_to_last_good()` (it returns the epoch it went back to), with a second interrupt held
    until its save is done, then re-raise: re-running the training cell then trains the unfinished
    epoch once, not on top of its half. An interrupt also prints how to resume."""
    with sigterm_as_interrupt():
        try:
            yield
        except KeyboardInterrupt:
            with interrupts_deferred(reraise=False):
                epoch = roll_back_to_last_good()
                print("Interrupted: the unfinished epoch was rolled back. " + resume_message(checkpoint_path, epoch))
            raise
        except Exception as error:
            with interrupts_deferred(reraise=False):
                try:
                    epoch = roll_back_to_last_good()
                except Exception as failed:  # e.g. the disk is still full: the error above is the news
                    print(f"note: rolling back after {type(error).__name__} failed too ({type(failed).__name__}: "
                          f"{failed}); restart the kernel and resume from {checkpoint_path}.")
                else:
                    if not isinstance(error, DivergenceError):  # its message says which settings to look at
                        print(f"{type(error).__name__} in epoch {epoch + 1}: that epoch was rolled back. "
                              + resume_message(checkpoint_path, epoch))
            raise


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


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
    them. The cells see copy, math, torch, nn, F, gu (this module) and gs (gan_speed) as the notebook's
    first cell imports them."""
    import torch.nn.functional as F
    import gan_speed  # here, not at the top: gan_speed needs nothing of this module, nor this module of it
    namespace = {"__name__": Path(notebook).stem, "copy": copy, "math": math, "torch": torch, "nn": torch.nn,
                 "F": F, "gu": sys.modules[__name__], "gs": gan_speed}
    exec(compile(notebook_cells_source(notebook, tag), str(notebook), "exec"), namespace)
    return namespace
