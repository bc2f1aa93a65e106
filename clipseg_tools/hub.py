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


def checked_files(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    """The files `names` (relative to `folder`) as the push uploads them, each checked to be a plain file inside
    the folder: a link (to a system file, say) or a name leading out of the folder is refused, never followed."""
    folder = Path(folder)
    files = {}
    for name in names:
        path = folder / name
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise CommandError(f"{name!r} is not a file inside {folder}: nothing was pushed")
        if any((folder / Path(*relative.parts[: i + 1])).is_symlink() for i in range(len(relative.parts))):
            raise CommandError(
                f"{path} is a symbolic link: the push uploads only files written there, never a link's target "
                "(nothing was pushed; replace the link with the file itself)"
            )
        if not path.is_file():
            raise CommandError(f"{path} is missing or not a file: nothing was pushed")
        files[relative.as_posix()] = path
    return files


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    files: Sequence[str],
    what: str = "The model",
    replace_under: str | tuple[str, ...] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload with clipseg-finetune",
) -> str:
    """Create the repository if needed and upload `files` (names relative to `folder`: what a run or an
    export wrote there, nothing else the folder holds) in one commit; with
    `replace_under` (a folder of the repository, e.g. "data/", or several), its files that this folder no longer has are
    deleted in the same commit. Returns the commit's URL. A failure says that `what` (e.g. "The model") is
    complete in `folder`, and the command that pushes it later."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    files = checked_files(folder, files)
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
            f"complete; push it later with `{upload_command(folder, repo_id, repo_type, sorted(files), private)}`",
            FAILED,
        ) from error
    return commit.commit_url


def upload_command(folder: Path, repo_id: str, repo_type: str, files: Sequence[str], private: bool) -> str:
    """The `hf upload` command that pushes what `push_folder` pushes: those files and no others."""
    parts = ["hf", "upload", repo_id, str(folder)]
    if repo_type != "model":
        parts += ["--repo-type", repo_type]
    if private:
        parts.append("--private")
    for name in files:
        parts += ["--include", name]
    return shlex.join(parts)
