"""Time this project's CLIPSeg against transformers' `CLIPSegForImageSegmentation` on the same work.

    python benchmarks/benchmark.py --device cpu --batch_size 8               # this machine
    python benchmarks/benchmark.py --device cuda --batch_size 64 --dtype bf16 # a GPU

Both models are built from the same config with the same (random) weights, in the same process, and fed
the same inputs. For each case the median of `--repeats` timed runs after `--warmup` runs is reported
(the device synchronised around each), in images (or image-phrase pairs) per second, with the ratio.

Cases:
- train_step:    forward + backward + AdamW on the decoder, one phrase per image;
- inference:     forward only, one phrase per image;
- prompts_K:     K phrases per image, forward (transformers repeats each image K times, as it must);
- train_step_K:  the training step with K phrases per image;
- loop:          training steps fed by the project's data pipeline (JPEG decode once per image, masks,
                 crop, collate; --num_workers processes) from a prepared synthetic PhraseCut with images of
                 real PhraseCut's size, against the bare step on the same batch size.
The logits of both models are compared once per case (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import CLIPSegForImageSegmentation  # noqa: E402

from configuration import ClipSegCustomConfig  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step")
    parser.add_argument("--prompts_per_image", type=int, default=4)
    parser.add_argument("--text_length", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cases", nargs="+", default=["train_step", "inference", "prompts_K", "train_step_K"]
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile our vision tower")
    parser.add_argument("--num_workers", type=int, default=2, help="data-loading processes for the loop case")
    parser.add_argument("--loop_steps", type=int, default=4)
    parser.add_argument(
        "--data_dir", help="PhraseCut folder for the loop case (default: synthetic, written once)"
    )
    parser.add_argument("--output", default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def build_models(device: torch.device) -> tuple[ClipSegCustomModel, CLIPSegForImageSegmentation]:
    """Ours and transformers', default (CIDAS rd64-refined) architecture, identical weights."""
    torch.manual_seed(0)
    ours = ClipSegCustomModel(ClipSegCustomConfig(decoder_dropout=0.0))
    theirs = CLIPSegForImageSegmentation(ours.config.to_clipseg_config())
    theirs.load_state_dict(ours.state_dict())
    theirs.clip.requires_grad_(False)  # frozen as in any CLIPSeg training: same trainable set as ours
    return ours.to(device).eval(), theirs.to(device).eval()


