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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batching import PhraseIndex, evaluation_loader
from .errors import CommandError
from .metrics import (
    OFFICIAL_THRESHOLD,
    THRESHOLDS,
    ThresholdSweep,
    confusion_counts,
    intersection_union,
    official_phrasecut_metrics,
)
from .own_data import has_ignore_regions
from .transforms import model_inputs


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
    num_images: int = 0

    def sweep(self) -> ThresholdSweep:
        sweep = ThresholdSweep()
        sweep.add_counts(self.counts, self.sample_ids)
        return sweep

    def clipseg_metrics(self) -> dict[str, float]:
        return self.sweep().clipseg_paper_metrics()

    def official_metrics(self) -> dict[str, dict[str, float]]:
        return official_phrasecut_metrics(self.intersections, self.unions, self.subsets)

    def flat_metrics(self) -> dict[str, float]:
        """Both protocols in one flat dict: the CLIPSeg paper's metrics as they are, the official protocol's
        over all tasks prefixed `official_`, and `images` and `samples` (phrases) scored, each once across
        processes."""
        metrics = self.clipseg_metrics()
        metrics.update({f"official_{k}": v for k, v in self.official_metrics()["all"].items()})
        metrics.update(images=self.num_images, samples=len(self.sample_ids))
        return metrics

    def summary(self) -> dict[str, Any]:
        """Both protocols, the official one per subset, with the curves: what `run_eval.py` reports."""
        return {
            "clipseg_paper_protocol": self.clipseg_metrics(),
            "official_protocol": self.official_metrics(),
            "official_threshold": self.official_threshold,
            "num_phrases": len(self.sample_ids),
            "curves": {k: v.tolist() for k, v in self.sweep().curves().items()},
        }


def predict_logits(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Logits [P, S, S] of a collated batch on the device (`model_inputs`): all phrases of its images, one
    vision pass per image.

    A model prepared by Accelerate for mixed-precision training keeps its plain forward in
    `_original_forward`; that one is called, so evaluation runs in the precision the caller chose.
    """
    forward = getattr(model, "_original_forward", model)
    logits = forward(
        pixel_values=inputs["pixel_values"],
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_index=inputs["image_index"],
    ).logits.float()
    if logits.shape != inputs["labels"].shape:
        raise CommandError(
            f"the model predicted logits of shape {tuple(logits.shape)} for masks of shape "
            f"{tuple(inputs['labels'].shape)}: it must return one map per phrase at its input size"
        )
    # Checked here, on the logits, so that the message names the cause (the metrics would only see NaN
    # probabilities); one read-back per batch, as the counts make anyway.
    if torch.isnan(logits).any():
        raise CommandError(
            "the model's outputs are not finite (NaN logits): its weights or its inputs hold NaN or inf, as after "
            "a training run that diverged; score an earlier checkpoint, or one trained with a lower learning rate"
        )
    return logits


def official_counts(
    probs: torch.Tensor,
    image_index: torch.Tensor,
    native_masks: Sequence[torch.Tensor],
    threshold: float,
    native_ignore: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union per phrase, the predictions resized (bilinear) to their image's original
    size; all phrases of one image are resized together, and scored outside its ignore region (one mask per
    image in `native_ignore`, when the data has them). `image_index` is on the host, so grouping the
    phrases reads nothing back; the counts stay on the device of `probs`."""
    intersections = torch.zeros(len(native_masks), dtype=torch.long, device=probs.device)
    unions = torch.zeros_like(intersections)
    for image in torch.unique(image_index).tolist():
        phrases = torch.nonzero(image_index == image).flatten()
        truth = torch.stack([native_masks[p] for p in phrases.tolist()]).to(probs.device, non_blocking=True)
        phrases = phrases.to(probs.device, non_blocking=True)
        resized = F.interpolate(probs[phrases][:, None], size=tuple(truth.shape[1:]), mode="bilinear")[:, 0]
        valid = None if native_ignore is None else ~native_ignore[image].to(probs.device)
        intersections[phrases], unions[phrases] = intersection_union(resized > threshold, truth, valid)
    return intersections, unions


def evaluate(
    model: Any,
    dataset: Any,
    tokenizer: Any,
    accelerator: Any,
    batch_size: int = 8,
    max_images: int = 0,
    official_threshold: float = OFFICIAL_THRESHOLD,
    num_workers: int = 0,
    description: str = "evaluating",
    mixed_precision: bool = False,
) -> EvaluationResult:
    """Score `model` on the first `max_images` images of `dataset` (0: all of them) under both protocols, each
    image at the model's size (`model.config.image_size`).

    `model` is the plain model (not a DDP wrapper): processes see different numbers of batches.
    It runs in float32, as the CLIPSeg paper evaluated, unless `mixed_precision` (the accelerator's).
    Nothing is drawn from the global random generators, so evaluating during training leaves the
    training run exactly as it would be without it.
    """
    rows = list(range(images_scored(len(dataset), max_images)))
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # the phrase count changes from batch to batch: nothing to tune
    try:
        with torch.random.fork_rng(devices=[]):
            loader = evaluation_loader(
                dataset,
                rows[accelerator.process_index :: accelerator.num_processes],
                model,
                tokenizer,
                batch_size=batch_size,
                device=accelerator.device,
                num_workers=num_workers,
                ignore_regions=has_ignore_regions(dataset),
            )
            was_training = model.training
            model.eval()
            index = PhraseIndex.from_dataset(dataset)
            parts = _score_batches(
                model, loader, index, accelerator, official_threshold, description, mixed_precision
            )
            model.train(was_training)
    finally:
        torch.backends.cudnn.benchmark = autotune
    return _gathered(parts, accelerator, official_threshold, len(rows))


def images_scored(num_images: int, max_images: int) -> int:
    """How many images an evaluation of the first `max_images` (0: all) of `num_images` scores."""
    return min(max_images, num_images) if max_images else num_images


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
            inputs = model_inputs(batch, device)
            with precision:
                logits = predict_logits(model, inputs)
            probs = torch.sigmoid(logits)
            image_index = batch["image_index"]  # on the host: grouping phrases by image reads nothing back
            parts["ids"].append(index.phrase_ids(batch["rows"], image_index))
            # The counts stay on the device until the end, read once (`confusion_counts` itself still waits
            # for the device per batch: its range check and its bincount read back).
            parts["counts"].append(confusion_counts(probs, inputs["labels"], valid=inputs.get("loss_mask")))
            inter, union = official_counts(
                probs, image_index, batch["native_masks"], official_threshold, batch.get("native_ignore")
            )
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


def _gathered(
    parts: dict[str, list], accelerator: Any, official_threshold: float, num_images: int
) -> EvaluationResult:
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
        num_images=num_images,
    )
