"""Choices made by the hardware at hand, none of which changes what a step computes.

* The CPU: `cpu_description` (the model, AMX / AVX-512 / AVX2 only, any cap), which every run
  records in config.json so that its times name the machine.
* `resolve_matmul_precision`: what `matmul_precision = "auto"` means here: bfloat16 matmuls where a
  few seconds' timing of the step's own layers (`medium_precision_speedup`, cached per machine by
  `measured_speedup`) finds them clearly faster than float32, as on a CPU with AMX; else float32.
  Nothing here changes the networks: they are the same on every machine.
* `conv_memory_format`: the layout of a convolutional network's weights (channels_last on a CPU).
* `pick_device`, `adam_kernel` (fused Adam where it exists), `float32_matmul_precision` (the block
  the training runs in).
* `step_runner`: the training step either as written (eager, the reference) or captured in CUDA
  graphs (`cuda_graphs = True`): one graph per kind of step, replayed with no Python or kernel launch
  overhead. The step is split into `step_schedule` (what a step does: a function of the epoch and
  step alone) and `apply_step` (doing it), so both paths run the same code.

Nothing here holds global state: a runner belongs to one run of the training cell.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from gan.errors import ParameterError

def cpu_model() -> str:
    """The CPU's model name (as lscpu shows it), or the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description(cpuinfo: str | None = None, environ=os.environ) -> str:
    """The CPU as timings must name it: its model, the widest vector instructions it has (AMX,
    AVX-512 or AVX2 only), and any cap on what PyTorch may use (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set(cpuinfo.split())
    isa = ("AMX" if "amx_bf16" in flags else "AVX-512, no AMX" if "avx512f" in flags
           else "AVX2 only" if "avx2" in flags else "no AVX2")
    caps = [f"{name}={environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if environ.get(name)]
    return f"{cpu_model()} ({isa}{'; capped: ' + ', '.join(caps) if caps else ''})"


# "auto" takes bfloat16 ("medium") only where it measured at least this much faster than float32 on
# the step's own layers: it costs precision, so a tie (or a noisy 1.1x) stays in float32.
MEDIUM_PRECISION_MIN_SPEEDUP = 1.25


def mlp_step_layers(config: dict) -> list[tuple[int, int, int]]:
    """(rows, inputs, outputs) of the MLP step's largest layers: D's first two on a batch of real and
    fake images, and G's output layer."""
    bs, d, g_last = config["batch_size"], config["d_hidden"], config["g_hidden"][-1]
    return [(2 * bs, 784, d[0]), (2 * bs, d[0], d[1]), (bs, g_last, 784)]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a clock read after it counts them."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def medium_precision_speedup(device: torch.device, layers: list[tuple[int, int, int]], rounds: int = 4,
                             reps: int = 3) -> float:
    """How many times faster these linear layers train (forward, and the backward to input and weight,
    as in the step) at `matmul_precision = "medium"` (bfloat16 products on a CPU, TF32 or bfloat16 on
    a GPU) than in plain float32, summed over the layers. Each layer is timed at both precisions back
    to back, `rounds` times, and the best of each counts: load from other programs slows both alike
    or only some rounds, and the best is what the hardware can do."""
    device = torch.device(device)
    best = {"highest": [float("inf")] * len(layers), "medium": [float("inf")] * len(layers)}
    generator = torch.Generator().manual_seed(0)  # the run's own random stream is left untouched
    tensors = [tuple(torch.randn(shape, generator=generator).to(device).requires_grad_(grad)
                     for shape, grad in (((rows, n_in), True), ((n_out, n_in), True), ((rows, n_out), False)))
               for rows, n_in, n_out in layers]

    def train_layer(x, w, grad_out):
        return torch.autograd.grad(torch.nn.functional.linear(x, w), (x, w), grad_out)

    for _ in range(rounds):
        for i, layer in enumerate(tensors):
            for precision, times in best.items():
                with float32_matmul_precision(precision):
                    train_layer(*layer)  # warm-up: kernel selection, weight reorders at this precision
                    synchronize(device)
                    started = time.perf_counter()
                    for _ in range(reps):
                        train_layer(*layer)
                    synchronize(device)
                    times[i] = min(times[i], (time.perf_counter() - started) / reps)
    return sum(best["highest"]) / sum(best["medium"])


