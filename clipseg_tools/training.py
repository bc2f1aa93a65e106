"""The training step and what it keeps between steps (the loss summed on the device between logs), the
optimizer and its schedule (a function of the step, set on the optimizer by `set_hyperparameters`).

`run_train.py` drives them; the benchmark's data-fed loop runs the same step, so its figures are the
script's. A step never waits for the device: the loss, and whether it was finite, stay there until a log
reads them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers.utils import logging

from .checkpoints import TrainerState
from .errors import FAILED, CommandError
from .transforms import model_inputs

logger = logging.get_logger(__name__)

# The CLIPSeg recipe's AdamW: `run_train.py`'s defaults (the original code's `--wd 1e-4` was ignored there, and
# PyTorch's 0.01 applied).
RECIPE_LEARNING_RATE = 1e-3
RECIPE_WEIGHT_DECAY = 1e-4

# What the training forward takes from a batch. The tokens go without their attention mask: CLIP's text tower
# is causal and pools at the end token, so right padding (`batching.tokenize`) changes no embedding, while
# transformers reads a given mask's values to choose its attention path, a wait for the device every step.
TRAINING_INPUTS = (
    "pixel_values",
    "input_ids",
    "image_index",
    "labels",
    "loss_mask",
    "conditional_pixel_values",
    "visual_index",
    "text_weight",
)


@dataclass
class LossTally:
    """What the next log reports, summed on the device since the last one (reading it waits for the device,
    so it is read once per log): the finite batch losses and their count, the optimizer steps skipped for a
    non-finite loss, and whether the optimizer step in progress has one."""

    loss: torch.Tensor
    batches: torch.Tensor
    skipped: torch.Tensor
    step_nonfinite: torch.Tensor
    counted_to_step: int  # the last step whose skipped steps were counted
    phrases: int = 0  # phrases trained on since the last log, all processes together
    since: float = field(default_factory=time.perf_counter)

    @classmethod
    def on(cls, device: torch.device | str, step: int = 0) -> LossTally:
        zero = partial(torch.zeros, (), device=device)
        return cls(
            loss=zero(dtype=torch.float32),
            batches=zero(dtype=torch.float32),
            skipped=zero(dtype=torch.float32),
            step_nonfinite=zero(dtype=torch.bool),
            counted_to_step=step,
        )


def training_step(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    batch: dict[str, Any],
    tally: LossTally,
    max_grad_norm: float | None = None,
) -> None:
    """Forward, backward and, at the end of a gradient accumulation, the optimizer step, for one host batch
    (as the loader gives it), issued without waiting for the device: the host queues the next batch's work
    while the device runs this one.

    A non-finite loss is caught on the device: every process's fused optimizer skips the optimizer step it
    belongs to (with accumulation, that step's other batches too), and `tally` counts it; `count_skipped_steps`
    reads the count at the next log or checkpoint."""
    batch = model_inputs(batch, accelerator.device)
    if accelerator.unwrap_model(model).cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's CUDA-graph outputs are done with
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = model(**{key: batch[key] for key in TRAINING_INPUTS if key in batch}).loss
        accelerator.backward(loss)
        finite = torch.isfinite(loss.detach())
        tally.loss += torch.where(finite, loss.detach().float(), 0.0)
        tally.batches += finite
        tally.step_nonfinite |= ~finite
        if accelerator.sync_gradients:
            # One process's non-finite loss skips the step on all of them: they keep the same weights.
            skip = accelerator.reduce(tally.step_nonfinite.float().reshape(1), "sum").clamp(max=1)[0]
            tally.skipped += skip
            tally.step_nonfinite.zero_()
            if max_grad_norm:
                trained = [p for group in optimizer.param_groups for p in group["params"]]
                accelerator.clip_grad_norm_(trained, max_grad_norm)
            # The fused AdamW kernel leaves parameters, moments and step count as they are when this is 1 (the
            # way GradScaler skips steps; with fp16 mixed precision GradScaler sets it from the gradients,
            # which a non-finite loss makes non-finite too).
            getattr(optimizer, "optimizer", optimizer).found_inf = skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tally.phrases += batch["image_index"].shape[0] * accelerator.num_processes


def count_skipped_steps(
    tally: LossTally, state: TrainerState, max_nonfinite_losses: int, main_process: bool = True
) -> None:
    """Read how many optimizer steps were skipped for a non-finite loss since the last count (this waits for
    the device; every process reads the same count); report them (on the main process), and end the run past
    `max_nonfinite_losses`."""
    skipped = int(tally.skipped.item())
    first_step, tally.counted_to_step = tally.counted_to_step + 1, state.global_step
    if not skipped:
        return
    tally.skipped.zero_()
    state.nonfinite_losses += skipped
    if main_process:
        logger.warning(
            f"steps {first_step}-{state.global_step}: {skipped} optimizer step(s) skipped for a non-finite loss "
            f"on some process ({state.nonfinite_losses} so far)"
        )
    if state.nonfinite_losses > max_nonfinite_losses:
        raise CommandError(
            f"{state.nonfinite_losses} non-finite losses (limit --max_nonfinite_losses {max_nonfinite_losses}); "
            "lower --learning_rate or check the data",
            FAILED,
        )


def record_log(
    accelerator: Any, tally: LossTally, learning_rate: float, state: TrainerState
) -> dict[str, float]:
    """The log since the last one (mean loss over all processes' finite batches, learning rate, phrases per
    second), recorded in the state's history; the tally starts again."""
    totals = accelerator.reduce(torch.stack([tally.loss, tally.batches]), "sum").tolist()
    logs = {
        "train_loss": totals[0] / max(1.0, totals[1]),
        "learning_rate": learning_rate,
        "samples_per_second": tally.phrases / max(time.perf_counter() - tally.since, 1e-9),
        "nonfinite_losses": state.nonfinite_losses,
    }
    state.log_history.append({"step": state.global_step, **logs})
    tally.loss.zero_()
    tally.batches.zero_()
    tally.phrases, tally.since = 0, time.perf_counter()
    return logs


def make_optimizer(
    trainable: list[torch.nn.Parameter] | list[dict[str, Any]],
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW, fused: one kernel for all the trained parameters, and it can skip a step on the device's word
    (`found_inf`), which lets `training_step` drop a non-finite step without waiting for the device.
    `trainable`: the parameters, or parameter groups (with `lr_scale`, their learning rate's multiple)."""
    return torch.optim.AdamW(
        trainable, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, fused=True
    )


def learning_rate_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, floor: float
) -> float:
    """The learning rate's multiplier at `step`: a linear warm-up, then cosine or linear down to `floor` (the
    minimum learning rate over the peak), or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def set_hyperparameters(optimizer: Any, **settings: Any) -> None:
    """Give every parameter group these AdamW settings (`lr`, `weight_decay`, `betas`, `eps`): the learning
    rate at each step (times the group's `lr_scale`), and this run's flags over those a checkpoint's optimizer
    state brings back."""
    for group in optimizer.param_groups:
        group.update(settings)
        if "lr" in settings:
            group["lr"] = settings["lr"] * group.get("lr_scale", 1.0)


def backbone_dtype_for(choice: str, mixed_precision: str) -> torch.dtype:
    """`--backbone_dtype`: 'auto' follows the mixed precision (the frozen CLIP needs no float32 master copy)."""
    if choice == "auto":
        choice = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")
    return getattr(torch, choice)


def prepare_for_training(accelerator: Any, model: Any, optimizer: Any, loader: Any) -> tuple:
    """Accelerate's preparation, except that the loader's batches stay on the host (pinned on a GPU machine):
    `model_inputs` copies them without blocking, where Accelerate's placement copies them blocking, which
    waits for the device's queue to drain (the previous step) before every batch. A stream's loader (an
    IterableDataset, split between the processes already: `streaming`) is left as it is: Accelerate would
    have the first process read every batch and hand the others their parts."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return (*accelerator.prepare(model, optimizer), loader)
    return accelerator.prepare(model, optimizer, loader, device_placement=[None, None, False])


def decoder_checksums(accelerator: Any, model: Any) -> list[float]:
    """A checksum of the decoder on every process; they must agree (the processes trained together)."""
    return checksums(accelerator, list(accelerator.unwrap_model(model).decoder.parameters()))


def trained_checksums(accelerator: Any, model: Any) -> list[float]:
    """A checksum of every trained parameter (the decoder's and CLIP's) on every process; they must agree."""
    unwrapped = accelerator.unwrap_model(model)
    return checksums(accelerator, [p for p in unwrapped.parameters() if p.requires_grad])


def checksums(accelerator: Any, parameters: list[torch.Tensor]) -> list[float]:
    """A position-weighted sum of `parameters` on every process; they must agree."""
    flat = torch.cat([p.detach().double().flatten() for p in parameters])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder(97)
    sums = accelerator.gather((flat * weights).sum().reshape(1)).tolist()
    if len(set(sums)) != 1:
        raise RuntimeError(f"the processes ended with different weights (checksums {sums})")
    return sums
