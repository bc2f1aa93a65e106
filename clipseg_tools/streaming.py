"""Training on a data set read as a stream instead of downloaded whole (`run_train.py --streaming`), for data
too large for one disk.

The training split is a `datasets.IterableDataset`: shuffled through a buffer (seeded; each epoch reshuffles),
split between the training processes (`split_dataset_by_node`) and, within a process, between its data-loader
workers (by `datasets`, whole shards each). Every row is converted as the map-style path converts it
(`own_data.convert_row`, `semantic_data.convert_row`, or kept as it is when it is in the project's form
already), after the split: a process converts its own rows only (a `datasets` map would sit below the split
and convert every process's rows in each process).

`StreamedSamples` makes one training sample per row, as `batching.TrainingSamples` makes one per phrase: an
anchor phrase drawn in the row, its other phrases, negatives from the phrases the stream has shown so far.
All of a sample's randomness comes from (seed, epoch, process, worker, row), so a sample is reproducible.

Resuming: each process's position is the epoch and, per data-loader worker, the rows handed to the training
loop in it (counted as the loop takes batches, not as workers read ahead). A resumed run reads the same
stream again and passes over those rows without converting them. With 0 or 1 worker it sees exactly the
samples the uninterrupted run would have seen, in the same order. With several workers each worker continues
after its own rows, but the loader takes their batches in turn starting from the first worker, so batches
interleave in another order than the uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, get_worker_info

from . import own_data, semantic_data
from .batching import (
    TrainingOptions,
    add_negatives,
    collate_training,
    cropped_sample,
    finish_phrases,
)
from .data import REQUIRED_COLUMNS, check_shape
from .errors import CommandError
from .loader import create_loader
from .own_data import BadRow, ReferringColumns, SourceOptions

NEGATIVE_POOL_SIZE = 4096  # distinct phrases kept for negatives: bounded memory on an endless stream


@dataclass(frozen=True)
class RowForm:
    """How a streamed row becomes one of the project's rows: `kind` "project" (the PhraseCut export: as it is),
    "referring" or "semantic" (converted as the map-style path converts them)."""

    kind: str
    columns: ReferringColumns = ReferringColumns()
    label_column: str = "label"
    class_ids: tuple[int, ...] = ()  # semantic: the classes, and their prompts in the same order
    class_prompts: tuple[str, ...] = ()
    reduce_labels: bool = False
    local_root: str | None = None  # a local data set's folder: the only place its rows may name files in
    ignore_regions: bool = False  # its rows may mark pixels to leave out of the loss (`own_data.ignore_mask`)

    def convert(self, raw: dict, index: int) -> dict:
        """The project's row; raises `BadRow` for a row the map-style conversion would refuse."""
        if self.kind == "referring":
            image, mask, prompt = (raw[self.columns.image], raw[self.columns.mask], raw[self.columns.prompt])
            return own_data.convert_row(image, mask, prompt, index, self.local_root)
        if self.kind == "semantic":
            image, label = raw[self.columns.image], raw[self.label_column]
            ids, prompts = list(self.class_ids), list(self.class_prompts)
            return semantic_data.convert_row(
                image, label, index, ids, prompts, self.reduce_labels, self.local_root
            )
        if not (raw.get("image") or {}).get("bytes"):
            # Decoding would open the file the cell names instead: any file of this machine.
            raise CommandError(
                f"row {index} of the stream holds no image bytes: images are read only from the bytes stored in "
                "the data set, never from files it names; export it again with `python -m "
                "phrasecut_dataset.publish`, which embeds them"
            )
        return raw

    def phrases(self, raw: dict) -> list[str]:
        """The row's phrases (each mask's first wording, as `PhraseIndex` reads a split's), read without
        decoding anything: what the pool of negatives learns from a row, from rows a resumed run passes over
        too. Semantic data draws its negatives from all of its classes."""
        if self.kind == "project":
            return [task["phrase"] for task in raw["tasks"]]
        if self.kind == "semantic":
            return []
        prompts = raw[self.columns.prompt]
        mask = raw[self.columns.mask]
        per_mask = prompts if isinstance(mask, list) and not own_data.is_segmentation(mask) else [prompts]
        first = [cell[0] if isinstance(cell, list) and cell else cell for cell in per_mask or []]
        return [p.strip() for p in first if isinstance(p, str) and p.strip()]


