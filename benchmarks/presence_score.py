"""Which per-prompt score tells "present" from "absent" best: the pipeline's `score` is chosen with this.

    python benchmarks/presence_score.py --model demo_output \\
        --data_dir ~/.cache/clipseg_finetune/demo/data_v2_1200 --split test --max_images 200

Each image of the split is prompted with its own phrases (present) and as many phrases of other images that it
does not hold (absent, drawn with a fixed seed). Candidate scores of a probability map: its maximum, the mean
of its top 1% of pixels, the fraction of pixels above 0.3, the mean probability. Each is judged by the area
under the ROC curve of present against absent (1: a threshold separates them perfectly, 0.5: chance), and by
the accuracy at the best threshold on that score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.data import load_splits  # noqa: E402
from clipseg_tools.transforms import decode_image  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel  # noqa: E402

CANDIDATES = {
    "maximum": lambda maps: maps.flatten(1).max(dim=1).values,
    "mean of the top 1%": lambda maps: (
        maps.flatten(1).topk(max(1, maps[0].numel() // 100), dim=1).values.mean(1)
    ),
    "fraction above 0.3": lambda maps: (maps.flatten(1) > 0.3).float().mean(1),
    "mean": lambda maps: maps.flatten(1).mean(1),
}


def roc_auc(present: np.ndarray, absent: np.ndarray) -> float:
    """P(score of a present prompt > score of an absent one), ties counted half (the Mann-Whitney statistic)."""
    scores = np.concatenate([present, absent])
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable").astype(np.float64) + 1
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    greater = ranks[: len(present)].sum() - len(present) * (len(present) + 1) / 2
    return float(greater / (len(present) * len(absent)))


def best_accuracy(present: np.ndarray, absent: np.ndarray) -> tuple[float, float]:
    """The accuracy of "present if score > t" at its best threshold t, and that t."""
    best = (0.0, 0.0)
    for threshold in np.unique(np.concatenate([present, absent])):
        correct = (present > threshold).sum() + (absent <= threshold).sum()
        best = max(best, (correct / (len(present) + len(absent)), float(threshold)))
    return best


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = ClipSegCustomModel.from_pretrained(args.model).eval()
    (split,) = load_splits({"--split": args.split}, data_dir=args.data_dir)
    rows = split.select(range(min(args.max_images, len(split))))
    all_phrases = sorted({task["phrase"] for row in rows for task in row["tasks"]})
    rng = np.random.default_rng(args.seed)
    scores = {name: ([], []) for name in CANDIDATES}
    for row in rows:
        present = sorted({task["phrase"] for task in row["tasks"]})
        others = [p for p in all_phrases if p not in present]
        absent = list(rng.choice(others, size=min(len(present), len(others)), replace=False))
        with torch.inference_mode():
            (maps,) = model.predict(decode_image(row["image"]), present + absent)
        for name, score in CANDIDATES.items():
            values = score(maps).numpy()
            scores[name][0].extend(values[: len(present)])
            scores[name][1].extend(values[len(present) :])
    results = {}
    print(
        f"{len(scores['maximum'][0])} present and {len(scores['maximum'][1])} absent prompts, {len(rows)} images"
    )
    print("| score | ROC AUC | best accuracy | at threshold |\n|---|---:|---:|---:|")
    for name, (present, absent) in scores.items():
        present, absent = np.asarray(present), np.asarray(absent)
        accuracy, threshold = best_accuracy(present, absent)
        results[name] = {"auc": roc_auc(present, absent), "accuracy": accuracy, "threshold": threshold}
        print(f"| {name} | {results[name]['auc']:.4f} | {accuracy:.4f} | {threshold:.4f} |")
    return results


if __name__ == "__main__":
    main()
