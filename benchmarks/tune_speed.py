"""The training step's cost in each `--tune` mode against `decoder`, side by side in one run.

    python benchmarks/tune_speed.py --repeats 5

Default architecture (CLIP ViT-B/16 with the rd64-refined decoder, 352 px, random weights: the times do not
depend on them), each mode with its default flags (lora: rank 8 on q, k, v and out projections of both towers;
last_blocks: 2; full), the optimizer groups `run_train.py` makes. One step: the forward pass of --images images
with --phrases phrases each (one vision pass per image), the loss, the backward pass and AdamW's step. Each
figure is the median of --repeats steps after one warm-up step; on a GPU (`--device cuda`) under bf16 autocast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools import tuning  # noqa: E402
from clipseg_tools.training import make_optimizer  # noqa: E402
from configuration import ClipSegCustomConfig  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel  # noqa: E402


def mode_args(mode: str) -> SimpleNamespace:
    """The flags `run_train.py` would have for `--tune mode` and nothing else."""
    args = SimpleNamespace(tune=mode, learning_rate=1e-3, mix_visual_prompts=0, unfreeze_last_blocks=None)
    args.__dict__.update({key: value for key, value in tuning.LORA_DEFAULTS.items()})
    args.merge_adapter, args.backbone_learning_rate = False, None
    parser = SimpleNamespace(error=lambda message: (_ for _ in ()).throw(ValueError(message)))
    tuning.check_arguments(parser, args)
    return args


def step_seconds(
    mode: str, images: int, phrases: int, repeats: int, device: torch.device
) -> tuple[float, int]:
    """The median step time in `mode`, and its trained parameter count."""
    torch.manual_seed(0)
    model = ClipSegCustomModel(ClipSegCustomConfig(decoder_dropout=0.0))
    args = mode_args(mode)
    tuning.apply(model, args)
    model.to(device).train()
    optimizer = make_optimizer(tuning.parameter_groups(model, args), 1e-3, 1e-4)
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(images, 3, size, size, generator=generator),
        "input_ids": torch.randint(1, 1000, (images * phrases, 8), generator=generator),
        "image_index": torch.arange(images).repeat_interleave(phrases),
        "labels": (torch.rand(images * phrases, size, size, generator=generator) > 0.5).float(),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tuning.count_trainable(model)["total"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--phrases", type=int, default=4, help="phrases per image")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(
        f"{args.images} images x {args.phrases} phrases per step, {device}, torch threads {torch.get_num_threads()}"
    )
    print("| --tune | trained parameters | step (s) | against decoder |\n|---|---|---|---|", flush=True)
    results = {}
    for mode in tuning.TUNE_MODES:
        seconds, trained = step_seconds(mode, args.images, args.phrases, args.repeats, device)
        results[mode] = seconds
        print(f"| {mode} | {trained:,} | {seconds:.3f} | {seconds / results['decoder']:.2f}x |", flush=True)
    return results


if __name__ == "__main__":
    main()
