"""Try a training recipe quickly: the notebook's networks and training step, scored every epoch.

The rows of the README's "What we tried" come from this script. It trains with the notebook's own
definitions (`Generator`, `Discriminator`, `train_step`, `r1_step`, read from Vanilla_GAN.ipynb: no
second copy that can drift) and the same helpers (minibatches, EMA, BatchNorm recalibration), without
the notebook's plots, checkpoints and final Parzen evaluation. Every epoch it prints one JSON line
with the score and Frechet distance of 2,000 samples; at the end it scores 10,000 samples (score, FD,
precision, recall, digit shares) and writes everything to `--out`; `--score-at` gives those final
scores after earlier epochs of the same run too.

One knob here is not a notebook parameter: a learning-rate decay (`--decay linear`), which we tried
and dropped (README). Two sweeps at once on a 2-core machine: give each `OMP_NUM_THREADS=1`.

    python sweep.py --epochs 12                            # the notebook's defaults, 12 epochs
    python sweep.py --epochs 40 --r1-gamma 0 --d-dropout 0.1
    python sweep.py --epochs 80 --score-at 40 60             # one run: 40, 60 and 80 epochs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

import gan_metrics as gm
import gan_utils as gu
from benchmark import NOTEBOOK, notebook_defaults
from mnist_classifier import load_classifier


def parse_args(argv=None) -> argparse.Namespace:
    d = notebook_defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get(gu.DATA_DIR_ENV, "data"))
    p.add_argument("--out", default="runs/sweep.json")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-subset", type=int, default=0, help="0: all 50,000 training images")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr-g", type=float, default=d["lr_g"])
    p.add_argument("--lr-d", type=float, default=d["lr_d"])
    p.add_argument("--beta1", type=float, default=d["beta1_g"], help="both networks")
    p.add_argument("--beta2", type=float, default=d["beta2_g"], help="both networks")
    p.add_argument("--d-steps", type=int, default=d["d_steps"])
    p.add_argument("--label-smoothing", type=float, default=d["label_smoothing"])
    p.add_argument("--r1-gamma", type=float, default=d["r1_gamma"])
    p.add_argument("--r1-every", type=int, default=d["r1_every"])
    p.add_argument("--ema-decay", type=float, default=d["ema_decay"])
    p.add_argument("--also-ema", type=float, nargs="*", default=[], metavar="DECAY",
                   help="more EMA generators of the same run, with these decays, scored at the end")
    p.add_argument("--g-batchnorm", type=int, choices=(0, 1), default=int(d["g_batchnorm"]))
    p.add_argument("--d-dropout", type=float, default=d["d_dropout"])
    p.add_argument("--decay", choices=("none", "linear"), default="none",
                   help="learning-rate decay to --decay-to times the rate, from --decay-from of the run")
    p.add_argument("--decay-from", type=float, default=0.0, help="fraction of the run")
    p.add_argument("--decay-to", type=float, default=0.0, help="fraction of the learning rate at the end")
    p.add_argument("--matmul-precision", choices=gu.MATMUL_PRECISIONS,
                   default=d["matmul_precision"], help="for the training steps only")
    p.add_argument("--final-samples", type=int, default=10000, help="0 skips the final scores")
    p.add_argument("--score-at", type=int, nargs="*", default=[], metavar="EPOCH",
                   help="also give the final scores (on --final-samples) after these epochs")
    return p.parse_args(argv)


def lr_factor(step: int, total: int, a: argparse.Namespace) -> float:
    """The learning rate's multiplier after `step` of `total` steps (1 without decay)."""
    progress = step / total
    if a.decay == "none" or progress <= a.decay_from:
        return 1.0
    return 1.0 - (1.0 - a.decay_to) * (progress - a.decay_from) / (1.0 - a.decay_from)


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
    latent_dim = notebook_defaults()["latent_dim"]
    nb = gu.load_notebook_definitions(NOTEBOOK)
    data = gu.load_mnist(a.data_dir, train_subset=a.train_subset)
    classifier = load_classifier()
    ref = gm.reference_stats(classifier, data.test_x)

    gu.seed_everything(a.seed)
    G, D = nb["Generator"](latent_dim, bool(a.g_batchnorm)), nb["Discriminator"](a.d_dropout)
    opt_G = torch.optim.Adam(G.parameters(), lr=a.lr_g, betas=(a.beta1, a.beta2), **gu.adam_kernel("cpu"))
    opt_D = torch.optim.Adam(D.parameters(), lr=a.lr_d, betas=(a.beta1, a.beta2), **gu.adam_kernel("cpu"))
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    sampler = G_ema if a.ema_decay > 0 else G
    # Other averages of the very same training run: a controlled comparison of EMA decays (the
    # updates read G's weights only, so they change neither the training nor its random numbers).
    also_ema = {decay: copy.deepcopy(G).eval().requires_grad_(False) for decay in a.also_ema}
    steps_per_epoch = len(data.train_x) // a.batch_size

    def final_scores_of(generator):  # the same 10,000 latents whenever and whichever generator is scored
        return final_scores(classifier, gu.generate_images(generator, a.final_samples, latent_dim, seed=a.seed + 4), ref)

    clock, rows, step_total = gu.Stopwatch(), [], 0
    result = {"args": vars(a), "rows": rows}
    for epoch in range(a.epochs):
        clock.start()
        G.train(), D.train()
        with gu.float32_matmul_precision(a.matmul_precision):  # training only; scores in float32
            for step, real in enumerate(gu.minibatches(data.train_x, a.batch_size, a.seed, epoch), 1):
                step_total += 1
                if a.decay != "none":
                    factor = lr_factor(step_total, a.epochs * steps_per_epoch, a)
                    gu.set_learning_rate(opt_G, a.lr_g * factor)
                    gu.set_learning_rate(opt_D, a.lr_d * factor)
                nb["train_step"](G, D, opt_G, opt_D, real, latent_dim, "non_saturating", 1.0 - a.label_smoothing,
                                 update_g=step % a.d_steps == 0)
                if a.r1_gamma > 0 and step % a.r1_every == 0:
                    nb["r1_step"](D, opt_D, real, a.r1_gamma, a.r1_every)
                if a.ema_decay > 0 and step % a.d_steps == 0:
                    g_steps = step_total // a.d_steps
                    gu.update_ema(G_ema, G, gu.ema_decay_at(g_steps, a.ema_decay))
                    for decay, averaged in also_ema.items():
                        gu.update_ema(averaged, G, gu.ema_decay_at(g_steps, decay))
        clock.stop()
        if sampler is G_ema:
            gu.recalibrate_batchnorm(G_ema, latent_dim, seed=a.seed)
        quick = gm.quick_scores(classifier, gu.generate_images(sampler, 2000, latent_dim, seed=a.seed + 1), ref)
        rows.append({"epoch": epoch + 1, "train_seconds": clock.elapsed(), "score": quick["score"], "fd": quick["fd"]})
        if epoch + 1 in a.score_at and a.final_samples:  # one run gives, e.g., 60 and 80 epochs
            rows[-1]["final"] = final_scores_of(sampler)
        print(json.dumps(rows[-1]), flush=True)
    if a.final_samples:
        # Scored already if the last epoch was in --score-at: the same generator and latents.
        result["final"] = (rows[-1].get("final") if rows else None) or final_scores_of(sampler)
        print(json.dumps(result["final"]), flush=True)
        result["final_also_ema"] = {}
        for decay, averaged in also_ema.items():
            gu.recalibrate_batchnorm(averaged, latent_dim, seed=a.seed)
            result["final_also_ema"][str(decay)] = final_scores_of(averaged)
            print(json.dumps({"ema_decay": decay, **result["final_also_ema"][str(decay)]}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    gu.write_json(a.out, result)
    return result


if __name__ == "__main__":
    main()
