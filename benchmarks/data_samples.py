"""CPU cost of the data pipeline: a worker's samples, and the main process's share of every batch.

    python benchmarks/data_samples.py --num_images 400 --samples 640

Each figure is taken --repeats times (the best is the one to compare: the others add what else the machine
was doing), on synthetic PhraseCut-sized images (375-500 px), with one thread in this process as a GPU
machine's pin-memory thread has:
- the main process's share of a training batch: taking a ready batch from a worker process and copying it
  once (the pin-memory thread's work), with the masks as bool or packed eight to a byte (`collate_training`'s
  `pack_labels`), handed over the default way (fresh shared memory per batch) or through the worker's
  reused buffers (`SharedBatchRing`, what run_train.py uses); random images and masks of the batch's shapes;
- the same for an evaluation batch of 8 whole images with their native-size masks (`collate_evaluation`);
- per sample, with the training images at full size and stored at the model's size: what `TrainingSamples`
  does for one item (read the row, decode the JPEG, rasterise the mask, crop, resize), and a worker's whole
  job for a batch of --batch_size divided by the batch (the samples, `collate_training`, the default
  hand-over: its tensors moved to shared memory, as a worker's queue does when it pickles them);
- the pipeline alone: samples per second from one worker process into the main process, either hand-over.

With --own_data, instead: the same pictures as a user's own referring rows (image, binary mask images, prompts;
`own_synthetic.referring_rows`): their conversion to the project's rows (`own_data.referring_to_rows`) in
images per second, in one process and in one per CPU, and a worker's time per training sample on the converted
rows (masks decoded from their 1-bit PNGs) against the PhraseCut rows they came from (masks drawn from
polygons), each at full size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.batching import (  # noqa: E402
    EvaluationImages,
    PhraseIndex,
    TrainingOptions,
    TrainingSamples,
    collate_evaluation,
    collate_training,
)
from clipseg_tools.data import load_splits, shrink_images  # noqa: E402
from clipseg_tools.demo import demo_words  # noqa: E402
from clipseg_tools.handover import SharedBatchRing  # noqa: E402
from clipseg_tools.own_data import ReferringColumns, referring_to_rows  # noqa: E402
from clipseg_tools.own_synthetic import REFERRING_FEATURES, referring_rows  # noqa: E402
from clipseg_tools.tiny_clip import build_word_tokenizer  # noqa: E402
from clipseg_tools.transforms import pack_masks  # noqa: E402
from phrasecut_dataset import write_synthetic_phrasecut  # noqa: E402


def milliseconds_per_sample(samples: TrainingSamples, count: int) -> float:
    for item in range(5):
        samples[item]
    start = time.perf_counter()
    for item in range(count):
        samples[item % len(samples)]
    return (time.perf_counter() - start) / count * 1e3


def milliseconds_per_batched_sample(samples: TrainingSamples, collate, count: int, batch_size: int) -> float:
    """A worker's time per sample: make a batch, collate it, move its tensors to shared memory."""
    batches = max(1, count // batch_size)

    def one_batch(first: int) -> None:
        items = [samples[(first + k) % len(samples)] for k in range(batch_size)]
        for value in collate(items).values():
            if isinstance(value, torch.Tensor):
                value.share_memory_()

    one_batch(0)
    start = time.perf_counter()
    for b in range(batches):
        one_batch(b * batch_size)
    return (time.perf_counter() - start) / (batches * batch_size) * 1e3


class WorkerBatches(Dataset):
    """Batches of --batch_size random model-size images and masks, made whole by a worker process."""

    def __init__(self, batch_size: int, size: int, packed: bool):
        self.batch_size, self.size, self.packed = batch_size, size, packed

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        shape = (self.batch_size, self.size, self.size)
        pixels = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=generator)
        masks = torch.rand(shape, generator=generator) > 0.5
        labels = {"packed_labels": pack_masks(masks)} if self.packed else {"labels": masks}
        return {"pixel_values": pixels.permute(0, 3, 1, 2), **labels}


