"""Train a CLIPSeg decoder on PhraseCut (or data in its format) with Accelerate.

    accelerate launch run_train.py --data_dir /data/VGPhraseCut_v0 --output_dir ./out

One script for one CPU, one or many GPUs and many machines; mixed precision and the number of processes
come from the Accelerate config (`accelerate launch --config_file accelerate_config.yaml ...`).
`python run_train.py --demo` runs the whole job offline on synthetic data with a small CLIP.

Read top to bottom: arguments -> pieces (data, model, optimizer, checkpoints) -> loop -> save, card, push.
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
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipseg_tools.batching import (
    EpochSampler,
    PhraseIndex,
    TrainingOptions,
    TrainingSamples,
    collate_training,
    model_inputs,
)
from clipseg_tools.cli import ArgumentParser, worker_count
from clipseg_tools.data import canonical_split, load_splits
from clipseg_tools.evaluation import evaluate
from clipseg_tools.handover import SharedBatchRing
from clipseg_tools.model_card import write_model_card
from clipseg_tools.prompts import TEMPLATES
from clipseg_tools.sources import model_source_problem
from modeling_clipseg_custom import ClipSegCustomModel, make_processor
from phrasecut_dataset import shrink_images

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
# Flags that shape a new decoder; a checkpoint given with --model_name_or_path brings its own.
ARCHITECTURE_FLAGS = (
    "image_size",
    "reduce_dim",
    "extract_layers",
    "decoder_intermediate_size",
    "decoder_num_attention_heads",
    "plain_head",
    "init_output_bias",
)


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_dir", help="raw PhraseCut folder (refer_*.json, image_data_split.json, images/)"
    )
    data.add_argument(
        "--dataset_name", help="a prepared export instead: Hub dataset id or local Parquet folder"
    )
    data.add_argument("--train_split", default="train", help="the split trained on")
    data.add_argument(
        "--validation_split", default="validation", help="the split evaluated on (during and after training)"
    )
    data.add_argument("--cache_dir", help="where prepared datasets and downloads are cached")
    data.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="when preparing --data_dir, skip (and count) broken entries",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        help="data-loader worker processes per training process (default: this machine's CPUs shared among "
        "its training processes, less one each, at most 16; 0 loads in the training process)",
    )
    data.add_argument(
        "--shrink_train_images",
        action="store_true",
        help="store the training images once at the model's size (short side --image_size, polygons scaled): "
        "a smaller JPEG decode and no resize per sample, for GPUs faster than the CPUs can decode (PC+ example "
        "images are then cut from the smaller images too)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="fine-tune a checkpoint of ours or a CIDAS one")
    model.add_argument(
        "--clip_model_name_or_path",
        default="openai/clip-vit-base-patch16",
        help="start a new decoder on this CLIP (used when --model_name_or_path is not given)",
    )
    model.add_argument("--image_size", type=int, default=352, help="input size of a new model (pixels)")
    model.add_argument("--reduce_dim", type=int, default=64, help="width of a new decoder (rd64, rd16)")
    model.add_argument(
        "--extract_layers",
        type=int,
        nargs="+",
        default=[3, 6, 9],
        help="CLIP vision layers the decoder reads",
    )
    model.add_argument("--decoder_intermediate_size", type=int, default=2048, help="decoder MLP width")
    model.add_argument("--decoder_num_attention_heads", type=int, default=4, help="decoder attention heads")
    model.add_argument(
        "--plain_head", action="store_true", help="one transposed convolution, not the refined head"
    )
    model.add_argument("--decoder_dropout", type=float, default=0.1, help="dropout in the decoder blocks")
    model.add_argument(
        "--backbone_dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype the frozen CLIP computes in during training (auto: the mixed precision's, else float32); "
        "the saved model keeps the starting float32 CLIP",
    )
    model.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the frozen CLIP towers and the decoder with its loss (the first steps compile)",
    )
    model.add_argument(
        "--compile_mode",
        choices=["default", "reduce-overhead"],
        default="default",
        help="torch.compile mode with --compile; reduce-overhead replays CUDA graphs (GPU, one optimizer step "
        "per batch: no --gradient_accumulation_steps)",
    )
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
    recipe.add_argument("--max_train_steps", type=int, default=20_000, help="optimizer steps")
    recipe.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step"
    )
    recipe.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate (AdamW)")
    recipe.add_argument(
        "--min_learning_rate", type=float, default=1e-4, help="where the cosine schedule ends"
    )
    recipe.add_argument(
        "--lr_scheduler_type",
        choices=["cosine", "linear", "constant"],
        default="cosine",
        help="schedule after warm-up",
    )
    recipe.add_argument("--num_warmup_steps", type=int, default=0, help="linear warm-up steps")
    recipe.add_argument(
        "--weight_decay", type=float, default=0.01, help="AdamW weight decay (the original's 0.01)"
    )
    recipe.add_argument("--adam_beta1", type=float, default=0.9)
    recipe.add_argument("--adam_beta2", type=float, default=0.999)
    recipe.add_argument("--adam_epsilon", type=float, default=1e-8)
    recipe.add_argument("--max_grad_norm", type=float, help="clip gradients to this norm (off by default)")
    recipe.add_argument(
        "--negative_prob",
        type=float,
        default=0.2,
        help="chance a phrase is swapped for one absent from the image (empty mask)",
    )
    recipe.add_argument(
        "--prompt_template",
        choices=sorted(TEMPLATES),
        default="shuffle+",
        help="the original's prompt templates",
    )
    recipe.add_argument(
        "--no_random_crop", action="store_true", help="squash whole images instead of square crops"
    )
    recipe.add_argument(
        "--mix_visual_prompts", action="store_true", help="PC+: mix text with example-image prompts"
    )
    recipe.add_argument(
        "--mix_text_min", type=float, default=0.0, help="PC+: least weight of the text embedding"
    )
    recipe.add_argument(
        "--mix_text_max", type=float, default=0.5, help="PC+: most weight of the text embedding"
    )
    recipe.add_argument(
        "--max_nonfinite_losses",
        type=int,
        default=10,
        help="stop after this many optimizer steps skipped for a NaN/inf loss (checked at each log)",
    )
    recipe.add_argument(
        "--seed", type=int, default=42, help="seeds the model, the data order and the augmentation"
    )

    run = parser.add_argument_group("checkpoints, evaluation, logging, sharing")
    run.add_argument("--output_dir", required=True, help="where the model, its card, checkpoints and logs go")
    run.add_argument(
        "--overwrite_output_dir", action="store_true", help="start afresh in an --output_dir that holds a run"
    )
    run.add_argument("--checkpointing_steps", type=int, default=1000, help="save a checkpoint every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=3, help="checkpoints kept (0: all)")
    run.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    run.add_argument(
        "--eval_steps", type=int, default=1000, help="evaluate every N steps (0: only at the end)"
    )
    run.add_argument("--max_eval_images", type=int, default=500, help="validation images used (0: all)")
    run.add_argument("--per_device_eval_batch_size", type=int, default=8, help="images per evaluation batch")
    run.add_argument("--logging_steps", type=int, default=10, help="log the loss every N steps")
    run.add_argument("--with_tracking", action="store_true", help="log to the trackers of --report_to")
    run.add_argument(
        "--report_to", default="tensorboard", help="tracker(s) for --with_tracking, e.g. tensorboard"
    )
    run.add_argument("--push_to_hub", action="store_true", help="upload the saved model folder at the end")
    run.add_argument("--hub_model_id", help="namespace/name of the model repository")
    run.add_argument("--hub_token", help="a Hub token (default: the one `hf auth login` saved)")
    run.add_argument("--hub_private_repo", action="store_true", help="create the repository private")
    run.add_argument(
        "--demo", action="store_true", help="offline end-to-end demo on synthetic data (see README)"
    )
    run.add_argument("--demo_images", type=int, default=1200, help="synthetic training images for --demo")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        check_demo_args(parser, args)
    else:
        check_args(parser, args)
    args.dataloader_num_workers = worker_count(
        parser, args.dataloader_num_workers, "--dataloader_num_workers"
    )
    return args


def check_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--demo brings its own data, CLIP and recipe: a flag it would silently override is refused."""
    from clipseg_tools.demo import DEMO_RECIPE

    overridden = (
        *DEMO_RECIPE,
        "data_dir",
        "dataset_name",
        "cache_dir",
        "model_name_or_path",
        "clip_model_name_or_path",
    )
    given = [f"--{key}" for key in overridden if getattr(args, key) != parser.get_default(key)]
    if given:
        parser.error(f"--demo uses its own data, CLIP and recipe: drop {', '.join(given)}")
    check_run_args(parser, args)
    check_push(parser, args)


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What a demo and any other run both check: resuming, the output folder, the push's repository name."""
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not (Path(args.resume_from_checkpoint) / STATE_FILE).is_file():
            parser.error(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint of this script (no "
                f"{STATE_FILE}); pass 'latest' or a {CHECKPOINT_PREFIX}N folder under <output_dir>/checkpoints"
            )
    out = Path(args.output_dir)
    if (out / "checkpoints").is_dir() and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        parser.error(
            f"--output_dir {out} holds a run: pass --resume_from_checkpoint latest to continue it, "
            "or --overwrite_output_dir to start over"
        )
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id namespace/name")


def check_push(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A push that cannot work is found before training, not after it. One process asks the Hub (its
    account endpoint is rate-limited); when it stops, the launcher stops the others."""
    if args.push_to_hub and os.environ.get("RANK", "0") == "0":
        problem = hub_access_problem(args.hub_token)
        if problem:
            parser.error(f"--push_to_hub: {problem}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values and combinations with one sentence naming the flag (exit code 2)."""
    if bool(args.data_dir) == bool(args.dataset_name):
        parser.error(
            "give exactly one of --data_dir (raw PhraseCut folder) or --dataset_name (prepared export)"
        )
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} does not exist or is not a folder")
    at_least_one = (
        "max_train_steps",
        "per_device_train_batch_size",
        "phrases_per_image",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "logging_steps",
        "per_device_eval_batch_size",
    )
    for flag in at_least_one:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    for flag in (
        "num_warmup_steps",
        "max_eval_images",
        "eval_steps",
        "checkpoints_total_limit",
    ):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must not be negative")
    if args.per_device_train_batch_size % args.phrases_per_image:
        parser.error(
            f"--per_device_train_batch_size {args.per_device_train_batch_size} is not divisible by "
            f"--phrases_per_image {args.phrases_per_image}"
        )
    if not 0 < args.min_learning_rate <= args.learning_rate:
        parser.error(
            "--learning_rate and --min_learning_rate must satisfy 0 < min_learning_rate <= learning_rate"
        )
    if not 0 <= args.negative_prob < 1:
        parser.error("--negative_prob must be in [0, 1)")
    if not 0 <= args.decoder_dropout < 1:
        parser.error("--decoder_dropout must be in [0, 1)")
    if not 0 <= args.mix_text_min <= args.mix_text_max <= 1:
        parser.error("--mix_text_min and --mix_text_max must satisfy 0 <= min <= max <= 1")
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile_mode {args.compile_mode} needs --compile")
    if args.compile_mode == "reduce-overhead" and args.gradient_accumulation_steps > 1:
        parser.error(
            "--compile_mode reduce-overhead takes one batch per optimizer step: drop --gradient_accumulation_steps "
            "(or use the default mode)"
        )
    if args.model_name_or_path:
        changed = [f for f in ARCHITECTURE_FLAGS if getattr(args, f) != parser.get_default(f)]
        if changed:
            parser.error(
                f"--{changed[0]} shapes a new decoder; with --model_name_or_path the checkpoint brings its own "
                "architecture (drop the flag, or start from --clip_model_name_or_path)"
            )
    check_run_args(parser, args)
    # Last, as these ask the Hub.
    flag = "model_name_or_path" if args.model_name_or_path else "clip_model_name_or_path"
    problem = model_source_problem(getattr(args, flag))
    if problem:
        parser.error(f"--{flag} {getattr(args, flag)}: {problem}")
    check_push(parser, args)


# ----------------------------------------------------------------------------------------------------
# Pieces: model, schedule, checkpoints
# ----------------------------------------------------------------------------------------------------


def offline_hint(source: str, error: Exception) -> OSError:
    return OSError(
        f"could not load {source!r} ({error.__class__.__name__}: {error}); without network access, pass the "
        "path of a local copy (e.g. made by `hf download` on a machine that has one)"
    )


def build_model(args: argparse.Namespace) -> tuple[ClipSegCustomModel, Any]:
    """A checkpoint to fine-tune, or a new decoder on a CLIP; the processor comes with it."""
    from transformers import AutoProcessor, AutoTokenizer

    if args.model_name_or_path:
        source = args.model_name_or_path
        try:
            model = ClipSegCustomModel.from_pretrained(source, decoder_dropout=args.decoder_dropout)
            processor = AutoProcessor.from_pretrained(source)
        except OSError as error:
            raise offline_hint(source, error) from error
        return model, processor
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
    try:
        processor = make_processor(AutoTokenizer.from_pretrained(source), args.image_size)
    except OSError as error:
        raise offline_hint(source, error) from error
    if args.init_output_bias is not None:
        head = model.decoder.transposed_convolution
        last = head[-1] if isinstance(head, torch.nn.Sequential) else head
        with torch.no_grad():
            last.bias.fill_(args.init_output_bias)
    return model, processor


def resolve_backbone_dtype(choice: str, mixed_precision: str) -> torch.dtype:
    """--backbone_dtype: 'auto' follows the mixed precision (the frozen CLIP needs no float32 master copy)."""
    if choice == "auto":
        choice = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")
    return getattr(torch, choice)


def float32_model(args: argparse.Namespace, accelerator: Accelerator, model: Any) -> ClipSegCustomModel:
    """The model with the starting checkpoint's float32 CLIP: itself (unwrapped) when its CLIP is float32,
    else the trained decoder on a fresh float32 copy (a low-precision copy trained it). What is scored, saved
    and pushed."""
    trained = accelerator.unwrap_model(model)
    if trained.backbone_dtype == torch.float32:
        return trained
    with torch.random.fork_rng(devices=[]):  # a new decoder's initialisation must not move the training RNG
        fresh, _ = build_model(args)
    fresh.decoder.load_state_dict(trained.decoder.state_dict())
    return fresh.to(accelerator.device).eval()


def make_optimizer(args: argparse.Namespace, trainable: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW, fused: one kernel for all the decoder's parameters, and it can skip a step on the device's
    word (`found_inf`), which lets `train_batch` drop a non-finite step without waiting for the device."""
    return torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        fused=True,
    )


def prepare_for_training(
    accelerator: Accelerator, model: Any, optimizer: Any, train_loader: DataLoader
) -> tuple:
    """Accelerate's preparation, except that the loader's batches stay on the host (pinned on a GPU machine):
    `model_inputs` copies them without blocking, where Accelerate's placement copies them blocking, which
    waits for the device's queue to drain (the previous step) before every batch."""
    return accelerator.prepare(model, optimizer, train_loader, device_placement=[None, None, False])


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


def decoder_only_checkpoints(accelerator: Accelerator) -> None:
    """Checkpoints hold the trainable decoder (MBs), not the frozen CLIP (hundreds of MBs each); a resumed
    run gets CLIP back from the same source it started from."""

    def is_decoder(key: str) -> bool:
        return key.removeprefix("module.").startswith("decoder.")

    def keep_decoder(models: list, weights: list, output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = {key: value for key, value in state.items() if is_decoder(key)}

    def load_decoder(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_file(Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))
            decoder = {key.removeprefix("module.").removeprefix("decoder."): v for key, v in state.items()}
            accelerator.unwrap_model(model).decoder.load_state_dict(decoder, strict=True)
        models.clear()  # loaded here; Accelerate must not load them again

    accelerator.register_save_state_pre_hook(keep_decoder)
    accelerator.register_load_state_pre_hook(load_decoder)


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
    logger.info(f"Saved checkpoint {final}")
    return final


def resume(
    accelerator: Accelerator, args: argparse.Namespace, output_dir: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    """Load the checkpoint and return its training state (step, batches consumed, log, ...). `settings` (what
    changes the numbers without changing the weights' shapes) must be those the checkpoint was trained with."""
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise ValueError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir / 'checkpoints'}"
            )
        checkpoint = found[-1]
    else:
        checkpoint = Path(args.resume_from_checkpoint)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if state["model_source"] != model_source(args):
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained from {state['model_source']!r}, this run starts "
            f"from {model_source(args)!r}: give the same --model_name_or_path / --clip_model_name_or_path"
        )
    for flag, value in settings.items():
        if flag in state and state[flag] != value:
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} was trained with --{flag} {state[flag]}, this run has "
                f"{value}: give the same value to continue it exactly"
            )
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"Resumed from {checkpoint} at step {state['step']}")
    return state