def inputs(args, device, prompts_per_image: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images, prompts = args.batch_size, args.batch_size * prompts_per_image
    ids = torch.randint(1, 49000, (prompts, args.text_length), generator=generator)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return {
        "pixel_values": torch.randn(images, 3, 352, 352, generator=generator).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "image_index": torch.arange(images).repeat_interleave(prompts_per_image).to(device),
        "labels": (torch.rand(prompts, 352, 352, generator=generator) > 0.8).float().to(device),
    }


def ours_call(model, batch, with_labels):
    return model(
        pixel_values=batch["pixel_values"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        image_index=batch["image_index"],
        labels=batch["labels"] if with_labels else None,
    )


def theirs_call(model, batch, with_labels):
    return model(
        pixel_values=batch["pixel_values"][batch["image_index"]],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"] if with_labels else None,
    )


def timed(fn, device, warmup, repeats) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(model, call, batch, autocast):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model.train()
        with autocast():
            loss = call(model, batch, True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward_fn(model, call, batch, autocast):
    def forward():
        model.eval()
        with torch.no_grad(), autocast():
            return call(model, batch, False).logits

    return forward


def loop_rate(args, model, call, device, autocast, phrases_per_image: int) -> float:
    """Pairs per second of training steps whose batches come from the project's data pipeline."""
    import tempfile
    from functools import partial

    from torch.utils.data import DataLoader, RandomSampler

    from clipseg_tools.batching import PhraseIndex, TrainingOptions, TrainingSamples, collate_training
    from clipseg_tools.data import load_splits
    from clipseg_tools.demo import demo_words
    from clipseg_tools.tiny_clip import build_word_tokenizer
    from phrasecut_dataset import write_synthetic_phrasecut

    scratch = Path(tempfile.gettempdir()) / "clipseg_benchmark"
    data_dir = args.data_dir or scratch / "data"
    if not args.data_dir and not (scratch / "data" / "image_data_split.json").is_file():
        write_synthetic_phrasecut(
            data_dir, {"train": 400}, seed=0, min_size=375, max_size=500, overwrite=True
        )
    split = load_splits(["train"], data_dir=str(data_dir), cache_dir=str(scratch / "cache"))["train"]
    tokenizer = build_word_tokenizer(demo_words(), scratch / "tokenizer", max_length=args.text_length)
    options = TrainingOptions(image_size=352, phrases_per_image=phrases_per_image, prompt_template="plain")
    samples = TrainingSamples(split, PhraseIndex.from_dataset(split), options)
    loader = DataLoader(
        samples,
        batch_size=args.batch_size,
        sampler=RandomSampler(samples, generator=torch.Generator().manual_seed(0)),
        num_workers=args.num_workers,
        drop_last=True,
        collate_fn=partial(collate_training, tokenizer=tokenizer, max_length=args.text_length),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    batches = iter(loader)
    pairs, start = 0, None
    for step in range(args.warmup + args.loop_steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with autocast():
            loss = call(model, batch, True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pairs += batch["labels"].shape[0] if step >= args.warmup else 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return pairs / (time.perf_counter() - start)


def max_logit_difference(ours, theirs, batch, autocast) -> float:
    with torch.no_grad(), autocast():
        a = ours_call(ours.eval(), batch, False).logits.float()
        b = theirs_call(theirs.eval(), batch, False).logits.float()
    return float((a - b).abs().max())


def forward_flops_per_image(model, call, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in batch.items()}
    one["image_index"] = torch.zeros(1, dtype=torch.long, device=one["pixel_values"].device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(model, one, False)
    return counter.get_total_flops()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    ours, theirs = build_models(device)
    if args.compile:
        ours.vision_activations = torch.compile(ours.vision_activations)
    k = args.prompts_per_image
    plans = {
        "train_step": (1, train_step_fn),
        "inference": (1, forward_fn),
        f"prompts_{k}": (k, forward_fn),
        f"train_step_{k}": (k, train_step_fn),
    }
    wanted = [c.replace("_K", f"_{k}") for c in args.cases]
    results = {
        "machine": {
            "device": str(device),
            "name": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "settings": {k2: v for k2, v in vars(args).items() if k2 != "output"},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "date": time.strftime("%Y-%m-%d"),
        "cases": {},
    }
    batch1 = inputs(args, device, 1)
    results["forward_gflops_per_image"] = {
        "ours": forward_flops_per_image(ours, ours_call, batch1) / 1e9,
        "transformers": forward_flops_per_image(theirs, theirs_call, batch1) / 1e9,
    }
    flops = results["forward_gflops_per_image"]
    print(
        f"forward GFLOP per image: ours {flops['ours']:.1f}, transformers {flops['transformers']:.1f}",
        flush=True,
    )
    for case in wanted:
        if case == "loop":
            continue
        per_image, make = plans[case]
        batch = inputs(args, device, per_image)
        pairs = batch["input_ids"].shape[0]
        t_ours = timed(make(ours, ours_call, batch, autocast), device, args.warmup, args.repeats)
        t_theirs = timed(make(theirs, theirs_call, batch, autocast), device, args.warmup, args.repeats)
        results["cases"][case] = {
            "phrases_per_image": per_image,
            "pairs_per_step": pairs,
            "ours_seconds": t_ours,
            "transformers_seconds": t_theirs,
            "ours_pairs_per_second": pairs / t_ours,
            "transformers_pairs_per_second": pairs / t_theirs,
            "speedup": t_theirs / t_ours,
            "max_abs_logit_difference": max_logit_difference(ours, theirs, batch, autocast),
        }
        print_row(case, results["cases"][case])
    if "loop" in wanted:
        results["cases"]["loop"] = loop_case(args, ours, theirs, device, autocast, results["cases"])
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


def loop_case(args, ours, theirs, device, autocast, cases) -> dict:
    """The data-fed loop of both models; ours also as a fraction of its bare step rate."""
    row = {
        "phrases_per_image": 1,
        "ours_pairs_per_second": loop_rate(args, ours, ours_call, device, autocast, 1),
        "transformers_pairs_per_second": loop_rate(args, theirs, theirs_call, device, autocast, 1),
    }
    row["speedup"] = row["ours_pairs_per_second"] / row["transformers_pairs_per_second"]
    if "train_step" in cases:
        row["ours_fraction_of_bare_step"] = (
            row["ours_pairs_per_second"] / cases["train_step"]["ours_pairs_per_second"]
        )
    print(
        f"{'loop':>14}: ours {row['ours_pairs_per_second']:8.2f} pairs/s | transformers "
        f"{row['transformers_pairs_per_second']:8.2f} pairs/s | x{row['speedup']:.2f}"
        + (
            f" | ours at {row['ours_fraction_of_bare_step']:.0%} of its bare step"
            if "ours_fraction_of_bare_step" in row
            else ""
        ),
        flush=True,
    )
    return row


def print_row(case: str, row: dict) -> None:
    print(
        f"{case:>14}: ours {row['ours_pairs_per_second']:8.2f} pairs/s ({row['ours_seconds']:.3f} s) | "
        f"transformers {row['transformers_pairs_per_second']:8.2f} pairs/s ({row['transformers_seconds']:.3f} s) | "
        f"x{row['speedup']:.2f} | max |dlogit| {row['max_abs_logit_difference']:.2e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
