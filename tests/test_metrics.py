"""Metric arithmetic against hand-computed values and a naive re-computation of the CLIPSeg protocol."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_on_two_processes
from scipy.integrate import simpson

from clipseg_tools.metrics import (
    THRESHOLDS,
    ThresholdSweep,
    clipseg_paper_metrics,
    confusion_counts,
    intersection_union,
    low_iou_samples,
    markdown_table,
    official_phrasecut_metrics,
    per_sample_iou,
    simpson_as_original,
    threshold_curves,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
METRIC_DIR = REPO_ROOT / "metrics" / "clipseg_iou"
AT = {round(float(t), 2): i for i, t in enumerate(THRESHOLDS)}  # threshold -> grid index


def counts_of(probs, targets):
    return confusion_counts(torch.tensor(probs, dtype=torch.float32), torch.tensor(targets)).numpy()


# ---------------------------------------------------------------- threshold grid and counts


def test_grid_is_the_clipseg_grid_and_finds_its_thresholds_exactly():
    assert len(THRESHOLDS) == 49 and THRESHOLDS[0] == 0.02 and THRESHOLDS[-1] == 0.98
    assert list(THRESHOLDS).index(0.1) == 4
    assert list(THRESHOLDS).index(0.3) == 14
    assert list(THRESHOLDS).index(0.5) == 24


def test_counts_by_hand_including_values_on_the_grid_ends():
    # One sample; p = 0 is never positive, p = 1 always, p equal to a threshold is negative there.
    probs = [[0.0, 0.02, 0.3, 0.5, 0.98, 1.0]]
    targets = [[1, 0, 1, 1, 0, 1]]
    counts = counts_of(probs, targets)[0]  # [49, 4] of (tp, fp, fn, tn)
    assert counts.shape == (49, 4)
    assert counts[AT[0.02]].tolist() == [3, 1, 1, 1]  # positives 0.3 0.5 0.98 1.0
    assert counts[AT[0.04]].tolist() == [3, 1, 1, 1]
    assert counts[AT[0.3]].tolist() == [2, 1, 2, 1]  # positives 0.5 0.98 1.0
    assert counts[AT[0.5]].tolist() == [1, 1, 3, 1]  # positives 0.98 1.0
    assert counts[AT[0.96]].tolist() == [1, 1, 3, 1]
    assert counts[AT[0.98]].tolist() == [1, 0, 3, 2]  # positive 1.0 only
    assert (counts.sum(-1) == 6).all()


def test_counts_equal_a_naive_loop_on_random_maps_with_values_on_the_grid():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 9, 11, generator=generator)
    probs.view(-1)[:49] = torch.as_tensor(THRESHOLDS)  # every grid value, rounded to float32
    probs.view(-1)[49:53] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    targets = torch.rand(5, 9, 11, generator=generator) > 0.5
    p, g = probs.numpy(), targets.numpy()
    expected = np.zeros((5, 49, 4), dtype=np.int64)
    for sample in range(5):
        for j, threshold in enumerate(THRESHOLDS):
            positive = p[sample] > np.float32(threshold)  # the original compares in float32
            expected[sample, j] = [
                (positive & g[sample]).sum(),
                (positive & ~g[sample]).sum(),
                (~positive & g[sample]).sum(),
                (~positive & ~g[sample]).sum(),
            ]
    counts = confusion_counts(probs, targets)
    assert counts.dtype == torch.int64
    np.testing.assert_array_equal(counts.numpy(), expected)


def test_counts_accept_float_masks_and_any_trailing_shape():
    probs = torch.rand(3, 4, 5, 6)
    masks = (torch.rand(3, 4, 5, 6) > 0.5).float()
    np.testing.assert_array_equal(confusion_counts(probs, masks), confusion_counts(probs, masks.bool()))


@pytest.mark.parametrize(
    ("probs", "targets", "message"),
    [
        (torch.randn(2, 4, 4) * 5, torch.zeros(2, 4, 4), "sigmoid"),
        (torch.full((1, 2, 2), float("nan")), torch.zeros(1, 2, 2), r"not finite \(NaN logits\)"),
        (torch.rand(2, 4, 4), torch.zeros(2, 4, 5), "same shape"),
    ],
)
def test_counts_reject_bad_input(probs, targets, message):
    with pytest.raises(ValueError, match=message):
        confusion_counts(probs, targets)


def test_nan_probabilities_are_not_blamed_on_a_missing_sigmoid():
    probs = torch.rand(2, 4, 4)
    probs[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN logits") as caught:
        confusion_counts(probs, torch.zeros(2, 4, 4))
    assert "sigmoid" not in str(caught.value)
    with pytest.raises(ValueError, match="apply torch.sigmoid"):  # logits passed as probabilities still are
        confusion_counts(probs.nan_to_num(3.0), torch.zeros(2, 4, 4))


# ---------------------------------------------------------------- CLIPSeg paper protocol, by hand


def test_perfect_prediction_scores_n_over_n_plus_one():
    targets = [[1, 1, 1, 0, 0, 0, 0, 0, 0]]
    scores = clipseg_paper_metrics(counts_of([[float(t) for t in targets[0]]], targets))
    for key in ("miou_0.3", "fgiou_0.3", "fgiou_0.5", "miou_best", "fgiou_best"):
        assert scores[key] == 0.75  # 3 / (1 + 3)
    assert scores["miou_best_threshold"] == 0.02  # every threshold ties: the first wins
    assert math.isnan(scores["ap"])  # one (recall, precision) point only
    assert scores["num_samples"] == 1


def test_empty_and_all_wrong_predictions_score_zero():
    targets = [[1, 1, 0, 0]]
    empty = clipseg_paper_metrics(counts_of([[0.0, 0.0, 0.0, 0.0]], targets))
    wrong = clipseg_paper_metrics(counts_of([[0.0, 0.0, 1.0, 1.0]], targets))
    for scores in (empty, wrong):
        assert scores["miou_0.3"] == scores["fgiou_0.5"] == scores["miou_best"] == 0.0
        assert math.isnan(scores["ap"])  # nothing predicted / a single (0, 0) point


def test_partial_prediction_by_hand():
    # Foreground probabilities 0.9 0.6 0.4 0.1, background 0.7 0.2 0 0.
    counts = counts_of([[0.9, 0.6, 0.4, 0.1, 0.7, 0.2, 0.0, 0.0]], [[1, 1, 1, 1, 0, 0, 0, 0]])
    assert counts[0, AT[0.3]].tolist() == [3, 1, 1, 3]
    scores = clipseg_paper_metrics(counts)
    assert scores["miou_0.3"] == pytest.approx(3 / 6)
    assert scores["fgiou_0.5"] == pytest.approx(2 / 6)
    assert scores["miou_best"] == pytest.approx(4 / 7)  # t < 0.1: tp 4, fp 2
    assert scores["miou_best_threshold"] == 0.02


def test_two_samples_mean_iou_differs_from_foreground_iou_and_ap_by_hand():
    # Sample A: foreground 0.85 0.55 0.25, background 0 0. Sample B: 2 pixels of foreground, missed.
    counts = np.concatenate(
        [counts_of([[0.85, 0.55, 0.25, 0.0, 0.0]], [[1, 1, 1, 0, 0]]), counts_of([[0.0, 0.0]], [[1, 1]])]
    )
    scores = clipseg_paper_metrics(counts)
    assert scores["miou_0.3"] == pytest.approx((2 / 4 + 0) / 2)  # A: tp 2 fn 1; B: 0
    assert scores["fgiou_0.3"] == pytest.approx(2 / (1 + 2 + 3))  # summed: tp 2, fn 1 + 2
    # Summed curve: t < 0.25 -> tp 3, (0.25, 0.55] -> 2, (0.55, 0.85] -> 1, above -> nothing.
    # recall = tp / (1 + 5), precision = tp / (1 + tp): three equally spaced points, so Simpson's
    # rule reads h / 3 * (y0 + 4 y1 + y2).
    recalls, precisions = [1 / 6, 2 / 6, 3 / 6], [1 / 2, 2 / 3, 3 / 4]
    assert scores["ap"] == pytest.approx((1 / 6) / 3 * (precisions[0] + 4 * precisions[1] + precisions[2]))
    assert scores["ap"] == pytest.approx(simpson(precisions, x=recalls))


def test_negatives_score_zero_whatever_they_predict():
    empty_gt = [[0, 0, 0, 0]]
    silent = counts_of([[0.0, 0.0, 0.0, 0.0]], empty_gt)
    noisy = counts_of([[0.9, 0.0, 0.0, 0.0]], empty_gt)
    assert silent[0, :, 0].sum() == silent[0, :, 2].sum() == 0  # no tp, no fn
    assert clipseg_paper_metrics(silent)["miou_best"] == 0.0
    assert clipseg_paper_metrics(noisy)["miou_best"] == 0.0
    positive = counts_of([[1.0, 1.0, 1.0, 0.0]], [[1, 1, 1, 0]])  # IoU 3 / 4
    mixed = clipseg_paper_metrics(np.concatenate([positive, silent]))
    assert mixed["miou_0.3"] == pytest.approx(0.75 / 2)
    assert mixed["fgiou_0.3"] == pytest.approx(0.75)  # the negative adds nothing to the sums


def test_empty_split_raises():
    with pytest.raises(ValueError, match="No samples"):
        clipseg_paper_metrics(np.zeros((0, 49, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="No samples"):
        ThresholdSweep().clipseg_paper_metrics()


def test_curves_and_failures():
    good = counts_of([[0.9, 0.8, 0.7, 0.1]], [[1, 1, 1, 0]])  # IoU 3 / 4 from 0.1 to 0.68
    bad = counts_of([[0.9, 0.1, 0.1, 0.1]], [[1, 1, 1, 0]])  # IoU <= 1 / 4 from 0.1 on
    counts = np.concatenate([good, bad])
    assert low_iou_samples(counts).tolist() == [False, True]
    curves = threshold_curves(counts)
    assert set(curves) == {"threshold", "miou", "fgiou", "precision", "recall"}
    assert all(curve.shape == (49,) for curve in curves.values())
    assert math.isnan(curves["precision"][-1])  # nothing above 0.98
    np.testing.assert_allclose(curves["miou"], per_sample_iou(counts).mean(axis=0))


# ---------------------------------------------------------------- CLIPSeg protocol, naive re-computation


def old_scipy_simps(y: np.ndarray, x: np.ndarray) -> float:
    """scipy < 1.11 `simps(y, x)` with its default even="avg", as the original CLIPSeg code called it."""
    if len(y) % 2 == 1:
        return simpson(y, x=x)
    first = (simpson(y[:-1], x=x[:-1]) if len(y) > 2 else 0) + (x[-1] - x[-2]) * (y[-1] + y[-2]) / 2
    last = (x[1] - x[0]) * (y[1] + y[0]) / 2 + (simpson(y[1:], x=x[1:]) if len(y) > 2 else 0)
    return (first + last) / 2


def test_average_precision_uses_the_original_rule_for_an_even_number_of_points():
    # Four points: Simpson on three + a trapezoid, averaged both ways, worked out by hand.
    x = np.array([0.0, 0.1, 0.2, 0.4])
    y = np.array([1.0, 0.9, 0.6, 0.2])
    simpson_first = 0.1 / 3 * (1.0 + 4 * 0.9 + 0.6)  # equal spacing on the first three
    trapezoid_last = 0.2 * (0.6 + 0.2) / 2
    trapezoid_first = 0.1 * (1.0 + 0.9) / 2
    simpson_last = simpson(y[1:], x=x[1:])  # uneven spacing: scipy's composite rule
    expected = 0.5 * (simpson_first + trapezoid_last + trapezoid_first + simpson_last)
    assert simpson_as_original(y, x) == pytest.approx(expected)
    assert simpson_as_original(y[:3], x[:3]) == pytest.approx(simpson_first)


def naive_clipseg_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Straightforward loops over samples and thresholds, as the original code reads."""
    per_sample = []
    for p, g in zip(probs, targets, strict=True):
        rows = []
        for t in THRESHOLDS:
            positive = p > np.float32(t)
            rows.append([int((positive & g).sum()), int((positive & ~g).sum()), int((~positive & g).sum())])
        per_sample.append(rows)
    ious = [[tp / (1 + tp + fp + fn) for tp, fp, fn in rows] for rows in per_sample]
    miou = [np.mean([sample[j] for sample in ious]) for j in range(len(THRESHOLDS))]
    summed = [[sum(rows[j][k] for rows in per_sample) for k in range(3)] for j in range(len(THRESHOLDS))]
    fgiou = [tp / (1 + tp + fp + fn) for tp, fp, fn in summed]
    pairs = [(tp / (1 + tp + fn), tp / (1 + tp + fp)) for tp, fp, fn in summed if tp + fp > 0]
    recalls, precisions = zip(*sorted(set(pairs), key=lambda pair: pair[0]), strict=True)
    return {
        "miou_0.3": miou[14],
        "fgiou_0.3": fgiou[14],
        "fgiou_0.5": fgiou[24],
        "miou_best": max(miou),
        "miou_best_threshold": THRESHOLDS[int(np.argmax(miou))],
        "fgiou_best": max(fgiou),
        "fgiou_best_threshold": THRESHOLDS[int(np.argmax(fgiou))],
        "ap": old_scipy_simps(np.array(precisions), np.array(recalls)),
        "num_samples": len(probs),
    }


