"""Check this project's Inception FID (gan/inception.py) against a published value before trusting it:
the FID of CIFAR-10's 50,000 training images against its 10,000 test images with the TF Inception
network, reported as 3.1 (NVlabs/stylegan2-ada issue #53: fid(x_train_50k, x_val_10k) = 3.1).

    python scripts/inception_check.py --data-dir DIR      # DIR holds cifar10/ (or cifar-10-batches-py/)

60,000 Inception passes: about 2 hours on a 2-core CPU (8-9 images/s on an AMD EPYC Zen 4), a minute
on a GPU. The features are cached chunk by chunk (gan/inception.py), so a stopped check resumes where
it stopped, and DCGAN.ipynb runs on this machine then find the test images' features ready. Prints FID
and KID for all 50,000 training images and for the first 10,000 (in the notebook's fixed shuffle: its
"real training images" row) against the test images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gan/ and gan_utils.py

import torch

from gan import hardware, image_data, inception

PUBLISHED_TRAIN_VS_TEST = 3.1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("GAN_DATA_DIR", "data"),
                        help="holds cifar10/ (JPEG folders) or cifar-10-batches-py/; default $GAN_DATA_DIR or data/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    device = hardware.pick_device(args.device)
    train, test = image_data.load_dataset("cifar10", args.data_dir, 32)
    train = image_data.shuffled(train, seed=0)  # DCGAN.ipynb's order: its first 10,000 are the notebook's real row
    started = time.perf_counter()
    test_f = inception.cached_features(test.images[:10000], device, "test images")
    # In two parts, the notebook's 10,000 real training images first: its runs find them cached.
    train_f = torch.cat([inception.cached_features(train.images[:10000], device, "training images"),
                         inception.cached_features(train.images[10000:], device, "other training images")])
    result = {"train_50k_vs_test": inception.fid_kid(train_f, test_f),
              "train_10k_vs_test": inception.fid_kid(train_f[:10000], test_f),
              "published_train_vs_test_fid": PUBLISHED_TRAIN_VS_TEST, "source": train.source,
              "device": str(device), "cpu": hardware.cpu_description(), "seconds": round(time.perf_counter() - started)}
    for name in ("train_50k_vs_test", "train_10k_vs_test"):
        r = result[name]
        print(f"{name}: FID {r['inception_fid']:.3f}, KID {r['inception_kid_mean']:.5f} ± {r['inception_kid_std']:.5f}")
    print(f"published FID of the 50,000 training images against the test images: about {PUBLISHED_TRAIN_VS_TEST}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
