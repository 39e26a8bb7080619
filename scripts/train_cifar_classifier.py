#!/usr/bin/env python3
"""Train the CIFAR-10 reference classifier (weights/cifar10_classifier.pt), and save it only if it beats the accuracy bar.

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

from gan import cifar_classifier as cc
from gan.hardware import cpu_model
from gan.image_data import load_dataset
from gan.mnist_classifier import write_classifier


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the CIFAR-10 reference classifier for the GAN metrics.")
    parser.add_argument("--data-dir", default=os.environ.get("GAN_DATA_DIR", "data"),
                        help="directory holding cifar-10-batches-py/ or cifar10/{train,test}/ "
                             "(default: $GAN_DATA_DIR or 'data')")
    parser.add_argument("--out", default=str(cc.DEFAULT_WEIGHTS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--float32", action="store_true", help="train in float32 instead of bfloat16 autocast")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps (to measure speed); nothing is saved")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train, test = load_dataset("cifar10", args.data_dir, 32)
    print(f"train: {len(train):,} images from {train.source}; test: {len(test):,} from {test.source}")
    started = time.perf_counter()
    model = cc.train_classifier(train.images, train.labels, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, bf16=not args.float32, max_steps=args.max_steps)
    seconds = time.perf_counter() - started
    if args.max_steps is not None:
        print(f"stopped after {args.max_steps} steps in {seconds:.0f} s; nothing saved")
        return
    result = cc.evaluate(model, test.images, test.labels)
    print(f"trained in {seconds:.0f} s on {args.threads} thread(s) of {cpu_model()}; test accuracy "
          f"{100 * result['acc']:.2f}% with flip averaging, {100 * result['acc_no_flip']:.2f}% without")
    for name, acc in zip(test.class_names, result["per_class"]):
        print(f"  {name:>10}: {100 * acc:.1f}%")
    # Plain types only (str(), float()): weights_only loading refuses anything else.
    meta = {"test_acc": result["acc"], "test_acc_no_flip": result["acc_no_flip"],
            "per_class_acc": {n: a for n, a in zip(test.class_names, result["per_class"])},
            "class_names": list(test.class_names), "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "bf16": not args.float32,
            "train_seconds": round(seconds, 1), "threads": args.threads, "cpu": cpu_model(),
            "train_source": train.source, "test_source": test.source, "torch": str(torch.__version__)}
    write_classifier(cc.save_classifier, model, args.out, meta, result["acc"], bar=0.85, reference=cc.DEFAULT_WEIGHTS)


if __name__ == "__main__":
    main()
