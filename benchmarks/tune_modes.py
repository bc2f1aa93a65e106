"""Which part of the model to tune: decoder, LoRA, last blocks or full, measured on the offline demo's world
with and without a shift in appearance that its small CLIP never saw.

    python benchmarks/tune_modes.py --steps 300

Data: the project's synthetic writer, 1200 training and 200 test images, once with flat shapes (the look the
demo's small CLIP was pre-trained on) and once `--style striped` (the same layouts, phrases and masks, the shapes
painted in stripes). Model and recipe: the demo's (`clipseg_tools.demo`: its small CLIP, 128 px, batch 32, peak
learning rate 5e-3 for the decoder), for --steps steps, each mode with its default CLIP learning rate. For each
data set and mode: foreground IoU at 0.3 and AP on the 200 test images (the evaluation `run_train.py` ends
with), trained parameters, the median training step time, and the size of the saved weights (and adapter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.demo import DEMO_RECIPE, _clip_key, build_small_clip, cache_root  # noqa: E402
from clipseg_tools.tuning import TUNE_MODES  # noqa: E402
from phrasecut_dataset import write_synthetic_phrasecut  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPLITS = {"val": 100, "test": 200}


def data_folder(style: str, images: int) -> Path:
    folder = cache_root() / f"tune_{style}_{images}"
    if not (folder / "image_data_split.json").is_file():
        write_synthetic_phrasecut(folder, {"train": images, **SPLITS}, seed=0, overwrite=True, style=style)
    return folder


def small_clip() -> Path:
    folder = cache_root() / f"clip_{_clip_key()}"
    if not (folder / "model.safetensors").is_file():
        build_small_clip(folder)
    return folder


def recipe_flags(steps: int) -> list[str]:
    flags = []
    settings = {**DEMO_RECIPE, "max_train_steps": steps, "checkpointing_steps": steps, "logging_steps": 5}
    for key, value in settings.items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else []
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def train(data: Path, clip: Path, output: Path, mode: str, steps: int) -> dict:
    command = [sys.executable, str(REPO / "run_train.py"), "--data_dir", str(data)]
    command += ["--clip_model_name_or_path", str(clip), "--cache_dir", str(cache_root() / "prepared")]
    command += ["--output_dir", str(output), "--overwrite_output_dir", "--tune", mode, *recipe_flags(steps)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads((output / "all_results.json").read_text())
    log = json.loads((output / "training_log.json").read_text())["log_history"]
    rates = [entry["samples_per_second"] for entry in log[1:] if "samples_per_second" in entry]
    batch = DEMO_RECIPE["per_device_train_batch_size"]
    weights = (output / "model.safetensors").stat().st_size
    adapter = output / "clip_adapter" / "adapter_model.safetensors"
    return {
        "fgiou_0.3": results["eval_fgiou_0.3"],
        "ap": results["eval_ap"],
        "trainable": results["trainable_parameters"]["total"],
        "step_seconds": batch / statistics.median(rates),
        "weights_mb": weights / 1e6,
        "adapter_mb": adapter.stat().st_size / 1e6 if adapter.is_file() else 0.0,
        "wall_seconds": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=1200, help="training images per data set")
    parser.add_argument("--modes", nargs="+", default=list(TUNE_MODES), choices=TUNE_MODES)
    parser.add_argument("--styles", nargs="+", default=["flat", "striped"], choices=["flat", "striped"])
    parser.add_argument("--output_dir", default="tune_modes", help="the runs' folders go here")
    args = parser.parse_args(argv)
    clip = small_clip()
    table = {}
    print("| data | --tune | fgIoU@0.3 | AP | trained parameters | step (s) | weights (MB) | adapter (MB) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for style in args.styles:
        data = data_folder(style, args.images)
        for mode in args.modes:
            row = train(data, clip, Path(args.output_dir) / f"{style}_{mode}", mode, args.steps)
            table[f"{style}/{mode}"] = row
            print(
                f"| {style} | {mode} | {row['fgiou_0.3']:.4f} | {row['ap']:.4f} | {row['trainable']:,} | "
                f"{row['step_seconds']:.3f} | {row['weights_mb']:.1f} | {row['adapter_mb']:.2f} |",
                flush=True,
            )
    return table


if __name__ == "__main__":
    main()
