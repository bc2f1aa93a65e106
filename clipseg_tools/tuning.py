"""What `run_train.py --tune` trains besides the decoder: nothing (`decoder`, the CLIPSeg recipe), LoRA adapters
on CLIP's projections (`lora`, through peft), the vision tower's last blocks (`last_blocks`), or all of CLIP
that the segmentation uses (`full`).

Only what the forward pass runs is trained: the vision tower stops after its last extracted block, so LoRA and
unfrozen blocks lie at or before it, and the blocks after it (which only example-image prompts run) train only
in `full` mode with `--mix_visual_prompts`. CLIP's parameters form a second optimizer group with their own
learning rate (`--backbone_learning_rate`).
"""

from __future__ import annotations

import argparse
from typing import Any

TUNE_MODES = ("decoder", "lora", "last_blocks", "full")
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
)  # CLIP's attention and MLP projections
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_TOWERS = ("vision", "text")
# The CLIP group's learning rate when --backbone_learning_rate is not given: adapters start from zero and take
# a larger one; pre-trained weights a small one.
DEFAULT_BACKBONE_LEARNING_RATE = {"lora": 1e-4, "last_blocks": 1e-5, "full": 1e-5}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--tune",
        choices=TUNE_MODES,
        default="decoder",
        help="what trains: decoder (the CLIPSeg recipe, CLIP frozen), lora (the decoder and adapters on CLIP's "
        "projections), last_blocks (the decoder and the vision tower's last --unfreeze_last_blocks blocks), full "
        "(the decoder and all of CLIP the segmentation runs)",
    )
    add("--lora_rank", type=int, default=8, help="--tune lora: the adapters' rank r")
    add("--lora_alpha", type=float, default=16.0, help="--tune lora: their scale is alpha / r")
    add("--lora_dropout", type=float, default=0.0, help="--tune lora: dropout on the adapters' inputs")
    add(
        "--lora_targets",
        nargs="+",
        default=list(DEFAULT_LORA_TARGETS),
        metavar="NAME",
        help=f"--tune lora: the projections adapted, of {', '.join(LORA_TARGETS)} (attention; fc1, fc2: MLP)",
    )
    add(
        "--lora_towers",
        nargs="+",
        default=list(LORA_TOWERS),
        choices=LORA_TOWERS,
        help="--tune lora: the towers adapted (vision: its blocks up to the last extracted one)",
    )
    add(
        "--unfreeze_last_blocks",
        type=int,
        help="--tune last_blocks: how many of the vision blocks the model runs, counted back from the last "
        "extracted one (default 2)",
    )
    add(
        "--backbone_learning_rate",
        type=float,
        help="the peak learning rate of CLIP's trained parameters (their own optimizer group, on the same "
        "schedule); default 1e-4 for lora, 1e-5 for last_blocks and full",
    )
    add(
        "--merge_adapter",
        action="store_true",
        help="--tune lora: save the adapters folded into CLIP's weights (a plain model) instead of beside them",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that belong to another mode, or values out of range: one sentence naming the flag."""
    mode = args.tune
    if mode != "lora":
        given = [flag for flag, default in LORA_DEFAULTS.items() if getattr(args, flag) != default]
        if args.merge_adapter:
            given.append("merge_adapter")
        if given:
            parser.error(f"--{given[0]} is for --tune lora (this run has --tune {mode})")
    if args.unfreeze_last_blocks is not None and mode != "last_blocks":
        parser.error(f"--unfreeze_last_blocks is for --tune last_blocks (this run has --tune {mode})")
    if args.backbone_learning_rate is not None and mode == "decoder":
        parser.error(
            "--backbone_learning_rate is for --tune lora, last_blocks or full: --tune decoder trains no CLIP"
        )
    if mode == "lora":
        unknown = [name for name in args.lora_targets if name not in LORA_TARGETS]
        if unknown:
            parser.error(
                f"--lora_targets {unknown[0]}: CLIP's layers have no such projection (choose from "
                f"{', '.join(LORA_TARGETS)})"
            )
        if args.lora_rank < 1:
            parser.error("--lora_rank must be at least 1")
        if not 0 <= args.lora_dropout < 1:
            parser.error("--lora_dropout must lie in [0, 1)")
    if mode == "last_blocks":
        args.unfreeze_last_blocks = 2 if args.unfreeze_last_blocks is None else args.unfreeze_last_blocks
        if args.unfreeze_last_blocks < 1:
            parser.error("--unfreeze_last_blocks must be at least 1")
    if args.backbone_learning_rate is None and mode != "decoder":
        args.backbone_learning_rate = DEFAULT_BACKBONE_LEARNING_RATE[mode]
    if args.backbone_learning_rate is not None and args.backbone_learning_rate <= 0:
        parser.error("--backbone_learning_rate must be positive")


LORA_DEFAULTS = {
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_targets": list(DEFAULT_LORA_TARGETS),
    "lora_towers": list(LORA_TOWERS),
}


def description(args: argparse.Namespace) -> str:
    """The mode and what shapes its trained parameters, as checkpoints record it (a resume must match)."""
    if args.tune == "lora":
        return (
            f"lora r={args.lora_rank} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} "
            f"targets={','.join(args.lora_targets)} towers={','.join(args.lora_towers)}"
        )
    if args.tune == "last_blocks":
        return f"last_blocks {args.unfreeze_last_blocks}"
    if args.tune == "full":
        return f"full{' with visual prompts' if getattr(args, 'mix_visual_prompts', 0) else ''}"
    return "decoder"


def used_vision_blocks(model: Any) -> int:
    """How many vision blocks the segmentation runs: up to the last extracted one."""
    return max(model.config.extract_layers) + 1


def apply(model: Any, args: argparse.Namespace) -> None:
    """Make what `--tune` names trainable (adapters injected for lora); everything else stays frozen. Raises
    ValueError naming the flag when the model cannot take it."""
    if args.tune == "decoder":
        return
    blocks = used_vision_blocks(model)
    vision = model.clip.vision_model
    if args.tune == "lora":
        model.add_clip_adapter(lora_config(model, args))
    elif args.tune == "last_blocks":
        if args.unfreeze_last_blocks > blocks:
            raise ValueError(
                f"--unfreeze_last_blocks {args.unfreeze_last_blocks}: the model runs {blocks} vision blocks (up to "
                f"its last extracted layer, {blocks - 1}), so at most {blocks} can be unfrozen"
            )
        for block in vision.encoder.layers[blocks - args.unfreeze_last_blocks : blocks]:
            block.requires_grad_(True)
    elif args.tune == "full":
        model.clip.text_model.requires_grad_(True)
        model.clip.text_projection.requires_grad_(True)
        vision.embeddings.requires_grad_(True)
        vision.pre_layrnorm.requires_grad_(True)
        for block in vision.encoder.layers[:blocks]:
            block.requires_grad_(True)
        if getattr(args, "mix_visual_prompts", 0):  # example images run the whole tower
            vision.requires_grad_(True)
            model.clip.visual_projection.requires_grad_(True)
    model.train()


def lora_config(model: Any, args: argparse.Namespace) -> Any:
    """peft's LoraConfig: the chosen projections of the text tower's blocks and of the vision blocks the model
    runs (module names inside `model.clip`)."""
    from peft import LoraConfig

    targets = "|".join(args.lora_targets)
    patterns = []
    if "vision" in args.lora_towers:
        blocks = "|".join(str(i) for i in range(used_vision_blocks(model)))
        patterns.append(rf"vision_model\.encoder\.layers\.({blocks})\.(self_attn|mlp)\.({targets})")
    if "text" in args.lora_towers:
        patterns.append(rf"text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.({targets})")
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="|".join(f"(?:{pattern})" for pattern in patterns),
        bias="none",
    )


def parameter_groups(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The decoder's parameters at --learning_rate, CLIP's trained ones at --backbone_learning_rate (as a
    scale of the scheduled rate, `lr_scale`, which `training.set_hyperparameters` applies)."""
    groups = [{"name": "decoder", "params": [p for p in model.decoder.parameters() if p.requires_grad]}]
    backbone = [p for p in model.clip.parameters() if p.requires_grad]
    if backbone:
        groups.append({"name": "clip", "params": backbone})
    set_learning_rate_scales(groups, args)
    return groups


def set_learning_rate_scales(groups: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Each group's learning rate as a multiple of --learning_rate: this run's flags (also over a
    checkpoint's)."""
    for group in groups:
        clip = group.get("name") == "clip"
        group["lr_scale"] = args.backbone_learning_rate / args.learning_rate if clip else 1.0


def trained_parameter_names(model: Any) -> set[str]:
    """State-dict names of every trained parameter (what a checkpoint must hold besides the decoder)."""
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def count_trainable(model: Any) -> dict[str, int]:
    """Trained parameters: the decoder's, CLIP's, and both."""
    decoder = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    clip = sum(p.numel() for p in model.clip.parameters() if p.requires_grad)
    return {"decoder": decoder, "clip": clip, "total": decoder + clip}


def unused_parameters_possible(args: argparse.Namespace) -> bool:
    """Whether some trained parameter may get no gradient in a step (the tower's end, which only example
    images run): DistributedDataParallel must then look for them."""
    return args.tune == "full" and bool(getattr(args, "mix_visual_prompts", 0))


__all__ = ["TUNE_MODES", "add_arguments", "apply", "check_arguments", "parameter_groups"]