def model_source(args: argparse.Namespace) -> str:
    return args.model_name_or_path or args.clip_model_name_or_path


def training_config(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("hub_token", "card_notes")}
    config.update(num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)
    config["total_batch_size"] = (
        args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    )
    return config


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def prompt_inputs(model: ClipSegCustomModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompts as the model takes them: phrases alone go in as tokens (the model then runs both towers
    together, in one CUDA graph with --compile_mode reduce-overhead); with example images (PC+), mixed
    embeddings.

    The tokens go without their attention mask: CLIP's text tower is causal and pools at the end token, so
    the padding after it (`tokenize` pads on the right) changes nothing, while a mask costs a wait for the
    device every step (transformers reads it to choose its attention path)."""
    if "visual_pixel_values" not in batch:
        return {"input_ids": batch["input_ids"]}
    return {"conditional_embeddings": conditional_embeddings(model, batch)}


def conditional_embeddings(model: ClipSegCustomModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text embeddings, mixed with example-image embeddings for the phrases that have one (PC+).

    Which phrases those are comes from the host (`visual_index`, its length a shape), so nothing is read
    back from the device; the tokens go without their mask, as in `prompt_inputs`."""
    embeddings = model.text_embeddings(batch["input_ids"])
    if not len(batch["visual_pixel_values"]):  # no phrase of this batch has an example image
        return embeddings
    index = batch["visual_index"]
    weight = batch["text_weight"].to(embeddings.dtype).index_select(0, index)[:, None]
    images = model.image_embeddings(batch["visual_pixel_values"]).to(embeddings.dtype)
    mixed = weight * embeddings.index_select(0, index) + (1 - weight) * images
    return embeddings.index_copy(0, index, mixed)


def run_evaluation(args, accelerator, model, split, processor, description) -> dict[str, float]:
    """Both protocols on the first --max_eval_images images, float32 (a low-precision training copy of CLIP is
    swapped for the starting float32 one), every phrase counted once."""
    unwrapped = float32_model(args, accelerator, model)
    rows = range(min(args.max_eval_images, len(split))) if args.max_eval_images else None
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # the phrase count changes from batch to batch: nothing to tune
    try:
        result = evaluate(
            unwrapped,
            split,
            processor.tokenizer,
            accelerator,
            image_size=unwrapped.config.image_size,
            batch_size=args.per_device_eval_batch_size,
            rows=rows,
            num_workers=args.dataloader_num_workers,
            description=description,
        )
    finally:
        torch.backends.cudnn.benchmark = autotune
    metrics = result.clipseg_metrics()
    metrics.update({f"official_{k}": v for k, v in result.official_metrics()["all"].items()})
    metrics["images"] = len(rows) if rows is not None else len(split)
    metrics["samples"] = len(result.sample_ids)  # phrases scored, each exactly once across processes
    return metrics


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
    # Its five lines per checkpoint name the temporary folder the checkpoint is renamed from; one line says where
    # each checkpoint is (`save_checkpoint`).
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
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
    splits = load_splits(
        [args.train_split, args.validation_split],
        data_dir=args.data_dir,
        dataset_name=args.dataset_name,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad_samples,
        accelerator=accelerator,
    )
    train_split, eval_split = (
        splits[canonical_split(args.train_split)],
        splits[canonical_split(args.validation_split)],
    )
    if args.shrink_train_images:
        with accelerator.main_process_first():
            train_split = shrink_images(
                train_split, model.config.image_size, num_proc=args.dataloader_num_workers or None
            )
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
    images_per_batch = args.per_device_train_batch_size // args.phrases_per_image
    if len(samples) < images_per_batch * accelerator.num_processes:
        raise ValueError(f"the training split has {len(samples)} phrases, fewer than one batch")
    on_gpu = accelerator.device.type == "cuda"
    train_loader = DataLoader(
        samples,
        batch_size=images_per_batch,
        sampler=EpochSampler(len(samples), args.seed),
        drop_last=True,
        # Its own generator: starting an epoch's iterator must not draw from the global RNG (dropout's),
        # or a resumed run would drift from the uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=on_gpu,
        # Workers hand batches over through buffers they reuse (`SharedBatchRing`): the main process maps
        # each once and copies batches out, into pinned memory on a GPU, with no page faults per batch.
        collate_fn=SharedBatchRing(
            partial(
                collate_training,
                tokenizer=processor.tokenizer,
                max_length=model.config.text_config.max_position_embeddings,
                # A compiled text tower (and each CUDA graph) is specialised to the phrase length: few lengths.
                pad_to_multiple_of=16 if args.compile else None,
                pack_labels=True,
            ),
            pin_memory=on_gpu,
        ),
    )
    # Fixed input shapes (drop_last batches of --image_size images): cuDNN's autotuner picks the fastest
    # kernels for the head's 3x3 convolution (it gave about 10% of a step on an H200 when the head's
    # transposed convolutions were cuDNN's too, benchmarks/RESULTS.md).
    torch.backends.cudnn.benchmark = torch.cuda.is_available()
    backbone_dtype = resolve_backbone_dtype(args.backbone_dtype, accelerator.mixed_precision)
    if backbone_dtype != torch.float32:
        model.cast_backbone(backbone_dtype)
    if args.compile:
        mode = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
        model.compile_backbone(**mode).compile_decoder(**mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_lambda, args=args))
    model, optimizer, train_loader = prepare_for_training(accelerator, model, optimizer, train_loader)
    # Stepped once per optimizer step by us (Accelerate would step a prepared one once per process).
    accelerator.register_for_checkpointing(scheduler)
    decoder_only_checkpoints(accelerator)

    state = {"step": 0, "consumed_batches": 0, "nonfinite_losses": 0, "log_history": []}
    settings = {
        "backbone_dtype": str(backbone_dtype).removeprefix("torch."),
        "shrink_train_images": args.shrink_train_images,
    }
    if args.resume_from_checkpoint:
        state = resume(accelerator, args, output_dir, settings)
    state["model_source"] = model_source(args)
    state.update(settings)
    if args.with_tracking:
        scalars = {
            k: v
            for k, v in training_config(args, accelerator).items()
            if isinstance(v, int | float | str | bool)
        }
        accelerator.init_trackers("clipseg_finetune", scalars)

    accelerator.print(
        f"Training: {len(samples)} phrases in {len(train_split)} images; {args.max_train_steps} steps of "
        f"{training_config(args, accelerator)['total_batch_size']} phrases ({accelerator.num_processes} processes "
        f"x {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation); trainable "
        f"parameters {sum(p.numel() for p in trainable):,}"
    )
    train_loop(
        args, accelerator, model, optimizer, scheduler, train_loader, trainable, eval_split, processor, state
    )

    # --- final evaluation, save, card, push: the decoder on the starting float32 CLIP ---
    final_model = float32_model(args, accelerator, model)
    metrics = run_evaluation(args, accelerator, final_model, eval_split, processor, "final evaluation")
    if args.with_tracking:
        accelerator.log({f"eval_{k}": v for k, v in metrics.items()}, step=state["step"])
        accelerator.end_training()
    results = {f"eval_{k}": v for k, v in metrics.items()}
    results.update(
        train_steps=state["step"],
        nonfinite_losses=state["nonfinite_losses"],
        num_processes=accelerator.num_processes,
        decoder_checksum_per_process=decoder_checksums(accelerator, model),
    )
    if accelerator.is_main_process:
        save_final_model(args, accelerator, final_model, processor, metrics, results, state["log_history"])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report(args, accelerator, final_model, processor, eval_split, metrics)
    if args.push_to_hub and accelerator.is_main_process:  # last: a failed push leaves everything else done
        push_output(args, output_dir)
    return results


