"""The DCGAN recipe most repositories copy (pytorch/examples `dcgan/main.py`), trained for a fixed
wall time and scored with DCGAN.ipynb's own metrics: the baseline DCGAN.ipynb's defaults must beat.

The recipe, as in pytorch/examples: 64x64 images through torchvision's `ImageFolder` with `Resize`,
`CenterCrop`, `ToTensor` and `Normalize`, a shuffling `DataLoader` (2 workers, batch 64); nz = 100,
ngf = ndf = 64; G of transposed convolutions with BatchNorm and ReLU, D of strided convolutions with
BatchNorm and LeakyReLU ending in a Sigmoid; weights drawn from N(0, 0.02); `BCELoss`; Adam with
lr 2e-4 and betas (0.5, 0.999); real and fake batches through D separately; `.item()` every step (the
original prints every step). Nothing of this project's speed or quality work is in it.

    python scripts/dcgan_baseline.py --train-folder DIR/train --test-folder DIR/test --seconds 1320 --out runs/baseline.json

trains for --seconds of training time (the clock stops while it scores), scores 2,000 samples every
--score-every seconds (a time-to-quality curve), then 10,000 samples: Frechet distance, KID,
precision/recall, classifier score and class shares on the CIFAR-10 reference classifier, against
the test folder's images, downsampled to 32x32 as DCGAN.ipynb does for 64-pixel runs; and, as the
notebook's `inception_metrics` decides (--inception auto: on a CUDA GPU only), the Inception FID and
KID of those 32x32 samples against the same test images (gan/inception.py). `step_pipeline` is what
benchmark.py times against the notebook's step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gan/ and gan_utils.py

import torch
import torch.nn as nn

import gan_utils as gu
from gan import cifar_classifier, image_data, inception, runs
from gan import metrics as gm


def weights_init(m: nn.Module) -> None:
    """pytorch/examples' initialisation: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales."""
    if "Conv" in type(m).__name__:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in type(m).__name__:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def examples_generator(nz: int = 100, ngf: int = 64, nc: int = 3) -> nn.Module:
    layers, c_in = [], nz
    for i, c in enumerate((ngf * 8, ngf * 4, ngf * 2, ngf)):
        layers += [nn.ConvTranspose2d(c_in, c, 4, 1 if i == 0 else 2, 0 if i == 0 else 1, bias=False),
                   nn.BatchNorm2d(c), nn.ReLU(True)]
        c_in = c
    model = nn.Sequential(*layers, nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    model.apply(weights_init)
    return model


def examples_discriminator(ndf: int = 64, nc: int = 3) -> nn.Module:
    layers, c_in = [], nc
    for i, c in enumerate((ndf, ndf * 2, ndf * 4, ndf * 8)):
        layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False)] + ([nn.BatchNorm2d(c)] if i else [])
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        c_in = c
    model = nn.Sequential(*layers, nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())
    model.apply(weights_init)
    return model