def _machine_key(device: torch.device, layers) -> str:
    """What a measured speed-up holds for: this CPU (or GPU), its caps, the threads, PyTorch, the layers."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    caps = ",".join(f"{k}={os.environ[k]}" for k in ("MKL_ENABLE_INSTRUCTIONS",) if os.environ.get(k))
    return (f"{cpu_description()} {caps}| {where} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__} | layers {sorted(map(tuple, layers))}")


def precision_cache_path() -> Path:
    from gan.image_data import user_cache_dir  # here, not at the top: gan.image_data imports gan.runs, which imports this module
    return user_cache_dir() / "matmul_precision.json"


def _read_speedups(path: Path) -> dict:
    """The cached speed-ups by machine key; {} (saying why) when the file is unreadable or not ours."""
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                                            for v in cached.values()):
            return cached
        raise ValueError("not a table of speed-ups")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        print(f"note: ignoring the cached precision measurements in {path} ({exc}); measuring again")
        return {}


def measured_speedup(device: torch.device, layers) -> tuple[float, str]:
    """(medium_precision_speedup for these layers on this machine, where it came from): measured once
    per machine (a few seconds: 7 s on one thread of a slow 2-core VM) and cached in the user's cache directory."""
    path, key = precision_cache_path(), _machine_key(device, layers)
    cached = _read_speedups(path)
    if key in cached:
        return cached[key], f"measured earlier, cached in {path}"
    started = time.perf_counter()
    speedup = medium_precision_speedup(device, layers)
    from gan.runs import write_json  # here, not at the top: gan.runs imports this module
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**cached, key: speedup})
    except OSError as exc:  # a read-only home: measured again next time, nothing else lost
        print(f"note: could not cache the precision measurement in {path} ({exc})")
    return speedup, f"measured now in {time.perf_counter() - started:.1f} s"


def resolve_matmul_precision(precision: str, device: torch.device, layers=None) -> tuple[str, str]:
    """(torch.set_float32_matmul_precision value, why) for the notebook parameter `matmul_precision`.

    "auto" times the step's own linear `layers` ((rows, inputs, outputs), e.g. mlp_step_layers) in
    float32 and at "medium" (bfloat16 products with float32 accumulation on a CPU; TF32 or bfloat16 on
    a GPU) on this machine, and takes "medium" where it trains them at least
    MEDIUM_PRECISION_MIN_SPEEDUP times as fast: 1.9-2.5x on a CPU with AMX, about 0.9x on an AVX-512 BF16
    CPU without AMX (docs/experiments.md). Networks without linear layers (DCGAN's convolutions) have
    nothing it would change: float32.
    """
    if precision != "auto":
        return precision, "as set"
    if not layers:
        return "highest", "auto: no matrix-multiply layers to speed up (the convolutions run in float32)"
    speedup, source = measured_speedup(torch.device(device), layers)
    chosen = "medium" if speedup >= MEDIUM_PRECISION_MIN_SPEEDUP else "highest"
    verdict = ("bfloat16 it is" if chosen == "medium" else
               f"under {MEDIUM_PRECISION_MIN_SPEEDUP}x, so float32")
    return chosen, (f"auto: the step's layers trained {speedup:.2f}x as fast with bfloat16 matmuls as in "
                    f"float32 here ({source}): {verdict}")


def conv_memory_format(device: torch.device) -> torch.memory_format:
    """The memory layout for a convolutional network's weights: channels_last on a CPU, where oneDNN's
    convolutions run in that layout natively (DCGAN.ipynb's step trained 1.17x the images per second,
    docs/experiments.md, "DCGAN on CIFAR-10"); unchanged elsewhere (untimed on GPUs). The weights' layout
    is only how they lie in memory: the networks compute the same function, to float32 rounding."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.preserve_format


# --------------------------------------------------------------------------------------------
# The device, and the kernels that run fastest on it
# --------------------------------------------------------------------------------------------

def mps_available() -> bool:
    """Apple's GPU backend (older PyTorch builds lack torch.backends.mps altogether)."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda if available, then mps, then cpu. A device that is not there is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device = {requested!r} but PyTorch sees no CUDA GPU here: use 'auto' or 'cpu'")
    if requested == "mps" and not mps_available():
        raise ParameterError("device = 'mps' but MPS is not available here: use 'auto' or 'cpu'")
    return torch.device(requested)


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