def train_loop(
    args, accelerator, model, optimizer, scheduler, train_loader, trainable, eval_split, processor, state
):
    """Optimizer steps until --max_train_steps; checkpoints, evaluation and logs on the way. `state` is
    updated in place and is what a checkpoint stores (with the weights, optimizer, schedule and RNGs)."""
    batches_per_epoch = len(train_loader)
    progress = tqdm(
        total=args.max_train_steps,
        initial=state["step"],
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    window = new_window(accelerator.device, state["step"])
    model.train()
    while state["step"] < args.max_train_steps:
        epoch, skip = divmod(state["consumed_batches"], batches_per_epoch)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        loader.set_epoch(epoch)  # the prepared loader sets the sampler's epoch from its own counter
        for batch in loader:
            state["consumed_batches"] += 1
            train_batch(args, accelerator, model, optimizer, trainable, batch, window)
            window["phrases"] += batch["image_index"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            scheduler.step()
            progress.update(1)
            step = state["step"]
            log_due = step % args.logging_steps == 0 or step == args.max_train_steps
            checkpoint_due = step % args.checkpointing_steps == 0 or step == args.max_train_steps
            if log_due or checkpoint_due:
                count_skipped_steps(args, accelerator, window, state)
            if log_due:
                log_window(args, accelerator, scheduler, progress, window, state)
            if checkpoint_due:
                save_checkpoint(accelerator, Path(args.output_dir), state, args.checkpoints_total_limit)
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_train_steps:
                metrics = run_evaluation(
                    args, accelerator, model, eval_split, processor, f"evaluating at step {step}"
                )
                accelerator.print(
                    f"step {step}: "
                    + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("miou_0.3", "fgiou_0.3", "ap"))
                )
                if args.with_tracking:
                    accelerator.log({f"eval_{k}": v for k, v in metrics.items()}, step=step)
                model.train()
            if step >= args.max_train_steps:
                break
    progress.close()


def new_window(device: torch.device, step: int) -> dict[str, Any]:
    """What the next log reports, summed on the device between logs (reading it waits for the device):
    the finite losses and their batches, the optimizer steps skipped for a non-finite loss, and whether
    the optimizer step in progress has one."""
    zero = partial(torch.zeros, (), device=device)
    return {
        "loss": zero(dtype=torch.float32),
        "batches": zero(dtype=torch.float32),
        "skipped": zero(dtype=torch.float32),
        "step_nonfinite": zero(dtype=torch.bool),
        "phrases": 0,
        "start": time.perf_counter(),
        "counted_to_step": step,
    }


def train_batch(args, accelerator, model, optimizer, trainable, batch, window) -> None:
    """Forward, backward and (at the end of an accumulation) the optimizer step, issued without waiting for
    the device: the host queues the next batch's work while the device runs this one.

    A non-finite loss is caught on the device: every process's fused optimizer skips the optimizer step it
    belongs to (with accumulation, that step's other batches too), and `window` counts it;
    `count_skipped_steps` reads the count at the next log or checkpoint."""
    batch = model_inputs(batch, accelerator.device)
    if accelerator.unwrap_model(model).cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's CUDA-graph outputs are done with
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = model(
                pixel_values=batch["pixel_values"],
                **prompt_inputs(accelerator.unwrap_model(model), batch),
                image_index=batch["image_index"],
                labels=batch["labels"],
            ).loss
        accelerator.backward(loss)
        finite = torch.isfinite(loss.detach())
        window["loss"] += torch.where(finite, loss.detach().float(), 0.0)
        window["batches"] += finite
        window["step_nonfinite"] |= ~finite
        if accelerator.sync_gradients:
            # One process's non-finite loss skips the step on all of them: they keep the same weights.
            skip = accelerator.reduce(window["step_nonfinite"].float().reshape(1), "sum").clamp(max=1)[0]
            window["skipped"] += skip
            window["step_nonfinite"].zero_()
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
            # The fused AdamW kernel leaves parameters, moments and step count as they are when this is 1
            # (the way GradScaler skips steps; with fp16 mixed precision, GradScaler sets it itself from
            # the gradients, which a non-finite loss makes non-finite too).
            getattr(optimizer, "optimizer", optimizer).found_inf = skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def count_skipped_steps(args, accelerator, window, state) -> None:
    """Read back how many optimizer steps were skipped for a non-finite loss since the last count (this
    waits for the device); report them, and stop the run past --max_nonfinite_losses."""
    skipped = int(window["skipped"].item())
    first_step, window["counted_to_step"] = window["counted_to_step"] + 1, state["step"]
    if not skipped:
        return
    window["skipped"].zero_()
    state["nonfinite_losses"] += skipped
    accelerator.print(
        f"steps {first_step}-{state['step']}: {skipped} optimizer step(s) skipped for a non-finite loss on "
        f"some process ({state['nonfinite_losses']} so far)"
    )
    if state["nonfinite_losses"] > args.max_nonfinite_losses:
        raise ValueError(
            f"{state['nonfinite_losses']} non-finite losses (limit --max_nonfinite_losses "
            f"{args.max_nonfinite_losses}); lower --learning_rate or check the data"
        )


def log_window(args, accelerator, scheduler, progress, window, state) -> None:
    """Mean loss over all processes' finite batches since the last log, learning rate, phrases per second."""
    totals = accelerator.reduce(torch.stack([window["loss"], window["batches"]]), "sum").tolist()
    elapsed = time.perf_counter() - window["start"]
    logs = {
        "train_loss": totals[0] / max(1.0, totals[1]),
        "learning_rate": scheduler.get_last_lr()[0],
        "samples_per_second": window["phrases"] / max(elapsed, 1e-9),
        "nonfinite_losses": state["nonfinite_losses"],
    }
    progress.set_postfix(
        loss=f"{logs['train_loss']:.4f}",
        lr=f"{logs['learning_rate']:.2e}",
        sps=f"{logs['samples_per_second']:.1f}",
    )
    state["log_history"].append({"step": state["step"], **logs})
    if args.with_tracking:
        accelerator.log(logs, step=state["step"])
    window["loss"].zero_()
    window["batches"].zero_()
    window.update(phrases=0, start=time.perf_counter())


def decoder_checksums(accelerator: Accelerator, model: Any) -> list[float]:
    """A checksum of the decoder on every process; they must agree (the processes trained together)."""
    flat = torch.cat(
        [p.detach().double().flatten() for p in accelerator.unwrap_model(model).decoder.parameters()]
    )
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder(97)
    sums = accelerator.gather((flat * weights).sum().reshape(1)).tolist()
    if len(set(sums)) != 1:
        raise RuntimeError(f"the processes ended with different decoders (checksums {sums})")
    return sums


def save_final_model(args, accelerator, model, processor, metrics, results, log_history) -> None:
    """Model, processor, code, card and results, written into a temporary folder and then moved in place."""
    output_dir = Path(args.output_dir)
    staging = output_dir / ".final_partial"
    shutil.rmtree(staging, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "all_results.json").write_text(json.dumps(results, indent=2))
    (staging / "training_log.json").write_text(
        json.dumps({"global_step": results["train_steps"], "log_history": log_history}, indent=2)
    )
    dataset_name = args.dataset_name or ("synthetic PhraseCut (demo)" if args.demo else "PhraseCut")
    write_model_card(
        staging,
        model_name=args.hub_model_id or output_dir.name,
        base_model=model_source(args),
        dataset_name=dataset_name,
        eval_split=args.validation_split,
        metrics=metrics,
        training_config=training_config(args, accelerator),
        notes=getattr(args, "card_notes", ""),
        eval_scope=f"{metrics['images']} images, {metrics['samples']} phrases",
    )
    for item in staging.iterdir():
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


LOCAL_ONLY = ("checkpoints", "clipseg_finetune", "runs")  # checkpoints and tracker logs stay local


def files_to_push(output_dir: Path) -> list[Path]:
    """The saved model folder: everything but checkpoints, tracker logs and unfinished (hidden) files."""
    return sorted(
        path
        for path in output_dir.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(output_dir).parts)
        and path.relative_to(output_dir).parts[0] not in LOCAL_ONLY
    )


