"""Train a CLIPSeg decoder on PhraseCut (or data in its form) with Accelerate.

    accelerate launch --config_file accelerate_config.yaml run_train.py --data_dir data/VGPhraseCut_v0 --output_dir out
    python run_train.py --demo --output_dir demo_output      # offline: synthetic data and a small CLIP

One script for one CPU, one or many GPUs and many machines: mixed precision and the number of processes come
from the Accelerate config. Read top to bottom: the arguments, their checks, `main` (the pieces), the training
loop, evaluation, and saving and sharing the model. The pieces themselves (samples and batches, the loader,
the training step, checkpoints, the Hub) are library modules in `clipseg_tools/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object, set_seed
from tqdm.auto import tqdm
from transformers.utils import logging

from clipseg_tools import checkpoints, run_folder, tuning
from clipseg_tools.batching import PhraseIndex, TrainingOptions, TrainingSamples, training_loader
from clipseg_tools.class_maps import CLASS_MAP_METRICS, class_map_scores
from clipseg_tools.cli import ArgumentParser, plural, run_command, setup_logging, worker_count
from clipseg_tools.data import canonical_split, load_source, load_splits, shrink_images
from clipseg_tools.errors import FAILED, CommandError
from clipseg_tools.evaluation import evaluate, images_scored
from clipseg_tools.files import atomic_folder, removed_if_left_empty
from clipseg_tools.hub import hub_access_problem, push_folder
from clipseg_tools.metrics import OFFICIAL_THRESHOLD
from clipseg_tools.model_card import write_model_card
from clipseg_tools.own_data import (
    add_source_arguments,
    check_class_prompt_template,
    columns_from,
    has_ignore_regions,
    is_phrasecut,
)
from clipseg_tools.prompts import TEMPLATES
from clipseg_tools.sources import load_error, model_source_problem
from clipseg_tools.streaming import (
    StreamedSamples,
    epoch_batches,
    process_stream,
    resumed_positions,
    row_form,
    start_position,
    stream_loader,
)
from clipseg_tools.training import (
    RECIPE_LEARNING_RATE,
    RECIPE_WEIGHT_DECAY,
    LossTally,
    backbone_dtype_for,
    count_skipped_steps,
    decoder_checksums,
    learning_rate_factor,
    make_optimizer,
    prepare_for_training,
    record_log,
    set_hyperparameters,
    trained_checksums,
    training_step,
)
from modeling_clipseg_custom import ADAPTER_FOLDER, ClipSegCustomModel, make_processor

logger = logging.get_logger(__name__)

# Flags that shape a new decoder (named as the config fields they set); a checkpoint given with
# --model_name_or_path brings its own.
ARCHITECTURE_FLAGS = (
    "image_size",
    "reduce_dim",
    "extract_layers",
    "decoder_intermediate_size",
    "decoder_num_attention_heads",
    "plain_head",
    "init_output_bias",
)
POSITIVE_FLAGS = (
    "max_train_steps",
    "per_device_train_batch_size",
    "phrases_per_image",
    "gradient_accumulation_steps",
    "checkpointing_steps",
    "logging_steps",
    "per_device_eval_batch_size",
    "ddp_timeout",
    "shuffle_buffer_size",
)
# What `args` carries beside the flags (a secret, and what the data turned out to be): not the configuration.
NOT_FLAGS = ("hub_token", "card_notes", "phrasecut", "validation_held_out", "trained", "onnx_export_error")
# The recipe's settings, recorded in every checkpoint: a resume that changes one applies it from there on,
# says so and records it (those that must not change are `checkpoints.MUST_MATCH`).
RESUMABLE_SETTINGS = (
    "max_train_steps",
    "per_device_train_batch_size",
    "phrases_per_image",
    "gradient_accumulation_steps",
    "learning_rate",
    "min_learning_rate",
    "lr_scheduler_type",
    "num_warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "negative_prob",
    "prompt_template",
    "no_random_crop",
    "mix_visual_prompts",
    "mix_text_min",
    "mix_text_max",
    "decoder_dropout",
    "seed",
    "streaming",
    "shuffle_buffer_size",
    "backbone_learning_rate",
)


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


ONNX_FOLDER = "onnx"  # where --export_onnx saves the graphs, inside --output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser.add_argument_group("data (give --data_dir or --dataset_name)"))
    add_model_arguments(parser.add_argument_group("model"))
    add_recipe_arguments(parser.add_argument_group("training recipe (defaults: the CLIPSeg paper's)"))
    tuning.add_arguments(
        parser.add_argument_group("what trains besides the decoder (default: nothing, CLIP frozen)")
    )
    add_run_arguments(parser.add_argument_group("output, checkpoints, evaluation, logging"))
    add_sharing_arguments(parser.add_argument_group("sharing on the Hugging Face Hub"))
    add = parser.add_argument_group("offline demo").add_argument
    add("--demo", action="store_true", help="train on synthetic data with a small CLIP, offline (see README)")
    add("--demo_images", type=int, default=1200, help="synthetic training images for --demo")
    return parser


def add_data_arguments(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add("--data_dir", help="raw PhraseCut folder (refer_*.json, image_data_split.json, images/)")
    add(
        "--dataset_name",
        help="a Hub dataset id or local folder (Parquet, images): the PhraseCut export, or your own referring rows "
        "(an image, its masks and their prompts; see --image_column)",
    )
    add_source_arguments(add)
    add(
        "--validation_split_percentage",
        type=float,
        default=10,
        help="when the data has no --validation_split: the share of the training split held out for it (seeded)",
    )
    add("--train_split", default="train", help="the split trained on")
    add("--validation_split", default="validation", help="the split evaluated on (during and after training)")
    add("--cache_dir", help="where prepared datasets and downloads are cached")
    add(
        "--streaming",
        action="store_true",
        help="read the training split of --dataset_name as a stream, converting rows as they come, for data too "
        "large for one disk (the validation split's first --max_eval_images rows are loaded as usual)",
    )
    add(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="--streaming: rows shuffled at a time (seeded by --seed, reshuffled each epoch)",
    )
    add("--skip_bad_samples", action="store_true", help="skip broken entries of --data_dir (and count them)")
    add(
        "--dataloader_num_workers",
        type=int,
        help="data-loader worker processes per training process (default: this machine's CPUs shared among its "
        "training processes, less one each, at most 16; 0 loads in the training process)",
    )
    add(
        "--shrink_train_images",
        action="store_true",
        help="store the training images once at the model's size (short side --image_size, polygons scaled): "
        "a smaller JPEG decode and no resize per sample, for GPUs faster than the CPUs can decode (PC+ example "
        "images are then cut from the smaller images too)",
    )


def add_model_arguments(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add("--model_name_or_path", help="fine-tune a checkpoint of ours or a CIDAS one")
    add(
        "--clip_model_name_or_path",
        default="openai/clip-vit-base-patch16",
        help="start a new decoder on this CLIP (used when --model_name_or_path is not given)",
    )
    add("--image_size", type=int, default=352, help="input size of a new model (pixels)")
    add("--reduce_dim", type=int, default=64, help="width of a new decoder (rd64, rd16)")
    add("--extract_layers", type=int, nargs="+", default=[3, 6, 9], help="CLIP vision blocks it reads")
    add("--decoder_intermediate_size", type=int, default=2048, help="decoder MLP width")
    add("--decoder_num_attention_heads", type=int, default=4, help="decoder attention heads")
    add("--plain_head", action="store_true", help="one transposed convolution, not the refined head")
    add("--decoder_dropout", type=float, default=0.1, help="dropout in the decoder blocks")
    add(
        "--init_output_bias",
        type=float,
        help="start a new decoder's output bias at this logit (e.g. the foreground prior, about -2.5)",
    )
    add(
        "--backbone_dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype the frozen CLIP computes in during training (auto: the mixed precision's, else float32); "
        "the saved model keeps the starting float32 CLIP",
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the frozen CLIP towers and the decoder with its loss (the first steps compile)",
    )
    add(
        "--compile_mode",
        choices=["default", "reduce-overhead"],
        default="default",
        help="torch.compile mode with --compile; reduce-overhead replays CUDA graphs (GPU, one optimizer step "
        "per batch: no --gradient_accumulation_steps)",
    )


def add_recipe_arguments(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add("--per_device_train_batch_size", type=int, default=64, help="phrases per device and step")
    add("--phrases_per_image", type=int, default=1, help="phrases drawn per image (one vision pass)")
    add("--max_train_steps", type=int, default=20_000, help="optimizer steps")
    add("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    add("--learning_rate", type=float, default=RECIPE_LEARNING_RATE, help="peak learning rate (AdamW)")
    add("--min_learning_rate", type=float, default=1e-4, help="where the cosine schedule ends")
    add(
        "--lr_scheduler_type",
        choices=["cosine", "linear", "constant"],
        default="cosine",
        help="after warm-up",
    )
    add("--num_warmup_steps", type=int, default=0, help="linear warm-up steps")
    add(
        "--weight_decay",
        type=float,
        default=RECIPE_WEIGHT_DECAY,
        help="AdamW weight decay: the recipe's --wd (the original CLIPSeg code ignored that flag and trained "
        "with PyTorch's default, 0.01)",
    )
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, help="clip gradients to this norm (off by default)")
    add("--negative_prob", type=float, default=0.2, help="chance of a phrase absent from the image")
    add("--prompt_template", choices=sorted(TEMPLATES), default="shuffle+", help="the original's templates")
    add("--no_random_crop", action="store_true", help="squash whole images instead of square crops")
    add("--mix_visual_prompts", action="store_true", help="PC+: mix text with example-image prompts")
    add("--mix_text_min", type=float, default=0.0, help="PC+: least weight of the text embedding")
    add("--mix_text_max", type=float, default=0.5, help="PC+: most weight of the text embedding")
    add(
        "--max_nonfinite_losses",
        type=int,
        default=10,
        help="stop after this many optimizer steps skipped for a NaN/inf loss (checked at each log and checkpoint)",
    )
    add("--seed", type=int, default=42, help="seeds the model, the data order and the augmentation")


def add_run_arguments(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add("--output_dir", required=True, help="where the model, its card, checkpoints and logs go")
    add(
        "--overwrite_output_dir",
        action="count",
        default=0,
        help="start afresh in an --output_dir holding a run (only the run's files are removed); twice to train in "
        "a folder that holds other files (they are kept, and never pushed)",
    )
    add("--checkpointing_steps", type=int, default=1000, help="save a checkpoint every N steps")
    add("--checkpoints_total_limit", type=int, default=3, help="checkpoints kept (0: all)")
    add("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    add("--eval_steps", type=int, default=1000, help="evaluate every N steps (0: only at the end)")
    add("--max_eval_images", type=int, default=500, help="validation images used (0: all)")
    add("--per_device_eval_batch_size", type=int, default=8, help="images per evaluation batch")
    add("--logging_steps", type=int, default=10, help="log the loss every N steps")
    add("--with_tracking", action="store_true", help="log to the trackers of --report_to")
    add("--report_to", default="tensorboard", help="tracker(s) for --with_tracking, e.g. tensorboard,wandb")
    add(
        "--ddp_timeout",
        type=int,
        default=1800,
        help="seconds a process waits for the others (data preparation by the first process included) before the "
        "run ends naming the wait",
    )


def add_sharing_arguments(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add("--push_to_hub", action="store_true", help="upload the saved model folder at the end")
    add("--hub_model_id", help="namespace/name of the model repository")
    add("--hub_token", help="a Hub token (default: the one `hf auth login` saved)")
    add("--hub_private_repo", action="store_true", help="create the repository private")
    add("--push_space", action="store_true", help="also push a web demo Space, <hub_model_id>-demo")
    add(
        "--export_onnx",
        action="store_true",
        help="also save the model's ONNX graphs (fp32 and int8) in onnx/ beside it, pushed with it: "
        "`run_predict.py --backend onnxruntime` and clipseg_tools.onnx_runtime run them without PyTorch",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        check_demo_args(parser, args)
    else:
        check_args(parser, args)
    workers = args.dataloader_num_workers
    args.dataloader_num_workers = worker_count(parser, workers, "--dataloader_num_workers")
    return args


# ----------------------------------------------------------------------------------------------------------
# Checks: every flag refused with one sentence that names it, before any work (exit code 2)
# ----------------------------------------------------------------------------------------------------------


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.data_dir) == bool(args.dataset_name):
        parser.error(
            "give exactly one of --data_dir (raw PhraseCut folder) or --dataset_name (prepared export)"
        )
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} does not exist or is not a folder")
    if args.streaming:
        check_streaming(parser, args)
    check_values(parser, args)
    if args.model_name_or_path:
        changed = [flag for flag in ARCHITECTURE_FLAGS if getattr(args, flag) != parser.get_default(flag)]
        if changed:
            parser.error(
                f"--{changed[0]} shapes a new decoder; with --model_name_or_path the checkpoint brings its own "
                "architecture (drop the flag, or start from --clip_model_name_or_path)"
            )
    check_run_args(parser, args)
    flag = "model_name_or_path" if args.model_name_or_path else "clip_model_name_or_path"
    problem = model_source_problem(getattr(args, flag))  # late: it may ask the Hub
    if problem:
        parser.error(f"--{flag} {getattr(args, flag)}: {problem}")
    check_push(parser, args)


def check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        check_class_prompt_template(args.class_prompt_template)
    except CommandError as error:
        parser.error(str(error))
    for flag in POSITIVE_FLAGS:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    for flag in (
        "num_warmup_steps",
        "max_eval_images",
        "eval_steps",
        "checkpoints_total_limit",
        "max_nonfinite_losses",
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
    if not 0 < args.validation_split_percentage < 100:
        parser.error("--validation_split_percentage must be in (0, 100)")
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


def check_streaming(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--streaming reads rows one by one from a Hub id or a local folder of Parquet files: what needs the
    whole data at hand is refused."""
    from clipseg_tools.coco_data import is_coco_folder

    if args.data_dir:
        parser.error(
            "--streaming reads a Hub id or a local Parquet folder (--dataset_name), and --data_dir (a raw PhraseCut "
            "folder) is prepared whole: drop --streaming, or stream its export (python -m phrasecut_dataset.publish)"
        )
    if is_coco_folder(args.dataset_name):
        parser.error(
            f"--streaming reads rows of Parquet files, and --dataset_name {args.dataset_name} is a COCO folder, "
            "converted whole from its annotation files: drop --streaming"
        )
    if args.mix_visual_prompts:
        parser.error(
            "--mix_visual_prompts takes example images from other images of the same phrase, which a stream "
            "cannot reach: drop --mix_visual_prompts or --streaming"
        )
    if args.shrink_train_images:
        parser.error(
            "--shrink_train_images stores the training images once at the model's size, and a stream is never "
            "stored: drop --shrink_train_images or --streaming"
        )


