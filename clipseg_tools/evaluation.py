"""The evaluation loop shared by `run_train.py` (evaluation during training) and `run_eval.py`.

One pass over the images scores every phrase under both protocols:
- the CLIPSeg paper's: the whole image squashed to the model size, raw phrases, per-threshold confusion
  counts at the model resolution (`ThresholdSweep`);
- the official PhraseCut one: the prediction resized to the original image size, binarised at one
  threshold, intersection and union against the native-resolution mask, per subset.

All of an image's phrases share one vision pass. Several processes each take every N-th image, and the
per-phrase results are gathered once, so every phrase counts exactly once however many processes run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .batching import EvaluationImages, PhraseIndex, collate_evaluation
from .metrics import ThresholdSweep, confusion_counts, intersection_union, official_phrasecut_metrics


@dataclass
class EvaluationResult:
    """Per-phrase results of one evaluation, ordered by phrase (sample) id."""

    sample_ids: np.ndarray
    counts: torch.Tensor  # [N, T, 4] confusion counts at the model resolution
    intersections: np.ndarray  # [N] at the original resolution, for the official protocol
    unions: np.ndarray
    task_ids: list[str] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    subsets: list[list[str]] = field(default_factory=list)
    rows: np.ndarray | None = None  # dataset row of each phrase
    official_threshold: float = 0.5

    def sweep(self) -> ThresholdSweep:
        sweep = ThresholdSweep()
        sweep.add_counts(self.counts, self.sample_ids)
        return sweep

    def clipseg_metrics(self) -> dict[str, float]:
        return self.sweep().clipseg_paper_metrics()

    def official_metrics(self) -> dict[str, dict[str, float]]:
        return official_phrasecut_metrics(self.intersections, self.unions, self.subsets)


def predict_logits(model: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Logits [P, S, S] of a collated batch (all phrases of its images, one vision pass per image)."""
    logits = model(
        pixel_values=batch["pixel_values"].to(device),
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        image_index=batch["image_index"].to(device),
    ).logits.float()
    if logits.shape != batch["labels"].shape:
        raise ValueError(
            f"the model predicted logits of shape {tuple(logits.shape)} for masks of shape "
            f"{tuple(batch['labels'].shape)}: it must return one map per phrase at its input size"
        )
    return logits


def official_counts(
    probs: torch.Tensor, image_index: torch.Tensor, native_masks: Sequence[torch.Tensor], threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union per phrase, with the prediction resized (bilinear) to the original size."""
    intersections, unions = [], []
    for p, mask in enumerate(native_masks):
        resized = F.interpolate(probs[p][None, None], size=tuple(mask.shape), mode="bilinear")[0, 0]
        i, u = intersection_union(resized > threshold, mask.to(resized.device))
        intersections.append(int(i))
        unions.append(int(u))
    return np.asarray(intersections, dtype=np.int64), np.asarray(unions, dtype=np.int64)


def evaluate(
    model: Any,
    dataset: Any,
    tokenizer: Any,
    accelerator: Any,
    image_size: int,
    batch_size: int = 8,
    rows: Sequence[int] | None = None,
    official_threshold: float = 0.5,
    num_workers: int = 0,
    description: str = "evaluating",
    on_batch: Callable[[dict, torch.Tensor], None] | None = None,
) -> EvaluationResult:
    """Score `model` on the rows of `dataset` (all of them by default) under both protocols.

    `model` is the plain model (not a DDP wrapper): processes see different numbers of batches.
    """
    index = PhraseIndex.from_dataset(dataset)
    rows = list(range(len(dataset))) if rows is None else list(rows)
    own_rows = rows[accelerator.process_index :: accelerator.num_processes]
    images = EvaluationImages(dataset, image_size, own_rows, native_masks=True)
    max_length = model.config.text_config.max_position_embeddings
    loader = DataLoader(
        images,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=partial(collate_evaluation, tokenizer=tokenizer, max_length=max_length),
    )
    device = accelerator.device
    parts: dict[str, list] = {
        k: [] for k in ("ids", "counts", "inter", "union", "task_ids", "phrases", "subsets", "rows")
    }
    was_training = model.training
    model.eval()
    progress = tqdm(loader, desc=description, disable=not accelerator.is_local_main_process, leave=False)
    with torch.no_grad():
        for batch in progress:
            with accelerator.autocast():
                logits = predict_logits(model, batch, device)
            probs = torch.sigmoid(logits)
            batch_rows = np.asarray(batch["rows"])[batch["image_index"].numpy()]
            within = np.concatenate([np.arange(n) for n in np.bincount(batch["image_index"].numpy())])
            parts["ids"].append(index.row_starts[batch_rows] + within)
            parts["counts"].append(confusion_counts(probs, batch["labels"].to(device)).cpu())
            inter, union = official_counts(
                probs, batch["image_index"], batch["native_masks"], official_threshold
            )
            parts["inter"].append(inter)
            parts["union"].append(union)
            parts["rows"].append(batch_rows)
            for key in ("task_ids", "phrases", "subsets"):
                parts[key].extend(batch[key])
            if on_batch is not None:
                on_batch(batch, probs)
    model.train(was_training)
    return _gathered(parts, accelerator, official_threshold)


def _gathered(parts: dict[str, list], accelerator: Any, official_threshold: float) -> EvaluationResult:
    """Collect every process's phrases (each process scored its own images) and order them by id."""
    local = {
        "ids": np.concatenate(parts["ids"]) if parts["ids"] else np.zeros(0, dtype=np.int64),
        "counts": torch.cat(parts["counts"]) if parts["counts"] else torch.zeros(0, 49, 4, dtype=torch.long),
        "inter": np.concatenate(parts["inter"]) if parts["inter"] else np.zeros(0, dtype=np.int64),
        "union": np.concatenate(parts["union"]) if parts["union"] else np.zeros(0, dtype=np.int64),
        "rows": np.concatenate(parts["rows"]) if parts["rows"] else np.zeros(0, dtype=np.int64),
        "task_ids": parts["task_ids"],
        "phrases": parts["phrases"],
        "subsets": parts["subsets"],
    }
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        everything = gather_object([local])
    else:
        everything = [local]
    ids = np.concatenate([p["ids"] for p in everything])
    order = np.argsort(ids, kind="stable")
    if len(np.unique(ids)) != len(ids):
        raise RuntimeError("a phrase was scored twice while gathering evaluation results across processes")

    def merged_list(key: str) -> list:
        flat = [value for p in everything for value in p[key]]
        return [flat[i] for i in order]

    return EvaluationResult(
        sample_ids=ids[order],
        counts=torch.cat([p["counts"] for p in everything])[torch.from_numpy(order)],
        intersections=np.concatenate([p["inter"] for p in everything])[order],
        unions=np.concatenate([p["union"] for p in everything])[order],
        task_ids=merged_list("task_ids"),
        phrases=merged_list("phrases"),
        subsets=merged_list("subsets"),
        rows=np.concatenate([p["rows"] for p in everything])[order],
        official_threshold=official_threshold,
    )
