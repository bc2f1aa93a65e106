"""The multi-class map of semantic data: every class prompted on every image, each pixel given the class of
highest probability, or no class where none passes the threshold; scored at the image's own size with the
definitions of `evaluate`'s `mean_iou` (per-class IoU and accuracy, their means, overall accuracy), as
transformers' semantic-segmentation examples report it.

The class prompts' text embeddings are made once; each image then runs the vision tower once and the decoder
once per class. Several processes each take every N-th image and their confusion matrices are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batching import evaluation_loader, tokenize
from .own_data import has_ignore_regions
from .transforms import model_inputs

# The scalar scores of `mean_iou_scores`, as run_train.py logs them (prefixed `class_map_`).
CLASS_MAP_METRICS = ("mean_iou", "mean_accuracy", "overall_accuracy")


def class_names(dataset: Any) -> list[str] | None:
    """The class names of semantic (or COCO) rows, from their `class_id` feature; None for other rows."""
    feature = getattr(dataset.features["tasks"], "feature", None)
    class_id = feature.get("class_id") if isinstance(feature, dict) else None
    return list(class_id.names) if hasattr(class_id, "names") else None


def class_map_confusion(
    model: Any,
    dataset: Any,
    tokenizer: Any,
    accelerator: Any,
    prompts: Sequence[str],
    threshold: float,
    rows: Sequence[int],
    batch_size: int = 4,
    mixed_precision: bool = False,
    description: str = "multi-class maps",
) -> np.ndarray:
    """Confusion counts [C + 1, C + 1] of the multi-class maps of `rows` (truth class x predicted class, the
    last row and column "no class"), ignore regions left out, summed over processes. `prompts[c]` prompts
    class c."""
    device = accelerator.device
    num_classes = len(prompts)
    mine = list(rows)[accelerator.process_index :: accelerator.num_processes]
    loader = evaluation_loader(
        dataset,
        mine,
        model,
        tokenizer,
        batch_size=batch_size,
        device=device,
        ignore_regions=has_ignore_regions(dataset),
    )
    forward = getattr(model, "_original_forward", model)  # as `evaluation.predict_logits`
    tokens = tokenize(tokenizer, prompts, model.config.text_config.max_position_embeddings)
    confusion = torch.zeros((num_classes + 1) ** 2, dtype=torch.long, device=device)
    precision = accelerator.autocast() if mixed_precision else nullcontext()
    was_training = model.training
    model.eval()
    progress = tqdm(loader, desc=description, disable=not accelerator.is_local_main_process, leave=False)
    tokens = {key: value.to(device) for key, value in tokens.items()}
    with torch.no_grad(), precision:
        # The project's model embeds the prompts once; another (transformers' CLIPSeg) takes them per image.
        embeddings = model.text_embeddings(**tokens) if hasattr(model, "text_embeddings") else None
        for batch in progress:
            pixels = model_inputs({"pixel_values": batch["pixel_values"]}, device)["pixel_values"]
            images = pixels.shape[0]
            image_index = torch.arange(images, device=device).repeat_interleave(num_classes)
            if embeddings is not None:
                prompts_in = {"conditional_embeddings": embeddings.repeat(images, 1)}
            else:
                prompts_in = {key: value.repeat(images, 1) for key, value in tokens.items()}
            logits = forward(pixel_values=pixels, image_index=image_index, **prompts_in).logits.float()
            probs = torch.sigmoid(logits).view(images, num_classes, *logits.shape[-2:])
            for image, truth in enumerate(truth_maps(batch, num_classes)):
                predicted = predicted_map(probs[image], tuple(truth.shape), threshold)
                confusion += count_pairs(truth.to(device), predicted, num_classes)
    model.train(was_training)
    confusion = accelerator.reduce(confusion, "sum") if accelerator.num_processes > 1 else confusion
    return confusion.view(num_classes + 1, num_classes + 1).cpu().numpy()


def class_map_scores(
    model: Any,
    dataset: Any,
    tokenizer: Any,
    accelerator: Any,
    template: str,
    threshold: float,
    max_images: int = 0,
    batch_size: int = 4,
    mixed_precision: bool = False,
    description: str = "multi-class maps",
) -> dict[str, Any] | None:
    """`mean_iou_scores` of the multi-class maps of the first `max_images` images (0: all), each class prompted
    as `template` says; None for data without classes."""
    names = class_names(dataset)
    if not names:
        return None
    rows = range(min(max_images, len(dataset)) if max_images else len(dataset))
    prompts = [template.format(name) for name in names]
    confusion = class_map_confusion(
        model,
        dataset,
        tokenizer,
        accelerator,
        prompts,
        threshold,
        rows,
        batch_size,
        mixed_precision,
        description,
    )
    return mean_iou_scores(confusion, names)


def truth_maps(batch: dict[str, Any], num_classes: int) -> list[torch.Tensor]:
    """Each image's class map at its own size from its tasks' masks and class ids: C (no class) where no task's
    mask lies (COCO's background), -1 in the image's ignore region (left out of the scores)."""
    maps, phrase = [], 0
    ignores = batch.get("native_ignore")
    for image, count in enumerate(torch.bincount(batch["image_index"]).tolist()):
        masks = batch["native_masks"][phrase : phrase + count]
        truth = torch.full(tuple(masks[0].shape), num_classes, dtype=torch.long)
        for mask, class_id in zip(masks, batch["class_ids"][phrase : phrase + count], strict=True):
            if 0 <= class_id < num_classes:
                truth[mask] = class_id
        if ignores is not None:
            truth[ignores[image]] = -1
        maps.append(truth)
        phrase += count
    return maps


def predicted_map(probs: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """[C, S, S] probabilities -> the class map at `size` (bilinear, as the per-prompt scores resize): the class
    of highest probability, or C (no class) where none is above `threshold`."""
    resized = F.interpolate(probs[None], size=size, mode="bilinear")[0]
    best, classes = resized.max(dim=0)
    return torch.where(best > threshold, classes, probs.shape[0])


def count_pairs(truth: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Flat [(C + 1) ** 2] counts of (truth, predicted) class pairs, C meaning no class, over the pixels outside
    the ignore region (truth -1)."""
    scored = truth >= 0
    keys = truth[scored] * (num_classes + 1) + predicted[scored]
    return torch.bincount(keys, minlength=(num_classes + 1) ** 2)


def mean_iou_scores(confusion: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """`evaluate`'s `mean_iou` results from confusion counts [C + 1, C + 1] (`count_pairs`): per class, IoU =
    intersection over (truth area + predicted area - intersection) and accuracy = intersection over truth area
    (NaN where the denominator is 0, left out of the means); overall accuracy = all intersections over all
    pixels of a class. "No class" is no class's area: a class predicted there (COCO's background) counts in
    that class's predicted area, as a label outside `num_labels` does in `mean_iou`."""
    confusion = np.asarray(confusion, dtype=np.float64)
    num_classes = confusion.shape[0] - 1
    intersection = np.diag(confusion)[:num_classes]
    truth_area = confusion[:num_classes].sum(axis=1)
    predicted_area = confusion[:, :num_classes].sum(axis=0)
    union = truth_area + predicted_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        accuracy = np.where(truth_area > 0, intersection / truth_area, np.nan)
    return {
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan"),
        "overall_accuracy": float(intersection.sum() / max(truth_area.sum(), 1.0)),
        "per_category_iou": dict(zip(names, iou.tolist(), strict=True)),
        "per_category_accuracy": dict(zip(names, accuracy.tolist(), strict=True)),
    }
