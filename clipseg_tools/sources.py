"""Checking, before any work, that a model given on the command line can be loaded."""

from __future__ import annotations

from pathlib import Path


def model_source_problem(source: str) -> str | None:
    """Why `source` (a local folder or a Hub id) cannot be a model to load, in a few words; None when it can.

    A source that names a local path (it exists, or it starts with `/` or `.`, or has more than one `/`) must
    be a folder with a config.json. transformers would read a missing folder as a malformed Hub id, and a
    training checkpoint (`checkpoints/step_N`, training state only) as a model whose weights are all missing.
    Anything else is a Hub id: reachable, or in the local cache when offline.
    """
    path = Path(source)
    if path.exists() or source.startswith(("/", ".")) or source.count("/") > 1:
        if not path.exists():
            return "no such folder"
        if not path.is_dir():
            return "is a file, not a model folder"
        if (path / "config.json").is_file():
            return None
        if (path / "trainer_state.json").is_file():  # run_train.py's STATE_FILE: a checkpoint's own file
            return (
                "is a training checkpoint (training state without config.json): give the run's output folder, "
                "or continue the run with --resume_from_checkpoint"
            )
        return (
            "is not a model folder (no config.json): give a folder written by run_train.py or save_pretrained"
        )
    from transformers.utils import cached_file

    try:
        cached_file(source, "config.json")
    except OSError as error:
        return (
            f"is no local folder, and as a Hub id it could not be found on the Hub or in the local cache "
            f"({error.__class__.__name__}); without network access, pass a local copy (`hf download {source} "
            "--local-dir DIR` on a machine that has one)"
        )
    return None
