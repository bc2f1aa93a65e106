"""CPU cost of one training sample, with the training images at full size and stored at the model's size.

    python benchmarks/data_samples.py --num_images 400 --samples 300

What one data-loader worker does per sample (`TrainingSamples`, one phrase per image, random square crop):
read the row, decode the JPEG, rasterise the mask, crop, resize to the model's size. Synthetic PhraseCut-sized
images (375-500 px). One process; each measurement is taken twice after a few warm-up samples.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.batching import PhraseIndex, TrainingOptions, TrainingSamples  # noqa: E402
from clipseg_tools.data import load_splits  # noqa: E402
from phrasecut_dataset import shrink_images, write_synthetic_phrasecut  # noqa: E402


def milliseconds_per_sample(samples: TrainingSamples, count: int) -> float:
    for item in range(5):
        samples[item]
    start = time.perf_counter()
    for item in range(count):
        samples[item % len(samples)]
    return (time.perf_counter() - start) / count * 1e3


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=400)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--image_size", type=int, default=352)
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="clipseg_data_samples_"))
    data_dir = write_synthetic_phrasecut(
        scratch / "data", {"train": args.num_images}, seed=0, min_size=375, max_size=500, overwrite=True
    )
    split = load_splits(["train"], data_dir=str(data_dir), cache_dir=str(scratch / "cache"))["train"]
    options = TrainingOptions(image_size=args.image_size, prompt_template="plain")
    results = {}
    for name, data in (
        ("full size", split),
        ("stored at the model's size", shrink_images(split, args.image_size)),
    ):
        samples = TrainingSamples(data, PhraseIndex.from_dataset(data), options)
        results[name] = [milliseconds_per_sample(samples, args.samples) for _ in range(2)]
        print(
            f"{name:>27}: " + " / ".join(f"{ms:.2f}" for ms in results[name]) + " ms per sample", flush=True
        )
    return results


if __name__ == "__main__":
    main()
