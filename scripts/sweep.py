"""Try a training recipe quickly: the notebook's networks and training step, scored every epoch.

The tables of `docs/experiments.md` come from this script. It trains with the notebook's own
definitions (`build_training_parts` and `train_step`, imported from `gan/vanilla_gan.py`, the module
the notebook exports: no second copy that can drift) on the same minibatches, so with the same settings it trains exactly the weights the
notebook trains; it leaves out the notebook's plots, checkpoints and final Parzen evaluation. Every
epoch it prints one JSON line with the score and Frechet distance of 2,000 samples; at the end it
scores 10,000 samples (score, FD, precision, recall, digit shares) and writes everything to `--out`;
`--score-at` gives those final scores after earlier epochs of the same run too.

Every training setting of the notebook's parameters cell is an option (`--lr-g`, `--r1-gamma`, ...,
defaults from the notebook). Two sweeps at once on a 2-core machine: give each `OMP_NUM_THREADS=1`.

    python scripts/sweep.py --epochs 12                            # the notebook's defaults, 12 epochs
    python scripts/sweep.py --epochs 40 --r1-gamma 0 --d-dropout 0.1
    python scripts/sweep.py --epochs 40 --d-hidden 1024 512 256       # the wider discriminator
    python scripts/sweep.py --epochs 80 --score-at 40 60             # one run: 40, 60 and 80 epochs
    python scripts/sweep.py --epochs 60 --stop-at-score 9 --final-samples 0   # training time to a score of 9
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gan/ and gan_utils.py

import torch

import gan_utils as gu
from gan import hardware, mnist_data, runs, settings
from gan import metrics as gm
from gan import vanilla_gan as method
from gan.errors import ParameterError
from gan.mnist_classifier import load_classifier

# The notebook parameters a sweep may change (the others are about files, logging and evaluation).
RECIPE_PARAMETERS = ("seed", "train_subset", "batch_size", "d_steps", "lr_g", "lr_d", "beta1", "beta2", "g_loss",
                     "loss", "label_smoothing", "r1_gamma", "r1_every", "ema_decay", "latent_dim", "g_hidden", "d_hidden",
                     "g_batchnorm", "d_dropout", "matmul_precision")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, got {text!r}")


def parse_width(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer widths (integers), got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    defaults = method.notebook_parameters()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get(mnist_data.DATA_DIR_ENV, "data"))
    p.add_argument("--out", default="runs/sweep.json")
    p.add_argument("--epochs", type=int, default=12)
    for name in RECIPE_PARAMETERS:  # typed like the notebook's default; checked by the notebook's rules
        default = defaults[name]
        if name in ("g_hidden", "d_hidden"):  # layer widths: --d-hidden 1024 512 256
            p.add_argument("--" + name.replace("_", "-"), type=parse_width, nargs="+", default=default,
                           help=f"default {default!r}")
            continue
        kind = parse_bool if isinstance(default, bool) else type(default)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f"default {default!r}")
    p.add_argument("--also-ema", type=float, nargs="*", default=[], metavar="DECAY",
                   help="more EMA generators of the same run, with these decays, scored every epoch and at the end")
    p.add_argument("--final-samples", type=int, default=10000, help="0 skips the final scores")
    p.add_argument("--score-at", type=int, nargs="*", default=[], metavar="EPOCH",
                   help="also give the final scores (on --final-samples) after these epochs")
    p.add_argument("--save-weights", default="", help="write G, D and G_ema's state dicts here at the end")
    p.add_argument("--stop-at-score", type=float, default=0.0, metavar="SCORE",
                   help="stop after the first epoch whose score (2,000 samples) reaches SCORE (0: never)")
    p.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda', 'auto', ...: where it trains")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the step as CUDA graphs (on a CUDA device)")
    a = p.parse_args(argv)
    try:
        settings.validate_parameters(recipe(a))
    except ParameterError as exc:
        p.error(str(exc))
    # The script's own options, checked now rather than after the training they would end.
    if a.epochs < 1:
        p.error(f"--epochs {a.epochs}: train at least 1 epoch")
    if a.final_samples and a.final_samples < settings.KNN_MIN_SAMPLES:
        p.error(f"--final-samples {a.final_samples}: precision and recall need at least {settings.KNN_MIN_SAMPLES} "
                "samples; 0 skips the final scores")
    if any(not 0 < d < 1 for d in a.also_ema):
        p.error(f"--also-ema {a.also_ema}: each decay is a number between 0 and 1 (e.g. 0.9995)")
    if any(not 1 <= e <= a.epochs for e in a.score_at):
        p.error(f"--score-at {a.score_at}: each epoch is between 1 and --epochs ({a.epochs})")
    try:
        hardware.pick_device(a.device)
    except (ParameterError, RuntimeError) as exc:  # RuntimeError: not a device name at all
        p.error(f"--device {a.device!r}: {exc}")
    for path in (a.out, a.save_weights):  # a missing directory fails now, not after hours of training
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    return a


def recipe(a: argparse.Namespace) -> dict:
    """The settings train_step reads, as the notebook's config dict holds them."""
    return {name: getattr(a, name) for name in RECIPE_PARAMETERS}