def random_batch(seed: int, samples: int = 6, size: int = 24):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.rand(samples, size, size, generator=generator) > 0.7
    noise = torch.rand(samples, size, size, generator=generator)
    probs = (0.5 * targets.float() + 0.6 * noise).clamp(0, 1)
    return probs, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_metrics_equal_naive_computation(seed):
    probs, targets = random_batch(seed)
    expected = naive_clipseg_metrics(probs.numpy(), targets.numpy())
    scores = clipseg_paper_metrics(confusion_counts(probs, targets))
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


# ---------------------------------------------------------------- accumulation


def test_sweep_refuses_samples_counted_twice():
    probs, targets = random_batch(4, samples=2)
    sweep = ThresholdSweep()
    sweep.update(probs, targets, sample_ids=[0, 1])
    sweep.update(probs[1:], targets[1:], sample_ids=[1])  # a padded duplicate gathered by mistake
    with pytest.raises(ValueError, match="gather_for_metrics"):
        sweep.clipseg_paper_metrics()


def reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: leave none behind for other tests."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def test_sweep_with_a_single_process_accelerator(fresh_accelerate_state):
    from accelerate import Accelerator

    probs, targets = random_batch(5, samples=4)
    sweep = ThresholdSweep()
    sweep.update(probs, targets, sample_ids=[10, 11, 12, 13], accelerator=Accelerator(cpu=True))
    assert sweep.sample_ids.tolist() == [10, 11, 12, 13]
    np.testing.assert_array_equal(sweep.counts, confusion_counts(probs, targets))