def check_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--demo brings its own data, CLIP and recipe: a flag it would silently override is refused."""
    from clipseg_tools.demo import DEMO_RECIPE

    sources = (
        "data_dir",
        "dataset_name",
        "streaming",
        "cache_dir",
        "model_name_or_path",
        "clip_model_name_or_path",
    )
    given = [f"--{key}" for key in (*DEMO_RECIPE, *sources) if getattr(args, key) != parser.get_default(key)]
    if given:
        parser.error(f"--demo uses its own data, CLIP and recipe: drop {', '.join(given)}")
    check_run_args(parser, args)
    check_push(parser, args)


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What a demo and any other run both check: what trains, resuming, the output folder, the push's
    repository name."""
    tuning.check_arguments(parser, args)
    if args.tune != "decoder" and args.backbone_dtype not in ("auto", "float32"):
        parser.error(
            f"--backbone_dtype {args.backbone_dtype} keeps CLIP in that precision, and --tune {args.tune} trains "
            "part of it, which needs float32 weights: drop --backbone_dtype (mixed precision still applies)"
        )
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not checkpoints.is_checkpoint(Path(args.resume_from_checkpoint)):
            parser.error(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint of this script (no "
                "trainer_state.json); pass 'latest' or a step_N folder under <output_dir>/checkpoints"
            )
    check_output_dir(parser, args)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id namespace/name")
    if args.push_space and not (args.push_to_hub and "/" in args.hub_model_id):
        parser.error(
            "--push_space needs --push_to_hub and --hub_model_id namespace/name (the Space loads it by that id)"
        )
    if args.with_tracking:
        check_trackers(parser, args.report_to)


def check_output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A folder the run can write, that holds this run or nothing else (unless told twice)."""
    out = Path(args.output_dir)
    problem = run_folder.writable_problem(out)
    if problem:
        parser.error(f"--output_dir {out}: {problem}")
    holds_run = run_folder.holds_run(out)
    if holds_run and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        parser.error(
            f"--output_dir {out} holds a run: pass --resume_from_checkpoint latest to continue it, "
            "or --overwrite_output_dir to start over"
        )
    foreign = run_folder.foreign_entries(out)
    if foreign and not holds_run and args.overwrite_output_dir < 2:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        parser.error(
            f"--output_dir {out} holds files that no run wrote ({shown}): choose a new or empty folder, or pass "
            "--overwrite_output_dir twice to train there anyway (those files are kept, and never pushed)"
        )


def check_trackers(parser: argparse.ArgumentParser, report_to: str) -> None:
    """--report_to names trackers that are installed (Accelerate would leave one out with a warning)."""
    import accelerate.tracking

    for name in (n.strip() for n in report_to.split(",")):
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            parser.error(
                f"--report_to {name}: not a tracker Accelerate knows ({', '.join(LOGGER_TYPE_TO_CLASS)})"
            )
        if not getattr(accelerate.tracking, f"is_{name}_available")():
            parser.error(f"--report_to {name}: the {name} package is not installed (pip install {name})")


def check_push(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A push that cannot work is found before training, not after it. One process asks the Hub (its
    account endpoint is rate-limited); when it stops, the launcher stops the others."""
    if args.push_to_hub and os.environ.get("RANK", "0") == "0":
        problem = hub_access_problem(args.hub_token)
        if problem:
            parser.error(f"--push_to_hub: {problem}")


# ----------------------------------------------------------------------------------------------------------
# main: the pieces
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
            # Example images run the vision tower's end, which other batches do not reach.
            DistributedDataParallelKwargs(find_unused_parameters=tuning.unused_parameters_possible(args)),
        ],
    )
    setup_logging(accelerator.is_main_process)
    owner = accelerator.is_main_process
    with removed_if_left_empty(args.output_dir, owner):
        if owner:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with run_folder.run_lock(Path(args.output_dir), owner), waits_named(args, accelerator):
            if args.demo:
                from clipseg_tools.demo import prepare_demo

                with accelerator.main_process_first():  # its data and small CLIP, made once and cached
                    args = prepare_demo(args)
            return train(args, accelerator)


