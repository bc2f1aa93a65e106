"""Export to a Hub-style folder, read it back every way `datasets` offers, and push it (offline, patched)."""

import io
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import datasets
import pytest
import yaml
from huggingface_hub import HfApi

from clipseg_tools.errors import CommandError
from phrasecut_dataset import (
    FEATURES,
    PhraseCutFormatError,
    export_dataset,
    load_phrasecut,
    push_export_to_hub,
    write_synthetic_phrasecut,
)
from phrasecut_dataset.publish import main as publish_main

TINY = Path(__file__).parent / "fixtures" / "phrasecut_tiny"


def plain_rows(dataset):
    """Rows with the image left as {bytes, path}, so they compare exactly."""
    return list(dataset.cast_column("image", datasets.Image(decode=False)))


def card_header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    raw = write_synthetic_phrasecut(root / "raw", {"train": 12, "val": 3, "test": 3, "miniv": 2}, seed=7)
    prepared = load_phrasecut(raw, cache_dir=root / "cache")
    out = export_dataset(prepared, root / "export", max_shard_size="40KB")
    return root, prepared, out


def test_export_is_laid_out_like_a_hub_repo(synthetic):
    _, prepared, out = synthetic
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "README.md" in files
    for split in prepared:
        shards = [f for f in files if f.startswith(f"data/{split}-")]
        assert shards == [f"data/{split}-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
    assert sum(f.startswith("data/train-") for f in files) > 1  # 40KB shards: train needs several
    assert len(files) == 1 + sum(f.startswith("data/") for f in files)
    assert not list(out.parent.glob("*.partial"))


def test_parquet_round_trip_map_style_and_streaming(synthetic):
    root, prepared, out = synthetic
    data_files = {
        split: sorted(str(p) for p in (out / "data").glob(f"{split}-*.parquet")) for split in prepared
    }
    loaded = datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(root / "hf_cache"))
    streamed = datasets.load_dataset("parquet", data_files=data_files, streaming=True)
    for split in prepared:
        expected = plain_rows(prepared[split])
        assert loaded[split].features == FEATURES
        assert plain_rows(loaded[split]) == expected
        assert plain_rows(streamed[split]) == expected


def test_folder_round_trip_map_style_and_streaming(synthetic):
    root, prepared, out = synthetic
    loaded = datasets.load_dataset(str(out), cache_dir=str(root / "hf_cache_folder"))
    streamed = datasets.load_dataset(str(out), streaming=True)
    assert list(loaded) == list(prepared)
    for split in prepared:
        expected = plain_rows(prepared[split])
        assert plain_rows(loaded[split]) == expected
        assert plain_rows(streamed[split]) == expected
    # The images decode from the embedded bytes.
    assert loaded["train"][0]["image"].size == (prepared["train"][0]["width"], prepared["train"][0]["height"])


def test_card_yaml_parses_and_describes_the_data(synthetic):
    _, prepared, out = synthetic
    text = (out / "README.md").read_text(encoding="utf-8")
    header = card_header(text)
    assert header["license"] == "other"
    assert header["task_categories"] == ["image-segmentation"]
    splits = {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]}
    assert splits == {split: len(dataset) for split, dataset in prepared.items()}
    assert datasets.Features._from_yaml_list(header["dataset_info"]["features"]) == FEATURES
    assert header["configs"] == [
        {"config_name": "default", "data_files": [{"split": s, "path": f"data/{s}-*"} for s in prepared]}
    ]
    tasks = sum(len(row["tasks"]) for row in prepared["train"])
    assert f"| train | {len(prepared['train'])} | {tasks} |" in text
    for fragment in ["CC BY 4.0", "per-image terms", "licence unspecified", "Wu", "CVPR", "@inproceedings"]:
        assert fragment in text


def test_export_refuses_a_non_empty_folder(synthetic):
    _, prepared, out = synthetic
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        export_dataset(prepared, out)


