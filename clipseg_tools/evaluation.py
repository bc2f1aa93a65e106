"""The evaluation loop shared by `run_train.py` (evaluation during training) and `run_eval.py`.

One pass over the images scores every phrase under both protocols:
- the CLIPSeg paper's: the whole image squashed to the model size, raw phrases, per-threshold confusion
  counts at the model resolution, float32 (`ThresholdSweep`);
- the official PhraseCut one: the prediction resized to the original image size, binarised at one
  threshold, intersection and union against the native-resolution mask, per subset.

All of an image's phrases share one vision pass. Several processes each take every N-th image, and the
per-phrase results are gathered once, so every phrase counts exactly once however many processes run.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .batching import EvaluationImages, PhraseIndex, collate_evaluation, normalize_pixels
from .handover import SharedBatchRing
from .metrics import (
    OFFICIAL_THRESHOLD,
    THRESHOLDS,
    ThresholdSweep,
    confusion_counts,
    intersection_union,
    official_phrasecut_metrics,
)


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
    official_threshold: float = OFFICIAL_THRESHOLD

    def sweep(self) -> ThresholdSweep:
        sweep = ThresholdSweep()
        sweep.add_counts(self.counts, self.sample_ids)
        return sweep

    def clipseg_metrics(self) -> dict[str, float]:
        return self.sweep().clipseg_paper_metrics()

    def official_metrics(self) -> dict[str, dict[str, float]]:
        return official_phrasecut_metrics(self.intersections, self.unions, self.subsets)


def predict_logits(model: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Logits [P, S, S] of a collated batch (all phrases of its images, one vision pass per image).

    A model prepared by Accelerate for mixed-precision training keeps its plain forward in
    `_original_forward`; that one is called, so evaluation runs in the precision the caller chose.
    """
    forward = getattr(model, "_original_forward", model)

    def moved(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True)  # no wait from pinned memory

    logits = forward(
        pixel_values=normalize_pixels(moved("pixel_values")),
        input_ids=moved("input_ids"),
        attention_mask=moved("attention_mask"),
        image_index=moved("image_index"),
    ).logits.float()
    if logits.shape != batch["labels"].shape:
        raise ValueError(
            f"the model predicted logits of shape {tuple(logits.shape)} for masks of shape "
            f"{tuple(batch['labels'].shape)}: it must return one map per phrase at its input size"
        )
    return logits


def official_counts(
    probs: torch.Tensor, image_index: torch.Tensor, native_masks: Sequence[torch.Tensor], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union per phrase, the predictions resized (bilinear) to their image's original
    size; all phrases of one image are resized together. `image_index` is on the host, so grouping the
    phrases reads nothing back; the counts stay on the device of `probs`."""
    intersections = torch.zeros(len(native_masks), dtype=torch.long, device=probs.device)
    unions = torch.zeros_like(intersections)
    for image in torch.unique(image_index).tolist():
        phrases = torch.nonzero(image_index == image).flatten()
        truth = torch.stack([native_masks[p] for p in phrases.tolist()]).to(probs.device, non_blocking=True)
        phrases = phrases.to(probs.device, non_blocking=True)
        resized = F.interpolate(probs[phrases][:, None], size=tuple(truth.shape[1:]), mode="bilinear")[:, 0]
        intersections[phrases], unions[phrases] = intersection_union(resized > threshold, truth)
    return intersections, unions


def evaluate(
    model: Any,
    dataset: Any,
    tokenizer: Any,
    accelerator: Any,
    image_size: int,
    batch_size: int = 8,
    rows: Sequence[int] | None = None,
    official_threshold: float = OFFICIAL_THRESHOLD,
    num_workers: int = 0,
    description: str = "evaluating",
    mixed_precision: bool = False,
) -> EvaluationResult:
    """Score `model` on the rows of `dataset` (all of them by default) under both protocols.

    `model` is the plain model (not a DDP wrapper): processes see different numbers of batches.
    It runs in float32, as the CLIPSeg paper evaluated, unless `mixed_precision` (the accelerator's).
    Nothing is drawn from the global random generators, so evaluating during training leaves the
    training run exactly as it would be without it.
    """
    with torch.random.fork_rng(devices=[]):
        index = PhraseIndex.from_dataset(dataset)
        rows = list(range(len(dataset))) if rows is None else list(rows)
        own_rows = rows[accelerator.process_index :: accelerator.num_processes]
        on_gpu = accelerator.device.type == "cuda"
        loader = DataLoader(
            EvaluationImages(dataset, image_size, own_rows, native_masks=True),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=on_gpu,
            # Reused shared-memory buffers: each batch's many native-size masks would otherwise be shared
            # one by one, each handed over and mapped anew by the main process.
            collate_fn=SharedBatchRing(
                partial(
                    collate_evaluation,
                    tokenizer=tokenizer,
                    max_length=model.config.text_config.max_position_embeddings,
                ),
                pin_memory=on_gpu,
            ),
        )
        was_training = model.training
        model.eval()
        parts = _score_batches(
            model, loader, index, accelerator, official_threshold, description, mixed_precision
        )
        model.train(was_training)
    return _gathered(parts, accelerator, official_threshold)


def _score_batches(
    model, loader, index, accelerator, official_threshold, description, mixed_precision
) -> dict:
    device = accelerator.device
    precision = accelerator.autocast() if mixed_precision else nullcontext()
    parts: dict[str, list] = {
        k: [] for k in ("ids", "counts", "inter", "union", "task_ids", "phrases", "subsets", "rows")
    }
    progress = tqdm(loader, desc=description, disable=not accelerator.is_local_main_process, leave=False)
    with torch.no_grad():
        for batch in progress:
            with precision:
                logits = predict_logits(model, batch, device)
            probs = torch.sigmoid(logits)
            image_index = batch["image_index"]
            parts["ids"].append(index.phrase_ids(batch["rows"], image_index))
            # The counts stay on the device until the end, read once (`confusion_counts` itself still waits
            # for the device per batch: its range check and its bincount read back).
            parts["counts"].append(confusion_counts(probs, batch["labels"].to(device, non_blocking=True)))
            inter, union = official_counts(probs, image_index, batch["native_masks"], official_threshold)
            parts["inter"].append(inter)
            parts["union"].append(union)
            parts["rows"].append(np.asarray(batch["rows"])[image_index.numpy()])
            for key in ("task_ids", "phrases", "subsets"):
                parts[key].extend(batch[key])
    for key in ("counts", "inter", "union"):  # one read each from the device
        if parts[key]:
            whole = torch.cat(parts[key]).cpu()
            parts[key] = [whole if key == "counts" else whole.numpy()]
    return parts


def _gathered(parts: dict[str, list], accelerator: Any, official_threshold: float) -> EvaluationResult:
    """Collect every process's phrases (each process scored its own images) and order them by id."""

    def joined(key: str, empty: Any) -> Any:
        return (torch.cat if key == "counts" else np.concatenate)(parts[key]) if parts[key] else empty

    local = {
        "ids": joined("ids", np.zeros(0, dtype=np.int64)),
        "counts": joined("counts", torch.zeros(0, len(THRESHOLDS), 4, dtype=torch.long)),
        "inter": joined("inter", np.zeros(0, dtype=np.int64)),
        "union": joined("union", np.zeros(0, dtype=np.int64)),
        "rows": joined("rows", np.zeros(0, dtype=np.int64)),
        **{key: parts[key] for key in ("task_ids", "phrases", "subsets")},
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
