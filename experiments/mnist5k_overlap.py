"""How many mnist5k images also occur in the official MNIST test set (exact pixel match)?

The certified runs train on both mnist5k splits (``data.train_split=train+test``) and are certified on the official
test set; that is fair only if the two share no image. This script checks it by hashing every image's 784 bytes:

    python experiments/mnist5k_overlap.py --mnist_test_dir ../shared/data/mnist

It prints the number of shared images per mnist5k split and exits 1 if any is found.
"""
from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np

from lcnn_jax import data as data_lib


def image_hashes(images: np.ndarray) -> set[str]:
    """MD5 of each image's bytes after mapping [0, 1] floats back to the 8-bit values they came from."""
    u8 = np.rint(np.asarray(images) * 255).astype(np.uint8)
    return {hashlib.md5(im.tobytes()).hexdigest() for im in u8}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist_test_dir", required=True, help="folder with the official t10k IDX files")
    args = p.parse_args(argv)
    official = image_hashes(data_lib.load_split("mnist", "test", data_dir=args.mnist_test_dir).images)
    shared = 0
    for split in ("train", "test"):
        n = len(image_hashes(data_lib.load_split("mnist5k", split).images) & official)
        print(f"mnist5k {split}: {n} image(s) also in the official MNIST test set ({len(official)} distinct images)")
        shared += n
    return 1 if shared else 0


if __name__ == "__main__":
    sys.exit(main())
