"""Where models and data come from: a local folder or a Hub id, checked before any work, and the one hint
for a machine without network access."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import is_checkpoint
from .errors import CommandError


def local_copy_hint(source: str, repo_type: str = "model") -> str:
    """What to do when `source` cannot be reached (said the same way everywhere)."""
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return (
        "without network access, pass the path of a local copy (made by `hf download "
        f"{source}{kind} --local-dir DIR` on a machine that has one)"
    )


def load_error(failure: str, source: str, error: Exception, repo_type: str = "model") -> CommandError:
    """The error for `source` that did not load: `failure` says which and how (e.g. "--model_name_or_path X
    could not be loaded"), then comes the loader's reason and, for a Hub id, what to do without network."""
    message = f"{failure} ({error.__class__.__name__}: {error})"
    if not looks_local(source):
        message += f"; {local_copy_hint(source, repo_type)}"
    return CommandError(message)


def looks_local(source: str) -> bool:
    """Whether `source` names a local path rather than a Hub id (`namespace/name`): it exists, starts with `/` or
    `.`, has no `/` at all (a folder beside this one, mistyped), or more than one."""
    return Path(source).exists() or source.startswith(("/", ".")) or source.count("/") != 1


def model_source_problem(source: str) -> str | None:
    """Why `source` (a local folder or a Hub id) cannot be a model to load, in a few words; None when it can.

    A local path must be a folder with a config.json (transformers would read a missing folder as a malformed
    Hub id, and a training checkpoint, which holds training state only, as a model whose weights are all
    missing). A Hub id must be in the local cache or reachable; with no network it fails at once, not after
    transformers' retries.
    """
    if looks_local(source):
        path = Path(source)
        if not path.exists():
            return "no such folder (a Hub id is namespace/name)"
        if not path.is_dir():
            return "is a file, not a model folder"
        if (path / "config.json").is_file():
            return None
        if is_checkpoint(path):
            return (
                "is a training checkpoint (training state without config.json): give the run's output folder, "
                "or continue the run with --resume_from_checkpoint"
            )
        return (
            "is not a model folder (no config.json): give a folder written by run_train.py or save_pretrained"
        )
    problem = hub_file_problem(source, "config.json")
    if problem is None:
        return None
    return (
        f"is no local folder, and as a Hub id it could not be found on the Hub or in the local cache ({problem}); "
        f"{local_copy_hint(source)}"
    )


def hub_file_problem(repo_id: str, filename: str, repo_type: str = "model") -> str | None:
    """Why `filename` of the Hub repository cannot be had (None when it is in the local cache or on the Hub),
    asking the Hub once, without the retries of a download."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    if isinstance(cached, str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and it is not in the local cache"
    try:
        found = file_exists(repo_id, filename, repo_type=repo_type)
    except Exception as error:  # no network, a private repository: each its own exception type
        return f"{error.__class__.__name__}: {error}"
    return None if found else f"{repo_id} has no {filename}"
