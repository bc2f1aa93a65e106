"""From dataset rows (one per image, all its phrases) to model batches, for training and evaluation.

Each image is decoded once for all of the phrases drawn from it, and the model's vision tower then runs
once for that image too (`image_index` says which image each phrase belongs to).

All randomness of a training sample comes from a generator seeded by (seed, epoch, index): a sample is
the same whichever worker makes it, and a resumed run sees exactly the samples it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler

from phrasecut_dataset.masks import polygons_to_mask

from .errors import CommandError
from .loader import create_loader
from .own_data import ignore_mask, mask_from_png
from .prompts import apply_template
from .transforms import (
    decode_image,
    decode_pixels,
    image_to_uint8,
    pack_masks,
    resize_mask,
    resize_pixels,
    stack_images,
)

IMAGE_COLUMN = "image"


@dataclass
class PhraseIndex:
    """Where every phrase of a split lives: task t is task `task_in_row[t]` of row `row_of_task[t]`."""

    row_of_task: np.ndarray
    task_in_row: np.ndarray
    phrases: list[str]
    tasks_by_phrase: dict[str, np.ndarray]
    row_starts: np.ndarray  # row r's tasks are row_starts[r] .. row_starts[r + 1] - 1

    @classmethod
    def from_dataset(cls, dataset: Any) -> PhraseIndex:
        """Read only the phrases (no images, no polygons), in the dataset's row order."""
        if dataset._indices is not None:  # a select/shuffle view: the Arrow table holds other rows
            dataset = dataset.flatten_indices()
        tasks = dataset.data.column("tasks")
        counts = pc.list_value_length(tasks).to_numpy().astype(np.int64)
        phrases = pc.struct_field(pc.list_flatten(tasks), "phrase").to_pylist()
        row_starts = np.concatenate([[0], np.cumsum(counts)])
        row_of_task = np.repeat(np.arange(len(counts)), counts)
        task_in_row = np.arange(len(phrases)) - row_starts[row_of_task]
        by_phrase: dict[str, list[int]] = {}
        for task, phrase in enumerate(phrases):
            by_phrase.setdefault(phrase, []).append(task)
        tasks_by_phrase = {phrase: np.asarray(ids) for phrase, ids in by_phrase.items()}
        return cls(row_of_task, task_in_row, phrases, tasks_by_phrase, row_starts)

    def __len__(self) -> int:
        return len(self.phrases)

    def phrase_ids(self, rows: Sequence[int], image_index: torch.Tensor) -> np.ndarray:
        """Ids of a batch's phrases: `rows[i]` is the dataset row of image i, and each image's phrases
        come in its task order (as `EvaluationImages` gives them)."""
        image_index = image_index.cpu().numpy()
        phrase_rows = np.asarray(rows)[image_index]
        within = np.concatenate([np.arange(n) for n in np.bincount(image_index)])
        return self.row_starts[phrase_rows] + within


