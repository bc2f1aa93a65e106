"""Training checkpoints, saved under `<output_dir>/checkpoints/step_N/`, found again and resumed from, and the
run's state they carry (`TrainerState`).

A checkpoint holds what Accelerate saves (optimizer, schedule, random states, the data loader's position)
with the model reduced to its trainable decoder (a few MB; the frozen CLIP comes back from where the run
started), and the run's `TrainerState` as JSON, written last. It is written under a temporary name and then
renamed, so a run killed while saving never leaves a half checkpoint under a `step_N` name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from transformers.utils import logging

from .errors import CommandError
from .files import move_into_place, partial_path

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
# What a run's output folder holds that stays on this machine when the model is pushed: its checkpoints and
# the trackers' logs.
STAYS_LOCAL = ("checkpoints", "clipseg_finetune", "runs")
# State fields a resumed run must share with its checkpoint, and the flags that set them.
MUST_MATCH = {
    "model_source": "--model_name_or_path / --clip_model_name_or_path",
    "backbone_dtype": "--backbone_dtype",
    "shrink_train_images": "--shrink_train_images",
}


@dataclass
class TrainerState:
    """Where a run is: saved in every checkpoint as `trainer_state.json` and restored on resume."""

    global_step: int = 0
    consumed_batches: int = 0  # data-loader batches drawn over all epochs: where the data order resumes
    nonfinite_losses: int = 0  # optimizer steps skipped for a NaN or infinite loss
    log_history: list[dict[str, Any]] = field(default_factory=list)
    # What changes the numbers without changing the weights' shapes: a resumed run must have the same
    # (None: not recorded, as in older checkpoints).
    model_source: str | None = None
    backbone_dtype: str | None = None
    shrink_train_images: bool | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, path: Path) -> TrainerState:
        saved = json.loads(Path(path).read_text())
        if "step" in saved:  # older checkpoints name it `step`
            saved["global_step"] = saved.pop("step")
        unknown = sorted(set(saved) - {f.name for f in fields(cls)})
        if unknown:
            raise CommandError(
                f"{path} has fields this version of run_train.py does not know ({unknown}): a newer version wrote it"
            )
        return cls(**saved)


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if is_checkpoint(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save(accelerator: Any, output_dir: Path, state: TrainerState, keep: int) -> Path:
    """Every process saves its part into a temporary folder, which then gets its `step_N` name; only the
    newest `keep` checkpoints stay (all of them with `keep` 0)."""
    final = Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.global_step}"
    staging = partial_path(final)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(state.to_json())
        move_into_place(staging, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}")
    return final


def find(given: str, output_dir: Path) -> Path:
    """`--resume_from_checkpoint`: 'latest' (the run's newest checkpoint) or a checkpoint folder."""
    if given != "latest":
        return Path(given)
    found = checkpoint_dirs(output_dir)
    if not found:
        raise CommandError(
            f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / 'checkpoints'}"
        )
    return found[-1]


def load(accelerator: Any, checkpoint: Path, current: TrainerState) -> TrainerState:
    """Restore the checkpoint into the prepared objects and return its state; refused, with the flag named,
    when `current` (this run's settings) differs from it in what changes the numbers."""
    saved = TrainerState.read(checkpoint / STATE_FILE)
    for name, flag in MUST_MATCH.items():
        then, now = getattr(saved, name), getattr(current, name)
        if then is None:  # not recorded: this run's setting goes on record from here
            setattr(saved, name, now)
        if then is None or then == now:
            continue
        if name == "model_source":
            raise CommandError(
                f"--resume_from_checkpoint {checkpoint} was trained from {then!r}, this run starts from {now!r}: "
                f"give the same {flag}"
            )
        raise CommandError(
            f"--resume_from_checkpoint {checkpoint} was trained with {flag} {then}, this run has {now}: give the "
            "same value to continue it exactly"
        )
    accelerator.load_state(str(checkpoint))
    logger.info(f"Resumed from {checkpoint} at step {saved.global_step}")
    return saved


def keep_decoder_only(accelerator: Any) -> None:
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
