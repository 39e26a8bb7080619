"""How fast does the notebook train, against a naive pipeline and against this machine's own limit?

Measures, in one process on one machine:
  (a) the notebook's training step (its own `train_step`: Algorithm 1's D and G updates, the lazy R1
      step every `r1_every` steps and the EMA update, with its networks and default settings,
      imported from gan/vanilla_gan.py, which the notebook exports: no second copy that can drift),
      on the dataset held as one tensor;
  (b) a naive reference pipeline, written the way typical GAN repos train: torchvision's MNIST
      Dataset with ToTensor + Normalize, a shuffling DataLoader, Sigmoid + BCELoss, a fresh noise
      batch (second G forward) for the generator step, default Adam, `.item()` every step;
  (c) the fp32 matrix-multiply peak (GFLOP/s) of this machine, measured on the spot, and how much
      faster its largest layers train with bfloat16 matmuls (what `"auto"` decides on);
  (d) a short training run of the notebook's recipe: minutes of training to a score of 9.
It prints images/s for (a) and (b), their ratio, (a)'s FLOP rate as a share of (c) and peak memory,
and writes the figures as JSON.

    python scripts/benchmark.py --data-dir /path/to/data            # CPU, the notebook's default batch size
    python scripts/benchmark.py --device cuda --matmul-precision high   # a GPU, with TF32 matmuls
    python scripts/benchmark.py --dcgan --data-dir /path/to/data   # DCGAN.ipynb against pytorch/examples' DCGAN
    python scripts/benchmark.py --score-epochs 0                   # (a), (b), (c) only: skip the timed training run
    python scripts/benchmark.py --quick                            # only the `make run` time to expect here (minutes: mostly one evaluation row)
    python scripts/benchmark.py --device cuda --cuda-graphs        # (a) replayed from CUDA graphs
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # --quick counts the start-up (imports, data) as part of a run

import argparse
import os
import tempfile
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gan/ and gan_utils.py

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import gan_utils as gu
from gan import metrics as gm
from gan import dcgan, hardware, image_data, mnist_data, runs, settings
from gan import vanilla_gan as method
from gan.errors import ParameterError


def matmul_peak_gflops(device: torch.device, sizes=(1024, 2048, 3072), seconds: float = 1.0) -> float:
    """Best fp32 GFLOP/s of square matmuls: the machine's practical ceiling for this workload."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        for _ in range(3):  # warm-up: thread pools, caches, kernel selection
            a @ b
        hardware.synchronize(device)
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            reps += 1
        hardware.synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - started) / 1e9)
    return best