def examples_loader(folder: str, batch_size: int = 64, workers: int = 2, image_size: int = 64):
    from torchvision import datasets, transforms

    class VisibleImageFolder(datasets.ImageFolder):
        # The one departure from pytorch/examples: hidden folders are not classes. ImageFolder would
        # take one for a class (e.g. the `.ipynb_checkpoints/` that Jupyter leaves in folders it opens).
        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            return classes, {name: i for i, name in enumerate(classes)}

    dataset = VisibleImageFolder(folder, transform=transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


class Recipe:
    """The pytorch/examples networks, optimizers and training step."""

    def __init__(self, nz: int = 100, ngf: int = 64, ndf: int = 64, device="cpu"):
        self.nz, self.device = nz, torch.device(device)
        self.G, self.D = examples_generator(nz, ngf).to(device), examples_discriminator(ndf).to(device)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.bce = nn.BCELoss()

    def step(self, real: torch.Tensor) -> tuple[float, float]:
        real = real.to(self.device)
        n = len(real)
        ones, zeros = torch.ones(n, device=self.device), torch.zeros(n, device=self.device)
        self.D.zero_grad()
        err_real = self.bce(self.D(real).view(-1), ones)
        err_real.backward()
        fake = self.G(torch.randn(n, self.nz, 1, 1, device=self.device))
        err_fake = self.bce(self.D(fake.detach()).view(-1), zeros)
        err_fake.backward()
        self.opt_D.step()
        self.G.zero_grad()
        err_g = self.bce(self.D(fake).view(-1), ones)
        err_g.backward()
        self.opt_G.step()
        return (err_real + err_fake).item(), err_g.item()  # logged every step, as the original prints

    @torch.no_grad()
    def samples(self, n: int, seed: int) -> torch.Tensor:
        """n samples in [-1, 1] (eval mode, as the notebook samples), 1,000 at a time."""
        self.G.eval()
        z = torch.randn(n, self.nz, 1, 1, generator=torch.Generator().manual_seed(seed))
        out = torch.cat([self.G(chunk.to(self.device)).cpu() for chunk in z.split(1000)])
        self.G.train()
        return out


def to_32(images: torch.Tensor) -> torch.Tensor:
    """64 -> 32 pixels, as DCGAN.ipynb prepares 64-pixel images for the 32-pixel classifier."""
    return nn.functional.interpolate(images, size=32, mode="area")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-folder", required=True, help="an image folder with class subfolders (ImageFolder)")
    p.add_argument("--test-folder", required=True, help="the real images the scores compare with")
    p.add_argument("--seconds", type=float, required=True, help="training time (scoring excluded)")
    p.add_argument("--score-every", type=float, default=300.0, help="seconds of training between quick scores")
    p.add_argument("--eval-samples", type=int, default=10000)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (pytorch/examples' default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception", choices=("auto", "on", "off"), default="auto",
                   help="Inception FID and KID: auto = on a CUDA GPU only (20-35 min for 10,000 samples on a 2-core CPU)")
    p.add_argument("--out", default="runs/dcgan_baseline.json")
    a = p.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # before training: a bad path fails now, not after it

    torch.manual_seed(a.seed)
    test = image_data.load_image_folder(a.test_folder, 32)
    reference_images = gu.to_model_range(test.images[:10000])
    classifier = cifar_classifier.load_classifier()
    reference = gm.reference_stats(classifier, reference_images)
    recipe, loader = Recipe(), examples_loader(a.train_folder, workers=a.workers)
    clock, curve, images, next_score = gu.Stopwatch(), [], 0, a.score_every
    while clock.elapsed() < a.seconds:
        clock.start()
        for real, _ in loader:
            recipe.step(real)
            images += len(real)
            if clock.elapsed() >= min(next_score, a.seconds):
                break  # (the next pass over the loader starts a fresh shuffle, as a new epoch would)
        clock.stop()
        if clock.elapsed() >= next_score or clock.elapsed() >= a.seconds:
            quick = gm.quick_scores(classifier, to_32(recipe.samples(2000, a.seed + 1)), reference)
            curve.append({"train_seconds": clock.elapsed(), "images": images, "fd": quick["fd"], "score": quick["score"]})
            print(json.dumps(curve[-1]), flush=True)
            next_score += a.score_every
    samples = recipe.samples(a.eval_samples, a.seed + 4)
    final = gm.image_evaluation(to_32(samples), reference_images, None, classifier)  # no memorisation check
    setting = {"auto": "auto", "on": True, "off": False}[a.inception]
    rows, not_computed = inception.final_rows({"baseline": to_32(samples)}, {}, reference_images, recipe.device, setting,
                                              turn_on="pass --inception on")
    final.update(rows["baseline"])
    result = {"args": vars(a), "train_seconds": clock.elapsed(), "images_seen": images,
              "epochs_seen": images / len(loader.dataset), "curve": curve, "final": final, "not_computed": not_computed}
    runs.write_json(a.out, result)
    gu.save_grid(samples[:64], Path(a.out).with_suffix(".png"))
    print(json.dumps(final), flush=True)
    return result


if __name__ == "__main__":
    main()
