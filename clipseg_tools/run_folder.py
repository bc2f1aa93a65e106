"""A training run's output folder: what the run writes there (and so may remove or push), a check that it can
write there at all, and a lock that keeps two runs out of one folder.

The folder holds the saved model (the files listed in `run_files.json`, written with them), the checkpoints
and the trackers' logs; anything else in it is the user's: never removed, never pushed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging

from .errors import CommandError
from .files import write_text_atomically

logger = logging.get_logger(__name__)

RUN_FILES = "run_files.json"  # the saved model's files: what a push uploads and an overwrite removes
LOCK_FILE = ".run.lock"
# What a run writes beside its model: checkpoints, the trackers' logs (Accelerate's project folder), its lock,
# and the hidden folder the model is written in before it gets its place.
RUN_ENTRIES = ("checkpoints", "clipseg_finetune", "runs", RUN_FILES, LOCK_FILE, ".partial")


def model_files(folder: Path) -> list[str]:
    """The saved model's files, as the run that saved them listed them (none before a run has saved)."""
    listing = Path(folder) / RUN_FILES
    if not listing.is_file():
        return []
    try:
        return list(json.loads(listing.read_text())["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise CommandError(f"{listing} is damaged ({error}): it lists the files a run saved") from error


def top_level_entries(names: list[str]) -> list[str]:
    """The folder's entries that hold these files (`onnx/vision.onnx` is held by `onnx`), in order."""
    return list(dict.fromkeys(Path(name).parts[0] for name in names))


def record_model_files(folder: Path, names: list[str]) -> None:
    write_text_atomically(Path(folder) / RUN_FILES, json.dumps({"files": sorted(names)}, indent=2))


def holds_run(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "checkpoints").is_dir() or (folder / RUN_FILES).is_file()


def foreign_entries(folder: Path) -> list[str]:
    """What the folder holds that no run wrote, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = {*RUN_ENTRIES, *top_level_entries(model_files(folder))}
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in ours)


def remove_run(folder: Path) -> list[str]:
    """Remove what a run wrote (model files, checkpoints, logs) and nothing else; returns the names removed."""
    folder = Path(folder)
    removed = []
    for name in [*top_level_entries(model_files(folder)), *RUN_ENTRIES]:
        path = folder / name
        if name == LOCK_FILE or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def writable_problem(folder: Path) -> str | None:
    """Why the run could not write into `folder` (or create it), found before any training; None if it can."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    for place in (existing, existing / "checkpoints"):
        if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
            return f"{place} is not writable (read-only file system or no permission)"
    return None


@contextmanager
def run_lock(folder: Path, owner: bool = True) -> Iterator[None]:
    """Hold `folder`'s lock for the block (taken by `owner`, the main process): a second run on the same
    folder is refused while this one lives. The operating system releases the lock when its holder dies, so
    the lock of a run that was killed is taken over (and said so)."""
    if not owner:
        yield
        return
    path = Path(folder) / LOCK_FILE
    handle = _locked(path)
    try:
        previous = handle.read().strip()
        if previous:
            logger.warning(
                f"{path}: taking over the lock of a run that ended without releasing it ({previous})"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no other run takes a file that is going away
        handle.close()


def _locked(path: Path):  # noqa: ANN202 (an open text file)
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (held open for the run's life)
        try:
            # A POSIX record lock: held by this process only (not by the data-loader workers it forks, which
            # outlive a killed run by a few seconds), and released by the system when the process dies.
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another run"
            handle.close()
            raise CommandError(
                f"--output_dir {path.parent} is in use by a run that is still going ({holder}; lock {path}): "
                "stop that run first, or choose another --output_dir"
            ) from None
        # The file may have been released and removed between our open and lock: then lock the new one.
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            handle.seek(0)
            return handle
        handle.close()
