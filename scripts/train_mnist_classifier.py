#!/usr/bin/env python3
"""Train the MNIST reference classifier (weights/mnist_classifier.pt), and save it only if it beats the accuracy bar.

The committed weights came from this script with its defaults; the metrics in both notebooks use them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gan/ and gan_utils.py

import torch

from gan import mnist_classifier as mc
from gan.mnist_data import load_mnist


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the MNIST reference classifier for the GAN metrics.")
    parser.add_argument("--data-dir", default=os.environ.get("GAN_DATA_DIR", "data"),
                        help="directory holding MNIST/raw (default: $GAN_DATA_DIR or 'data')")
    parser.add_argument("--out", default=str(mc.DEFAULT_WEIGHTS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 leaves the other core to a GAN training run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    splits = load_mnist(args.data_dir)
    started = time.perf_counter()
    model = mc.train_classifier(splits.train_x, splits.train_y, epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - started
    val_acc = mc.accuracy(model, splits.val_x, splits.val_y)
    test_acc = mc.accuracy(model, splits.test_x, splits.test_y)
    print(f"trained in {seconds:.0f} s on {args.threads} thread(s); "
          f"val accuracy {100 * val_acc:.2f}%, test accuracy {100 * test_acc:.2f}%")
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    meta = {"val_acc": val_acc, "test_acc": test_acc, "epochs": args.epochs, "seed": args.seed,
            "train_seconds": round(seconds, 1), "threads": args.threads, "torch": str(torch.__version__)}
    mc.write_classifier(mc.save_classifier, model, args.out, meta, test_acc, bar=0.992, reference=mc.DEFAULT_WEIGHTS)


if __name__ == "__main__":
    main()