def row_form(
    stream: datasets.IterableDataset,
    options: SourceOptions,
    where: str,
    dataset_name: str | None,
    cache_dir: str | None = None,
    local_root: str | None = None,
) -> RowForm:
    """What the stream's rows are, told from its columns as `data.in_project_form` tells a split's; a column
    the conversion needs and the stream lacks is named with its flag."""
    if own_data.is_project_form(stream):
        missing = [column for column in REQUIRED_COLUMNS if column not in stream.column_names]
        if missing:
            raise CommandError(
                f"{where} lacks the columns {missing}: it is not in the project's form (one row per image with "
                "its tasks)"
            )
        return RowForm("project", ignore_regions="ignore" in stream.column_names)
    columns = options.columns
    if semantic_data.is_semantic(stream, options.label_column) and columns.mask not in stream.column_names:
        for flag, name in (("--image_column", columns.image), ("--label_column", options.label_column)):
            if name not in stream.column_names:
                raise CommandError(
                    f"{where} has no column {name!r} (it has {stream.column_names}): name the right one with {flag}"
                )
        id2label = semantic_data.load_id2label(options.id2label, dataset_name, cache_dir)
        ids = tuple(sorted(id2label))
        return RowForm(
            "semantic",
            columns=columns,
            label_column=options.label_column,
            class_ids=ids,
            class_prompts=tuple(options.class_prompt_template.format(id2label[i]) for i in ids),
            reduce_labels=options.reduce_labels,
            local_root=local_root,
            ignore_regions=True,  # the ignore index: a stream cannot be scanned ahead for images that have it
        )
    check_shape(stream, options, where)
    own_data.check_columns(stream, columns, where)
    return RowForm("referring", columns=columns, local_root=local_root)


def process_stream(
    stream: datasets.IterableDataset, seed: int, buffer_size: int, rank: int, world_size: int
) -> datasets.IterableDataset:
    """This process's share of the stream: images left encoded, shuffled through a buffer of `buffer_size`
    rows (seeded; `set_epoch` reshuffles), split between the `world_size` processes."""
    shuffled = stream.decode(False).shuffle(seed=seed, buffer_size=buffer_size)
    return split_dataset_by_node(shuffled, rank=rank, world_size=world_size)


class PhrasePool:
    """Where negatives come from: the last `size` distinct phrases the stream has shown (the oldest goes first),
    or a fixed list (a semantic data set's class prompts)."""

    def __init__(self, size: int = NEGATIVE_POOL_SIZE, fixed: Sequence[str] = ()):
        self.phrases = list(fixed)
        self.slots = {phrase: k for k, phrase in enumerate(self.phrases)}
        self.size, self.grows, self.oldest = size, not fixed, 0

    def add(self, phrases: Sequence[str]) -> None:
        if not self.grows:
            return
        for phrase in phrases:
            if phrase in self.slots:
                continue
            if len(self.phrases) < self.size:
                self.slots[phrase] = len(self.phrases)
                self.phrases.append(phrase)
                continue
            del self.slots[self.phrases[self.oldest]]
            self.phrases[self.oldest], self.slots[phrase] = phrase, self.oldest
            self.oldest = (self.oldest + 1) % self.size

    def absent(self, present: set[str], rng: np.random.Generator) -> str:
        """A phrase not in `present`; "" (a negative with no text) when none turns up, as at the stream's start."""
        for _ in range(20 if self.phrases else 0):
            phrase = self.phrases[int(rng.integers(len(self.phrases)))]
            if phrase not in present:
                return phrase
        return ""