@contextmanager
def waits_named(args: argparse.Namespace, accelerator: Accelerator) -> Iterator[None]:
    """A process that waited --ddp_timeout for the others ends with one sentence that says so (the others may
    be stopped, hung or still preparing data), naming the processes it waited for."""
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as error:
        text = str(error)
        if accelerator.num_processes == 1 or not any(
            w in text for w in ("Timed out", "timed out", "Timeout")
        ):
            raise
        others = [rank for rank in range(accelerator.num_processes) if rank != accelerator.process_index]
        waited_for = f"process {others[0]}" if len(others) == 1 else f"processes {others[0]}-{others[-1]}"
        raise CommandError(
            f"process {accelerator.process_index} of {accelerator.num_processes} waited --ddp_timeout "
            f"{args.ddp_timeout} s for {waited_for} and gave up ({text.splitlines()[0][:160]}): it is hung, "
            "stopped or much slower (preparing data for the first time: raise --ddp_timeout)",
            FAILED,
        ) from error


def train(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    """Build the pieces, train, save, evaluate, share; returns `all_results.json`'s content."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process and args.overwrite_output_dir and not args.resume_from_checkpoint:
        removed = run_folder.remove_run(output_dir)
        if removed:
            logger.info(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)}")
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    model, processor = build_model(args)
    tune_model(args, model)
    train_split, eval_split = load_data(args, accelerator, model.config.image_size)
    if len(eval_split) == 0:
        raise CommandError(
            f"--validation_split {args.validation_split} has no images: give a split that has some"
        )
    _, train_loader = training_data(args, accelerator, model, processor, train_split)
    # Fixed input shapes (drop_last batches of --image_size images): cuDNN's autotuner picks the fastest
    # kernels for the head's 3x3 convolution.
    torch.backends.cudnn.benchmark = torch.cuda.is_available()
    # A trained CLIP keeps float32 master weights (mixed precision still computes in bf16/fp16).
    backbone_dtype = backbone_dtype_for(args.backbone_dtype, accelerator.mixed_precision)
    if args.tune != "decoder":
        backbone_dtype = torch.float32
    if backbone_dtype != torch.float32:
        model.cast_backbone(backbone_dtype)
    if args.compile:
        mode = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
        if args.tune == "decoder":
            model.compile_backbone(**mode)
        model.compile_decoder(**mode)  # a tuned CLIP runs eager: the towers' graphs are inference-only
    trainable = [p for p in model.parameters() if p.requires_grad]
    args.trained = tuning.count_trainable(model)
    trained_names = tuning.trained_parameter_names(model.clip)
    betas = (args.adam_beta1, args.adam_beta2)
    groups = tuning.parameter_groups(model, args)
    optimizer = make_optimizer(groups, args.learning_rate, args.weight_decay, betas, args.adam_epsilon)
    model, optimizer, train_loader = prepare_for_training(accelerator, model, optimizer, train_loader)
    checkpoints.keep_trained_only(accelerator, {f"clip.{name}" for name in trained_names})

    state = checkpoints.TrainerState(
        model_source=model_source(args),
        tuning=tuning.description(args),
        backbone_dtype=str(backbone_dtype).removeprefix("torch."),
        shrink_train_images=args.shrink_train_images,
        settings=run_settings(args, accelerator),
    )
    if args.resume_from_checkpoint:
        state = resume(args, accelerator, state)
    if args.streaming:
        state.stream_positions = stream_positions(accelerator, state, train_loader.num_workers)
    # This run's flags, over what a checkpoint's optimizer state brought back (the learning rate: each step).
    set_hyperparameters(optimizer, weight_decay=args.weight_decay, betas=betas, eps=args.adam_epsilon)
    tuning.set_learning_rate_scales(optimizer.param_groups, args)
    if args.with_tracking:
        config = training_config(args, accelerator)
        scalars = {k: v for k, v in config.items() if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers("clipseg_finetune", scalars)
    log_start(args, accelerator, train_split, train_loader, eval_split, state, backbone_dtype, trainable)

    evaluator = partial(run_evaluation, args, accelerator, split=eval_split, processor=processor)
    train_loop(args, accelerator, model, optimizer, train_loader, state, evaluator)
    return finish(args, accelerator, model, processor, eval_split, state)


def run_settings(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    """What a checkpoint records of the recipe, to say what a resume changes."""
    settings = {name: getattr(args, name) for name in RESUMABLE_SETTINGS}
    return {
        **settings,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
    }


def resume(args, accelerator, state: checkpoints.TrainerState) -> checkpoints.TrainerState:
    """Continue from --resume_from_checkpoint: its later checkpoints are set aside (a rewind), and 'latest'
    with none saved yet starts from the beginning."""
    output_dir = Path(args.output_dir)
    checkpoint = checkpoints.find(args.resume_from_checkpoint, output_dir)
    if checkpoint is None:
        return state
    accelerator.wait_for_everyone()  # every process has found it before any is moved
    if accelerator.is_main_process:
        checkpoints.set_aside_after(checkpoint, output_dir)
    accelerator.wait_for_everyone()
    return checkpoints.load(accelerator, checkpoint, state)


def stream_positions(accelerator: Accelerator, state: checkpoints.TrainerState, workers: int) -> list[dict]:
    """--streaming: every process's place in its stream: where the resumed checkpoint left it (what that
    means is logged), else at the start."""
    if state.global_step == 0 and not state.stream_positions:
        return [start_position(workers) for _ in range(accelerator.num_processes)]
    positions, said = resumed_positions(state.stream_positions, accelerator.num_processes, workers)
    logger.info(f"--streaming: {said}")
    return positions


def learning_rate_at(args: argparse.Namespace, step: int) -> float:
    """The learning rate of optimizer step `step` (counted from 0), from this run's flags."""
    floor = args.min_learning_rate / args.learning_rate
    factor = learning_rate_factor(
        step, args.max_train_steps, args.num_warmup_steps, args.lr_scheduler_type, floor
    )
    return args.learning_rate * factor


