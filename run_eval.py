"""Score CLIPSeg models on PhraseCut under the CLIPSeg paper's protocol and the official one, side by side.

    python run_eval.py --model ./out --data_dir /data/VGPhraseCut_v0
    python run_eval.py --model ./out --compare CIDAS/clipseg-rd64-refined transformers:CIDAS/clipseg-rd64 ...
    accelerate launch --multi_gpu --num_processes 4 run_eval.py --model ./out ...

A model is a folder or Hub id: a checkpoint of ours, or a CIDAS-format one (a saved
`CLIPSegForImageSegmentation`, loaded into our model). Prefix it with `transformers:` to run it through
transformers' own `CLIPSegForImageSegmentation` instead (one image copy per phrase, as that class needs).
Prefix a SAM 3 checkpoint with `sam3:` (e.g. `sam3:facebook/sam3`) to score transformers' `Sam3Model` on the
same samples: each phrase's map is the union of its instances (`clipseg_tools/sam3_compare.py`), each image
given at SAM 3's own input size.

Writes `results.md` and `results.json` (all models, both protocols, the paper's reference rows) and, per
model, a failure gallery (`gallery/<model>/index.html`) with the precision-recall curve and IoU histogram,
and each model's parameter count and scoring speed (images per second).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers.utils import logging

from clipseg_tools.class_maps import CLASS_MAP_METRICS, class_map_scores, class_names
from clipseg_tools.cli import ArgumentParser, run_command, setup_logging, worker_count
from clipseg_tools.data import load_splits
from clipseg_tools.errors import CommandError
from clipseg_tools.evaluation import EvaluationResult, evaluate, images_scored
from clipseg_tools.files import removed_if_left_empty, write_text_atomically
from clipseg_tools.gallery import write_gallery
from clipseg_tools.metrics import OFFICIAL_THRESHOLD, markdown_table
from clipseg_tools.own_data import (
    add_source_arguments,
    check_class_prompt_template,
    columns_from,
    is_phrasecut,
)
from clipseg_tools.sam3_compare import SAM3_PREFIX, load_sam3, sam3_source_problem
from clipseg_tools.sources import load_error, model_source_problem

logger = logging.get_logger(__name__)

# Table 3 of the CLIPSeg paper (PhraseCut test, threshold 0.3): reference rows for the comparison.
PAPER_ROWS = {
    "paper: CLIPSeg (PC+), D=64": {"miou_0.3": 0.434, "fgiou_0.3": 0.547, "ap": 0.767},
    "paper: CLIPSeg (PC), D=64": {"miou_0.3": 0.461, "fgiou_0.3": 0.562, "ap": 0.782},
    "paper: CLIPSeg (PC), D=128": {"miou_0.3": 0.482, "fgiou_0.3": 0.565, "ap": 0.782},
}
PAPER_COLUMNS = [
    "miou_0.3",
    "fgiou_0.3",
    "fgiou_0.5",
    "ap",
    "miou_best",
    "fgiou_best",
    "fgiou_best_threshold",
]
OFFICIAL_COLUMNS = [
    "count",
    "mean_iou",
    "mean_dice",
    "cum_iou",
    "pr_0.5",
    "pr_0.6",
    "pr_0.7",
    "pr_0.8",
    "pr_0.9",
]
STOCK_PREFIX = "transformers:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder or Hub id of the model to score")
    parser.add_argument("--compare", nargs="*", default=[], help="more models scored on the same samples")
    data = parser.add_argument_group("data (give --data_dir or --dataset_name)")
    data.add_argument("--data_dir", help="raw PhraseCut folder (prepared with the project's builder)")
    data.add_argument(
        "--dataset_name",
        help="a Hub dataset id or local folder (Parquet, images): the PhraseCut export, or your own referring rows",
    )
    add_source_arguments(data.add_argument)
    data.add_argument("--split", default="test", help="the split scored")
    data.add_argument("--cache_dir", help="where prepared datasets and downloads are cached")
    data.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="skip broken entries of --data_dir (and count them), as run_train.py does",
    )
    parser.add_argument("--max_images", type=int, default=0, help="score the first N images only (0: all)")
    parser.add_argument(
        "--batch_size", type=int, default=8, help="images per batch (all their phrases together)"
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        help="data-loader worker processes per process (default: this machine's CPUs shared among its "
        "processes, less one each, at most 16; 0 loads in the scoring process)",
    )
    parser.add_argument(
        "--official_threshold",
        type=float,
        default=OFFICIAL_THRESHOLD,
        help="probability threshold for the official protocol",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="evaluate under bf16 autocast (the paper used float32)"
    )
    parser.add_argument(
        "--output_dir", default="eval_results", help="where results.md, results.json and the gallery go"
    )
    parser.add_argument(
        "--gallery_max", type=int, default=100, help="failure pictures per model (0: no gallery)"
    )
    args = parser.parse_args(argv)
    if bool(args.data_dir) == bool(args.dataset_name):
        parser.error(
            "give exactly one of --data_dir (raw PhraseCut folder) or --dataset_name (prepared export)"
        )
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} does not exist or is not a folder")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    try:
        check_class_prompt_template(args.class_prompt_template)
    except CommandError as error:
        parser.error(str(error))
    if args.max_images < 0:
        parser.error("--max_images must not be negative")
    if not 0 < args.official_threshold < 1:
        parser.error("--official_threshold must lie strictly between 0 and 1")
    for spec in [args.model, *args.compare]:  # all of them before scoring any
        source = spec.removeprefix(STOCK_PREFIX).removeprefix(SAM3_PREFIX)
        problem = model_source_problem(source)
        if not problem and spec.startswith(SAM3_PREFIX):
            problem = sam3_source_problem(source)
        if problem:
            parser.error(f"--model/--compare {spec}: {problem}")
    args.num_workers = worker_count(parser, args.num_workers, "--num_workers")
    return args


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


class StockClipSeg(torch.nn.Module):
    """transformers' `CLIPSegForImageSegmentation` behind our forward signature: the class needs one image
    per phrase, so each image is repeated for its phrases (the vision tower runs once per phrase)."""

    def __init__(self, model: Any, image_size: int):
        super().__init__()
        self.model = model
        self.config = argparse.Namespace(text_config=model.config.text_config, image_size=image_size)

    def forward(self, pixel_values, input_ids, attention_mask, image_index):
        return self.model(
            pixel_values=pixel_values[image_index], input_ids=input_ids, attention_mask=attention_mask
        )


def load_model(spec: str, device: torch.device) -> tuple[Any, Any]:
    """Model and processor from a folder or Hub id (the module docstring says what `transformers:` and
    `sam3:` do)."""
    if spec.startswith(SAM3_PREFIX):
        return load_sam3(spec.removeprefix(SAM3_PREFIX), device, f"--model/--compare {spec!r}")
    from transformers import AutoProcessor, CLIPSegForImageSegmentation

    from modeling_clipseg_custom import ClipSegCustomModel

    stock = spec.startswith(STOCK_PREFIX)
    source = spec[len(STOCK_PREFIX) :] if stock else spec
    try:
        if stock:
            model = CLIPSegForImageSegmentation.from_pretrained(source)
        else:
            model = ClipSegCustomModel.from_pretrained(source)
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise load_error(f"--model/--compare {spec!r} is not a loadable model", source, error) from error
    model = model.to(device).eval()
    if stock:
        size = processor.image_processor.size
        model = StockClipSeg(model, int(size.get("height") or size.get("shortest_edge")))
    return model, processor


def model_label(spec: str, taken: set[str]) -> str:
    label = re.sub(r"[^A-Za-z0-9_.+-]+", "_", spec.rstrip("/")).strip("_") or "model"
    while label in taken:
        label += "_"
    taken.add(label)
    return label


# ----------------------------------------------------------------------------------------------------
# Scoring and reporting
# ----------------------------------------------------------------------------------------------------


def score(
    model: Any, processor: Any, split: Any, args: argparse.Namespace, accelerator: Accelerator, label: str
) -> EvaluationResult:
    try:
        return evaluate(
            model,
            split,
            processor.tokenizer,
            accelerator,
            batch_size=args.batch_size,
            max_images=args.max_images,
            official_threshold=args.official_threshold,
            num_workers=args.num_workers,
            description=label,
            mixed_precision=args.bf16,
        )
    except CommandError as error:
        raise CommandError(f"{label}: {error}", error.exit_code) from error
    except ValueError as error:  # the metrics' checks: an empty split, predictions that are not probabilities
        raise CommandError(f"{label}: {error}") from error


def score_class_maps(
    model: Any, processor: Any, split: Any, args: argparse.Namespace, accelerator: Accelerator, label: str
) -> dict[str, Any]:
    """The multi-class map's scores (`evaluate`'s `mean_iou` names) on the same images."""
    return class_map_scores(
        model,
        split,
        processor.tokenizer,
        accelerator,
        args.class_prompt_template,
        args.official_threshold,
        args.max_images,
        batch_size=args.batch_size,
        mixed_precision=args.bf16,
        description=f"{label} (multi-class maps)",
    )


def class_map_lines(args: argparse.Namespace, summaries: dict[str, dict]) -> list[str]:
    """The report's multi-class section: the three scores per model, then IoU and accuracy per class."""
    maps = {name: s["class_map"] for name, s in summaries.items() if "class_map" in s}
    if not maps:
        return []
    classes = list(next(iter(maps.values()))["per_category_iou"])
    per_class = {
        cls: {
            f"{name} {what}": scores[f"per_category_{what}"][cls]
            for name, scores in maps.items()
            for what in ("iou", "accuracy")
        }
        for cls in classes
    }
    return [
        f"## Multi-class map (argmax over the {len(classes)} class prompts at each image's own size, no class "
        f"where none passes {args.official_threshold}); `evaluate`'s mean_iou definitions",
        "",
        markdown_table({name: scores for name, scores in maps.items()}, list(CLASS_MAP_METRICS)),
        "",
        "### Per class",
        "",
        markdown_table(per_class, row_label="class"),
        "",
    ]


