"""Training checkpoints, saved under `<output_dir>/checkpoints/step_N/`, checked, found again and resumed from,
and the run's state they carry (`TrainerState`).

A checkpoint holds what Accelerate saves (optimizer and random states) with the model reduced to its
trainable decoder (a few MB of safetensors; the frozen CLIP comes back from where the run started), the run's
`TrainerState` as JSON (the step, the data's position, the settings), and last a manifest: every file's size
and SHA-256. It is written under a temporary name and then renamed, so a run killed while saving never leaves
a half checkpoint under a `step_N` name; the manifest finds a file damaged or lost after that.

Nothing in a checkpoint is unpickled as code: the run's own state is JSON, the decoder safetensors, and
Accelerate loads the optimizer and random states with `weights_only=True`. The learning-rate schedule is
not saved at all: it is a function of the step and of this run's flags.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils import logging

from .errors import CommandError
from .files import move_into_place, partial_path

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
# What Accelerate saves and `load` lets it read back: safetensors, and states it loads with weights_only=True.
ACCELERATE_FILES = ("model", "optimizer", "random_states_", "scaler", "sampler", "dl_state_dict")
SET_ASIDE = "set_aside"  # under checkpoints/: those after the one a run rewound to
# State fields a resumed run must share with its checkpoint, and the flags that set them.
MUST_MATCH = {
    "model_source": "--model_name_or_path / --clip_model_name_or_path",
    "tuning": "--tune (and its flags)",
    "backbone_dtype": "--backbone_dtype",
    "shrink_train_images": "--shrink_train_images",
}


@dataclass
class TrainerState:
    """Where a run is: saved in every checkpoint as `trainer_state.json` and restored on resume."""

    global_step: int = 0
    consumed_batches: int = 0  # data-loader batches drawn over all epochs: where the data order resumes
    nonfinite_losses: int = 0  # optimizer steps skipped for a NaN or infinite loss
    # --streaming: each process's place in its stream, by process index (`streaming.start_position`): the
    # epoch, and the rows each data-loader worker had handed to the training loop in it.
    stream_positions: list[dict[str, Any]] | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    # What changes the numbers without changing the weights' shapes: a resumed run must have the same
    # (None: not recorded, as in older checkpoints).
    model_source: str | None = None
    tuning: str | None = None  # what trains besides the decoder (`tuning.description`)
    backbone_dtype: str | None = None
    shrink_train_images: bool | None = None
    # The recipe's settings as the run had them (see `run_train.RESUMABLE_SETTINGS`), and where a resumed run
    # changed them: [{"step": N, "changed": {flag: [before, after]}}].
    settings: dict[str, Any] | None = None
    setting_changes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, path: Path) -> TrainerState:
        try:
            saved = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise CommandError(f"{path} cannot be read ({error})") from error
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


def step_of(folder: Path) -> int:
    return int(Path(folder).name[len(CHECKPOINT_PREFIX) :])


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The run's checkpoints (complete when saved; `problem` checks them now), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []
    return sorted(
        (p for p in found if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and is_checkpoint(p)), key=step_of
    )


def save(accelerator: Any, output_dir: Path, state: TrainerState, keep: int) -> Path:
    """Every process saves its part into a temporary folder, which then gets its `step_N` name; only the
    newest `keep` checkpoints stay (all of them with `keep` 0)."""
    final = Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.global_step}"
    staging = partial_path(final)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))  # a full disk: `cli.out_of_space` says so
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(state.to_json())
        write_manifest(staging)
        move_into_place(staging, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}")
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """The checkpoint's files with their sizes and checksums, written last: what `problem` checks."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2))


def problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint, naming the file (None when every file is as it was saved)."""
    checkpoint = Path(checkpoint)
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():
        if is_checkpoint(checkpoint):  # saved by an earlier version, which wrote no manifest
            logger.warning(
                f"{checkpoint} has no {MANIFEST_FILE} (an earlier version saved it): files not checked"
            )
            return None
        return f"{checkpoint} is not a checkpoint of run_train.py (no {MANIFEST_FILE})"
    try:
        listed = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest_path} is damaged ({error})"
    for name, expected in sorted(listed.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size:,} bytes where {expected['bytes']:,} were saved (truncated or damaged)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its saved checksum (damaged)"
        if path.suffix in (".bin", ".pkl") and not _loads_safely(path):
            return (
                f"{path} holds more than tensors and numbers, which are all a checkpoint saves (not loaded)"
            )
    unlisted = sorted(
        p.name for p in checkpoint.iterdir() if p.name not in listed and p.name != MANIFEST_FILE
    )
    if unlisted:  # never read: Accelerate loads only the files of what the run registers
        logger.warning(f"{checkpoint} holds files its manifest does not list, which are ignored: {unlisted}")
    return None


def _loads_safely(path: Path) -> bool:
    """Whether torch loads the file with `weights_only=True` (as Accelerate loads optimizer and random states):
    a file that needs more, such as pickled code, is refused here rather than half-loaded there (Accelerate
    passes over random states it cannot load without a word)."""
    from accelerate.utils import load as accelerate_load

    try:
        accelerate_load(path, map_location="cpu")
    except Exception:  # the unpickler's refusal, or a damaged file: either way not this run's state
        return False
    return True


def find(given: str, output_dir: Path) -> Path | None:
    """`--resume_from_checkpoint`: a checkpoint folder (refused when damaged), or 'latest': the run's newest
    intact checkpoint (damaged ones are named and passed over), None when the run has none yet."""
    if given != "latest":
        found = problem(Path(given))
        if found:
            raise CommandError(f"--resume_from_checkpoint {given}: {found}")
        return Path(given)
    damaged = []
    for checkpoint in reversed(checkpoint_dirs(output_dir)):
        found = problem(checkpoint)
        if not found:
            if damaged:
                logger.warning(f"Resuming from {checkpoint}, the newest intact checkpoint")
            return checkpoint
        logger.warning(f"Passing over a damaged checkpoint: {found}")
        damaged.append(found)
    if damaged:
        raise CommandError(
            f"--resume_from_checkpoint latest: every checkpoint in {Path(output_dir) / 'checkpoints'} is damaged "
            f"(the newest: {damaged[0]}); start over with --overwrite_output_dir"
        )
    logger.warning(
        f"--resume_from_checkpoint latest: {Path(output_dir) / 'checkpoints'} holds no complete checkpoint yet "
        "(the run ended before its first): starting from the beginning"
    )
    return None


def set_aside_after(checkpoint: Path, output_dir: Path) -> list[Path]:
    """A run resumed from `checkpoint` rewinds: the run's later checkpoints are moved to
    `checkpoints/set_aside/<time>/`, so that 'latest' means this run's from now on. Returns where they went."""
    later = [p for p in checkpoint_dirs(output_dir) if step_of(p) > step_of(checkpoint)]
    later += [p for p in (Path(output_dir) / "checkpoints").glob(f".{CHECKPOINT_PREFIX}*.partial")]
    if not later:
        return []
    aside = Path(output_dir) / "checkpoints" / SET_ASIDE / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in later:
        path.rename(aside / path.name)
        moved.append(aside / path.name)
    logger.warning(
        f"Resuming from {checkpoint}: the {len(moved)} later checkpoint(s) of the run it rewinds were moved to "
        f"{aside} (delete them when not needed)"
    )
    return moved


def load(accelerator: Any, checkpoint: Path, current: TrainerState) -> TrainerState:
    """Restore the checkpoint into the prepared objects and return its state; refused, with the flag named,
    when `current` (this run's settings) differs from it in what changes the numbers. Other settings that
    changed apply from here on: said, and recorded in the state."""
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
    note_changed_settings(saved, current.settings or {}, checkpoint)
    with tempfile.TemporaryDirectory(prefix="clipseg-resume-") as view:
        # Accelerate is shown the files it loads safely and no others: it would unpickle a custom state file
        # with safe loading off (an earlier version saved the schedule so; now it follows from the step).
        for path in checkpoint.iterdir():
            if path.name.startswith(ACCELERATE_FILES):
                (Path(view) / path.name).symlink_to(path.absolute())
        try:
            accelerator.load_state(view)
        except (OSError, RuntimeError, ValueError, SafetensorError, KeyError) as error:
            raise CommandError(
                f"--resume_from_checkpoint {checkpoint} could not be loaded ({error})"
            ) from error
    logger.info(f"Resumed from {checkpoint} at step {saved.global_step}")
    return saved


def note_changed_settings(saved: TrainerState, settings: dict[str, Any], checkpoint: Path) -> None:
    """Settings that differ from the checkpoint's apply from its step on: said, and recorded in the state."""
    before = saved.settings or {}
    changed = {k: [before[k], v] for k, v in settings.items() if k in before and before[k] != v}
    saved.settings = settings
    if not changed:
        return
    saved.setting_changes.append({"step": saved.global_step, "changed": changed})
    said = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changed.items())
    logger.warning(
        f"Resuming {checkpoint} with changed settings, applied from step {saved.global_step} on: {said}"
    )
    if "num_processes" in changed:
        logger.warning(
            f"The checkpoint was saved by {changed['num_processes'][0]} process(es), this run has "
            f"{changed['num_processes'][1]}: the data order and random states were saved per process, so the run "
            "continues, but not as the uninterrupted run would have (exact resume needs the same number)"
        )


def keep_trained_only(accelerator: Any, trained: set[str]) -> None:
    """Checkpoints hold what trains: the decoder and the CLIP parameters named in `trained` (LoRA adapters,
    unfrozen blocks: MBs), not the frozen CLIP (hundreds of MBs each); a resumed run gets the rest of CLIP back
    from the same source it started from."""

    def is_kept(key: str) -> bool:
        key = key.removeprefix("module.")
        return key.startswith("decoder.") or key in trained

    def keep(models: list, weights: list, output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = {key: value for key, value in state.items() if is_kept(key)}

    def load(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_file(Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))
            state = {key.removeprefix("module."): value for key, value in state.items()}
            unwrapped = accelerator.unwrap_model(model)
            decoder = {
                key.removeprefix("decoder."): v for key, v in state.items() if key.startswith("decoder.")
            }
            unwrapped.decoder.load_state_dict(decoder, strict=True)
            clip_part = {key: value for key, value in state.items() if not key.startswith("decoder.")}
            if set(clip_part) != trained:
                missing, extra = sorted(trained - set(clip_part)), sorted(set(clip_part) - trained)
                raise ValueError(
                    f"the checkpoint's trained CLIP parameters differ from this run's (missing {missing[:3]}, "
                    f"not trained here {extra[:3]}): resume with the --tune settings it was trained with"
                )
            unwrapped.load_state_dict(clip_part, strict=False)
        models.clear()  # loaded here; Accelerate must not load them again

    accelerator.register_save_state_pre_hook(keep)
    accelerator.register_load_state_pre_hook(load)