class EpochSampler(Sampler[int]):
    """A fresh permutation of the tasks each epoch, fixed by (seed, epoch). Yields `epoch * n + task`, so
    the dataset knows the epoch too; `set_epoch` picks the epoch (resuming sets it directly)."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        return iter((self.epoch * self.num_items + order).tolist())


def random_square_crop(
    anchor_mask: np.ndarray, rng: np.random.Generator, tries: int = 50, min_fraction: float = 0.05
) -> tuple[int, int, int]:
    """(top, left, side) of a random square crop of side min(H, W), as the original CLIPSeg training:
    the first of `tries` random crops in which the phrase's mask covers more than `min_fraction` of the
    image area, else the crop that keeps the most of the mask."""
    height, width = anchor_mask.shape
    side = min(height, width)
    vertical = height > width
    # The crop slides along one axis only: mask pixels per line, summed, give each crop's count in O(1).
    per_line = anchor_mask.view(np.uint8).sum(axis=1 if vertical else 0, dtype=np.int32)  # 2x bool's sum
    cumulative = np.concatenate([[0], np.cumsum(per_line)])
    positions = (height if vertical else width) - side + 1
    needed = min_fraction * height * width
    best_offset, best_count = 0, -1
    for _ in range(tries):
        offset = int(rng.integers(positions))
        count = cumulative[offset + side] - cumulative[offset]
        if count > needed:
            best_offset = offset
            break
        if count > best_count:
            best_offset, best_count = offset, count
    return (best_offset, 0, side) if vertical else (0, best_offset, side)


def visual_prompt(
    image: Image.Image, mask: np.ndarray, size: int, blur: float = 3.0, background: float = 0.1
) -> Image.Image:
    """The paper's best visual prompt engineering: blur and darken the background, crop around the object
    with 10% context, pad to a square, resize. Done on pixels (the original worked on normalised values)."""
    pixels = np.asarray(image, dtype=np.float32)
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=blur)), dtype=np.float32)
    keep = mask[:, :, None].astype(np.float32)
    composed = pixels * keep + background * blurred * (1.0 - keep)
    rows, cols = np.nonzero(mask)
    if len(rows):
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        context_y, context_x = int(0.1 * (bottom - top)), int(0.1 * (right - left))
        top, left = max(0, top - context_y), max(0, left - context_x)
        bottom, right = min(mask.shape[0], bottom + context_y), min(mask.shape[1], right + context_x)
        composed = composed[top:bottom, left:right]
    height, width = composed.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, 3), dtype=np.float32)
    square[
        (side - height) // 2 : (side - height) // 2 + height,
        (side - width) // 2 : (side - width) // 2 + width,
    ] = composed
    return Image.fromarray(square.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)


def wordings(task: Mapping) -> list[str]:
    """A task's prompts: its phrase, and the other wordings of the same mask a user's data may give."""
    return [task["phrase"], *(task.get("other_phrases") or [])]


def draw_wording(task: Mapping, rng: np.random.Generator) -> str:
    """One of a task's wordings for a training sample; a task with one (PhraseCut's) draws nothing, so its
    samples stay those of a run without this choice."""
    options = wordings(task)
    return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]


def read_image(row: dict, decode: Callable[[Any], Any] = decode_image) -> Any:
    """A row's image, decoded (a PIL image, or an RGB array [H, W, 3] with `decode_pixels`); a broken one is
    named (the data should have been validated when prepared)."""
    try:
        return decode(row[IMAGE_COLUMN])
    except (OSError, ValueError, SyntaxError) as error:
        raise CommandError(
            f"image {row.get('image_id')} cannot be decoded ({error}); prepare the data again from the raw "
            "folder with --skip_bad_samples to leave such images out"
        ) from error


def task_mask(task: Mapping, row: Mapping, height: int, width: int) -> np.ndarray:
    """One prepared task's mask on its image (height x width), drawn the official way; unusable polygons are
    named with the task and the image."""
    try:
        if task.get("mask"):  # a user's own data: the mask as stored (own_data)
            return mask_from_png(task["mask"], height, width)
        return polygons_to_mask(task["polygons"], height, width)
    except (TypeError, ValueError, KeyError, OSError) as error:
        raise CommandError(
            f"task {task.get('task_id')} of image {row.get('image_id')} has an unusable mask or polygons ({error}); prepare "
            "the data again from the raw folder"
        ) from error


def row_masks(row: Mapping, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """The masks of all of a row's tasks, in its task order: bool [K, height, width], drawn on the image's own
    size: `size` (height, width) where the decoded image is at hand, else the row's `height` and `width`."""
    height, width = size or (int(row["height"]), int(row["width"]))
    masks = np.zeros((len(row["tasks"]), height, width), dtype=bool)
    for k, task in enumerate(row["tasks"]):
        masks[k] = task_mask(task, row, height, width)
    return masks


@dataclass
class TrainingOptions:
    image_size: int = 352
    phrases_per_image: int = 1
    negative_prob: float = 0.2
    prompt_template: str = "shuffle+"
    random_crop: bool = True
    crop_tries: int = 50
    crop_min_fraction: float = 0.05
    visual_prompts: bool = False
    mix_text_min: float = 0.0
    mix_text_max: float = 0.5
    ignore_regions: bool = False  # the data marks pixels to leave out (`own_data.has_ignore_regions`)
    seed: int = 0


