"""Decode a data set into the cache and time a cold and a warm load.

    tar xzf ../shared/datasets/cifar10-jpeg.tar.gz   # once: the JPEG copy of CIFAR-10 into ./cifar10-jpeg
    python -m data_zoo --name imagefolder --root cifar10-jpeg [--cache-dir DIR] [--fresh]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from data_zoo.cache import default_cache_dir, load_images
from data_zoo.sources import list_datasets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example:\n" + "\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="imagefolder", choices=list_datasets())
    p.add_argument("--root", help="data root (not needed for synthetic)")
    p.add_argument("--cache-dir", help=f"cache folder (default {default_cache_dir()})")
    p.add_argument("--fresh", action="store_true", help="time the first decode in an empty temporary cache")
    p.add_argument("--download", action="store_true", help="cifar10/cifar100: download when missing")
    args = p.parse_args()
    options = {"download": True} if args.download else {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = tmp if args.fresh else args.cache_dir
        start = time.perf_counter()
        images = load_images(args.name, args.root, cache, **options)
        first = time.perf_counter() - start
        start = time.perf_counter()
        load_images(args.name, args.root, cache, **options)
        second = time.perf_counter() - start
    print(f"{args.name}: train {images.train_x.shape}, test {images.test_x.shape}, classes {', '.join(images.classes)}")
    print(f"first load (decode{'' if args.fresh else ' or cache'}): {first:.2f} s")
    print(f"second load (cache): {second:.2f} s   speed-up x{first / second:.1f}")


if __name__ == "__main__":
    main()