def build_model(args: argparse.Namespace) -> tuple[ClipSegCustomModel, Any]:
    """A checkpoint to fine-tune, or a new decoder on a CLIP; the processor comes with it."""
    from transformers import AutoProcessor, AutoTokenizer

    if args.model_name_or_path:
        source = args.model_name_or_path
        try:
            model = ClipSegCustomModel.from_pretrained(source, decoder_dropout=args.decoder_dropout)
        except (OSError, ValueError) as error:
            raise load_error(f"--model_name_or_path {source} could not be loaded", source, error) from error
        head_upsampling = math.prod(model.config.refined_head_strides)
        if (
            model.config.use_complex_transposed_convolution
            and head_upsampling != model.config.vision_config.patch_size
        ):
            raise CommandError(
                f"--model_name_or_path {source} has transformers' refined head for patch size "
                f"{model.config.vision_config.patch_size}, which upsamples by {head_upsampling}: its logits are not at "
                "the input's size, so it cannot be trained here (evaluate it, or start a new decoder on its CLIP)"
            )
        try:
            return model, AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise load_error(
                f"--model_name_or_path {source}: its processor could not be loaded", source, error
            ) from error
    source = args.clip_model_name_or_path
    try:
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
    except OSError as error:
        raise load_error(f"--clip_model_name_or_path {source} could not be loaded", source, error) from error
    except ValueError as error:  # the config's own check names its fields: name the flags that set them
        message = str(error).removeprefix("Invalid ClipSegCustomConfig: ").rstrip(".")
        for flag in ARCHITECTURE_FLAGS:
            message = re.sub(rf"\b{flag}\b", f"--{flag}", message)
        raise CommandError(f"{message} (with the CLIP of --clip_model_name_or_path {source})") from error
    if args.init_output_bias is not None:
        head = model.decoder.transposed_convolution
        last = head[-1] if isinstance(head, torch.nn.Sequential) else head
        with torch.no_grad():
            last.bias.fill_(args.init_output_bias)
    return model, processor