def cropped_sample(
    row: Mapping, tasks: list[Mapping], options: TrainingOptions, rng: np.random.Generator
) -> dict:
    """A training sample's image: `row`'s picture cropped (a random square around the first task's mask) and
    resized, with `tasks`' masks and first wordings, and its ignore region when the data marks one."""
    pixels = read_image(row, decode_pixels)
    masks = np.stack([task_mask(task, row, *pixels.shape[:2]) for task in tasks])
    ignore = ignore_mask(row, *pixels.shape[:2]) if options.ignore_regions else None
    if options.random_crop:
        top, left, side = random_square_crop(masks[0], rng, options.crop_tries, options.crop_min_fraction)
        pixels = pixels[top : top + side, left : left + side]  # a view: copied once, by the collate
        masks = masks[:, top : top + side, left : left + side]
        ignore = None if ignore is None else ignore[top : top + side, left : left + side]
    size = options.image_size
    sample = {
        "pixel_values": image_to_uint8(resize_pixels(pixels, size)),
        "masks": torch.from_numpy(resize_mask(masks, size)),
        "phrases": [task["phrase"] for task in tasks],
    }
    if ignore is not None:
        sample["ignore"] = torch.from_numpy(np.ascontiguousarray(resize_mask(ignore, size)))
    return sample


def add_negatives(
    sample: dict,
    row: Mapping,
    options: TrainingOptions,
    rng: np.random.Generator,
    absent_phrase: Callable[[set[str], np.random.Generator], str],
) -> set[int]:
    """With probability `negative_prob` each phrase of `sample` becomes one absent from the row (empty mask);
    returns which did."""
    present = {phrase for task in row["tasks"] for phrase in wordings(task)}
    negatives = set()
    for k in range(len(sample["phrases"])):
        if rng.random() < options.negative_prob:
            sample["phrases"][k] = absent_phrase(present, rng)
            sample["masks"][k] = False
            negatives.add(k)
    return negatives


def finish_phrases(
    sample: dict,
    tasks: list[Mapping],
    negatives: set[int],
    options: TrainingOptions,
    rng: np.random.Generator,
) -> None:
    """The positives' wordings drawn (a user's data may give several per mask), then the prompt templates."""
    for k, task in enumerate(tasks):
        if k not in negatives:
            sample["phrases"][k] = draw_wording(task, rng)
    sample["phrases"] = [
        apply_template(p, options.prompt_template, rng) if p else p for p in sample["phrases"]
    ]


