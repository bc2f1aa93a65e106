"""Train a CLIPSeg decoder on PhraseCut (or data in its format) with Accelerate.

    accelerate launch run_train.py --data_dir /data/VGPhraseCut_v0 --output_dir ./out

One script for one CPU, one or many GPUs and many machines; mixed precision and the number of processes
come from the Accelerate config (`accelerate launch --config_file accelerate_config.yaml ...`).
`python run_train.py --demo` runs the whole job offline on synthetic data with a small CLIP.

Read top to bottom: arguments -> pieces (data, model, optimizer) -> loop -> save, card, push.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipseg_tools.batching import (
    EpochSampler,
    PhraseIndex,
    TrainingOptions,
    TrainingSamples,
    collate_training,
)
from clipseg_tools.evaluation import evaluate
from clipseg_tools.model_card import write_model_card
from clipseg_tools.prompts import TEMPLATES
from configuration import ClipSegCustomConfig
from modeling_clipseg_custom import ClipSegCustomModel, make_processor

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_dir", help="raw PhraseCut folder (refer_*.json, image_data_split.json, images/)"
    )
    data.add_argument(
        "--dataset_name", help="a prepared export instead: Hub dataset id or local Parquet folder"
    )
    data.add_argument("--train_split", default="train")
    data.add_argument("--validation_split", default="validation")
    data.add_argument("--cache_dir", help="where prepared datasets and downloads are cached")
    data.add_argument("--skip_bad_samples", action="store_true", help="skip (and count) broken images/tasks")
    data.add_argument("--dataloader_num_workers", type=int, default=4)

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="fine-tune a checkpoint of ours or a CIDAS one")
    model.add_argument(
        "--clip_model_name_or_path",
        default="openai/clip-vit-base-patch16",
        help="start a new decoder on this CLIP (used when --model_name_or_path is not given)",
    )
    model.add_argument("--image_size", type=int, default=352)
    model.add_argument("--reduce_dim", type=int, default=64)
    model.add_argument("--extract_layers", type=int, nargs="+", default=[3, 6, 9])
    model.add_argument("--decoder_intermediate_size", type=int, default=2048)
    model.add_argument("--decoder_num_attention_heads", type=int, default=4)
    model.add_argument(
        "--plain_head", action="store_true", help="one transposed convolution, not the refined head"
    )
    model.add_argument("--decoder_dropout", type=float, default=0.1)
    model.add_argument(
        "--init_output_bias",
        type=float,
        help="start a new decoder's output bias at this logit (e.g. the foreground prior, about -2.5)",
    )

    recipe = parser.add_argument_group("training recipe (defaults: the CLIPSeg paper)")
    recipe.add_argument(
        "--per_device_train_batch_size", type=int, default=64, help="phrases per device and step"
    )
    recipe.add_argument(
        "--phrases_per_image", type=int, default=1, help="phrases drawn per image (one vision pass)"
    )
    recipe.add_argument("--max_train_steps", type=int, default=20_000)
    recipe.add_argument("--gradient_accumulation_steps", type=int, default=1)
    recipe.add_argument("--learning_rate", type=float, default=1e-3)
    recipe.add_argument(
        "--min_learning_rate", type=float, default=1e-4, help="where the cosine schedule ends"
    )
    recipe.add_argument("--lr_scheduler_type", choices=["cosine", "linear", "constant"], default="cosine")
    recipe.add_argument("--num_warmup_steps", type=int, default=0)
    recipe.add_argument(
        "--weight_decay", type=float, default=0.01, help="AdamW weight decay (the original's 0.01)"
    )
    recipe.add_argument("--adam_beta1", type=float, default=0.9)
    recipe.add_argument("--adam_beta2", type=float, default=0.999)
    recipe.add_argument("--adam_epsilon", type=float, default=1e-8)
    recipe.add_argument("--max_grad_norm", type=float, help="clip gradients to this norm (off by default)")
    recipe.add_argument("--negative_prob", type=float, default=0.2)
    recipe.add_argument("--prompt_template", choices=sorted(TEMPLATES), default="shuffle+")
    recipe.add_argument(
        "--no_random_crop", action="store_true", help="squash whole images instead of square crops"
    )
    recipe.add_argument(
        "--mix_visual_prompts", action="store_true", help="PC+: mix text with example-image prompts"
    )
    recipe.add_argument("--mix_text_min", type=float, default=0.0)
    recipe.add_argument("--mix_text_max", type=float, default=0.5)
    recipe.add_argument(
        "--max_nonfinite_losses", type=int, default=10, help="stop after this many NaN/inf losses"
    )
    recipe.add_argument("--seed", type=int, default=42)

    run = parser.add_argument_group("checkpoints, evaluation, logging, sharing")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--overwrite_output_dir", action="store_true")
    run.add_argument("--checkpointing_steps", type=int, default=1000)
    run.add_argument("--checkpoints_total_limit", type=int, default=3)
    run.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    run.add_argument(
        "--eval_steps", type=int, default=1000, help="evaluate every N steps (0: only at the end)"
    )
    run.add_argument("--max_eval_images", type=int, default=500, help="validation images used (0: all)")
    run.add_argument("--per_device_eval_batch_size", type=int, default=8, help="images per evaluation batch")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--with_tracking", action="store_true")
    run.add_argument(
        "--report_to", default="tensorboard", help="tracker(s) for --with_tracking, e.g. tensorboard"
    )
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", help="namespace/name of the model repository")
    run.add_argument("--hub_token")
    run.add_argument("--hub_private_repo", action="store_true")
    run.add_argument(
        "--demo", action="store_true", help="offline end-to-end demo on synthetic data (see README)"
    )
    run.add_argument("--demo_images", type=int, default=1200, help="synthetic training images for --demo")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad combinations with one clear sentence naming the flag (exit code 2)."""
    if args.demo:
        return
    if bool(args.data_dir) == bool(args.dataset_name):
        parser.error(
            "give exactly one of --data_dir (raw PhraseCut folder) or --dataset_name (prepared export)"
        )
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} does not exist or is not a folder")
    if args.per_device_train_batch_size % args.phrases_per_image:
        parser.error(
            f"--per_device_train_batch_size {args.per_device_train_batch_size} is not divisible by "
            f"--phrases_per_image {args.phrases_per_image}"
        )
    for flag in (
        "max_train_steps",
        "per_device_train_batch_size",
        "phrases_per_image",
        "gradient_accumulation_steps",
    ):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if not 0 <= args.negative_prob < 1:
        parser.error("--negative_prob must be in [0, 1)")
    if not 0 <= args.mix_text_min <= args.mix_text_max <= 1:
        parser.error("--mix_text_min and --mix_text_max must satisfy 0 <= min <= max <= 1")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id namespace/name")
    if args.checkpointing_steps < 1:
        parser.error("--checkpointing_steps must be at least 1")
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        if (out / "checkpoints").is_dir():
            parser.error(
                f"--output_dir {out} holds a run: pass --resume_from_checkpoint latest to continue it, "
                "or --overwrite_output_dir to start over"
            )