def count_five_samples_on_two_processes():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    probs, targets = random_batch(7, samples=5, size=8)
    # Batches of 2 over 2 processes: the last round is padded with a duplicate sample.
    loader = accelerator.prepare(DataLoader(TensorDataset(probs, targets, torch.arange(5)), batch_size=2))
    sweep = ThresholdSweep()
    for batch_probs, batch_targets, batch_ids in loader:
        sweep.update(batch_probs, batch_targets, batch_ids, accelerator=accelerator)
    assert sorted(sweep.sample_ids.tolist()) == [0, 1, 2, 3, 4]
    order = sweep.sample_ids
    assert torch.equal(sweep.counts, confusion_counts(probs[order], targets[order]))


def test_sweep_gathers_each_sample_once_across_two_processes():
    run_on_two_processes("test_metrics", "count_five_samples_on_two_processes")


# ---------------------------------------------------------------- official PhraseCut protocol


def test_intersection_union_by_hand():
    pred = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    intersection, union = intersection_union(pred, gt)
    assert (int(intersection), int(union)) == (1, 4)
    batched = intersection_union(torch.stack([pred, pred]), torch.stack([gt, pred]))
    assert [t.tolist() for t in batched] == [[1, 2], [4, 2]]
    with pytest.raises(ValueError, match="original image size"):
        intersection_union(pred, gt[:, :2])


