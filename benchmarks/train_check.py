"""`run_train.py` eager, with `--compile`, and with `--compile --compile_mode reduce-overhead` (CUDA graphs) on
the same small job: the training losses must agree. Meant for a GPU (on a CPU the graphs mode compiles
without graphs); a small random CLIP and a synthetic PhraseCut, written to a scratch folder.

    python benchmarks/train_check.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RUNS = {
    "eager": [],
    "compile": ["--compile"],
    "cuda_graphs": ["--compile", "--compile_mode", "reduce-overhead"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "clipseg_train_check"))
    parser.add_argument("--tolerance", type=float, default=2e-2, help="largest relative loss difference")
    return parser.parse_args(argv)


def small_clip(folder: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    from clipseg_tools.demo import demo_words
    from clipseg_tools.tiny_clip import build_word_tokenizer, tiny_clip_configs

    tokenizer = build_word_tokenizer(demo_words(), folder, max_length=16)
    torch.manual_seed(0)
    configs = tiny_clip_configs(
        tokenizer, width=64, layers=4, heads=4, patch_size=16, pretrain_image_size=64, max_positions=16
    )
    CLIPModel(CLIPConfig(**configs)).save_pretrained(folder)
    return folder


def train(args, name: str, data: Path, clip: Path) -> tuple[list[float], float]:
    out = Path(args.scratch) / name
    command = [
        sys.executable, str(REPO_ROOT / "run_train.py"),
        "--data_dir", str(data), "--clip_model_name_or_path", str(clip), "--output_dir", str(out),
        "--overwrite_output_dir", "--image_size", "128", "--per_device_train_batch_size", "32",
        "--phrases_per_image", "2", "--extract_layers", "1", "2", "3", "--max_train_steps", str(args.steps), "--logging_steps", "1",
        "--eval_steps", "0", "--max_eval_images", "8", "--dataloader_num_workers", "2",
        "--cache_dir", str(Path(args.scratch) / "hf_cache"), *RUNS[name],
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_MIXED_PRECISION": args.mixed_precision}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{name}: run_train.py failed\n{result.stderr[-3000:]}")
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    return [entry["train_loss"] for entry in log], seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    from phrasecut_dataset import write_synthetic_phrasecut

    scratch = Path(args.scratch)
    data = write_synthetic_phrasecut(
        scratch / "data", {"train": 64, "val": 8, "test": 8}, seed=1, overwrite=True
    )
    clip = small_clip(scratch / "clip")
    losses, worst = {}, 0.0
    for name in args.runs:
        try:
            losses[name], seconds = train(args, name, data, clip)
        except RuntimeError as failure:
            print(failure, flush=True)
            return 1
        print(f"{name:>12} ({seconds:5.1f} s): " + " ".join(f"{x:.4f}" for x in losses[name]), flush=True)
        if name != args.runs[0]:
            reference = losses[args.runs[0]]
            difference = max(abs(a - b) / abs(b) for a, b in zip(losses[name], reference))
            worst = max(worst, difference)
            print(f"{'':>12} largest relative difference from {args.runs[0]}: {difference:.1e}", flush=True)
    agree = worst <= args.tolerance
    print(f"losses {'agree' if agree else 'DISAGREE'} (tolerance {args.tolerance:.0e})", flush=True)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
