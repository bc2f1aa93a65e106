"""A Hub Space that serves the web demo (`app.py`) on a pushed model: its folder, and the push.

    python -m clipseg_tools.space --hub_model_id you/clipseg-rd64-phrasecut --output_dir space   # the files
    python -m clipseg_tools.space --hub_model_id you/clipseg-rd64-phrasecut --push             # to the Hub

`run_train.py --push_to_hub --push_space` does the push after the model's. The Space `<model id>-demo` (Gradio)
holds a copy of the project's `app.py` that serves that model by default, the picture module it imports, the
example pictures, `requirements.txt` pinned to the versions installed here, and a README with the Space's
settings. The model's own code comes from the model repository (`trust_remote_code`), as for any user.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .cli import ArgumentParser, run_command
from .errors import FAILED, CommandError
from .hub import hub_access_problem

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The line of app.py that names the model served when --model is not given (the Space's copy fills it in).
DEFAULT_MODEL_LINE = "DEFAULT_MODEL: str | None = None"
# What the app imports, at the versions this machine runs it with (gradio is the Space's SDK, set in the README).
# peft: a model trained with --tune lora carries a CLIP adapter.
REQUIREMENTS = ("torch", "transformers", "huggingface_hub", "numpy", "pillow", "peft")
# The gradio the app is tested with, for a Space pushed from a machine without the [demo] extra.
TESTED_GRADIO = "6.31.0"


def space_id_for(model_id: str) -> str:
    return f"{model_id}-demo"


def write_space(folder: Path, model_id: str, private: bool = False) -> list[str]:
    """Write the Space's files into `folder` (created; it must not exist); returns their names, sorted."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(space_app(model_id))
    (folder / "requirements.txt").write_text("".join(f"{name}=={pinned(name)}\n" for name in REQUIREMENTS))
    (folder / "README.md").write_text(space_readme(model_id, private))
    (folder / "clipseg_tools").mkdir()
    (folder / "clipseg_tools" / "__init__.py").write_text(
        '"""The web demo\'s pictures: `demo_views`, copied from clipseg-finetune\'s `clipseg_tools`."""\n'
    )
    shutil.copyfile(
        PROJECT_ROOT / "clipseg_tools" / "demo_views.py", folder / "clipseg_tools" / "demo_views.py"
    )
    (folder / "examples").mkdir()
    for picture in sorted((PROJECT_ROOT / "examples").glob("*.jpg")):
        shutil.copyfile(picture, folder / "examples" / picture.name)
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def space_app(model_id: str) -> str:
    """The project's app.py with `model_id` as the model it serves by default."""
    source = (PROJECT_ROOT / "app.py").read_text()
    if source.count(DEFAULT_MODEL_LINE) != 1:
        raise RuntimeError(f"app.py must hold the line {DEFAULT_MODEL_LINE!r} once: the Space fills it in")
    return source.replace(DEFAULT_MODEL_LINE, f"DEFAULT_MODEL: str | None = {json.dumps(model_id)}")


def pinned(package: str) -> str:
    """The installed version, without a local build tag (torch's `+cpu`): the Space installs from PyPI."""
    return importlib.metadata.version(package).split("+")[0]


def gradio_version() -> str:
    """The Space's SDK version: the gradio installed here, else the one the app was tested with."""
    try:
        return pinned("gradio")
    except importlib.metadata.PackageNotFoundError:
        return TESTED_GRADIO


def space_readme(model_id: str, private: bool) -> str:
    settings = {
        "title": f"{model_id.split('/')[-1]} demo",
        "emoji": "✂️",
        "colorFrom": "blue",
        "colorTo": "red",
        "sdk": "gradio",
        "sdk_version": gradio_version(),
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "app_file": "app.py",
        "models": [model_id],
        "pinned": False,
    }
    front = yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
    body = (
        f"# {model_id}: web demo\n\n"
        f"Text- and image-prompted segmentation with [{model_id}](https://huggingface.co/{model_id}), a CLIPSeg "
        "model trained with clipseg-finetune. Pick an example picture or upload one, type prompts "
        "(comma-separated) and/or give an example image: the page shows each prompt's heat map and overlay with "
        "its highest probability, and the multi-class map (each pixel in the colour of its most probable prompt) "
        "with a threshold slider.\n\nRun it locally with `python app.py` (or `--model` another model).\n"
    )
    if private:
        body += (
            "\nThe model is private: give this Space a secret `HF_TOKEN` with a token that can read it "
            "(Settings, Variables and secrets).\n"
        )
    return f"---\n{front}---\n\n{body}"


def push_space(model_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or update) the Space `<model_id>-demo` with the files of `write_space`; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    space_id = space_id_for(model_id)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "space"
        write_space(folder, model_id, private)
        try:
            space_id = api.create_repo(
                space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True
            ).repo_id
            api.upload_folder(
                folder_path=folder,
                repo_id=space_id,
                repo_type="space",
                commit_message="Web demo generated by clipseg-finetune",
            )
        except Exception as error:  # no network, a refused token, a name taken: say how to try again
            raise CommandError(
                f"the web demo Space {space_id} could not be created or updated ({error.__class__.__name__}: "
                f"{error}); try again with `python -m clipseg_tools.space --hub_model_id {model_id} --push`",
                FAILED,
            ) from error
    return f"{api.endpoint}/spaces/{space_id}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hub_model_id", required=True, help="namespace/name of the model the Space serves")
    parser.add_argument("--output_dir", help="write the Space's files into this new folder")
    parser.add_argument("--push", action="store_true", help="create or update the Space <hub_model_id>-demo")
    parser.add_argument("--hub_token", help="a Hub token (default: the one `hf auth login` saved)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the Space private")
    args = parser.parse_args(argv)
    if "/" not in args.hub_model_id:
        parser.error("--hub_model_id must be namespace/name: the Space loads the model by its full id")
    if not (args.output_dir or args.push):
        parser.error("give --output_dir (write the files), --push (send them to the Hub), or both")
    if args.output_dir and Path(args.output_dir).exists():
        parser.error(f"--output_dir {args.output_dir} exists: give a new folder")
    problem = args.push and hub_access_problem(args.hub_token)
    if problem:
        parser.error(f"--push: {problem}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.output_dir:
        names = write_space(Path(args.output_dir), args.hub_model_id, args.hub_private_repo)
        print(f"Wrote {len(names)} files to {args.output_dir}/")
    if args.push:
        print(
            f"Pushed the web demo to {push_space(args.hub_model_id, args.hub_private_repo, args.hub_token)}"
        )


if __name__ == "__main__":
    run_command(main)
