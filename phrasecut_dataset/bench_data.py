"""Data-path speed on synthetic PhraseCut: write, prepare, and read + transform (images per second).

    python -m phrasecut_dataset.bench_data --num_images 2000

"read + transform" is what training and evaluation do per image: decode the JPEG once, resize it
to --size and normalise it, and rasterise every one of its task masks at native size, resized to --size.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import datasets

from .builder import load_phrasecut
from .masks import decode_image, image_to_tensor, resize_image, row_masks
from .synthetic import write_synthetic_phrasecut


def read_and_transform(dataset: datasets.Dataset, size: int) -> int:
    """Run the per-image transform over the whole split; returns the number of masks made."""
    masks_made = 0
    for row in dataset.cast_column("image", datasets.Image(decode=False)):
        image_to_tensor(resize_image(decode_image(row["image"]), size))
        masks_made += len(row_masks(row, size, size))
    return masks_made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=352, help="Model input side.")
    parser.add_argument("--work_dir", default=None, help="Keep the data here (default: a temporary folder).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_size", type=int, default=160, help="Smallest synthetic image side.")
    parser.add_argument("--max_size", type=int, default=320, help="Largest (real PhraseCut images are ~500).")
    args = parser.parse_args(argv)
    logging.getLogger("phrasecut_dataset").setLevel(logging.WARNING)
    datasets.disable_progress_bars()

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="phrasecut_bench_"))
    try:
        start = time.perf_counter()
        raw = write_synthetic_phrasecut(
            work_dir / "raw",
            {"train": args.num_images},
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            overwrite=True,
        )
        write_s = time.perf_counter() - start

        start = time.perf_counter()
        train = load_phrasecut(raw, cache_dir=work_dir / f"cache_{time.time_ns()}", splits=["train"])["train"]
        prepare_s = time.perf_counter() - start

        start = time.perf_counter()
        masks_made = read_and_transform(train, args.size)
        read_s = time.perf_counter() - start
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    n = args.num_images
    results = {
        "images": n,
        "tasks": masks_made,
        "write_images_per_s": round(n / write_s, 1),
        "prepare_images_per_s": round(n / prepare_s, 1),
        "read_transform_images_per_s": round(n / read_s, 1),
        "read_transform_tasks_per_s": round(masks_made / read_s, 1),
        "size": args.size,
    }
    print(f"synthetic write:  {n} images in {write_s:.1f} s  ({results['write_images_per_s']} images/s)")
    print(f"prepare:          {n} images in {prepare_s:.1f} s  ({results['prepare_images_per_s']} images/s)")
    print(
        f"read + transform: {n} images / {masks_made} masks in {read_s:.1f} s  "
        f"({results['read_transform_images_per_s']} images/s, {results['read_transform_tasks_per_s']} masks/s)"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