def tune_model(args: argparse.Namespace, model: ClipSegCustomModel) -> None:
    """--tune: what trains besides the decoder. A starting checkpoint's own adapter is folded into its CLIP
    first: the run trains (and saves) one adapter at most."""
    if model.has_clip_adapter:
        model.merge_clip_adapter()
        logger.info("the starting checkpoint's LoRA adapter is merged into its CLIP before training")
    try:
        tuning.apply(model, args)
    except ValueError as error:
        raise CommandError(str(error)) from error


def model_source(args: argparse.Namespace) -> str:
    return args.model_name_or_path or args.clip_model_name_or_path


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


def load_data(args: argparse.Namespace, accelerator: Accelerator, image_size: int) -> tuple[Any, Any]:
    """The training and validation splits (the first process prepares them, the others read the cache)."""
    if args.streaming:
        return load_streamed_data(args, accelerator)
    notes: dict[str, str] = {}
    train_split, eval_split = load_splits(
        {"--train_split": args.train_split, "--validation_split": args.validation_split},
        data_dir=args.data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad_samples,
        accelerator=accelerator,
        source_options=columns_from(args),
        hold_out=None
        if args.data_dir
        else ("--validation_split", args.validation_split_percentage, args.seed),
        num_proc=args.dataloader_num_workers or None,
        notes=notes,
    )
    args.validation_held_out = notes.get("--validation_split")
    args.phrasecut = is_phrasecut(train_split)
    if args.shrink_train_images:
        with accelerator.main_process_first():
            train_split = shrink_images(train_split, image_size, num_proc=args.dataloader_num_workers or None)
    return train_split, eval_split


def load_streamed_data(args: argparse.Namespace, accelerator: Accelerator) -> tuple[Any, Any]:
    """--streaming: the training split as a stream (read as training goes), and the first --max_eval_images
    rows of the validation split, converted as usual. Nothing can be held out of a stream ahead: a validation
    split the data lacks is refused."""
    streams = load_source(args.dataset_name, args.dataset_config_name, args.cache_dir, streaming=True)
    source, found = f"--dataset_name {args.dataset_name}", sorted(streams)
    if canonical_split(args.train_split) not in streams:
        raise CommandError(f"--train_split {args.train_split!r}: {source} has no such split (it has {found})")
    if canonical_split(args.validation_split) not in streams:
        raise CommandError(
            f"--validation_split {args.validation_split!r}: {source} has no such split (it has {found}), and with "
            "--streaming no share of the training split can be held out for it: give a --validation_split that "
            "exists, or drop --streaming"
        )
    (eval_split,) = load_splits(
        {"--validation_split": args.validation_split},
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad_samples,
        accelerator=accelerator,
        source_options=columns_from(args),
        num_proc=args.dataloader_num_workers or None,
        stream_rows=args.max_eval_images,
    )
    args.validation_held_out = None
    args.phrasecut = is_phrasecut(eval_split)
    return streams[canonical_split(args.train_split)], eval_split


def training_options(args: argparse.Namespace, model: Any, ignore_regions: bool) -> TrainingOptions:
    return TrainingOptions(
        image_size=model.config.image_size,
        phrases_per_image=args.phrases_per_image,
        negative_prob=args.negative_prob,
        prompt_template=args.prompt_template,
        random_crop=not args.no_random_crop,
        visual_prompts=args.mix_visual_prompts,
        mix_text_min=args.mix_text_min,
        mix_text_max=args.mix_text_max,
        ignore_regions=ignore_regions,
        seed=args.seed,
    )


