"""CLIPSeg paper IoU / AP for text-prompted binary segmentation, as an `evaluate` metric.

Load it by path, offline: `evaluate.load("./metrics/clipseg_iou")` for probability maps, or
`evaluate.load("./metrics/clipseg_iou", "counts")` for per-sample confusion counts.

The arithmetic is not repeated here: it is imported from `clipseg_tools.metrics`, the project's
single implementation, so the numbers cannot drift apart. `evaluate` copies this file into its
module cache before importing it, so the project must be importable: installed (`pip install -e .`)
or run from the repository root, as the project's scripts and tests are.
"""

import datasets
import evaluate
import numpy as np
import torch

try:
    # Indented on purpose: evaluate scans top-level import lines and would otherwise ask the user to
    # `pip install clipseg_tools`, a name that is not a distribution.
    from clipseg_tools.metrics import THRESHOLDS, clipseg_paper_metrics, confusion_counts
except ImportError as error:
    raise ImportError(
        "The clipseg_iou metric uses the clipseg_tools package of the CLIPSeg fine-tuning project: "
        "install the project (`pip install -e <repository root>`) or run from the repository root."
    ) from error

_DESCRIPTION = """\
The evaluation protocol of the CLIPSeg paper (Lüddecke & Ecker, CVPR 2022) for PhraseCut: foreground
probabilities are thresholded at 49 values 0.02 ... 0.98 (positive when p > t); per sample and threshold
the tp/fp/fn/tn pixel counts give mIoU (mean of tp / (1 + tp + fp + fn) over samples), foreground IoU
(the same on counts summed over samples) and AP (Simpson integration of the smoothed precision over the
smoothed recall of the summed counts).
"""

_KWARGS_DESCRIPTION = """
Args (config "default"):
    predictions: one probability map per sample, `[H, W]` floats in [0, 1] (after the sigmoid).
    references: one binary mask per sample, `[H, W]`, same size as its prediction (nonzero = foreground).
Args (config "counts"):
    confusion_counts: one `[49, 4]` array of (tp, fp, fn, tn) per sample, from
        `clipseg_tools.metrics.confusion_counts`; far cheaper to store than the maps.
Returns:
    miou_0.3, fgiou_0.3, fgiou_0.5, miou_best, miou_best_threshold, fgiou_best, fgiou_best_threshold,
    ap (nan when fewer than 2 distinct recall values), num_samples.
Examples:
    >>> metric = evaluate.load("./metrics/clipseg_iou")
    >>> scores = metric.compute(predictions=[[[0.9, 0.1]]], references=[[[1, 0]]])
    >>> round(scores["miou_0.3"], 4)
    0.5
"""

_CITATION = """\
@inproceedings{lueddecke2022clipseg,
  title = {Image Segmentation Using Text and Image Prompts},
  author = {L{\\"u}ddecke, Timo and Ecker, Alexander},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2022},
}
"""

_FEATURES = {
    "default": datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
        }
    ),
    "counts": datasets.Features(
        {"confusion_counts": datasets.Sequence(datasets.Sequence(datasets.Value("int64")))}
    ),
}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClipsegIou(evaluate.Metric):
    """CLIPSeg paper metrics (mIoU, foreground IoU, AP over a threshold sweep)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _FEATURES:
            raise ValueError(f"Unknown config {self.config_name!r}: use one of {sorted(_FEATURES)}.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES[self.config_name],
            reference_urls=["https://arxiv.org/abs/2112.10003"],
        )

    def _compute(self, predictions=None, references=None, confusion_counts=None) -> dict:
        if confusion_counts is None:
            confusion_counts = [_count_one_sample(p, r) for p, r in zip(predictions, references, strict=True)]
        counts = np.asarray(confusion_counts, dtype=np.int64).reshape(-1, len(THRESHOLDS), 4)
        return clipseg_paper_metrics(counts)


def _count_one_sample(prediction, reference) -> np.ndarray:
    # Maps may differ in size from sample to sample, so each is counted on its own.
    probs = torch.as_tensor(np.asarray(prediction, dtype=np.float32)).unsqueeze(0)
    masks = torch.as_tensor(np.asarray(reference, dtype=np.uint8)).unsqueeze(0)
    return confusion_counts(probs, masks, THRESHOLDS)[0].numpy()
