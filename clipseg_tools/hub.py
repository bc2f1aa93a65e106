"""The Hugging Face Hub: whether a push can work (asked before any work), and a folder pushed in one commit.

Used by `run_train.py --push_to_hub` (a trained model) and `python -m phrasecut_dataset.publish
--push_to_hub` (a dataset export). This module imports nothing of the project but its errors.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from .errors import FAILED, CommandError


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


def files_to_push(folder: Path, local_only: Sequence[str] = ()) -> list[Path]:
    """The folder's files, leaving out hidden ones (unfinished writes) and the top-level entries named in
    `local_only` (a run's checkpoints and tracker logs)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.relative_to(folder).parts[0] not in local_only
    )


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    what: str = "The model",
    local_only: Sequence[str] = (),
    replace_under: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload with clipseg-finetune",
) -> str:
    """Create the repository if needed and upload `files_to_push(folder, local_only)` in one commit; with
    `replace_under` (a folder of the repository, e.g. "data/"), its files that this folder no longer has are
    deleted in the same commit. Returns the commit's URL. A failure says that `what` (e.g. "The model") is
    complete in `folder`, and the command that pushes it later."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    files = {path.relative_to(folder).as_posix(): path for path in files_to_push(folder, local_only)}
    try:
        repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()
        ]
        if replace_under:
            stale = api.list_repo_files(repo_id, repo_type=repo_type)
            operations += [
                CommitOperationDelete(path_in_repo=name)
                for name in stale
                if name.startswith(replace_under) and name not in files
            ]
        commit = api.create_commit(
            repo_id=repo_id, operations=operations, repo_type=repo_type, commit_message=commit_message
        )
    except Exception as error:  # no network, a refused token, a full quota: say what is safe, how to retry
        raise CommandError(
            f"--push_to_hub {repo_id} failed ({error.__class__.__name__}: {error}). {what} in {folder} is "
            f"complete; push it later with `{upload_command(folder, repo_id, repo_type, local_only, private)}`",
            FAILED,
        ) from error
    return commit.commit_url


def upload_command(
    folder: Path, repo_id: str, repo_type: str, local_only: Sequence[str], private: bool
) -> str:
    """The `hf upload` command that pushes what `push_folder` pushes."""
    parts = ["hf", "upload", repo_id, str(folder)]
    if repo_type != "model":
        parts += ["--repo-type", repo_type]
    if private:
        parts.append("--private")
    for pattern in (*(f"{name}/*" for name in local_only), ".*"):
        parts += ["--exclude", pattern]
    return shlex.join(parts)