class FakeHub:
    """Stands in for the Hub: records what HfApi would create and upload."""

    def __init__(self, existing=()):
        self.existing = list(existing)
        self.created, self.operations = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def list_repo_files(self, api, repo_id, **kwargs):
        return list(self.existing)

    def create_commit(self, api, repo_id, operations, **kwargs):
        self.operations.extend(operations)
        return SimpleNamespace(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/0", oid="0")

    def patch(self):
        return mock.patch.multiple(
            HfApi,
            create_repo=lambda api, repo_id, **kw: self.create_repo(api, repo_id, **kw),
            list_repo_files=lambda api, repo_id, **kw: self.list_repo_files(api, repo_id, **kw),
            create_commit=lambda api, repo_id, operations, **kw: self.create_commit(
                api, repo_id, operations, **kw
            ),
        )

    def uploaded(self):
        return {op.path_in_repo: op for op in self.operations if hasattr(op, "path_or_fileobj")}

    def deleted(self):
        return sorted(op.path_in_repo for op in self.operations if not hasattr(op, "path_or_fileobj"))


def read_operation(operation) -> bytes:
    source = operation.path_or_fileobj
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    if isinstance(source, bytes):
        return source
    assert isinstance(source, io.IOBase)
    return source.read()


def test_push_uploads_exactly_the_export_and_removes_stale_shards(synthetic):
    _, _, out = synthetic
    hub = FakeHub(existing=[".gitattributes", "README.md", "data/train-00000-of-00009.parquet"])
    with hub.patch():
        url = push_export_to_hub(out, "someone/phrasecut-synthetic", private=True, token="hf_fake")
    assert url.startswith("https://huggingface.co/datasets/someone/phrasecut-synthetic")
    assert hub.created == [
        ("someone/phrasecut-synthetic", {"repo_type": "dataset", "private": True, "exist_ok": True})
    ]
    local = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(hub.uploaded()) == local
    assert hub.deleted() == ["data/train-00000-of-00009.parquet"]
    card = read_operation(hub.uploaded()["README.md"]).decode("utf-8")
    assert card_header(card)["configs"][0]["config_name"] == "default"


def test_push_never_sends_files_the_export_did_not_write_nor_follows_links(synthetic, tmp_path):
    _, prepared, out = synthetic
    folder = tmp_path / "export"
    shutil.copytree(out, folder)
    (folder / "notes.txt").write_text("the user's")
    (folder / ".env").write_text("HF_TOKEN=secret")
    (folder / "data" / ".cache").mkdir()
    (folder / "data" / ".cache" / "x.lock").write_text("")
    hub = FakeHub()
    with hub.patch():
        push_export_to_hub(folder, "someone/phrasecut")
    assert sorted(hub.uploaded()) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())

    (folder / "data" / "train-99999-of-99999.parquet").symlink_to("/etc/passwd")
    hub = FakeHub()
    with hub.patch(), pytest.raises(CommandError, match="train-99999-of-99999.parquet is a symbolic link"):
        push_export_to_hub(folder, "someone/phrasecut")
    assert not hub.uploaded()
    # An overwrite replaces an earlier export, never a folder holding anything else.
    with pytest.raises(FileExistsError, match=r"holds files that are not an export's \(.env, notes.txt\)"):
        export_dataset(prepared, folder, overwrite=True)
    assert (folder / "notes.txt").is_file()


def test_push_offline_says_what_to_do(synthetic):
    _, _, out = synthetic
    with pytest.raises(
        CommandError, match="(?s)HF_HUB_OFFLINE.*The export in .* is complete; push it later with"
    ):
        push_export_to_hub(out, "someone/phrasecut")


def test_command_line_exports_and_pushes(tmp_path, capsys):
    out = tmp_path / "export"
    hub = FakeHub()
    argv = ["--data_dir", str(TINY), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    # Offline, the push is refused before any export work (tests run with HF_HUB_OFFLINE set).
    with pytest.raises(SystemExit) as stop:
        publish_main([*argv, "--push_to_hub", "--hub_dataset_id", "someone/tiny"])
    assert stop.value.code == 2 and "--push_to_hub: HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not out.exists()
    with hub.patch(), mock.patch("phrasecut_dataset.publish.hub_access_problem", return_value=None):
        publish_main([*argv, "--push_to_hub", "--hub_dataset_id", "someone/tiny"])
    printed = capsys.readouterr().out
    assert "exported train: 1 images, validation: 1 images, test: 1 images, miniv: 1 images" in printed
    assert "pushed to https://huggingface.co/datasets/someone/tiny" in printed
    assert sorted(hub.uploaded()) == [
        "README.md",
        "data/miniv-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
    ]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Left out while preparing: 1 images whose metadata size does not match the JPEG" in card


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        publish_main(["--data_dir", str(TINY), "--output_dir", str(tmp_path / "o"), "--push_to_hub"])
    assert "--push_to_hub needs --hub_dataset_id" in capsys.readouterr().err
    with pytest.raises(PhraseCutFormatError, match="is not a directory"):
        publish_main(["--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])


def test_an_empty_split_is_left_out_of_the_export_and_said_so(tmp_path, caplog):
    """datasets cannot load an empty split back ("corresponds to no data"): the export leaves it out, and the
    log and the card say so."""
    raw = write_synthetic_phrasecut(tmp_path / "raw", {"train": 2}, seed=1, min_size=32, max_size=48)
    prepared = load_phrasecut(raw, cache_dir=tmp_path / "cache", splits=["train", "test"])
    assert len(prepared["test"]) == 0
    with caplog.at_level("WARNING", logger="phrasecut_dataset.publish"):
        out = export_dataset(prepared, tmp_path / "export")
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf_cache"))
    assert list(loaded) == ["train"]
    assert plain_rows(loaded["train"]) == plain_rows(prepared["train"])
    assert not list((out / "data").glob("test-*"))
    assert "the test split has no images" in caplog.text
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "The test split had no images and is left out" in card
    assert [s["name"] for s in card_header(card)["dataset_info"]["splits"]] == ["train"]


def test_an_export_of_empty_splits_only_is_refused(tmp_path):
    raw = write_synthetic_phrasecut(tmp_path / "raw", {"train": 1}, seed=1, min_size=32, max_size=48)
    prepared = load_phrasecut(raw, cache_dir=tmp_path / "cache", splits=["test", "miniv"])
    with pytest.raises(CommandError, match="no split has any image.*test, miniv"):
        export_dataset(prepared, tmp_path / "export")
    assert not (tmp_path / "export").exists()