# ----------------------------------------------------------------------------------------------------
# Pieces: data, model, optimizer, schedule, checkpoints
# ----------------------------------------------------------------------------------------------------


def load_splits(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, datasets.Dataset]:
    """The training and validation splits, images left as bytes (decoded once per image in the transform)."""
    wanted = [args.train_split, args.validation_split]
    with accelerator.main_process_first():  # prepare once; the other processes read the cache
        if args.data_dir:
            from phrasecut_dataset import load_phrasecut

            splits = load_phrasecut(
                args.data_dir, cache_dir=args.cache_dir, splits=wanted, skip_bad=args.skip_bad_samples
            )
        else:
            splits = datasets.load_dataset(args.dataset_name, cache_dir=args.cache_dir)
    missing = [name for name in wanted if name not in splits]
    if missing:
        raise SystemExit(f"error: the dataset has no split(s) {missing}; it has {sorted(splits)}")
    return {name: splits[name].cast_column("image", datasets.Image(decode=False)) for name in wanted}


def build_model(args: argparse.Namespace) -> tuple[ClipSegCustomModel, Any]:
    """A checkpoint to fine-tune, or a new decoder on a CLIP; the processor comes with it."""
    from transformers import AutoProcessor, AutoTokenizer

    if args.model_name_or_path:
        source = args.model_name_or_path
        model = ClipSegCustomModel.from_pretrained(source, decoder_dropout=args.decoder_dropout)
        try:
            processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError):
            processor = make_processor(AutoTokenizer.from_pretrained(source), model.config.image_size)
    else:
        source = args.clip_model_name_or_path
        model = ClipSegCustomModel.from_clip(
            source,
            image_size=args.image_size,
            reduce_dim=args.reduce_dim,
            extract_layers=args.extract_layers,
            decoder_intermediate_size=args.decoder_intermediate_size,
            decoder_num_attention_heads=args.decoder_num_attention_heads,
            use_complex_transposed_convolution=not args.plain_head,
            decoder_dropout=args.decoder_dropout,
        )
        processor = make_processor(AutoTokenizer.from_pretrained(source), args.image_size)
        if args.init_output_bias is not None:
            head = model.decoder.transposed_convolution
            last = head[-1] if isinstance(head, torch.nn.Sequential) else head
            with torch.no_grad():
                last.bias.fill_(args.init_output_bias)
    return model, processor