def training_data(args, accelerator, model, processor, split) -> tuple[Any, Any]:
    """The training samples (uniform over phrases; with --streaming one per row of this process's share of
    the stream) and their loader."""
    images_per_batch = args.per_device_train_batch_size // args.phrases_per_image
    if args.streaming:
        return streamed_training_data(args, accelerator, model, processor, split, images_per_batch)
    options = training_options(args, model, has_ignore_regions(split))
    samples = TrainingSamples(split, PhraseIndex.from_dataset(split), options)
    if len(samples) < images_per_batch * accelerator.num_processes:
        raise CommandError(f"the training split has {plural(len(samples), 'phrase')}, fewer than one batch")
    loader = training_loader(
        samples,
        processor.tokenizer,
        model.config.text_config.max_position_embeddings,
        images_per_batch=images_per_batch,
        device=accelerator.device,
        num_workers=args.dataloader_num_workers,
        seed=args.seed,
        # A compiled text tower (and each CUDA graph) is specialised to the phrase length: few lengths.
        pad_to_multiple_of=16 if args.compile else None,
    )
    return samples, loader


def streamed_training_data(args, accelerator, model, processor, stream, images_per_batch) -> tuple[Any, Any]:
    """--streaming: samples from this process's share of the stream, and their loader. `datasets` gives each
    data-loader worker whole shards (files): more workers than shards would idle."""
    where = f"the {args.train_split} split of --dataset_name {args.dataset_name}"
    local_root = args.dataset_name if Path(args.dataset_name).is_dir() else None
    form = row_form(stream, columns_from(args), where, args.dataset_name, args.cache_dir, local_root)
    rank, processes = accelerator.process_index, accelerator.num_processes
    stream = process_stream(stream, args.seed, args.shuffle_buffer_size, rank, processes)
    options = training_options(args, model, form.ignore_regions)
    samples = StreamedSamples(stream, form, options, rank, where, args.skip_bad_samples)
    workers = min(args.dataloader_num_workers, stream.num_shards)
    if workers < args.dataloader_num_workers:
        logger.info(
            f"--streaming: {plural(workers, 'data-loader worker')} per process, not --dataloader_num_workers "
            f"{args.dataloader_num_workers}: `datasets` gives each worker whole shards (files), and each process's "
            f"share of the stream has {plural(stream.num_shards, 'shard')}"
        )
    loader = stream_loader(
        samples,
        processor.tokenizer,
        model.config.text_config.max_position_embeddings,
        images_per_batch=images_per_batch,
        device=accelerator.device,
        num_workers=workers,
        seed=args.seed,
        pad_to_multiple_of=16 if args.compile else None,
    )
    return samples, loader


def training_config(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in NOT_FLAGS}
    config.update(num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)
    config["total_batch_size"] = (
        args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    )
    return config


def trainable_summary(args: argparse.Namespace, trainable: list) -> str:
    """The trained parameter count and what they are."""
    total = sum(p.numel() for p in trainable)
    if args.tune == "decoder":
        return f"{total:,} (the decoder; CLIP stays frozen)"
    clip_rate = f", CLIP's at learning rate {args.backbone_learning_rate:g}"
    return f"{total:,} (--tune {tuning.description(args)}: the decoder and part of CLIP{clip_rate})"