def hub_access_problem(token: str | None) -> str | None:
    """Why a push would fail, in a few words (offline mode, no network, no valid token, a read-only token);
    None when it may work."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached"
    try:
        account = HfApi(token=token).whoami()
    except Exception as error:  # no network, no token, a revoked token: each its own exception type
        return (
            f"the Hub refused or could not be reached ({error.__class__.__name__}: {error}); log in with "
            "`hf auth login` or pass --hub_token"
        )
    if account.get("auth", {}).get("accessToken", {}).get("role") == "read":
        return "the token is read-only: give one that can write (`hf auth login` or --hub_token)"
    return None


def push_output(args: argparse.Namespace, output_dir: Path) -> None:
    """Upload exactly the saved model folder, in one commit; checkpoints and tracker logs stay local."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=args.hub_token)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(output_dir).as_posix(), path_or_fileobj=str(path))
        for path in files_to_push(output_dir)
    ]
    try:
        repo_id = api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True).repo_id
        api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message="Upload model trained with clipseg-finetune",
        )
    except Exception as error:  # after training: say what is safe and how to push it by hand
        excluded = " ".join(
            f"--exclude '{pattern}'" for pattern in (*(f"{name}/*" for name in LOCAL_ONLY), ".*")
        )
        private = " --private" if args.hub_private_repo else ""
        raise OSError(
            f"--push_to_hub {args.hub_model_id} failed ({error.__class__.__name__}: {error}). The model is saved in "
            f"{output_dir}; push it later with `hf upload {args.hub_model_id} {output_dir}{private} {excluded}`"
        ) from error
    print(f"Pushed {len(operations)} files from {output_dir} to https://huggingface.co/{repo_id}")


def report(args, accelerator, model, processor, eval_split, metrics) -> None:
    """Say where everything is (and, for the demo, draw sample predictions)."""
    output_dir = Path(args.output_dir)
    print(
        f"\nEvaluation on {args.validation_split} ({metrics['images']} images, {metrics['samples']} phrases): "
        f"mIoU@0.3 {metrics['miou_0.3']:.4f}, foreground IoU@0.3 {metrics['fgiou_0.3']:.4f}, "
        f"best foreground IoU {metrics['fgiou_best']:.4f} (t={metrics['fgiou_best_threshold']:.2f}), AP {metrics['ap']:.4f}"
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


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # bad input, named by the code that found it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