def final_scores(classifier, images: torch.Tensor, ref: gm.ReferenceStats) -> dict:
    features, probs = gm.classifier_outputs(classifier, images)
    precision, recall = gm.precision_recall(features, ref.features)
    shares = gm.class_fractions(probs)
    return {"score": gm.classifier_score(probs), "precision": precision, "recall": recall,
            "fd": gm.fd_to_reference(features, ref),
            "min_share": shares.min().item(), "max_share": shares.max().item(),
            "rarest_digit": shares.argmin().item(), "commonest_digit": shares.argmax().item()}


def main(argv=None) -> dict:
    a = parse_args(argv)
    s = recipe(a)
    # Seeded, the classifier and the networks built and the fixed noise drawn in the notebook's order
    # (building the classifier draws its initial weights before loading its own), so that training
    # starts from the same weights and the same random-number stream as the notebook's.
    runs.seed_everything(a.seed)
    device = hardware.pick_device(a.device)
    data = mnist_data.load_mnist(a.data_dir, device=device, train_subset=a.train_subset)
    classifier = load_classifier(device=device)
    ref = gm.reference_stats(classifier, data.test_x)
    parts = method.build_training_parts(s, device)
    # The notebook's fixed noise for its grids, unused here: drawn so that training continues the
    # random-number stream exactly where the notebook's does.
    torch.randn(64, a.latent_dim, device=device)
    sampler = parts["G_ema"] if a.ema_decay > 0 else parts["G"]
    # Other averages of the very same training run: a controlled comparison of EMA decays (the
    # updates read G's weights only, so they change neither the training nor its random numbers).
    also_ema = {decay: copy.deepcopy(parts["G"]).eval().requires_grad_(False) for decay in a.also_ema}
    steps_per_epoch = len(data.train_x) // a.batch_size
    precision, why = hardware.resolve_matmul_precision(a.matmul_precision, device, hardware.mlp_step_layers(s))
    print(f"training matmul precision: {precision} ({why}); D's hidden layers: {s['d_hidden']}",
          flush=True)
    step_fn = hardware.step_runner(vars(method), parts, s, (a.batch_size, *data.train_x.shape[1:]), device, a.cuda_graphs)

    def quick_scores_of(generator, recalibrate):  # the notebook's per-epoch scores: 2,000 fixed latents
        if recalibrate:  # an average's BatchNorm statistics, recomputed for its weights as the notebook does
            method.recalibrate_batchnorm(generator, a.latent_dim, seed=a.seed)
        quick = gm.quick_scores(classifier, gu.generate_images(generator, 2000, a.latent_dim, seed=a.seed + 1), ref)
        return {"score": quick["score"], "fd": quick["fd"]}

    def final_scores_of(generator):  # the same 10,000 latents whenever and whichever generator is scored
        return final_scores(classifier, gu.generate_images(generator, a.final_samples, a.latent_dim, seed=a.seed + 4), ref)

    clock, rows = gu.Stopwatch(), []
    result = {"args": vars(a), "rows": rows, "matmul_precision_resolved": precision}
    for epoch in range(a.epochs):
        clock.start()
        parts["G"].train(), parts["D"].train()
        with hardware.float32_matmul_precision(precision):  # training only; scores in float32
            for step, real in enumerate(gu.minibatches(data.train_x, a.batch_size, a.seed, epoch), 1):
                step_fn(real, epoch, step, steps_per_epoch)
                if also_ema and step % a.d_steps == 0:
                    g_steps = (epoch * steps_per_epoch + step) // a.d_steps
                    for decay, averaged in also_ema.items():
                        method.update_ema(averaged, parts["G"], 1.0 - method.ema_decay_at(g_steps, decay))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's kernels have finished: its time is all counted
        clock.stop()
        quick = quick_scores_of(sampler, recalibrate=sampler is parts["G_ema"])
        rows.append({"epoch": epoch + 1, "train_seconds": clock.elapsed(), "score": quick["score"], "fd": quick["fd"]})
        if also_ema:  # the other averages on the same latents: which decay reaches a score sooner
            rows[-1]["also_ema"] = {str(decay): quick_scores_of(averaged, recalibrate=True)
                                    for decay, averaged in also_ema.items()}
        if epoch + 1 in a.score_at and a.final_samples:  # one run gives, e.g., 60 and 80 epochs
            rows[-1]["final"] = final_scores_of(sampler)
        print(json.dumps(rows[-1]), flush=True)
        if a.stop_at_score and quick["score"] >= a.stop_at_score:
            break
    if a.final_samples:
        # Scored already if the last epoch was in --score-at: the same generator and latents.
        result["final"] = (rows[-1].get("final") if rows else None) or final_scores_of(sampler)
        print(json.dumps(result["final"]), flush=True)
        result["final_also_ema"] = {}
        for decay, averaged in also_ema.items():
            method.recalibrate_batchnorm(averaged, a.latent_dim, seed=a.seed)
            result["final_also_ema"][str(decay)] = final_scores_of(averaged)
            print(json.dumps({"ema_decay": decay, **result["final_also_ema"][str(decay)]}), flush=True)
    runs.write_json(a.out, result)  # first: the scores are what a sweep is for
    if a.save_weights:
        torch.save({key: parts[key].state_dict() for key in ("G", "D", "G_ema")}, a.save_weights)
    return result


if __name__ == "__main__":
    main()