class TrainingSamples(Dataset):
    """One item = one image (cropped, resized) and `phrases_per_image` of its phrases with their masks.

    Items are anchored at a task, so drawing items uniformly draws phrases uniformly, as in the paper.
    With probability `negative_prob` a phrase is swapped for one absent from the image (empty mask).
    With `visual_prompts`, each phrase also gets an example image made from another sample of the same
    phrase and a text weight for the paper's text/visual mix.
    """

    def __init__(self, dataset: Any, index: PhraseIndex, options: TrainingOptions):
        self.dataset = dataset
        self.index = index
        self.options = options
        self.all_phrases = sorted(index.tasks_by_phrase)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        epoch, anchor = divmod(int(item), len(self.index))
        rng = np.random.default_rng([self.options.seed, epoch, anchor])
        row_id = int(self.index.row_of_task[anchor])
        row = self.dataset[row_id]
        chosen = self._choose_tasks(row_id, anchor, rng)
        tasks = [row["tasks"][int(self.index.task_in_row[t])] for t in chosen]
        sample = cropped_sample(row, tasks, self.options, rng)
        negatives = add_negatives(sample, row, self.options, rng, self._absent_phrase)
        if self.options.visual_prompts:
            self._add_visual_prompts(sample, chosen, rng)
        finish_phrases(
            sample, tasks, negatives, self.options, rng
        )  # after the example images: found by phrase
        return sample

    def _choose_tasks(self, row_id: int, anchor: int, rng: np.random.Generator) -> list[int]:
        """The anchor plus K-1 other tasks of the same image (repeats only if the image has fewer)."""
        first, last = self.index.row_starts[row_id], self.index.row_starts[row_id + 1]
        others = [t for t in range(first, last) if t != anchor]
        extra = self.options.phrases_per_image - 1
        if extra <= 0:
            return [anchor]
        if len(others) >= extra:
            picked = rng.choice(others, size=extra, replace=False).tolist()
        else:
            picked = others + rng.choice(np.arange(first, last), size=extra - len(others)).tolist()
        return [anchor] + [int(t) for t in picked]

    def _absent_phrase(self, present: set[str], rng: np.random.Generator) -> str:
        for _ in range(20):
            phrase = self.all_phrases[int(rng.integers(len(self.all_phrases)))]
            if phrase not in present:
                return phrase
        return ""  # every phrase of the split is in this image: keep it a negative with no text

    def _add_visual_prompts(self, sample: dict, chosen: list[int], rng: np.random.Generator) -> None:
        """Example images from another sample of each phrase, for the phrases that have one (`visual_index`,
        their positions); those get a text weight below 1, the others text only (weight 1)."""
        size = self.options.image_size
        visuals, positions, weights = [], [], []
        for k, phrase in enumerate(sample["phrases"]):
            candidates = self.index.tasks_by_phrase.get(phrase, np.empty(0, dtype=np.int64))
            candidates = candidates[candidates != chosen[k]]
            if not len(candidates):
                weights.append(1.0)
                continue
            support = int(candidates[rng.integers(len(candidates))])
            row = self.dataset[int(self.index.row_of_task[support])]
            support_image = read_image(row)
            support_task = row["tasks"][int(self.index.task_in_row[support])]
            mask = task_mask(support_task, row, support_image.height, support_image.width)
            visuals.append(image_to_uint8(visual_prompt(support_image, mask, size)))
            positions.append(k)
            weights.append(float(rng.uniform(self.options.mix_text_min, self.options.mix_text_max)))
        sample["conditional_pixel_values"] = visuals  # [3, S, S] each, stacked by the collate
        sample["visual_index"] = torch.tensor(positions, dtype=torch.long)
        sample["text_weight"] = torch.tensor(weights)