def other_tasks(count: int, anchor: int, extra: int, rng: np.random.Generator) -> list[int]:
    """`extra` other tasks of a row of `count` (repeats only if it has fewer), as `TrainingSamples` picks them."""
    if extra <= 0:
        return []
    others = [t for t in range(count) if t != anchor]
    if len(others) >= extra:
        return [int(t) for t in rng.choice(others, size=extra, replace=False)]
    return others + [int(t) for t in rng.choice(count, size=extra - len(others))]


def make_sample(row: dict, options: TrainingOptions, pool: PhrasePool, rng: np.random.Generator) -> dict:
    """One image of `row` (cropped, resized) with `phrases_per_image` of its phrases: the sample
    `TrainingSamples` makes, anchored at a phrase drawn in the row."""
    tasks = row["tasks"]
    anchor = int(rng.integers(len(tasks)))
    others = other_tasks(len(tasks), anchor, options.phrases_per_image - 1, rng)
    chosen = [tasks[k] for k in [anchor, *others]]
    sample = cropped_sample(row, chosen, options, rng)
    negatives = add_negatives(sample, row, options, rng, pool.absent)
    finish_phrases(sample, chosen, negatives, options, rng)
    return sample


class StreamedSamples(torch.utils.data.IterableDataset):
    """One training sample per row of a process's stream (`process_stream`), from where `start_at` says.

    Each sample carries `worker` and `rows`: the data-loader worker that made it and the stream rows it took
    (its own, and bad rows skipped before it), which the training loop counts as it takes the batch."""

    def __init__(
        self,
        stream: datasets.IterableDataset,
        form: RowForm,
        options: TrainingOptions,
        rank: int,
        where: str,
        skip_bad: bool = False,
        pool_size: int = NEGATIVE_POOL_SIZE,
    ):
        self.stream, self.form, self.options = stream, form, options
        self.rank, self.where, self.skip_bad, self.pool_size = rank, where, skip_bad, pool_size
        self.epoch, self.skip = 0, [0]

    def start_at(self, epoch: int, skip: Sequence[int] = (0,)) -> None:
        """Read epoch `epoch`'s stream, each worker passing over the first `skip[worker]` rows of its own."""
        self.epoch, self.skip = epoch, list(skip)
        self.stream.set_epoch(epoch)  # reshuffles the buffer and the shards' order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()  # `datasets` gives each worker its own shards
        worker = info.id if info else 0
        skip = self.skip[worker] if worker < len(self.skip) else 0
        pool = PhrasePool(self.pool_size, self.form.class_prompts)
        taken = 0
        for position, raw in enumerate(self.stream):
            if position >= skip:
                taken += 1
                sample = self.sample(raw, position, worker, pool)
                if sample is not None:
                    yield {**sample, "worker": worker, "rows": taken}
                    taken = 0
            pool.add(self.form.phrases(raw))  # after its sample: a row's negatives come from the rows before

    def sample(self, raw: dict, position: int, worker: int, pool: PhrasePool) -> dict | None:
        """The sample of the row at `position` of this worker's stream; None for a bad row with `skip_bad`
        (otherwise named) or a row without phrases."""
        try:
            row = self.form.convert(raw, position)
        except BadRow as error:
            if self.skip_bad:
                return None
            raise CommandError(
                f"{self.where}, row {position} of the shuffled stream of process {self.rank} (worker {worker}, "
                f"epoch {self.epoch}): {error}; pass --skip_bad_samples to skip such rows"
            ) from None
        if not row["tasks"]:
            return None
        rng = np.random.default_rng([self.options.seed, self.epoch, self.rank, worker, position])
        return make_sample(row, self.options, pool, rng)


def collate_streamed(items: list[dict], **collate_options: Any) -> dict[str, Any]:
    """`collate_training`'s batch (labels packed), with `stream_rows`: (worker, stream rows the batch took)."""
    batch = collate_training(items, pack_labels=True, **collate_options)
    batch["stream_rows"] = (items[0]["worker"], sum(item["rows"] for item in items))
    return batch