def lr_lambda(step: int, args: argparse.Namespace) -> float:
    """Multiplier of the learning rate: optional linear warm-up, then cosine (or linear) down to the floor."""
    if step < args.num_warmup_steps:
        return (step + 1) / args.num_warmup_steps
    if args.lr_scheduler_type == "constant":
        return 1.0
    progress = min(1.0, (step - args.num_warmup_steps) / max(1, args.max_train_steps - args.num_warmup_steps))
    floor = args.min_learning_rate / args.learning_rate
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_scheduler_type == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted save never gets its final name)."""
    root = output_dir / "checkpoints"
    found = (
        [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    )
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: dict, keep: int) -> Path:
    """`save_state` into a temporary folder, then rename it: a killed save leaves no half checkpoint."""
    root = output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['step']}"
    partial_dir = root / f".partial_{CHECKPOINT_PREFIX}{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(partial_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial_dir, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: Path, wanted: str) -> Path:
    if wanted == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise SystemExit(
                f"error: --resume_from_checkpoint latest: no checkpoint in {output_dir / 'checkpoints'}"
            )
        return found[-1]
    path = Path(wanted)
    if not (path / STATE_FILE).is_file():
        raise SystemExit(
            f"error: --resume_from_checkpoint {path} is not a checkpoint of this script "
            f"(no {STATE_FILE}); pass 'latest' or a {CHECKPOINT_PREFIX}N folder under <output_dir>/checkpoints"
        )
    return path


def training_config(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("hub_token",)}
    config.update(num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)
    config["total_batch_size"] = (
        args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    )
    return config


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def conditional_embeddings(model: ClipSegCustomModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text embeddings, mixed with example-image embeddings where the batch carries them (PC+)."""
    embeddings = model.text_embeddings(batch["input_ids"], batch["attention_mask"])
    if "visual_pixel_values" in batch:
        weight = batch["text_weight"].to(embeddings.dtype)
        mixed = weight < 1
        if mixed.any():
            images = model.image_embeddings(batch["visual_pixel_values"][mixed]).to(embeddings.dtype)
            embeddings = embeddings.clone()
            embeddings[mixed] = weight[mixed, None] * embeddings[mixed] + (1 - weight[mixed, None]) * images
    return embeddings


def run_evaluation(args, accelerator, model, split, processor, description) -> dict[str, float]:
    rows = None
    if args.max_eval_images and args.max_eval_images < len(split):
        rows = range(args.max_eval_images)
    result = evaluate(
        accelerator.unwrap_model(model),
        split,
        processor.tokenizer,
        accelerator,
        image_size=model_config(accelerator, model).image_size,
        batch_size=args.per_device_eval_batch_size,
        rows=rows,
        description=description,
    )
    metrics = result.clipseg_metrics()
    official = result.official_metrics()["all"]
    metrics.update({f"official_{k}": v for k, v in official.items()})
    metrics["samples"] = len(result.sample_ids)  # phrases scored, each exactly once across processes
    return metrics