def measured(model: Any, seconds: float, num_images: int) -> dict[str, Any]:
    """A model's size (every parameter, CLIP's included) and scoring speed: images over the wall time of its
    `evaluate` call (data loading, forward passes, metric counts)."""
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "images_per_second": num_images / seconds if seconds > 0 else float("nan"),
        "seconds": seconds,
    }


def speed_lines(speeds: dict[str, dict]) -> list[str]:
    """The report's size and speed table (parameters written with thousands separators)."""
    if not speeds:
        return []
    rows = {
        name: {"parameters": f"{s['parameters']:,}", "images/s": s["images_per_second"]}
        for name, s in speeds.items()
    }
    return [
        "## Size and speed",
        "",
        "Parameters: all of the model's (CLIP's included). Images/s: the images scored over the wall time of "
        "the model's scoring on this machine (data loading, forward passes, metric counts); the first model "
        "may also pay one-off warm-up.",
        "",
        markdown_table(rows, ["parameters", "images/s"], digits=2),
        "",
    ]


def write_report(
    output_dir: Path,
    args: argparse.Namespace,
    summaries: dict[str, dict],
    num_images: int,
    phrasecut: bool = True,
    speeds: dict[str, dict] | None = None,
) -> str:
    """`results.md` (both tables, Markdown) and `results.json`; returns the Markdown. The paper's figures are
    shown beside PhraseCut scores only (`phrasecut`); a user's own data gets the same two protocols. `speeds`
    (`measured`, per model) go beside the scores, not into them: they differ from run to run."""
    paper_table = {name: s["clipseg_paper_protocol"] for name, s in summaries.items()}
    official_table = {name: s["official_protocol"]["all"] for name, s in summaries.items()}
    native = "Official PhraseCut protocol" if phrasecut else "At each image's own size"
    lines = [
        f"# Evaluation on the {args.split} split ({num_images} images, "
        f"{next(iter(summaries.values()))['num_phrases']} phrases)",
        "",
        "## CLIPSeg paper protocol (whole image at the model size, raw phrases, 49 thresholds)",
        "",
        markdown_table({**paper_table, **(PAPER_ROWS if phrasecut else {})}, PAPER_COLUMNS),
        "",
        *(
            [
                "The `paper:` rows are the CLIPSeg paper's Table 3 on the full PhraseCut test split, for reference.",
                "",
            ]
            if phrasecut
            else []
        ),
        f"## {native} (original resolution, threshold {args.official_threshold}), all tasks",
        "",
        markdown_table(official_table, OFFICIAL_COLUMNS),
        "",
    ]
    for name, s in summaries.items():
        lines += [
            f"### {name}: official protocol per subset",
            "",
            markdown_table(s["official_protocol"], OFFICIAL_COLUMNS, row_label="subset"),
            "",
        ]
    lines += class_map_lines(args, summaries)
    lines += speed_lines(speeds or {})
    markdown = "\n".join(lines)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "results.md", markdown)
    payload = {
        "split": args.split,
        "num_images": num_images,
        "models": summaries,
        "paper_reference": PAPER_ROWS if phrasecut else None,
        "size_and_speed": speeds or {},
    }
    write_text_atomically(
        output_dir / "results.json", json.dumps(without_nan(payload), indent=2, allow_nan=False)
    )
    return markdown