def log_start(
    args, accelerator, train_split, train_loader, eval_split, state, backbone_dtype, trainable
) -> None:
    """What is about to run, in one block (the numbers a reader checks before leaving a run alone)."""
    processes = accelerator.num_processes
    total = training_config(args, accelerator)["total_batch_size"]
    eval_images = images_scored(len(eval_split), args.max_eval_images)
    when = f"every {args.eval_steps:,} steps and at the end" if args.eval_steps else "at the end"
    warmup = f" after {plural(args.num_warmup_steps, 'warm-up step')}" if args.num_warmup_steps else ""
    schedule = (
        "constant"
        if args.lr_scheduler_type == "constant"
        else f"{args.lr_scheduler_type} to {args.min_learning_rate:g}"
    )
    precision = accelerator.mixed_precision
    if accelerator.device.type == "cpu" and precision != "no":
        precision += (
            " (from the Accelerate config; `accelerate launch --mixed_precision no` trains a CPU in float32)"
        )
    if args.streaming:  # a stream's length is not known ahead
        data = f"streamed, one sample per row, shuffled {args.shuffle_buffer_size:,} rows at a time"
    else:
        data = f"{plural(len(train_split), 'image')} with {plural(len(train_loader.dataset), 'phrase')}"
    lines = [
        "***** Running training *****",
        f"  Training data: {data} (split {args.train_split})",
        f"  Evaluation: {plural(eval_images, 'image')} of split {args.validation_split}"
        + (f" ({args.validation_held_out})" if getattr(args, "validation_held_out", None) else "")
        + f", {when}",
        f"  Steps: {args.max_train_steps:,}, each of {plural(total, 'phrase')} "
        f"({plural(processes, 'process', 'processes')} x {args.per_device_train_batch_size} per device x "
        f"{plural(args.gradient_accumulation_steps, 'batch', 'batches')} accumulated), "
        f"{plural(args.phrases_per_image, 'phrase')} per image; starting at step {state.global_step}",
        f"  Optimizer: AdamW, learning rate {args.learning_rate:g}{warmup}, {schedule}, weight decay {args.weight_decay:g}",
        f"  Device: {accelerator.device.type}, mixed precision {precision}; the frozen CLIP computes in "
        f"{str(backbone_dtype).removeprefix('torch.')}; {plural(torch.get_num_threads(), 'torch thread')}",
        f"  Data-loader workers: {train_loader.num_workers} per process",
        f"  Trainable parameters: {trainable_summary(args, trainable)}",
        f"  Output: {args.output_dir}",
    ]
    logger.info("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def train_loop(args, accelerator, model, optimizer, train_loader, state, evaluator) -> None:
    """Optimizer steps until --max_train_steps, from where `state` is; logs, checkpoints and evaluations on
    the way. `state` is updated in place (each checkpoint stores it)."""
    progress = tqdm(
        total=args.max_train_steps,
        initial=state.global_step,
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    tally = LossTally.on(accelerator.device, state.global_step)
    set_hyperparameters(optimizer, lr=learning_rate_at(args, state.global_step))
    model.train()
    while state.global_step < args.max_train_steps:
        for batch in epoch_loader(args, accelerator, train_loader, state):
            state.consumed_batches += 1
            training_step(accelerator, model, optimizer, batch, tally, args.max_grad_norm)
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            set_hyperparameters(optimizer, lr=learning_rate_at(args, state.global_step))
            progress.update(1)
            after_step(args, accelerator, model, optimizer, progress, tally, state, evaluator)
            if state.global_step >= args.max_train_steps:
                break
    progress.close()


def epoch_loader(args, accelerator, train_loader, state) -> Iterable[dict[str, Any]]:
    """The batches of the epoch the run is in, from where `state` says it is in it."""
    if args.streaming:  # each process's own place in its own share of the stream
        return epoch_batches(train_loader, state.stream_positions, accelerator.process_index)
    epoch, skip = divmod(state.consumed_batches, len(train_loader))
    loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
    loader.set_epoch(epoch)  # the prepared loader sets the sampler's epoch from its own counter
    return loader


def after_step(args, accelerator, model, optimizer, progress, tally, state, evaluator) -> None:
    """The log, the checkpoint and the evaluation due after this optimizer step."""
    step = state.global_step
    last = step == args.max_train_steps
    log_due = step % args.logging_steps == 0 or last
    checkpoint_due = step % args.checkpointing_steps == 0 or last
    if log_due or checkpoint_due:
        count_skipped_steps(tally, state, args.max_nonfinite_losses, accelerator.is_main_process)
    if log_due:
        logs = record_log(accelerator, tally, optimizer.param_groups[0]["lr"], state)
        progress.set_postfix(
            loss=f"{logs['train_loss']:.4f}",
            lr=f"{logs['learning_rate']:.2e}",
            sps=f"{logs['samples_per_second']:.1f}",
        )
        if args.with_tracking:
            accelerator.log(logs, step=step)
    if checkpoint_due:
        if args.streaming:  # every process's place in its stream, for the main process to save (in place)
            state.stream_positions[:] = gather_object([state.stream_positions[accelerator.process_index]])
        checkpoints.save(accelerator, Path(args.output_dir), state, args.checkpoints_total_limit)
    if args.eval_steps and step % args.eval_steps == 0 and not last:
        metrics = evaluator(model, description=f"evaluating at step {step}")
        logger.info(
            f"step {step}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("miou_0.3", "fgiou_0.3", "ap"))
        )
        if args.with_tracking:
            accelerator.log(eval_results(metrics), step=step)
        model.train()


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def run_evaluation(args, accelerator, model, split, processor, description: str) -> dict[str, float]:
    """Both protocols on the first --max_eval_images images, float32 (a low-precision training copy of CLIP is
    swapped for the starting float32 one), every phrase counted once; on semantic (and COCO) data the
    multi-class map's scores too (`class_map_` metrics)."""
    model = float32_model(args, accelerator, model)
    result = evaluate(
        model,
        split,
        processor.tokenizer,
        accelerator,
        batch_size=args.per_device_eval_batch_size,
        max_images=args.max_eval_images,
        num_workers=args.dataloader_num_workers,
        description=description,
    )
    metrics = result.flat_metrics()
    scores = class_map_scores(
        model,
        split,
        processor.tokenizer,
        accelerator,
        args.class_prompt_template,
        OFFICIAL_THRESHOLD,
        args.max_eval_images,
        batch_size=args.per_device_eval_batch_size,
        description=f"{description} (multi-class maps)",
    )
    if scores:
        metrics.update({f"class_map_{key}": scores[key] for key in CLASS_MAP_METRICS})
    return metrics


def eval_results(metrics: dict[str, float]) -> dict[str, float]:
    """Evaluation metrics as `all_results.json` and the trackers name them."""
    return {f"eval_{key}": value for key, value in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# Save and share
# ----------------------------------------------------------------------------------------------------------


def finish(
    args, accelerator, model, processor, eval_split, state: checkpoints.TrainerState
) -> dict[str, Any]:
    """Save the decoder on the starting float32 CLIP with its card, then score it and add the scores, then push.
    Saved first: an evaluation that fails (broken data, a full /dev/shm) leaves the trained model in place."""
    final_model = float32_model(args, accelerator, model)
    results = {
        "train_steps": state.global_step,
        "nonfinite_losses": state.nonfinite_losses,
        "num_processes": accelerator.num_processes,
        "decoder_checksum_per_process": decoder_checksums(accelerator, model),
        "trained_checksum_per_process": trained_checksums(accelerator, model),
        "tune": tuning.description(args),
        "trainable_parameters": getattr(args, "trained", None),
    }
    if accelerator.is_main_process:
        save_final_model(args, accelerator, final_model, processor, results, state)
    accelerator.wait_for_everyone()
    try:
        metrics = run_evaluation(args, accelerator, final_model, eval_split, processor, "final evaluation")
    except Exception as error:
        raise CommandError(
            f"the final evaluation failed ({last_line(error)}); the trained model is saved "
            f"in {args.output_dir} without scores: score it with `python run_eval.py --model {args.output_dir}`",
            FAILED,
        ) from error
    results = {**eval_results(metrics), **results}
    if args.with_tracking:
        accelerator.log(eval_results(metrics), step=state.global_step)
        accelerator.end_training()
    if accelerator.is_main_process:
        with atomic_folder(args.output_dir, merge=True) as staging:
            write_card(args, accelerator, staging, metrics)
            (staging / "all_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report(args, final_model, processor, eval_split, metrics)
    export_error = getattr(args, "onnx_export_error", None)
    if export_error is not None:
        raise CommandError(
            f"the ONNX export failed ({last_line(export_error)}); the trained model is saved and scored in "
            f"{args.output_dir}: export it with `python -m clipseg_tools.onnx_export --model {args.output_dir} "
            f"--output ONNX_FOLDER`",
            FAILED,
        ) from export_error
    if args.push_to_hub and accelerator.is_main_process:  # last: a failed push leaves everything else done
        push_model(args)
    return results


def push_model(args: argparse.Namespace) -> str:
    """Upload the files the run saved (its list of them), nothing else the folder holds; returns the URL."""
    url = push_folder(
        Path(args.output_dir),
        args.hub_model_id,
        files=run_folder.model_files(Path(args.output_dir)),
        # An earlier push's adapter or graphs that this model does not have would load with its weights.
        replace_under=(f"{ADAPTER_FOLDER}/", f"{ONNX_FOLDER}/"),
        private=args.hub_private_repo,
        token=args.hub_token,
        commit_message="Upload model trained with clipseg-finetune",
    )
    logger.info(f"Pushed {args.output_dir} to {url}")
    if args.push_space:
        from clipseg_tools.space import push_space

        space = push_space(args.hub_model_id, private=args.hub_private_repo, token=args.hub_token)
        logger.info(f"Pushed the web demo to {space}")
    return url


def last_line(error: BaseException) -> str:
    """An error's last line (a data-loader worker's error carries the worker's whole traceback)."""
    lines = str(error).strip().splitlines()
    return lines[-1][:300] if lines else error.__class__.__name__


def save_final_model(args, accelerator, model, processor, results, state) -> None:
    """Model, processor, code, card (scores follow) and results, written aside and then moved into
    --output_dir, with the list of these files (what a push uploads, what --overwrite_output_dir removes)."""
    log = {"global_step": state.global_step, "log_history": state.log_history}
    if state.setting_changes:
        log["setting_changes"] = state.setting_changes
    if args.merge_adapter and model.has_clip_adapter:
        model = model.without_clip_adapter(merge=True)
    earlier = run_folder.top_level_entries(run_folder.model_files(Path(args.output_dir)))
    with atomic_folder(args.output_dir, merge=True) as staging:
        model.save_pretrained(staging)  # with --tune lora: the starting CLIP and decoder, the adapter beside
        processor.save_pretrained(staging)
        (staging / "all_results.json").write_text(json.dumps(results, indent=2))
        (staging / "training_log.json").write_text(json.dumps(log, indent=2))
        if args.export_onnx:
            args.onnx_export_error = export_onnx(args, staging)
        write_card(args, accelerator, staging, metrics={})
        names = [path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file()]
        run_folder.record_model_files(staging, names)
        written = set(run_folder.top_level_entries(names))
    # What an earlier save of this run wrote and this one did not (an adapter, graphs) would load with it.
    for entry in earlier:
        if entry not in written:
            remove_entry(Path(args.output_dir) / entry)


def export_onnx(args: argparse.Namespace, staging: Path) -> BaseException | None:
    """The saved model's ONNX graphs in `staging`/onnx; a failure is returned, not raised, so that the model
    is saved whatever happens to its export (the run ends naming it once the model is scored)."""
    from clipseg_tools.onnx_export import export

    try:
        export(
            str(staging),
            staging / ONNX_FOLDER,
            recorded_source=args.hub_model_id or Path(args.output_dir).name,
        )
    except Exception as error:
        logger.error(f"the ONNX export failed: {last_line(error)}")
        return error
    return None


def remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_card(args, accelerator, folder: Path, metrics: dict[str, float]) -> None:
    """The model card, with the scores once there are some; local paths are left off it."""
    scope = f"{plural(metrics['images'], 'image')}, {plural(metrics['samples'], 'phrase')}" if metrics else ""
    held_out = getattr(args, "validation_held_out", None)
    scope = ", ".join(part for part in (held_out, scope) if part)
    write_model_card(
        folder,
        model_name=args.hub_model_id or Path(args.output_dir).name,
        base_model=model_source(args),
        dataset_name=args.dataset_name or ("synthetic PhraseCut (demo)" if args.demo else "PhraseCut"),
        eval_split=args.validation_split,
        metrics=metrics,
        training_config=training_config(args, accelerator),
        notes=getattr(args, "card_notes", ""),
        eval_scope=scope,
        phrasecut=getattr(args, "phrasecut", True),
        onnx=args.export_onnx and getattr(args, "onnx_export_error", None) is None,
        trained=trained_text(args),
    )


def trained_text(args: argparse.Namespace) -> str:
    """The card's line on what trained, and how many parameters."""
    counts = getattr(args, "trained", None)
    if not counts:
        return ""
    if args.tune == "decoder":
        return f"Trained: the decoder ({counts['total']:,} parameters); CLIP frozen (`--tune decoder`)."
    saved = (
        "merged into CLIP's weights"
        if args.merge_adapter
        else "saved beside the weights as a peft adapter, applied on loading"
    )
    lora = f"; the adapter is {saved}" if args.tune == "lora" else ""
    return (
        f"Trained: `--tune {tuning.description(args)}`, {counts['total']:,} parameters (the decoder's "
        f"{counts['decoder']:,} and CLIP's {counts['clip']:,}){lora}."
    )


def report(args, model, processor, eval_split, metrics) -> None:
    """Say where everything is (and, for the demo, draw sample predictions)."""
    output_dir = Path(args.output_dir)
    lines = [
        f"Evaluation on {args.validation_split} ({plural(metrics['images'], 'image')}, "
        f"{plural(metrics['samples'], 'phrase')}): mIoU@0.3 {metrics['miou_0.3']:.4f}, foreground IoU@0.3 "
        f"{metrics['fgiou_0.3']:.4f}, best foreground IoU {metrics['fgiou_best']:.4f} "
        f"(t={metrics['fgiou_best_threshold']:.2f}), AP {metrics['ap']:.4f}",
        f"Model, processor and code: {output_dir}/",
        f"Model card:                {output_dir / 'README.md'}",
        f"Results:                   {output_dir / 'all_results.json'}",
    ]
    if args.demo:
        from clipseg_tools.demo import save_sample_predictions

        paths = save_sample_predictions(model, processor, eval_split, output_dir)
        lines += [
            f"Sample predictions:        {paths[0].parent}/ ({plural(len(paths), 'picture')}: image, then heat map "
            "and truth per phrase)",
            f"Demo data:                 {args.data_dir}; score the model on it with",
            f"  python run_eval.py --model {output_dir} --data_dir {args.data_dir} --cache_dir {args.cache_dir} "
            f"--split {args.validation_split}",
        ]
    logger.info("\n".join(lines))


if __name__ == "__main__":
    run_command(main)