def stream_loader(
    samples: StreamedSamples,
    tokenizer: Any,
    max_length: int,
    *,
    images_per_batch: int,
    device: torch.device,
    num_workers: int,
    seed: int,
    pad_to_multiple_of: int | None = None,
) -> DataLoader:
    """Batches of `images_per_batch` samples; each worker drops its last incomplete batch (fixed shapes). Its
    workers start afresh each epoch, so that they read the epoch and the rows to pass over set then."""
    collate = partial(
        collate_streamed, tokenizer=tokenizer, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of
    )
    return create_loader(
        samples,
        collate,
        batch_size=images_per_batch,
        device=device,
        num_workers=num_workers,
        drop_last=True,
        seed=seed,
    )


def start_position(workers: int, epoch: int = 0) -> dict[str, Any]:
    """A process's place at the start of an epoch: no rows taken by any of its `workers` (0: one reader)."""
    return {"epoch": epoch, "workers": workers, "rows": [0] * max(1, workers)}


def resumed_positions(
    saved: list[dict[str, Any]] | None, processes: int, workers: int
) -> tuple[list[dict[str, Any]], str]:
    """Every process's place to start from, from a checkpoint's (`saved`), and what that means, for the log."""
    if not saved:
        return [start_position(workers) for _ in range(processes)], (
            "the checkpoint holds no stream position (it was not trained with --streaming): the stream starts "
            "from its beginning"
        )
    if len(saved) != processes:
        epoch = saved[0]["epoch"]
        return [start_position(workers, epoch) for _ in range(processes)], (
            f"the checkpoint's streams were read by {len(saved)} processes, this run has {processes}: each starts "
            f"epoch {epoch} of its new share of the stream from its beginning"
        )
    if saved[0]["workers"] != workers:
        positions = []
        for position in saved:
            share, more = divmod(sum(position["rows"]), max(1, workers))
            rows = [share + (k < more) for k in range(max(1, workers))]
            positions.append({**start_position(workers, position["epoch"]), "rows": rows})
        return positions, (
            f"the checkpoint's streams were read by {saved[0]['workers']} data-loader worker(s) per process, this "
            f"run has {workers}: each process continues epoch {saved[0]['epoch']} after as many rows, split among its "
            "workers, but not the same rows as the uninterrupted run"
        )
    rows = ", ".join(f"{sum(p['rows']):,}" for p in saved)
    said = f"resuming epoch {saved[0]['epoch']} of the stream after the rows each process had taken ({rows})"
    if workers <= 1:
        return saved, f"{said}: exactly the samples and order of the uninterrupted run"
    return saved, (
        f"{said}: each of the {workers} data-loader workers continues after its own rows, but their batches "
        "interleave in another order than the uninterrupted run's (exact with 0 or 1 worker)"
    )


def epoch_batches(loader: DataLoader, positions: list[dict[str, Any]], rank: int) -> Iterator[dict]:
    """This process's batches of the epoch `positions[rank]` is in, from where it is in it. Each batch's rows
    are counted into the position as the training loop takes the batch (the loader reads ahead); at the
    stream's end the position moves to the next epoch. The entry is looked up at each batch: a checkpoint
    refreshes the list in place with every process's (`gather_object`)."""
    samples: StreamedSamples = loader.dataset
    start = positions[rank]
    epoch, workers, fresh = start["epoch"], start["workers"], not any(start["rows"])
    samples.start_at(epoch, start["rows"])
    taken = 0
    for batch in loader:
        worker, rows = batch.pop("stream_rows")
        positions[rank]["rows"][worker] += rows
        taken += 1
        yield batch
    if not taken and fresh:
        raise CommandError(
            f"{samples.where}: process {rank} got no full batch of {loader.batch_size} images from its share of "
            f"the stream in epoch {epoch}: give more rows, or a smaller --per_device_train_batch_size"
        )
    positions[rank] = start_position(workers, epoch + 1)