def without_nan(value: Any) -> Any:
    """JSON has no NaN: undefined numbers (e.g. AP of a flat curve) become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    # float32 unless --bf16, whatever the launch configuration says: the protocol is float32.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if args.bf16 else "no"
    )
    setup_logging(accelerator.is_main_process)
    output_dir = Path(args.output_dir)
    (split,) = load_splits(
        {"--split": args.split},
        data_dir=args.data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad_samples,
        accelerator=accelerator,
        source_options=columns_from(args),
    )
    num_images = images_scored(len(split), args.max_images)

    with removed_if_left_empty(output_dir, accelerator.is_main_process):
        return score_all(args, accelerator, split, num_images)


def score_all(
    args: argparse.Namespace, accelerator: Accelerator, split: Any, num_images: int
) -> dict[str, dict]:
    """Every model on the same samples, with its gallery; then the report."""
    output_dir = Path(args.output_dir)
    summaries, speeds, taken = {}, {}, set()
    for spec in [args.model, *args.compare]:
        label = model_label(spec, taken)
        model, processor = load_model(spec, accelerator.device)
        start = time.perf_counter()
        result = score(model, processor, split, args, accelerator, label)
        speeds[label] = measured(model, time.perf_counter() - start, result.num_images)
        summaries[label] = result.summary()
        if class_names(split):
            summaries[label]["class_map"] = score_class_maps(
                model, processor, split, args, accelerator, label
            )
        if accelerator.is_main_process and args.gallery_max:
            folder = write_gallery(
                output_dir / "gallery" / label, model, processor, split, result, limit=args.gallery_max
            )
            summaries[label]["gallery"] = str(folder / "index.html")
        del model
    if accelerator.is_main_process:
        markdown = write_report(
            output_dir, args, summaries, num_images, phrasecut=is_phrasecut(split), speeds=speeds
        )
        print(markdown)  # the command's output; where it was written goes to the log
        gallery = f", {output_dir / 'gallery'}/ (failure pictures)" if args.gallery_max else ""
        logger.info(f"Written: {output_dir / 'results.md'}, {output_dir / 'results.json'}{gallery}")
    return summaries


if __name__ == "__main__":
    run_command(main)