# --------------------------------------------------------------------------------------------
# The training step: eager, or captured in CUDA graphs
# --------------------------------------------------------------------------------------------

class CudaGraphBackend:
    """Captures and replays with torch.cuda.graphs (the real thing; needs a CUDA device)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    def warm_up(self, fn: Callable):
        # Eager steps before a capture run on a side stream, as torch.cuda.graphs asks: lazy
        # initialisation (cuBLAS handles, the allocator's pools) must not happen during capture.
        main = torch.cuda.current_stream(self.stream.device)  # the training device's, not cuda:0's
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn()
        main.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable):
        # Records fn's kernels without running them. The handle: the graph and fn's outputs, static
        # tensors that every replay overwrites in place.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            out = fn()
        return graph, out

    @staticmethod
    def replay(handle):
        graph, out = handle
        graph.replay()
        return out


class EagerBackend:
    """Stands in for CUDA graphs on a CPU (tests): "capturing" keeps the function and runs nothing,
    "replaying" runs it again on the same static buffers. Everything around the graphs (which
    buffers are static, when a graph is captured, re-captured or replayed) is then the real code."""

    def __init__(self):
        self.captures = 0

    @staticmethod
    def warm_up(fn: Callable):
        return fn()

    def capture(self, fn: Callable):
        self.captures += 1
        return fn

    @staticmethod
    def replay(handle):
        return handle()


def _captured_tensors(parts: dict) -> list[torch.Tensor]:
    """Every tensor a captured step reads or writes in place besides its static inputs: the networks'
    parameters and buffers and the optimizers' state. A graph holds their addresses; if one is
    replaced (an optimizer's load_state_dict after a resume or a rollback), the graph is stale."""
    tensors = []
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            tensors += list(part.parameters()) + list(part.buffers())
        elif isinstance(part, torch.optim.Optimizer):
            for state in part.state.values():
                tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


def _baked_in(parts: dict, settings: dict) -> tuple:
    """What a capture freezes besides tensors: the settings the step reads and the optimizers'
    learning rates and betas (Python numbers passed to the kernels as they are recorded)."""
    groups = [(g["lr"], tuple(g["betas"])) for part in parts.values() if isinstance(part, torch.optim.Optimizer)
              for g in part.param_groups]
    return tuple(sorted((k, repr(v)) for k, v in settings.items())), tuple(groups)


class CapturedSteps:
    """The notebook's step, replayed from CUDA graphs: `runner(real, epoch, step, steps_per_epoch)`
    returns what `train_step` returns and trains the same way.

    * One graph per kind of step: (G updated?, lazy R1 step?), so up to four. Each kind runs eagerly
      `warmup` times first (these are real training steps, not extra ones), then is captured once
      and replayed from then on.
    * Static inputs: the minibatch (copied into a fixed buffer before each replay) and the EMA's
      lerp weight 1 - beta_t (a 0-d tensor filled before each replay: it changes every step during
      the warm-up of the average). The noise is drawn inside the graph from torch's CUDA generator,
      which graphs advance as eager code does.
    * Re-captured: every graph, when a setting or a learning rate differs from the capture's, or
      when a tensor the graphs write (weights, BatchNorm statistics, Adam's moments) was replaced:
      after a resume or a rollback loads an optimizer's state. Checked at each epoch's first step
      (settings cannot change inside an epoch). A new run of the training cell makes a new runner,
      so a changed setting always starts from fresh graphs anyway.
    """

    def __init__(self, schedule: Callable, apply: Callable, parts: dict, settings: dict,
                 batch_shape: tuple, device: torch.device, backend=None, warmup: int = 3):
        self.schedule, self.apply, self.parts, self.settings = schedule, apply, parts, settings
        self.device = torch.device(device)
        self.backend = backend if backend is not None else CudaGraphBackend(self.device)
        self.warmup = warmup
        self.real = torch.zeros(batch_shape, device=self.device)  # the static minibatch
        self.ema_weight = torch.zeros((), device=self.device)      # the static 1 - beta_t
        self.graphs: dict[tuple, object] = {}                      # kind -> the backend's handle
        self.eager_steps: dict[tuple, int] = {}
        self.fingerprint = None
        if isinstance(self.backend, CudaGraphBackend):
            set_capturable(parts, True)

    def _current_fingerprint(self) -> tuple:
        return _baked_in(self.parts, self.settings), tuple(t.data_ptr() for t in _captured_tensors(self.parts))

    def __call__(self, real: torch.Tensor, epoch: int, step: int, steps_per_epoch: int) -> torch.Tensor:
        update_g, r1, ema_weight = self.schedule(epoch, step, steps_per_epoch, self.settings)
        kind = (update_g, r1, ema_weight is not None)
        if real.shape != self.real.shape:
            raise ValueError(f"a captured step takes minibatches of shape {tuple(self.real.shape)}, "
                             f"got {tuple(real.shape)}: re-run the training cell after changing batch_size")
        eager_so_far = self.eager_steps.get(kind, 0)
        if eager_so_far < self.warmup:
            self.eager_steps[kind] = eager_so_far + 1
            return self.backend.warm_up(lambda: self.apply(self.parts, real, self.settings, update_g, r1, ema_weight))
        if step == 1 or kind not in self.graphs:  # checked at each epoch's start, and before a capture
            fingerprint = self._current_fingerprint()
            if fingerprint != self.fingerprint:  # something the graphs baked in changed: capture anew
                self.graphs.clear()
                self.fingerprint = fingerprint
        self.real.copy_(real)
        if ema_weight is not None:
            self.ema_weight.fill_(ema_weight)
        if kind not in self.graphs:
            weight = self.ema_weight if ema_weight is not None else None
            self.graphs[kind] = self.backend.capture(
                lambda: self.apply(self.parts, self.real, self.settings, update_g, r1, weight))
        return self.backend.replay(self.graphs[kind])


def set_capturable(parts: dict, capturable: bool) -> None:
    """Adam's `capturable` flag on every optimizer of `parts`: True keeps its step count and bias
    corrections on the device, as a CUDA graph needs; off CUDA, Adam's foreach kernel (the one used
    on MPS) refuses True. The flag travels in checkpoints and snapshots, so each training run sets
    it for the step it runs."""
    for part in parts.values():
        if isinstance(part, torch.optim.Optimizer):
            for group in part.param_groups:
                group["capturable"] = capturable


def step_runner(method: dict, parts: dict, settings: dict, batch_shape: tuple, device: torch.device,
                cuda_graphs: bool, report: Callable[[str], None] = print) -> Callable:
    """The training step for one run of the training cell: `run(real, epoch, step, steps_per_epoch)`.

    `method` holds `train_step`, `step_schedule` and `apply_step`: the notebook's globals() (so that a
    cell that redefines one is what trains) or vars(gan.vanilla_gan). With `cuda_graphs` on a
    CUDA device, the step is captured (CapturedSteps); otherwise it is the notebook's `train_step`
    as written. `cuda_graphs` on another device falls back to it, and says so."""
    device = torch.device(device)
    if cuda_graphs and device.type == "cuda":
        return CapturedSteps(method["step_schedule"], method["apply_step"], parts, settings, batch_shape, device)
    set_capturable(parts, False)  # e.g. resuming on MPS from a checkpoint of a captured GPU run
    if cuda_graphs:
        report(f"cuda_graphs = True needs a CUDA device; this run trains on {device.type}, so the step "
               "runs as written (eager). Set cuda_graphs = False to silence this.")

    def run(real, epoch, step, steps_per_epoch):
        return method["train_step"](parts, real, epoch, step, steps_per_epoch, settings)

    return run
