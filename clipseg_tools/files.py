"""Files and folders written so that a crash never leaves a half-written one under its final name.

Everything is written under a temporary name beside its target (`.NAME.partial`) and then renamed: a rename
within a file system is atomic, so the target is either as it was or complete. This module imports nothing
of the project: the dataset package uses it too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(target: str | Path) -> Path:
    """Where `target` is written before it gets its name: hidden, beside it, on the same file system."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def write_text_atomically(path: str | Path, text: str) -> None:
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def move_into_place(staging: Path, target: Path, merge: bool = False) -> None:
    """Give the finished folder `staging` its final name `target`, replacing what was there. With `merge`,
    entry by entry instead: `target` keeps its other entries (a run's checkpoints beside its model)."""
    if not merge:
        _remove(target)
        os.replace(staging, target)
        return
    target.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        _remove(target / entry.name)
        os.replace(entry, target / entry.name)
    staging.rmdir()


def _remove(path: Path) -> None:
    """Make room for a rename: a folder is removed with its contents, a file or a link on its own."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_folder(target: str | Path, merge: bool = False) -> Iterator[Path]:
    """An empty folder to write into; when the block ends without an error it becomes `target` (see
    `move_into_place` for `merge`), and when it raises, it is removed and `target` stays as it was. With
    `merge` it lies inside `target` (a hidden `.partial`), so that a killed write leaves nothing outside it."""
    target = Path(target)
    staging = target / ".partial" if merge else partial_path(target)
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed while writing
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    move_into_place(staging, target, merge=merge)


@contextmanager
def removed_if_left_empty(folder: str | Path, owner: bool = True) -> Iterator[None]:
    """A folder a command is about to fill: if the command fails before writing anything into it, a folder
    that did not exist before is removed again (by `owner`, the one process that does so), rather than left
    behind empty."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if owner and not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