def test_official_metrics_by_hand_with_subsets():
    # Task IoUs: 0.5 (exactly), 0.9, 0 (I = 0), 0.75.
    intersections = [2, 9, 0, 3]
    unions = [4, 10, 5, 4]
    subsets = [["c20", "i_single"], ["c20"], ["i_single", "all"], []]
    results = official_phrasecut_metrics(intersections, unions, subsets)
    assert list(results) == ["all", "c20", "i_single"]
    overall = results["all"]
    assert overall["count"] == 4
    assert overall["mean_iou"] == pytest.approx((0.5 + 0.9 + 0 + 0.75) / 4)
    assert overall["cum_iou"] == pytest.approx(14 / 23)
    # Dice = 2I / (I + U) per task (= 2 IoU / (1 + IoU)): 4/6, 18/19, 0, 6/7.
    assert overall["mean_dice"] == pytest.approx((4 / 6 + 18 / 19 + 0 + 6 / 7) / 4)
    # Strictly greater: the task at exactly 0.5 does not count at 0.5, nor 0.9 at 0.9.
    assert [overall[f"pr_{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)] == [0.5, 0.5, 0.5, 0.25, 0.0]
    assert results["c20"] == pytest.approx(
        {"count": 2, "mean_iou": 0.7, "mean_dice": (4 / 6 + 18 / 19) / 2, "cum_iou": 11 / 14, "pr_0.5": 0.5}
        | {"pr_0.6": 0.5}
        | {"pr_0.7": 0.5, "pr_0.8": 0.5, "pr_0.9": 0.0}
    )
    assert results["i_single"]["count"] == 2
    assert results["i_single"]["mean_iou"] == pytest.approx(0.25)
    assert results["i_single"]["cum_iou"] == pytest.approx(2 / 9)


def test_official_metrics_empty_unions_and_bad_input():
    results = official_phrasecut_metrics([0, 0], [0, 0])
    assert results["all"]["mean_iou"] == results["all"]["mean_dice"] == 0.0  # I = 0 scores 0, no division
    assert math.isnan(results["all"]["cum_iou"])
    with pytest.raises(ValueError, match="empty"):
        official_phrasecut_metrics([], [])
    with pytest.raises(ValueError, match="intersection <= union"):
        official_phrasecut_metrics([3], [2])
    with pytest.raises(ValueError, match="2 tasks"):
        official_phrasecut_metrics([1], [2], [["all"], ["c20"]])


def test_markdown_table_puts_models_side_by_side():
    table = markdown_table({"ours": {"miou_0.3": 0.5, "num_samples": 3, "curve": [1]}, "cidas": {"ap": 0.25}})
    assert table.splitlines() == [
        "| model | miou_0.3 | num_samples | ap |",
        "|---|---:|---:|---:|",
        "| ours | 0.5000 | 3 |  |",
        "| cidas |  |  | 0.2500 |",
    ]


# ---------------------------------------------------------------- the evaluate module


@pytest.fixture(scope="module")
def evaluate_lib():
    return pytest.importorskip("evaluate")


def test_evaluate_module_loads_by_path_offline_and_agrees(evaluate_lib, tmp_path):
    probs, targets = random_batch(6, samples=4, size=12)
    expected = clipseg_paper_metrics(confusion_counts(probs, targets))

    maps = evaluate_lib.load(str(METRIC_DIR), cache_dir=str(tmp_path))
    maps.add_batch(predictions=list(probs[:2].numpy()), references=list(targets[:2].numpy()))
    maps.add_batch(predictions=list(probs[2:].numpy()), references=list(targets[2:].numpy()))
    assert maps.compute() == pytest.approx(expected, nan_ok=True)

    counts = evaluate_lib.load(str(METRIC_DIR), "counts", cache_dir=str(tmp_path))
    result = counts.compute(confusion_counts=confusion_counts(probs, targets).numpy())
    assert result == pytest.approx(expected, nan_ok=True)
