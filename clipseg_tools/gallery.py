"""Failure gallery: pictures of the phrases a model gets wrong at every reasonable threshold, browsable.

A failure is a phrase whose IoU stays below 0.5 at every threshold from 0.1 to 0.5. Each gets one picture:
the image, the predicted heat map over it, the ground truth, the phrase and its best IoU in that range.
`index.html` links them all, beside the precision-recall curve and the IoU histogram of the whole split.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from .batching import PhraseIndex, evaluation_loader  # noqa: E402
from .evaluation import EvaluationResult, predict_logits  # noqa: E402
from .files import atomic_folder  # noqa: E402
from .metrics import low_iou_samples  # noqa: E402
from .pictures import caption_font  # noqa: E402
from .transforms import decode_image, model_inputs  # noqa: E402

FAILURE_RANGE = (0.1, 0.5)
TILE_HEIGHT = 256


def write_gallery(
    folder: Path, model: Any, processor: Any, split: Any, result: EvaluationResult, limit: int = 100
) -> Path:
    """Write the pictures, the two plots and `index.html` into `folder` (replaced as a whole); returns it."""
    sweep = result.sweep()
    ious = sweep.per_sample_iou()
    in_range = (sweep.thresholds >= FAILURE_RANGE[0]) & (sweep.thresholds <= FAILURE_RANGE[1])
    best_iou = ious[:, in_range].max(axis=1)
    failed = np.flatnonzero(low_iou_samples(sweep.counts, sweep.thresholds, 0.5, FAILURE_RANGE))
    shown = failed[np.argsort(best_iou[failed], kind="stable")][:limit]  # worst first

    with atomic_folder(folder) as staging:
        plot_precision_recall(sweep.curves(), staging / "pr_curve.png")
        at_03 = int(np.flatnonzero(np.isclose(sweep.thresholds, 0.3))[0])
        plot_iou_histogram(ious[:, at_03], staging / "iou_histogram.png")
        entries = draw_failures(staging, model, processor, split, result, shown, best_iou)
        (staging / "index.html").write_text(index_page(entries, len(result.sample_ids), len(failed)))
    return Path(folder)


def draw_failures(folder, model, processor, split, result, failed, best_iou) -> list[dict]:
    """Predict again (float32, as scored), for the failing images only; one picture per failing phrase."""
    if not len(failed):
        return []
    index = PhraseIndex.from_dataset(split)
    rows = sorted({int(result.rows[i]) for i in failed})
    wanted = {int(result.sample_ids[i]): i for i in failed}
    device = next(model.parameters()).device
    loader = evaluation_loader(split, rows, model, processor.tokenizer, batch_size=4, device=device)
    entries = []
    with torch.no_grad():
        for batch in loader:
            probs = torch.sigmoid(predict_logits(model, model_inputs(batch, device))).cpu()
            ids = index.phrase_ids(batch["rows"], batch["image_index"])
            images = {}
            for p, sample_id in enumerate(ids.tolist()):
                if sample_id not in wanted:
                    continue
                position = wanted[sample_id]
                row = int(result.rows[position])
                if row not in images:
                    images[row] = decode_image(split[row]["image"])
                name = f"{len(entries):04d}_{re_safe(result.task_ids[position])}.png"
                picture = failure_picture(
                    images[row], probs[p], batch["native_masks"][p], batch["phrases"][p], best_iou[position]
                )
                picture.save(folder / name)
                entries.append(
                    {
                        "file": name,
                        "phrase": batch["phrases"][p],
                        "task_id": result.task_ids[position],
                        "iou": float(best_iou[position]),
                    }
                )
    return sorted(entries, key=lambda e: e["iou"])


def re_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:80]


def failure_picture(
    image: Image.Image, probs: torch.Tensor, truth: torch.Tensor, phrase: str, iou: float
) -> Image.Image:
    """[image | heat map over the image | ground truth] with the phrase and IoU written below."""
    scale = TILE_HEIGHT / image.height
    size = (max(1, round(image.width * scale)), TILE_HEIGHT)
    base = image.resize(size, Image.BILINEAR)
    heat = F.interpolate(probs[None, None].float(), size=(size[1], size[0]), mode="bilinear")[0, 0].numpy()
    overlay = np.asarray(base, dtype=np.float32) * 0.5
    overlay[..., 0] += 127 * np.clip(heat, 0, 1)
    overlay[..., 2] += 127 * (1 - np.clip(heat, 0, 1))
    truth_tile = (
        Image.fromarray(truth.numpy().astype(np.uint8) * 255).resize(size, Image.NEAREST).convert("RGB")
    )
    sheet = Image.new("RGB", (3 * size[0], TILE_HEIGHT + 28), "white")
    for k, tile in enumerate([base, Image.fromarray(overlay.clip(0, 255).astype(np.uint8)), truth_tile]):
        sheet.paste(tile, (k * size[0], 0))
    ImageDraw.Draw(sheet).text(
        (4, TILE_HEIGHT + 4), f'"{phrase}"  best IoU {iou:.3f}', fill="black", font=caption_font()
    )
    return sheet


def plot_precision_recall(curves: dict[str, np.ndarray], path: Path) -> None:
    keep = ~np.isnan(curves["precision"])
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot(curves["recall"][keep], curves["precision"][keep], marker=".")
    axis.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Precision-recall over 49 thresholds",
    )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_iou_histogram(ious: np.ndarray, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.hist(ious, bins=20, range=(0, 1))
    axis.set(xlabel="IoU at threshold 0.3", ylabel="phrases", title=f"Per-phrase IoU ({len(ious)} phrases)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def index_page(entries: list[dict], total: int, failures: int) -> str:
    rows = "\n".join(
        f'<tr><td><a href="{e["file"]}"><img src="{e["file"]}" height="120"></a></td>'
        f"<td>{html.escape(e['phrase'])}</td><td>{html.escape(e['task_id'])}</td><td>{e['iou']:.3f}</td></tr>"
        for e in entries
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Failure gallery</title>
<style>body{{font-family:sans-serif}} td{{padding:4px;vertical-align:middle}}</style></head>
<body>
<h1>Failure gallery</h1>
<p>{failures} of {total} phrases have IoU below 0.5 at every threshold from {FAILURE_RANGE[0]} to {FAILURE_RANGE[1]};
the {len(entries)} worst are shown (image | prediction over the image, red = high | ground truth).</p>
<p><a href="pr_curve.png"><img src="pr_curve.png" height="300"></a>
<a href="iou_histogram.png"><img src="iou_histogram.png" height="300"></a></p>
<table><tr><th>picture</th><th>phrase</th><th>task</th><th>best IoU</th></tr>
{rows}
</table></body></html>
"""