def model_config(accelerator: Accelerator, model: Any) -> ClipSegCustomConfig:
    return accelerator.unwrap_model(model).config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.demo:
        from clipseg_tools.demo import prepare_demo

        args = prepare_demo(args)
    output_dir = Path(args.output_dir)

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=str(output_dir),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    if accelerator.is_main_process and args.overwrite_output_dir and not args.resume_from_checkpoint:
        shutil.rmtree(output_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    # --- pieces ---
    model, processor = build_model(args)
    splits = load_splits(args, accelerator)
    train_split, eval_split = splits[args.train_split], splits[args.validation_split]
    options = TrainingOptions(
        image_size=model.config.image_size,
        phrases_per_image=args.phrases_per_image,
        negative_prob=args.negative_prob,
        prompt_template=args.prompt_template,
        random_crop=not args.no_random_crop,
        visual_prompts=args.mix_visual_prompts,
        mix_text_min=args.mix_text_min,
        mix_text_max=args.mix_text_max,
        seed=args.seed,
    )
    samples = TrainingSamples(train_split, PhraseIndex.from_dataset(train_split), options)
    sampler = EpochSampler(len(samples), args.seed)
    images_per_batch = args.per_device_train_batch_size // args.phrases_per_image
    if len(samples) < images_per_batch * accelerator.num_processes:
        raise SystemExit(f"error: the training split has {len(samples)} phrases, fewer than one batch")
    train_loader = DataLoader(
        samples,
        batch_size=images_per_batch,
        sampler=sampler,
        drop_last=True,
        # Its own generator: starting an epoch's iterator must not draw from the global RNG (dropout's),
        # or a resumed run would drift from the uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        collate_fn=partial(
            collate_training,
            tokenizer=processor.tokenizer,
            max_length=model.config.text_config.max_position_embeddings,
        ),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_lambda, args=args))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Stepped once per optimizer step by us (Accelerate would step a prepared one once per process).
    accelerator.register_for_checkpointing(scheduler)

    # --- resume ---
    step, nonfinite = 0, 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        step, nonfinite = state["step"], state["nonfinite_losses"]
        accelerator.print(f"Resumed from {checkpoint} at step {step}")

    if args.with_tracking:
        accelerator.init_trackers(
            "clipseg_finetune",
            {
                k: v
                for k, v in training_config(args, accelerator).items()
                if isinstance(v, (int, float, str, bool))
            },
        )

    total_batch = (
        args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    )
    accelerator.print(
        f"Training: {len(samples)} phrases in {len(train_split)} images; {args.max_train_steps} steps of "
        f"{total_batch} phrases ({accelerator.num_processes} processes x {args.per_device_train_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation); trainable parameters "
        f"{sum(p.numel() for p in trainable):,}"
    )

    # --- loop ---
    batches_per_epoch = len(train_loader)
    consumed = step * args.gradient_accumulation_steps
    epoch = consumed // batches_per_epoch
    progress = tqdm(
        total=args.max_train_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    metrics: dict[str, float] = {}
    log_history: list[dict[str, float]] = []
    running_loss, window_start, window_phrases = 0.0, time.perf_counter(), 0
    model.train()
    while step < args.max_train_steps:
        skip = consumed - epoch * batches_per_epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        loader.set_epoch(epoch)  # the prepared loader sets the sampler's epoch from its own counter
        for batch in loader:
            consumed += 1
            with accelerator.accumulate(model):
                unwrapped = accelerator.unwrap_model(model)
                with accelerator.autocast():
                    embeddings = conditional_embeddings(unwrapped, batch)
                    loss = model(
                        pixel_values=batch["pixel_values"],
                        conditional_embeddings=embeddings,
                        image_index=batch["image_index"],
                        labels=batch["labels"],
                    ).loss
                finite = bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all())
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    optimizer.step()
                else:
                    nonfinite += 1
                    accelerator.print(
                        f"Step {step + 1}: non-finite loss ({loss.item()}); batch skipped ({nonfinite} so far)"
                    )
                    if nonfinite > args.max_nonfinite_losses:
                        raise SystemExit(
                            f"error: {nonfinite} non-finite losses (limit --max_nonfinite_losses "
                            f"{args.max_nonfinite_losses}); lower --learning_rate or check the data"
                        )
                optimizer.zero_grad(set_to_none=True)
            if finite:
                running_loss += loss.item()
                window_phrases += batch["labels"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            scheduler.step()
            progress.update(1)

            if step % args.logging_steps == 0 or step == args.max_train_steps:
                elapsed = time.perf_counter() - window_start
                logs = {
                    "train_loss": running_loss
                    / max(1, args.logging_steps * args.gradient_accumulation_steps),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "samples_per_second": window_phrases / max(elapsed, 1e-9),
                    "nonfinite_losses": nonfinite,
                }
                progress.set_postfix(
                    loss=f"{logs['train_loss']:.4f}",
                    lr=f"{logs['learning_rate']:.2e}",
                    sps=f"{logs['samples_per_second']:.1f}",
                )
                log_history.append({"step": step, **logs})
                if args.with_tracking:
                    accelerator.log(logs, step=step)
                running_loss, window_start, window_phrases = 0.0, time.perf_counter(), 0

            if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
                state = {"step": step, "nonfinite_losses": nonfinite, "epoch": epoch}
                save_checkpoint(accelerator, output_dir, state, args.checkpoints_total_limit)
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_train_steps:
                metrics = run_evaluation(
                    args, accelerator, model, eval_split, processor, f"evaluating at step {step}"
                )
                accelerator.print(
                    f"step {step}: "
                    + ", ".join(
                        f"{k} {v:.4f}" for k, v in metrics.items() if k in ("miou_0.3", "fgiou_0.3", "ap")
                    )
                )
                if args.with_tracking:
                    accelerator.log({f"eval_{k}": v for k, v in metrics.items()}, step=step)
                model.train()
            if step >= args.max_train_steps:
                break
        else:
            epoch += 1
    progress.close()

    # --- final evaluation, save, card, push ---
    metrics = run_evaluation(args, accelerator, model, eval_split, processor, "final evaluation")
    if args.with_tracking:
        accelerator.log({f"eval_{k}": v for k, v in metrics.items()}, step=step)
        accelerator.end_training()
    results = {f"eval_{k}": v for k, v in metrics.items()}
    results.update(train_steps=step, nonfinite_losses=nonfinite, num_processes=accelerator.num_processes)
    results["decoder_weights_equal_across_processes"] = weights_agree(accelerator, model)
    if accelerator.is_main_process:
        save_final_model(args, accelerator, model, processor, metrics, results, log_history)
    accelerator.wait_for_everyone()
    if args.push_to_hub and accelerator.is_main_process:
        push_output(args, output_dir)
    if accelerator.is_main_process:
        report(args, accelerator, model, processor, eval_split, metrics)
    return results


def report(args, accelerator, model, processor, eval_split, metrics) -> None:
    """Say where everything is (and, for the demo, draw sample predictions)."""
    output_dir = Path(args.output_dir)
    print(
        f"\nEvaluation on {args.validation_split}: mIoU@0.3 {metrics['miou_0.3']:.4f}, "
        f"foreground IoU@0.3 {metrics['fgiou_0.3']:.4f}, best foreground IoU {metrics['fgiou_best']:.4f}, "
        f"AP {metrics['ap']:.4f}"
    )
    print(f"Model, processor and code: {output_dir}/")
    print(f"Model card:                {output_dir / 'README.md'}")
    print(f"Results:                   {output_dir / 'all_results.json'}")
    if args.demo:
        from clipseg_tools.demo import save_sample_predictions

        paths = save_sample_predictions(accelerator.unwrap_model(model), processor, eval_split, output_dir)
        print(
            f"Sample predictions:        {paths[0].parent}/ ({len(paths)} pictures: image, then heat map and truth per phrase)"
        )


def weights_agree(accelerator: Accelerator, model: Any) -> bool:
    """Every process must end with the same decoder; a mismatch means the processes trained apart."""
    flat = torch.cat(
        [p.detach().float().flatten() for p in accelerator.unwrap_model(model).decoder.parameters()]
    )
    gathered = accelerator.gather(flat[None]).reshape(accelerator.num_processes, -1)
    agree = all(torch.equal(gathered[0], row) for row in gathered)
    if not agree:
        raise RuntimeError(
            "the processes ended with different decoder weights: distributed training went wrong"
        )
    return agree


def save_final_model(args, accelerator, model, processor, metrics, results, log_history) -> None:
    """Model, processor, code, card and results, written into a temporary folder and then moved in place."""
    output_dir = Path(args.output_dir)
    staging = output_dir / ".final_partial"
    shutil.rmtree(staging, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "all_results.json").write_text(json.dumps(results, indent=2))
    (staging / "training_log.json").write_text(
        json.dumps({"global_step": results["train_steps"], "log_history": log_history}, indent=2)
    )
    dataset_name = args.dataset_name or ("synthetic PhraseCut (demo)" if args.demo else "PhraseCut")
    write_model_card(
        staging,
        model_name=args.hub_model_id or output_dir.name,
        base_model=args.model_name_or_path or args.clip_model_name_or_path,
        dataset_name=dataset_name,
        eval_split=args.validation_split,
        metrics=metrics,
        training_config=training_config(args, accelerator),
        notes=getattr(args, "card_notes", ""),
    )
    for item in staging.iterdir():
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def files_to_push(output_dir: Path) -> list[Path]:
    """The saved model folder: everything but checkpoints, tracker logs and unfinished (hidden) files."""
    skip_dirs = {"checkpoints", "clipseg_finetune", "runs"}
    return sorted(
        path
        for path in output_dir.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(output_dir).parts)
        and path.relative_to(output_dir).parts[0] not in skip_dirs
    )


def push_output(args: argparse.Namespace, output_dir: Path) -> None:
    """Upload exactly the saved model folder, in one commit; checkpoints and logs stay local."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(output_dir).as_posix(), path_or_fileobj=str(path))
        for path in files_to_push(output_dir)
    ]
    api.create_commit(
        repo_id=repo_id, operations=operations, commit_message="Upload model trained with clipseg-finetune"
    )
    print(f"Pushed {len(operations)} files from {output_dir} to https://huggingface.co/{repo_id}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # bad input named by the code that found it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