def _whole_batch(batch: dict) -> dict:
    return batch


def _copy_once(batch: dict) -> None:
    for value in batch.values():
        for tensor in value if isinstance(value, list) else [value]:
            if isinstance(tensor, torch.Tensor):
                tensor.clone()


def main_process_ms_per_batch(
    dataset: Dataset, collate: Callable, ring: bool, batch_size: int | None = None, batches: int = 3
) -> float:
    """Take ready batches from a worker's queue and copy each once, as a pin-memory thread does. With
    `ring`, the worker's buffers have each carried a batch before (the steady state of a run), and the copy
    is the ring's own."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=1,
        prefetch_factor=batches,
        collate_fn=SharedBatchRing(collate, slots=batches) if ring else collate,
    )
    ready = iter(loader)
    for _ in range(2 * batches):
        next(ready)
    time.sleep(3 + batches)  # the worker fills its queue: only the main process's work is timed
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(ready)
        if not ring:  # the ring's batches arrive copied out of its buffers already
            _copy_once(batch)
    return (time.perf_counter() - start) / batches * 1e3


def pipeline_samples_per_second(
    samples: TrainingSamples, collate: Callable, ring: bool, batch_size: int, batches: int
) -> float:
    """Samples per second through one worker process (samples, collate, hand-over) into the main process,
    each batch copied once there (the ring's batches arrive copied)."""
    handover = SharedBatchRing(collate) if ring else collate
    loader = DataLoader(samples, batch_size=batch_size, shuffle=True, num_workers=1, collate_fn=handover)
    ready = iter(loader)
    next(ready)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(ready)
        if not ring:
            _copy_once(batch)
    return batches * batch_size / (time.perf_counter() - start)


def report(results: dict, name: str, key: str, values: list[float], digits: int, what: str) -> None:
    results[name] = {key: values}
    print(f"{name:>44}: " + " / ".join(f"{v:.{digits}f}" for v in values) + f" {what}", flush=True)


def phrasecut_rows(num_images: int, scratch: Path) -> Any:
    """Synthetic PhraseCut-sized rows (375-500 px), prepared by the project's builder."""
    data_dir = write_synthetic_phrasecut(
        scratch / "data", {"train": num_images}, seed=0, min_size=375, max_size=500, overwrite=True
    )
    (split,) = load_splits(
        {"the samples' data": "train"}, data_dir=str(data_dir), cache_dir=str(scratch / "cache")
    )
    return split


def own_data_costs(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Conversion speed of referring rows and the training samples' cost on them against PhraseCut's rows."""
    results: dict[str, dict[str, list[float]]] = {}
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    scratch = Path(tempfile.mkdtemp(prefix="clipseg_own_data_"))
    phrasecut = phrasecut_rows(args.num_images, scratch)
    referring = datasets.Dataset.from_dict(
        referring_rows(phrasecut.cast_column("image", datasets.Image(decode=False))),
        features=REFERRING_FEATURES,
    )
    for processes in (None, max(2, os.cpu_count() or 1)):
        rates = []
        for _ in range(args.repeats):  # an in-memory source: `map` caches nothing, each repeat converts
            start = time.perf_counter()
            converted, _ = referring_to_rows(referring, ReferringColumns(), "benchmark", num_proc=processes)
            rates.append(len(converted) / (time.perf_counter() - start))
        name = f"conversion, {processes or 1} process(es)"
        report(
            results, name, "images_per_second", rates, 0, "images/s (referring rows to the project's rows)"
        )
    options = TrainingOptions(image_size=args.image_size, prompt_template="plain")
    for name, data in (
        ("PhraseCut rows (polygons)", phrasecut),
        ("converted own rows (PNG masks)", converted),
    ):
        samples = TrainingSamples(data, PhraseIndex.from_dataset(data), options)
        per_sample = [milliseconds_per_sample(samples, args.samples) for _ in range(args.repeats)]
        report(results, name, "per_sample_ms", per_sample, 2, "ms per training sample, full-size images")
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=400)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=352)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--own_data", action="store_true", help="time a user's own data instead (see above)")
    args = parser.parse_args(argv)
    if args.own_data:
        return own_data_costs(args)
    results: dict[str, dict[str, list[float]]] = {}
    # One thread, as the loader's pin-memory thread sets for itself on a GPU machine (and as each worker
    # runs): two would make the copies here contend with the worker process for this machine's two cores.
    torch.set_num_threads(1)

    # First, in a process that has not yet allocated much: the copies' destinations behave as the pinned
    # memory a GPU machine's loader reuses (fresh allocations in a fragmented heap add page faults).
    for packed, ring in ((False, False), (True, False), (True, True)):
        name = "main process, masks " + ("packed" if packed else "as bool") + (", reused buffers" * ring)
        batches = WorkerBatches(args.batch_size, args.image_size, packed)
        per_batch = [main_process_ms_per_batch(batches, _whole_batch, ring) for _ in range(args.repeats)]
        what = f"ms per training batch of {args.batch_size} taken from a worker and copied once"
        report(results, name, "per_batch_ms", per_batch, 1, what)

    scratch = Path(tempfile.mkdtemp(prefix="clipseg_data_samples_"))
    split = phrasecut_rows(args.num_images, scratch)
    tokenizer = build_word_tokenizer(demo_words(), scratch / "tokenizer")
    collate = partial(
        collate_training, tokenizer=tokenizer, max_length=tokenizer.model_max_length, pack_labels=True
    )
    options = TrainingOptions(image_size=args.image_size, prompt_template="plain")
    stored = shrink_images(split, args.image_size)
    for name, data in (("full size", split), ("stored at the model's size", stored)):
        samples = TrainingSamples(data, PhraseIndex.from_dataset(data), options)
        per_sample = [milliseconds_per_sample(samples, args.samples) for _ in range(args.repeats)]
        report(results, name, "per_sample_ms", per_sample, 2, "ms per sample")
        in_batch = [
            milliseconds_per_batched_sample(samples, collate, args.samples, args.batch_size)
            for _ in range(args.repeats)
        ]
        report(
            results,
            name + ", in a worker's batch",
            "per_sample_in_batch_ms",
            in_batch,
            2,
            f"ms per sample in a batch of {args.batch_size} (collate, default hand-over)",
        )

    # Enough batches of 8 for the warm-up and the timed ones, however few images there are.
    evaluation = EvaluationImages(split, args.image_size, rows=[i % len(split) for i in range(8 * 12)])
    collate_eval = partial(collate_evaluation, tokenizer=tokenizer, max_length=tokenizer.model_max_length)
    for ring in (False, True):
        name = "main process, evaluation, " + ("reused buffers" if ring else "default hand-over")
        per_batch = [
            main_process_ms_per_batch(evaluation, collate_eval, ring, batch_size=8)
            for _ in range(args.repeats)
        ]
        what = "ms per evaluation batch of 8 images (native-size masks) taken from a worker and copied once"
        report(results, name, "per_batch_ms", per_batch, 1, what)

    samples = TrainingSamples(stored, PhraseIndex.from_dataset(stored), options)
    batches = max(2, args.samples // args.batch_size)
    for ring in (False, True):
        name = "pipeline alone, " + ("reused buffers" if ring else "default hand-over")
        rates = [
            pipeline_samples_per_second(samples, collate, ring, args.batch_size, batches)
            for _ in range(args.repeats)
        ]
        report(
            results,
            name,
            "samples_per_second",
            rates,
            0,
            "samples/s from one worker, images stored at the model's size",
        )
    return results


if __name__ == "__main__":
    main()
