"""The web demo's Hub Space: the folder it is made of, its push (offline, HfApi patched), and run_train.py's
--push_space."""

import ast
import importlib.metadata
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml

from clipseg_tools import run_folder
from clipseg_tools.errors import FAILED, CommandError
from clipseg_tools.space import main as space_main
from clipseg_tools.space import push_space, write_space

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "someone/clipseg-demo"
SPACE_FILES = [
    "README.md",
    "app.py",
    "clipseg_tools/__init__.py",
    "clipseg_tools/demo_views.py",
    "examples/shapes_1.jpg",
    "examples/shapes_2.jpg",
    "examples/shapes_3.jpg",
    "requirements.txt",
]


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def default_model(app_source: str) -> str | None:
    """The value app.py assigns to DEFAULT_MODEL."""
    for node in ast.parse(app_source).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "DEFAULT_MODEL":
            return ast.literal_eval(node.value)
    raise AssertionError("app.py assigns no DEFAULT_MODEL")


def test_the_space_folder_holds_the_projects_app_serving_the_pushed_model(tmp_path):
    names = write_space(tmp_path / "space", MODEL_ID)
    assert names == SPACE_FILES
    space = tmp_path / "space"

    app_source = (space / "app.py").read_text()
    project_app = (REPO_ROOT / "app.py").read_text()
    assert default_model(project_app) is None and default_model(app_source) == MODEL_ID
    differing = [line for line in app_source.splitlines() if line not in project_app.splitlines()]
    assert differing == [f'DEFAULT_MODEL: str | None = "{MODEL_ID}"'], "otherwise the project's own app"
    assert (space / "clipseg_tools" / "demo_views.py").read_bytes() == (
        REPO_ROOT / "clipseg_tools" / "demo_views.py"
    ).read_bytes()
    assert (space / "examples" / "shapes_1.jpg").read_bytes() == (
        REPO_ROOT / "examples" / "shapes_1.jpg"
    ).read_bytes()

    settings = front_matter((space / "README.md").read_text())
    assert settings["sdk"] == "gradio" and settings["app_file"] == "app.py"
    assert settings["models"] == [MODEL_ID] and settings["title"] == "clipseg-demo demo"
    assert settings["sdk_version"].count(".") == 2
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert requirements[0] == "torch==2.13.0", "the project's pin, without the local build tag"
    assert f"transformers=={importlib.metadata.version('transformers')}" in requirements
    assert all("==" in line for line in requirements) and not any(
        r.startswith("gradio") for r in requirements
    )


def test_a_private_space_says_it_needs_a_token_to_read_the_model(tmp_path):
    write_space(tmp_path / "space", MODEL_ID, private=True)
    assert "secret `HF_TOKEN`" in (tmp_path / "space" / "README.md").read_text()
    write_space(tmp_path / "public", MODEL_ID)
    assert "HF_TOKEN" not in (tmp_path / "public" / "README.md").read_text()


class FakeHub:
    """HfApi's repository creation, commit (the model's push) and folder upload (the Space's), recording what
    would be sent."""

    def __init__(self, refuse: Exception | None = None):
        self.refuse = refuse
        self.created, self.commits = [], []

    def create_repo(self, api, repo_id, **kwargs):
        if self.refuse:
            raise self.refuse
        self.created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.commits.append((repo_id, kwargs.get("repo_type"), files))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

    def upload_folder(self, api, *, folder_path, repo_id, repo_type=None, **kwargs):
        # Read now: the Space's folder is a temporary one, gone once the push returns.
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.commits.append((repo_id, repo_type, files))
        return SimpleNamespace(commit_url=f"https://huggingface.co/spaces/{repo_id}/commit/0", oid="0")

    def patch(self):
        from huggingface_hub import HfApi

        return mock.patch.multiple(
            HfApi,
            create_repo=lambda api, repo_id, **kw: self.create_repo(api, repo_id, **kw),
            create_commit=lambda api, repo_id, operations, **kw: self.create_commit(
                api, repo_id, operations, **kw
            ),
            upload_folder=lambda api, **kw: self.upload_folder(api, **kw),
            list_repo_files=lambda api, repo_id, **kw: [],
        )


def test_the_push_creates_a_gradio_space_and_uploads_the_folder():
    hub = FakeHub()
    with hub.patch():
        url = push_space(MODEL_ID, private=True, token="hf_test")
    assert url == "https://huggingface.co/spaces/someone/clipseg-demo-demo"
    assert hub.created == [
        (
            "someone/clipseg-demo-demo",
            {"repo_type": "space", "space_sdk": "gradio", "private": True, "exist_ok": True},
        )
    ]
    [(repo, repo_type, files)] = hub.commits
    assert repo == "someone/clipseg-demo-demo" and repo_type == "space"
    assert sorted(files) == SPACE_FILES
    assert default_model(files["app.py"].decode()) == MODEL_ID


def test_a_refused_space_push_says_how_to_try_again():
    hub = FakeHub(refuse=ConnectionError("Name or service not known"))
    with hub.patch(), pytest.raises(CommandError) as failed:
        push_space(MODEL_ID)
    assert failed.value.exit_code == FAILED
    assert "(ConnectionError: Name or service not known)" in str(failed.value)
    assert f"`python -m clipseg_tools.space --hub_model_id {MODEL_ID} --push`" in str(failed.value)


def test_run_train_pushes_the_space_after_the_model(tmp_path):
    import run_train

    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "README.md"):
        (out / name).write_text("{}")
    run_folder.record_model_files(out, ["config.json", "README.md"])
    args = SimpleNamespace(
        output_dir=str(out),
        hub_model_id=MODEL_ID,
        hub_private_repo=False,
        hub_token="hf_test",
        push_space=True,
    )
    hub = FakeHub()
    with hub.patch():
        run_train.push_model(args)
    assert [(repo, repo_type) for repo, repo_type, _ in hub.commits] == [
        (MODEL_ID, "model"),
        ("someone/clipseg-demo-demo", "space"),
    ]
    assert sorted(hub.commits[0][2]) == ["README.md", "config.json"]


def test_push_space_needs_push_to_hub_and_a_full_model_id(tmp_path, synthetic_data, tiny_clip_dir, capsys):
    import run_train

    argv = ["--data_dir", str(synthetic_data), "--clip_model_name_or_path", str(tiny_clip_dir),
            "--output_dir", str(tmp_path / "out"), "--push_space"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        run_train.parse_args(argv)
    assert stop.value.code == 2 and "--push_space needs --push_to_hub" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        run_train.parse_args([*argv, "--push_to_hub", "--hub_model_id", "no-namespace"])
    assert stop.value.code == 2 and "--hub_model_id namespace/name" in capsys.readouterr().err


def test_the_command_writes_the_folder_and_refuses_to_do_nothing(tmp_path, capsys):
    space_main(["--hub_model_id", MODEL_ID, "--output_dir", str(tmp_path / "space")])
    assert "Wrote 8 files" in capsys.readouterr().out
    assert (
        sorted(p.relative_to(tmp_path / "space").as_posix() for p in (tmp_path / "space").rglob("*.*"))
        == SPACE_FILES
    )
    for argv, said in [
        (["--hub_model_id", MODEL_ID], "give --output_dir"),
        (["--hub_model_id", "name", "--output_dir", str(tmp_path / "new")], "must be namespace/name"),
        (["--hub_model_id", MODEL_ID, "--output_dir", str(tmp_path / "space")], "exists"),
        (["--hub_model_id", MODEL_ID, "--push"], "--push: HF_HUB_OFFLINE is set"),
    ]:
        with pytest.raises(SystemExit) as stop:
            space_main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err