def tokenize(
    tokenizer: Any, phrases: Sequence[str], max_length: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad on the right to the longest phrase, rounded up to a multiple of `pad_to_multiple_of` (at most
    `max_length`: fewer distinct shapes for a compiled model and its CUDA graphs; padding after the end token
    changes no embedding, which is why the training step can leave the attention mask out); cut phrases
    longer than the text tower (the end token is kept)."""
    tokens = tokenizer(
        list(phrases),
        padding=True,
        padding_side="right",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    length = tokens["input_ids"].shape[1]
    if pad_to_multiple_of and length % pad_to_multiple_of:
        extra = min(max_length, length + pad_to_multiple_of - length % pad_to_multiple_of) - length
        tokens["input_ids"] = F.pad(tokens["input_ids"], (0, extra), value=tokenizer.pad_token_id)
        tokens["attention_mask"] = F.pad(tokens["attention_mask"], (0, extra), value=0)
    return tokens


def collate_training(
    items: list[dict],
    tokenizer: Any,
    max_length: int,
    pad_to_multiple_of: int | None = None,
    pack_labels: bool = False,
) -> dict[str, torch.Tensor]:
    """Images uint8 [I,3,S,S]; phrases flattened to P rows with `image_index` [P] and `labels` [P,S,S] (bool),
    or, with `pack_labels`, `packed_labels` [P,S,S/8] (`pack_masks`: a worker moves an eighth of the bytes
    into shared memory, the main process pins and copies an eighth); `model_inputs` turns it into the
    model's inputs on the device."""
    phrases = [phrase for item in items for phrase in item["phrases"]]
    labels = torch.cat([item["masks"] for item in items])
    batch = {
        "pixel_values": stack_images([item["pixel_values"] for item in items]),
        "image_index": torch.tensor([i for i, item in enumerate(items) for _ in item["phrases"]]),
        **({"packed_labels": pack_masks(labels)} if pack_labels else {"labels": labels}),
        **tokenize(tokenizer, phrases, max_length, pad_to_multiple_of),
    }
    if "ignore" in items[0]:  # one mask per image, packed: `model_inputs` makes each prompt's loss mask
        batch["packed_ignore"] = pack_masks(torch.stack([item["ignore"] for item in items]))
    if "conditional_pixel_values" in items[0]:
        visuals = [v for item in items for v in item["conditional_pixel_values"]]
        size = batch["pixel_values"].shape[-1]
        batch["conditional_pixel_values"] = (
            stack_images(visuals) if visuals else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        )
        first_phrase = np.cumsum([0] + [len(item["phrases"]) for item in items])
        batch["visual_index"] = torch.cat(
            [item["visual_index"] + start for item, start in zip(items, first_phrase)]
        )
        batch["text_weight"] = torch.cat([item["text_weight"] for item in items])
    return batch


def training_loader(
    samples: TrainingSamples,
    tokenizer: Any,
    max_length: int,
    *,
    images_per_batch: int,
    device: torch.device,
    num_workers: int,
    seed: int,
    pad_to_multiple_of: int | None = None,
    persistent_workers: bool = True,
) -> DataLoader:
    """Training batches of `images_per_batch` samples (images with their phrases), in `EpochSampler`'s order,
    masks packed for the hand-over; an epoch's last, incomplete batch is dropped (fixed shapes)."""
    collate = partial(
        collate_training,
        tokenizer=tokenizer,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        pack_labels=True,
    )
    return create_loader(
        samples,
        collate,
        batch_size=images_per_batch,
        device=device,
        num_workers=num_workers,
        sampler=EpochSampler(len(samples), seed),
        drop_last=True,
        persistent_workers=persistent_workers,
        seed=seed,
    )


class EvaluationImages(Dataset):
    """One item = one whole image squashed to the model size with all of its phrases (CLIPSeg protocol),
    plus what the official protocol needs: the native-size masks and each task's subsets."""

    def __init__(self, dataset: Any, image_size: int, rows: Sequence[int], ignore_regions: bool = False):
        self.dataset = dataset
        self.image_size = image_size
        self.rows = list(rows)
        self.ignore_regions = ignore_regions

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> dict[str, Any]:
        row = self.dataset[self.rows[item]]
        pixels = read_image(row, decode_pixels)
        native = row_masks(row, size=pixels.shape[:2])
        sample = {
            "pixel_values": image_to_uint8(resize_pixels(pixels, self.image_size)),
            "masks": torch.from_numpy(resize_mask(native, self.image_size)),
            "phrases": [t["phrase"] for t in row["tasks"]],
            "task_ids": [t["task_id"] for t in row["tasks"]],
            "class_ids": [t.get("class_id", -1) for t in row["tasks"]],
            "subsets": [list(t.get("subsets") or ["all"]) for t in row["tasks"]],
            "image_id": row.get("image_id"),
            "row": self.rows[item],
            "native_masks": torch.from_numpy(native),
        }
        if self.ignore_regions:
            ignore = ignore_mask(row, *pixels.shape[:2])
            sample["ignore"] = torch.from_numpy(np.ascontiguousarray(resize_mask(ignore, self.image_size)))
            sample["native_ignore"] = torch.from_numpy(ignore)
        return sample


def collate_evaluation(items: list[dict], tokenizer: Any, max_length: int) -> dict[str, Any]:
    """Like `collate_training`, plus per-phrase bookkeeping lists (task ids, subsets, native masks)."""
    batch = collate_training(items, tokenizer, max_length)
    for key in ("phrases", "task_ids", "class_ids", "subsets"):
        batch[key] = [value for item in items for value in item[key]]
    batch["rows"] = [item["row"] for item in items]
    batch["native_masks"] = [mask for item in items for mask in item["native_masks"]]
    if "native_ignore" in items[0]:
        batch["native_ignore"] = [item["native_ignore"] for item in items]
    return batch


def evaluation_loader(
    dataset: Any,
    rows: Sequence[int],
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    ignore_regions: bool = False,
) -> DataLoader:
    """Batches of whole images (the given rows, in order), each with all of its phrases, at `model`'s input size
    and text length; with `ignore_regions`, each image's ignore mask too."""
    collate = partial(
        collate_evaluation, tokenizer=tokenizer, max_length=model.config.text_config.max_position_embeddings
    )
    return create_loader(
        EvaluationImages(dataset, model.config.image_size, rows, ignore_regions),
        collate,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
    )