class CountFlops(TorchDispatchMode):
    """Counts the FLOPs of matrix multiplies (forward, backward, and a gradient of a gradient) with
    torch's own per-operator formulas. torch.utils.flop_counter.FlopCounterMode would do the same but
    its module hooks refuse torch.autograd.grad, which the R1 penalty needs."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def build_models(cfg: dict, device: torch.device):
    torch.manual_seed(cfg["seed"])
    G = method.Generator(cfg["latent_dim"], cfg["g_hidden"], cfg["g_batchnorm"]).to(device)
    D = method.Discriminator(cfg["d_hidden"], cfg["d_dropout"]).to(device)
    return G, D


def time_notebook_step(cfg: dict, train_x: torch.Tensor, seconds: float, profile_steps: int = 0,
                       cuda_graphs: bool = False) -> dict:
    """(a): the notebook's train_step over its minibatches, as the training cell runs it (replayed
    from CUDA graphs if cuda_graphs, on a CUDA device); then, if profile_steps, torch.profiler over
    that many more steps: where the step's time goes. The caller sets the matmul precision, as the
    training cell does."""
    device = train_x.device
    torch.manual_seed(cfg["seed"])
    parts = method.build_training_parts(cfg, device)
    bs = cfg["batch_size"]
    steps_per_epoch = len(train_x) // bs
    r1_every = cfg["r1_every"] if cfg["r1_gamma"] > 0 else 0
    runner = hardware.step_runner(vars(method), parts, cfg, (bs, *train_x.shape[1:]), device, cuda_graphs)

    def step(real, number, epoch=0):
        return runner(real, epoch, number, steps_per_epoch)

    real = train_x[:bs]
    # Matmul FLOPs, forward and backward, of a plain step and of a step with the R1 penalty: on average
    # one step in r1_every carries the penalty.
    with CountFlops() as counter:
        step(real, 1)
    flops_per_step = counter.flops
    if r1_every:
        with CountFlops() as counter:
            step(real, r1_every)
        flops_per_step += (counter.flops - flops_per_step) / r1_every
    for number in range(1, 6):  # warm-up: thread pools, allocator, kernel selection
        step(real, number)
    hardware.synchronize(device)
    images, epoch, started = 0, 0, time.perf_counter()
    sums = torch.zeros(5, device=device)
    while time.perf_counter() - started < seconds:
        for number, real in enumerate(gu.minibatches(train_x, bs, cfg["seed"], epoch), 1):
            sums += step(real, number, epoch)
            images += bs
            if images % (bs * cfg["log_every"]) == 0 and time.perf_counter() - started >= seconds:
                break
        epoch += 1
    sums.tolist()  # the host sync the training cell makes every log_every steps
    elapsed = time.perf_counter() - started
    result = {"images_per_s": images / elapsed, "seconds": elapsed, "images": images,
              "flops_per_image": flops_per_step / bs, "gflops": flops_per_step / bs * images / elapsed / 1e9}
    if profile_steps:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for number in range(1, profile_steps + 1):
                step(real, number)
        result["profile"] = time_shares(prof.key_averages())
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return result


# Operators grouped by what they do, for the profile's summary.
PROFILE_GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "adam": ("aten::_fused_adam_",),
                  "ema": ("aten::lerp_",)}


def time_shares(events) -> dict:
    """Share of the profiled CPU time spent in each PROFILE_GROUPS group (the rest: everything else)."""
    total = sum(e.self_cpu_time_total for e in events)
    shares = {group: sum(e.self_cpu_time_total for e in events if e.key in names) / total
              for group, names in PROFILE_GROUPS.items()}
    return {**shares, "rest": 1.0 - sum(shares.values())}


def time_naive_pipeline(cfg: dict, data_dir: str, device: torch.device, seconds: float,
                        num_workers: int) -> dict:
    """(b): the typical pipeline, same networks and batch size, for comparison."""
    from torchvision import datasets, transforms

    # download=True, as typical repos have it: where mnist_data fetched only the .gz files, torchvision
    # finds them, checks their md5 and unpacks them beside (no network); with download=False it would
    # refuse a directory that the notebook itself reads.
    dataset = datasets.MNIST(data_dir, train=True, download=True, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=True,
                                         drop_last=True, num_workers=num_workers)
    G, D = build_models(cfg, device)
    D = nn.Sequential(D, nn.Sigmoid())  # probabilities + BCELoss, as most repos do
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg["lr_g"], betas=(cfg["beta1"], 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg["lr_d"], betas=(cfg["beta1"], 0.999))
    bce = nn.BCELoss()
    latent = cfg["latent_dim"]
    images, started, done = 0, time.perf_counter(), False
    while not done:
        for real, _ in loader:
            real = real.view(len(real), -1).to(device)
            ones, zeros = torch.ones(len(real), device=device), torch.zeros(len(real), device=device)
            fake = G(torch.randn(len(real), latent, device=device))
            loss_d = bce(D(real), ones) + bce(D(fake.detach()), zeros)
            opt_D.zero_grad()
            loss_d.backward()
            opt_D.step()
            loss_g = bce(D(G(torch.randn(len(real), latent, device=device))), ones)  # fresh noise
            opt_G.zero_grad()
            loss_g.backward()
            opt_G.step()
            loss_d.item(), loss_g.item()  # logged every step, a host sync each time
            images += len(real)
            if time.perf_counter() - started >= seconds:
                done = True
                break
    elapsed = time.perf_counter() - started
    return {"images_per_s": images / elapsed, "seconds": elapsed, "images": images,
            "num_workers": num_workers}


def time_to_score(args, cfg: dict, device: torch.device) -> dict:
    """A short training run of the notebook's recipe (sweep.py: the notebook's own step, scored on
    2,000 samples after every epoch as the notebook does), stopped at the first epoch that reaches
    the target score: how many seconds of training a user waits for good samples on this machine."""
    import sweep
    with tempfile.TemporaryDirectory() as tmp:
        run = sweep.main(["--data-dir", args.data_dir, "--device", str(device), "--epochs", str(args.score_epochs),
                          "--stop-at-score", str(args.score_target), "--final-samples", "0",
                          "--batch-size", str(cfg["batch_size"]), "--r1-gamma", str(cfg["r1_gamma"]),
                          "--r1-every", str(cfg["r1_every"]), "--matmul-precision", cfg["matmul_precision"],
                          "--g-hidden", *map(str, cfg["g_hidden"]), "--d-hidden", *map(str, cfg["d_hidden"]),
                          "--train-subset", str(args.train_subset), "--out", str(Path(tmp) / "run.json")]
                         + (["--cuda-graphs"] if args.cuda_graphs else []))
    rows = run["rows"]
    reached = next((row for row in rows if row["score"] >= args.score_target), None)
    return {"target": args.score_target, "reached": reached is not None,
            "epoch": reached["epoch"] if reached else None,
            "train_seconds": reached["train_seconds"] if reached else None,
            "best_score": max(row["score"] for row in rows), "epochs_run": len(rows),
            "train_seconds_run": rows[-1]["train_seconds"], "curve": [{k: r[k] for k in ("epoch", "train_seconds", "score")} for r in rows]}


def time_to_score_line(t: dict) -> str:
    if t["reached"]:
        return (f"  time to a score of {t['target']:g}     {t['train_seconds'] / 60:8.1f} min of training "
                f"({t['train_seconds']:.0f} s, epoch {t['epoch']})\n")
    return (f"  time to a score of {t['target']:g}        not reached in {t['epochs_run']} epochs "
            f"({t['train_seconds_run'] / 60:.1f} min; best {t['best_score']:.2f})\n")


def quick_estimate(cfg: dict, data, device: torch.device, seconds: float) -> dict:
    """--quick: the `make run` time to expect on this machine, from a timing of each part a run has
    (none of it extrapolated from another machine): the step for `seconds`, one end-of-epoch scoring
    (the BatchNorm recalibration and the scores of `metrics_samples` samples), and the final
    evaluation's real-image row at full size (the run's own row costs about as much); the start-up
    is this process's own, to the data loaded. The closing cells (plots, GIF, export) are not timed."""
    from gan.mnist_classifier import load_classifier
    startup = time.perf_counter() - STARTED
    with hardware.float32_matmul_precision(cfg["matmul_precision"]):
        step = time_notebook_step(cfg, data.train_x, seconds)
    classifier = load_classifier(device=device)
    G = build_models(cfg, device)[0]
    started = time.perf_counter()
    ref = gm.reference_stats(classifier, data.test_x)
    reference_seconds = time.perf_counter() - started
    started = time.perf_counter()
    method.recalibrate_batchnorm(G, cfg["latent_dim"], seed=cfg["seed"])
    gm.quick_scores(classifier, gu.generate_images(G, cfg["metrics_samples"], cfg["latent_dim"], seed=1), ref)
    score_seconds = time.perf_counter() - started if cfg["metrics_every"] else 0.0
    started = time.perf_counter()
    if cfg["eval_samples"]:
        gm.reference_row(data, classifier, n=cfg["eval_samples"])
    row_seconds = time.perf_counter() - started
    epochs = cfg["epochs"]
    epoch_seconds = (len(data.train_x) // cfg["batch_size"]) * cfg["batch_size"] / step["images_per_s"]
    parts = {"start-up (imports, data, reference statistics)": startup + reference_seconds,
             "training": epochs * epoch_seconds,
             "per-epoch scores": epochs // max(cfg["metrics_every"], 1) * score_seconds,
             "final evaluation (two rows)": 2 * row_seconds}
    return {"epochs": epochs, "epoch_seconds": epoch_seconds, "score_seconds": score_seconds,
            "parts_seconds": parts, "total_seconds": sum(parts.values()), "notebook_step": step}


def quick_lines(q: dict) -> str:
    return ("".join(f"  {name:<48} {seconds / 60:6.1f} min\n" for name, seconds in q["parts_seconds"].items())
            + f"  expected `make run` time here: about {q['total_seconds'] / 60:.0f} min ({q['epochs']} epochs of "
              f"{q['epoch_seconds']:.1f} s; the closing plots and the install not counted)\n")


def peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": gu.peak_rss_mb()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def time_dcgan_step(cfg: dict, train_images: torch.Tensor, seconds: float) -> dict:
    """DCGAN.ipynb's step as its training cell runs it: its networks and settings, the MNIST notebook's
    train_step, minibatches sliced from the uint8 tensor and scaled on the device."""
    torch.manual_seed(cfg["seed"])
    parts = dcgan.build_training_parts(cfg, train_images.device, train_images.shape[1])
    bs, steps_per_epoch = cfg["batch_size"], len(train_images) // cfg["batch_size"]
    with hardware.float32_matmul_precision(cfg["matmul_precision"]):
        for number in range(1, 6):  # warm-up
            method.train_step(parts, gu.to_model_range(train_images[:bs]), 0, number, steps_per_epoch, cfg)
        images, epoch, started, sums = 0, 0, time.perf_counter(), torch.zeros(5, device=train_images.device)
        while time.perf_counter() - started < seconds:
            for number, batch in enumerate(gu.minibatches(train_images, bs, cfg["seed"], epoch), 1):
                sums += method.train_step(parts, gu.to_model_range(batch), epoch, number, steps_per_epoch, cfg)
                images += bs
                if number % cfg["log_every"] == 0 and time.perf_counter() - started >= seconds:
                    break
            epoch += 1
        sums.tolist()
    elapsed = time.perf_counter() - started
    return {"images_per_s": images / elapsed, "seconds": elapsed, "images": images}


def time_examples_dcgan(train_folder: str, seconds: float, workers: int) -> dict:
    """The pytorch/examples DCGAN recipe (dcgan_baseline.py): 64x64, ImageFolder + DataLoader."""
    import dcgan_baseline
    torch.manual_seed(0)
    recipe, loader = dcgan_baseline.Recipe(), dcgan_baseline.examples_loader(train_folder, workers=workers)
    images, started, done = 0, time.perf_counter(), False
    while not done:
        for real, _ in loader:
            recipe.step(real)
            images += len(real)
            if time.perf_counter() - started >= seconds:
                done = True
                break
    elapsed = time.perf_counter() - started
    return {"images_per_s": images / elapsed, "seconds": elapsed, "images": images, "num_workers": workers}


def dcgan_main(args) -> dict:
    """--dcgan: DCGAN.ipynb's step against the pytorch/examples recipe, on CIFAR-10's JPEG folder."""
    cfg = dcgan.notebook_parameters()
    device = hardware.pick_device(args.device)
    cfg["matmul_precision"] = hardware.resolve_matmul_precision(cfg["matmul_precision"], device)[0]
    folder = Path(args.data_dir) / "cifar10" / "train"
    if not folder.is_dir():  # both sides read the same JPEG files; pytorch/examples' ImageFolder needs them
        raise SystemExit(f"benchmark.py --dcgan reads CIFAR-10 as folders of images, {folder}/<class>/*.jpg, "
                         "and there is no such folder. Point --data-dir (or GAN_DATA_DIR) at a directory "
                         "holding cifar10/train/<class>/ (CIFAR-10's python download, as `make run-dcgan` "
                         "fetches it, is not a folder of images).")
    train = image_data.load_image_folder(folder, cfg["image_size"], progress=False)
    ours = time_dcgan_step(cfg, train.images.to(device), args.seconds)
    theirs = time_examples_dcgan(str(folder), args.seconds, workers=2)
    result = {"device": str(device), "threads": torch.get_num_threads(), "notebook_step": ours,
              "examples_pipeline": theirs, "speedup_vs_examples": ours["images_per_s"] / theirs["images_per_s"],
              "settings": {k: cfg[k] for k in ("image_size", "batch_size", "g_width", "d_width", "matmul_precision")},
              "epoch_seconds_50k": 50000 / ours["images_per_s"], "versions": gu.library_versions()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    runs.write_json(args.out, result)
    print(f"device {device}, {torch.get_num_threads()} threads\n"
          f"  (a) DCGAN.ipynb step      {ours['images_per_s']:8.0f} images/s  ({cfg['image_size']} px, widths "
          f"{cfg['g_width']}/{cfg['d_width']}, batch {cfg['batch_size']}; one epoch of 50,000 in {result['epoch_seconds_50k']:.0f} s)\n"
          f"  (b) pytorch/examples      {theirs['images_per_s']:8.0f} images/s  (64 px, ngf = ndf = 64, batch 64, "
          f"ImageFolder + DataLoader, 2 workers)\n"
          f"  speed-up (a)/(b)          {result['speedup_vs_examples']:8.2f}x\n  written to {args.out}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dcgan", action="store_true",
                        help="time DCGAN.ipynb's step against the pytorch/examples DCGAN recipe on "
                             "<data-dir>/cifar10/train/ instead (--device, --seconds and --out apply)")
    parser.add_argument("--data-dir", default=os.environ.get(mnist_data.DATA_DIR_ENV, "data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the notebook's")
    parser.add_argument("--seconds", type=float, default=None, help="timing window per pipeline (default 20; 5 with --quick)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the naive pipeline")
    parser.add_argument("--r1-gamma", type=float, default=None, help="override the notebook's (0: no R1 step)")
    parser.add_argument("--r1-every", type=int, default=None, help="override the notebook's steps between R1 steps")
    parser.add_argument("--matmul-precision", choices=settings.MATMUL_PRECISIONS, default=None,
                        help="float32 matmul precision of (a); default: the notebook's")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing (a), profile this many of its steps and print where the time goes")
    parser.add_argument("--cuda-graphs", action="store_true", help="time (a) replayed from CUDA graphs (CUDA only)")
    parser.add_argument("--score-epochs", type=int, default=60, metavar="N",
                        help="then train the notebook's recipe for up to N epochs, scored after each, and report "
                             "the training time to --score-target (0 skips this run)")
    parser.add_argument("--score-target", type=float, default=9.0, help="the classifier score of the timed run")
    parser.add_argument("--train-subset", type=int, default=0, help="training images of the timed run (0: all)")
    parser.add_argument("--g-hidden", type=int, nargs="+", default=None, metavar="WIDTH", help="override the notebook's")
    parser.add_argument("--d-hidden", type=int, nargs="+", default=None, metavar="WIDTH",
                        help="override the notebook's (768 384 192; most reimplementations: 1024 512 256)")
    parser.add_argument("--quick", action="store_true",
                        help="only print the `make run` time to expect here: each part of a run timed briefly "
                             "(2-3 minutes on a 2-core CPU, most of it one row of the final evaluation; --seconds defaults to 5)")
    parser.add_argument("--out", default="runs/benchmark.json")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 5.0 if args.quick else 20.0
    if args.dcgan:
        return dcgan_main(args)

    cfg = method.notebook_parameters()
    if args.batch_size is not None:
        cfg["batch_size"] = args.batch_size
    if args.r1_gamma is not None:
        cfg["r1_gamma"] = args.r1_gamma
    if args.r1_every is not None:
        cfg["r1_every"] = args.r1_every
    if args.matmul_precision:
        cfg["matmul_precision"] = args.matmul_precision
    for name in ("g_hidden", "d_hidden"):
        if getattr(args, name):
            cfg[name] = getattr(args, name)
    try:  # the notebook's own rules, before minutes of timing: --batch-size 0, --r1-every 0, ...
        settings.validate_parameters(cfg)
        if args.seconds <= 0 or args.score_epochs < 0 or args.profile < 0:
            raise ParameterError(f"--seconds ({args.seconds}) must be positive, --score-epochs "
                                    f"({args.score_epochs}) and --profile ({args.profile}) 0 or more")
    except ParameterError as exc:
        parser.error(str(exc))
    device = hardware.pick_device(args.device)
    precision_setting = cfg["matmul_precision"]
    cfg["matmul_precision"], precision_reason = hardware.resolve_matmul_precision(
        precision_setting, device, hardware.mlp_step_layers(cfg))
    data = mnist_data.load_mnist(args.data_dir, device=device, download=True)
    if args.quick:
        q = quick_estimate(cfg, data, device, args.seconds)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        runs.write_json(args.out, {"device": str(device), "threads": torch.get_num_threads(), "cpu": hardware.cpu_description(),
                                   "matmul_precision": cfg["matmul_precision"], "quick": q})
        print(f"device {device} ({hardware.cpu_description()}), {torch.get_num_threads()} threads, matmul precision "
              f"{cfg['matmul_precision']} ({precision_reason})\n" + quick_lines(q) + f"  written to {args.out}")
        return {"quick": q}

    peak = matmul_peak_gflops(device)  # plain float32: the yardstick whatever (a) runs at
    reduced = cfg["matmul_precision"] != "highest"
    with hardware.float32_matmul_precision(cfg["matmul_precision"]):  # (a) only, as the notebook trains
        peak_at_precision = matmul_peak_gflops(device) if reduced else peak
        ours = time_notebook_step(cfg, data.train_x, args.seconds, args.profile, args.cuda_graphs)
    naive = time_naive_pipeline(cfg, args.data_dir, device, args.seconds, args.num_workers)
    speedup = hardware.medium_precision_speedup(device, hardware.mlp_step_layers(cfg))  # measured anew, not cached
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "batch_size": cfg["batch_size"], "r1_gamma": cfg["r1_gamma"],
        "g_hidden": cfg["g_hidden"], "d_hidden": cfg["d_hidden"],
        "matmul_precision": cfg["matmul_precision"], "matmul_precision_reason": precision_reason,
        "cuda_graphs": args.cuda_graphs and device.type == "cuda",
        "matmul_peak_gflops": peak, "medium_precision_speedup": speedup,
        "notebook_step": ours, "naive_pipeline": naive,
        "speedup_vs_naive": ours["images_per_s"] / naive["images_per_s"],
        "share_of_matmul_peak": ours["gflops"] / peak,
        "epoch_seconds_50k": 50000 / ours["images_per_s"],
        **peak_memory_mb(device), "versions": gu.library_versions(),
    }
    extra = ""
    if args.score_epochs:
        result["time_to_score"] = time_to_score(args, cfg, device)
        extra += time_to_score_line(result["time_to_score"])
    if reduced:
        result["matmul_peak_gflops_at_precision"] = peak_at_precision
        result["share_of_matmul_peak_at_precision"] = ours["gflops"] / peak_at_precision
        extra += (f"  matmul peak ({cfg['matmul_precision']})    {peak_at_precision:8.1f} GFLOP/s: (a) runs at "
                  f"{result['share_of_matmul_peak_at_precision']:.0%} of it\n")
    if args.profile:
        # The matmuls' own rate (all FLOPs over the time spent in matmuls): the ceiling of (a) at this
        # batch size if everything else (Adam, EMA, activations, autograd) took no time at all.
        result["matmul_only_share_of_peak"] = result["share_of_matmul_peak"] / ours["profile"]["matmul"]
        extra += ("  profile of (a): " + ", ".join(f"{k} {v:.0%}" for k, v in ours["profile"].items())
                  + f"; the matmuls alone run at {result['matmul_only_share_of_peak']:.0%} of peak\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    runs.write_json(args.out, result)
    print(f"device {device}, {torch.get_num_threads()} threads, batch size {cfg['batch_size']}, r1_gamma {cfg['r1_gamma']}"
          f", D hidden {cfg['d_hidden']}, G hidden {cfg['g_hidden']}, matmul precision {cfg['matmul_precision']} ({precision_reason})\n"
          f"  matmul peak (fp32)        {peak:8.1f} GFLOP/s\n"
          f"  \"medium\" matmuls         {speedup:8.2f}x as fast as fp32 at the step's layers (bfloat16 on a CPU)\n"
          +
          f"  (a) notebook step         {ours['images_per_s']:8.0f} images/s  "
          f"({ours['gflops']:.1f} GFLOP/s = {result['share_of_matmul_peak']:.0%} of peak, "
          f"{ours['flops_per_image'] / 1e6:.1f} MFLOP/image, one epoch of 50,000 in {result['epoch_seconds_50k']:.1f} s)\n"
          f"  (b) naive pipeline        {naive['images_per_s']:8.0f} images/s  (DataLoader, {args.num_workers} workers)\n"
          f"  speed-up (a)/(b)          {result['speedup_vs_naive']:8.2f}x\n"
          f"  peak memory (RSS)         {result['peak_rss_mb']:8.0f} MB\n"
          + extra
          + f"  written to {args.out}")
    return result


if __name__ == "__main__":
    main()
