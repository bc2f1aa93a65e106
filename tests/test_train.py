"""run_train.py end to end on a tiny CLIP and a synthetic PhraseCut: learning, resume, DDP, push, bad args."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from conftest import run_on_two_processes, two_process_launcher  # noqa: E402
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
# What a saved model folder must hold: weights, config, the code for trust_remote_code, the card.
SAVED_MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "modeling_clipseg_custom.py",
    "configuration.py",
    "README.md",
}


def train_args(data_dir, clip_dir, output_dir, *extra):
    return [
        "--data_dir", str(data_dir),
        "--clip_model_name_or_path", str(clip_dir),
        "--output_dir", str(output_dir),
        "--image_size", "64",
        "--reduce_dim", "16",
        "--extract_layers", "0", "1",
        "--decoder_intermediate_size", "32",
        "--per_device_train_batch_size", "8",
        "--phrases_per_image", "2",
        "--dataloader_num_workers", "0",
        "--eval_steps", "0",
        "--logging_steps", "1",
        "--cache_dir", str(Path(output_dir).parent / "hf_cache"),
        *extra,
    ]  # fmt: skip


def run_script(args, timeout=600, env_extra=None, launcher=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.update(env_extra or {})
    command = (launcher or [sys.executable]) + [str(REPO_ROOT / "run_train.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def test_short_training_learns_and_its_outputs_reload_offline(tmp_path, synthetic_data, tiny_clip_dir):
    out = tmp_path / "out"
    result = run_script(
        train_args(
            synthetic_data, tiny_clip_dir, out, "--max_train_steps", "30", "--learning_rate", "3e-3",
            "--with_tracking", "--report_to", "tensorboard",
        )
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert list(out.rglob("events.out.tfevents.*")), "--with_tracking --report_to tensorboard wrote no events"
    losses = [
        entry["train_loss"] for entry in json.loads((out / "training_log.json").read_text())["log_history"]
    ]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses

    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == 30 and results["num_processes"] == 1
    assert results["eval_samples"] > 0 and 0 <= results["eval_fgiou_0.3"] <= 1
    files = {p.name for p in out.iterdir()}
    assert SAVED_MODEL_FILES <= files
    assert {"processor_config.json", "tokenizer.json", "all_results.json"} <= files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_30"]

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert any(r.metric_type == "fgiou_0_3" for r in card.data.eval_results)
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}  # the split's name alone
    assert "CVPR 2022" in card.text and "PhraseCut" in card.text

    script = textwrap.dedent(
        f"""
        import builtins
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        builtins.input = lambda prompt="": print("ASKED", prompt)  # transformers' trust_remote_code question
        # With the flag (as the card has it) the processor may come first: no question either way
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
        maps = model.predict(Image.new("RGB", (50, 40), "red"), ["red circle", "blue square"], processor=processor)
        print("ok", tuple(maps[0].shape), model.config.image_size)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_HOME": str(tmp_path / "home")}
    reload = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert "ok (2, 40, 50) 64" in reload.stdout and "ASKED" not in reload.stdout


def test_killed_run_resumes_to_the_same_weights_bitwise(tmp_path, synthetic_data, tiny_clip_dir):
    # Dropout on, evaluation at every checkpoint, a data worker, and accumulation over 5 batches that does not
    # divide an epoch (Accelerate then syncs early at the epoch's end): all of it must resume exactly.
    common = (
        "--max_train_steps", "16", "--checkpointing_steps", "2", "--eval_steps", "2", "--decoder_dropout", "0.1",
        "--dataloader_num_workers", "1", "--gradient_accumulation_steps", "5",
    )  # fmt: skip
    straight = run_script(train_args(synthetic_data, tiny_clip_dir, tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr[-4000:]

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "run_train.py"),
            *train_args(synthetic_data, tiny_clip_dir, out, *common),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_6" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists()  # it really died mid-run

    resumed = run_script(
        train_args(synthetic_data, tiny_clip_dir, out, *common, "--resume_from_checkpoint", "latest")
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from" in resumed.stdout
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all((expected[k] == got[k]).all() for k in expected), (
        "resumed weights differ from the uninterrupted run"
    )
    assert json.loads((out / "all_results.json").read_text()) == json.loads(
        (tmp_path / "straight" / "all_results.json").read_text()
    )
    straight_log = json.loads((tmp_path / "straight" / "training_log.json").read_text())["log_history"]
    resumed_log = json.loads((out / "training_log.json").read_text())["log_history"]
    assert [e["step"] for e in resumed_log] == [e["step"] for e in straight_log]  # the log survives the kill
    assert [e["train_loss"] for e in resumed_log] == [e["train_loss"] for e in straight_log]


def test_two_processes_on_cpu_train_together_and_score_each_sample_once(
    tmp_path, synthetic_data, tiny_clip_dir
):
    out = tmp_path / "ddp"
    launcher = two_process_launcher(29517)
    result = run_script(
        train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "6"), launcher=launcher
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    checksums = results["decoder_checksum_per_process"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both processes hold the same decoder

    from phrasecut_dataset import load_phrasecut

    validation = load_phrasecut(synthetic_data, cache_dir=tmp_path / "hf_cache", splits=["validation"])[
        "validation"
    ]
    assert results["eval_samples"] == sum(len(row["tasks"]) for row in validation)

    # The two processes' evaluation (each scored half of the images) equals one process scoring the saved model.
    import run_eval

    alone = run_eval.main(
        ["--model", str(out), "--data_dir", str(synthetic_data), "--split", "validation", "--num_workers", "0",
         "--cache_dir", str(tmp_path / "hf_cache"), "--output_dir", str(tmp_path / "eval"), "--gallery_max", "0"]
    )  # fmt: skip
    scores = next(iter(alone.values()))["clipseg_paper_protocol"]
    for key in ("miou_0.3", "fgiou_0.3", "fgiou_0.5", "miou_best", "fgiou_best"):
        assert results[f"eval_{key}"] == scores[key], key


def fake_hub(sent: dict):
    """HfApi's repository creation and commit, recording what would be uploaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    def fake_create_commit(self, repo_id, operations, **kwargs):
        sent["repo"] = repo_id
        sent["files"] = {
            op.path_in_repo: op.path_or_fileobj for op in operations if hasattr(op, "path_or_fileobj")
        }
        sent["deleted"] = [op.path_in_repo for op in operations if not hasattr(op, "path_or_fileobj")]
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    # What the repository already holds: an earlier push's adapter, which this model does not have.
    listed = ["config.json", "clip_adapter/adapter_config.json", "clip_adapter/adapter_model.safetensors"]
    create = mock.patch.multiple(
        HfApi,
        create_repo=lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"),
        list_repo_files=lambda self, repo_id, **kw: listed,
    )
    return create, mock.patch.object(HfApi, "create_commit", fake_create_commit)


def push_run(out, synthetic_data, tiny_clip_dir) -> tuple:
    """`run_train.push_model` on a finished run's folder, to a fake Hub: the run's arguments and what was sent."""
    import run_train

    args = run_train.parse_args(
        train_args(synthetic_data, tiny_clip_dir, out, "--resume_from_checkpoint", "latest")
    )
    args.hub_model_id, args.hub_token = "someone/clipseg-demo", "hf_test"
    sent = {}
    create, commit = fake_hub(sent)
    with create, commit:
        run_train.push_model(args)
    return args, sent


def test_push_sends_the_saved_model_only_never_other_files_or_a_link_target(
    tmp_path, synthetic_data, tiny_clip_dir
):
    out = tmp_path / "out"
    result = run_script(train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "2"))
    assert result.returncode == 0, result.stderr[-4000:]
    # What the user keeps in the folder, and what an attacker might plant there: never uploaded.
    (out / "notes.txt").write_text("private")
    (out / ".env").write_text("HF_TOKEN=secret")
    (out / "passwd").symlink_to("/etc/passwd")

    from huggingface_hub import ModelCard

    import run_train
    from clipseg_tools.errors import CommandError

    args, sent = push_run(out, synthetic_data, tiny_clip_dir)
    assert sent["repo"] == "someone/clipseg-demo"
    names = set(sent["files"])
    assert SAVED_MODEL_FILES <= names
    assert {"processor_config.json", "tokenizer.json", "all_results.json", "training_log.json"} <= names
    assert not names & {"notes.txt", ".env", "passwd", "run_files.json"}
    # An earlier push's adapter would load with these weights: the same commit deletes it.
    assert sent["deleted"] == ["clip_adapter/adapter_config.json", "clip_adapter/adapter_model.safetensors"]
    assert not any(name.startswith("checkpoints/") for name in names)
    card = ModelCard(Path(sent["files"]["README.md"]).read_text())  # as uploaded: its metadata parses
    assert card.data.eval_results and card.data.pipeline_tag == "image-segmentation"

    # A saved file replaced by a link (to a system file): refused, nothing sent.
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to("/etc/passwd")
    sent.clear()
    create, commit = fake_hub(sent)
    with create, commit, pytest.raises(CommandError, match="tokenizer.json is a symbolic link"):
        run_train.push_model(args)
    assert not sent


def test_a_push_that_cannot_work_is_refused_before_training(tmp_path, synthetic_data, tiny_clip_dir, capsys):
    from huggingface_hub import HfApi, constants

    import run_train
    from clipseg_tools.hub import hub_access_problem

    argv = train_args(
        synthetic_data, tiny_clip_dir, tmp_path / "out", "--push_to_hub", "--hub_model_id", "a/b"
    )
    with mock.patch.object(constants, "HF_HUB_OFFLINE", True), pytest.raises(SystemExit) as stop:
        run_train.parse_args(argv)
    assert stop.value.code == 2
    assert "--push_to_hub: HF_HUB_OFFLINE is set" in capsys.readouterr().err

    def refused(self):
        raise OSError("401 Unauthorized")

    with mock.patch.object(constants, "HF_HUB_OFFLINE", False), mock.patch.object(HfApi, "whoami", refused):
        assert "(OSError: 401 Unauthorized); log in with `hf auth login`" in hub_access_problem("bad")

    def account(role):
        return lambda self: {"name": "someone", "auth": {"accessToken": {"role": role}}}

    online = mock.patch.object(constants, "HF_HUB_OFFLINE", False)
    with online, mock.patch.object(HfApi, "whoami", account("read")):
        assert "the token is read-only" in hub_access_problem("read-only")
    with online, mock.patch.object(HfApi, "whoami", account("write")):
        assert hub_access_problem("good") is None
        assert run_train.parse_args(argv).push_to_hub
    # Only the first process asks the Hub (its account endpoint is rate-limited).
    with mock.patch.object(constants, "HF_HUB_OFFLINE", True), mock.patch.dict(os.environ, {"RANK": "1"}):
        assert run_train.parse_args(argv).push_to_hub


def test_a_failed_push_says_where_the_model_is_and_how_to_push_it(tmp_path):
    from huggingface_hub import HfApi

    from clipseg_tools.errors import FAILED, CommandError
    from clipseg_tools.hub import push_folder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    (tmp_path / "out" / "README.md").write_text("card")

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    with mock.patch.object(HfApi, "create_repo", unreachable), pytest.raises(CommandError) as failed:
        push_folder(tmp_path / "out", "someone/model", files=["config.json", "README.md"], private=True)
    assert failed.value.exit_code == FAILED
    assert "--push_to_hub someone/model failed (ConnectionError: Name or service not known)" in str(
        failed.value
    )
    retry = (
        f"`hf upload someone/model {tmp_path / 'out'} --private --include README.md --include config.json`"
    )
    assert f"The model in {tmp_path / 'out'} is complete; push it later with {retry}" in str(failed.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt_template", "fancy"], "invalid choice: 'fancy'"),
        (
            ["--per_device_train_batch_size", "7", "--phrases_per_image", "2"],
            "is not divisible by --phrases_per_image",
        ),
        (["--resume_from_checkpoint", "{tmp}"], "is not a checkpoint of this script"),
        (["--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead needs --compile"),
        (
            ["--compile", "--compile_mode", "reduce-overhead", "--gradient_accumulation_steps", "2"],
            "drop --gradient_accumulation_steps",
        ),
    ],
)
def test_bad_arguments_end_with_a_clear_message(tmp_path, synthetic_data, tiny_clip_dir, extra, message):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    result = run_script(
        train_args(synthetic_data, tiny_clip_dir, tmp_path / "out", "--max_train_steps", "2", *extra)
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "usage:" not in result.stderr  # the sentence, not buried under fifty options


def test_help_shows_the_defaults(capsys):
    import run_eval
    import run_train

    text = " ".join(run_train.build_parser().format_help().split())
    for shown in ("--image_size IMAGE_SIZE input size of a new model (pixels) (default: 352)",
                  "--num_warmup_steps NUM_WARMUP_STEPS linear warm-up steps (default: 0)",
                  "--adam_beta1 ADAM_BETA1 (default: 0.9)"):  # fmt: skip
        assert shown in text
    assert "(default: None)" not in text and "(default: False)" not in text
    with mock.patch("sys.argv", ["run_eval.py", "--help"]), pytest.raises(SystemExit):
        run_eval.parse_args()
    text = " ".join(capsys.readouterr().out.split())
    assert "--split SPLIT the split scored (default: test)" in text and "(default: None)" not in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_train_steps", "5", "--image_size", "64"], "drop --image_size, --max_train_steps"),
        (["--data_dir", "{tmp}"], "drop --data_dir"),
        (["--output_dir", "{tmp}/run"], "--output_dir {tmp}/run holds a run"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--resume_from_checkpoint", "{tmp}"], "is not a checkpoint of this script"),
    ],
)
def test_the_demo_refuses_flags_it_would_override_and_a_folder_holding_a_run(
    tmp_path, capsys, extra, message
):
    import run_train

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    with pytest.raises(SystemExit) as stop:
        run_train.parse_args(["--demo", "--output_dir", str(tmp_path / "demo"), *extra])
    assert stop.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_a_decoder_the_clip_cannot_feed_is_named_by_its_flag_and_leaves_no_folder(
    tmp_path, synthetic_data, tiny_clip_dir
):
    out = tmp_path / "out"
    result = run_script(train_args(synthetic_data, tiny_clip_dir, out, "--extract_layers", "0", "5"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "error: --extract_layers [0, 5] reach beyond the vision tower: its blocks are 0..2" in result.stderr
    )
    assert "Traceback" not in result.stderr and not out.exists()  # a failed run leaves no empty folder


def test_a_stock_checkpoint_whose_logits_are_not_at_the_input_size_is_refused_for_training(tmp_path):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    import run_train
    from clipseg_tools.errors import CommandError

    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=32
    )
    text = dict(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        extract_layers=[0, 1],
        reduce_dim=16,
        use_complex_transposed_convolution=True,
    )
    CLIPSegForImageSegmentation(config).save_pretrained(tmp_path / "stock")
    args = run_train.build_parser().parse_args(
        ["--model_name_or_path", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "out")]
    )
    with pytest.raises(
        CommandError, match="transformers' refined head for patch size 32, which upsamples by 64"
    ):
        run_train.build_model(args)


def test_checkpoints_of_the_first_state_format_still_resume_and_others_are_named(tmp_path):
    from clipseg_tools import checkpoints
    from clipseg_tools.errors import CommandError

    class Restored:  # what `load` asks of the Accelerator once the state is checked
        def load_state(self, folder):
            self.files = sorted(os.listdir(folder))

    # The first format: the step as `step`, the precision and image storage not recorded.
    first = {
        "step": 6,
        "consumed_batches": 30,
        "nonfinite_losses": 0,
        "log_history": [],
        "model_source": "clip",
    }
    (tmp_path / "trainer_state.json").write_text(json.dumps(first))
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (tmp_path / name).write_bytes(b"")
    current = checkpoints.TrainerState(
        model_source="clip", backbone_dtype="bfloat16", shrink_train_images=False
    )
    accelerator = Restored()
    state = checkpoints.load(accelerator, tmp_path, current)
    # Accelerate sees what it loads safely; the first format's pickled schedule is left out (the step sets it).
    assert accelerator.files == ["model.safetensors", "optimizer.bin", "random_states_0.pkl"]
    assert (state.global_step, state.consumed_batches) == (6, 30)
    assert (state.backbone_dtype, state.shrink_train_images) == ("bfloat16", False)  # on record from now on
    with pytest.raises(CommandError, match="trained from 'clip', this run starts from 'other'"):
        checkpoints.load(accelerator, tmp_path, checkpoints.TrainerState(model_source="other"))
    (tmp_path / "trainer_state.json").write_text(json.dumps({**first, "epoch": 2}))
    with pytest.raises(
        CommandError, match="trainer_state.json has fields this version of run_train.py does not"
    ):
        checkpoints.load(accelerator, tmp_path, current)


def test_missing_data_dir_is_named(tmp_path, tiny_clip_dir):
    result = run_script(train_args(tmp_path / "nowhere", tiny_clip_dir, tmp_path / "out"))
    assert result.returncode == 2
    assert "--data_dir" in result.stderr and "nowhere" in result.stderr


@pytest.mark.parametrize(
    "flag, folder, message",
    [
        ("--model_name_or_path", "missing", "no such folder"),
        ("--model_name_or_path", "out/checkpoints/step_5", "is a training checkpoint"),
        ("--clip_model_name_or_path", "out", "is not a model folder (no config.json)"),
    ],
)
def test_a_model_that_cannot_load_is_named_before_any_work(
    tmp_path, synthetic_data, capsys, flag, folder, message
):
    import run_train

    (tmp_path / "out" / "checkpoints" / "step_5").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "step_5" / "trainer_state.json").write_text("{}")
    argv = [
        "--data_dir",
        str(synthetic_data),
        "--output_dir",
        str(tmp_path / "run"),
        flag,
        str(tmp_path / folder),
    ]
    with pytest.raises(SystemExit) as stop:
        run_train.parse_args(argv)
    assert stop.value.code == 2
    assert f"{flag} {tmp_path / folder}: {message}" in capsys.readouterr().err


def test_a_hub_id_that_is_not_cached_offline_is_named_with_the_way_to_get_it():
    from clipseg_tools.sources import model_source_problem

    problem = model_source_problem("nobody/no-such-model")  # HF_HUB_OFFLINE=1 in the tests
    assert problem.startswith("is no local folder, and as a Hub id it could not be found")
    assert "`hf download nobody/no-such-model --local-dir DIR`" in problem


def test_data_loader_workers_default_to_the_cpus_each_process_may_use(tmp_path, tiny_clip_dir, monkeypatch):
    import run_eval
    import run_train
    from clipseg_tools import loader

    usable_cpus = loader.usable_cpus

    def machine(cpus, processes):
        monkeypatch.setattr(loader, "usable_cpus", lambda: cpus)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        return loader.default_num_workers()

    assert machine(16, 1) == 15  # one CPU left for the training process's own thread
    assert machine(16, 4) == 3
    assert machine(4, 4) == 0  # one CPU each: data loads in the training process
    assert machine(128, 1) == loader.MAX_DEFAULT_WORKERS
    assert machine(4, "") == 3  # LOCAL_WORLD_SIZE set but empty: one process

    # The CPUs: those the process may run on, or its container's quota when smaller.
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path / "cpu.max") == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path / "cpu.max") == 8
    assert usable_cpus(tmp_path / "absent") == 8
    machine(8, 2)
    given = train_args(tmp_path, tiny_clip_dir, tmp_path / "out")
    at = given.index("--dataloader_num_workers")
    del given[at : at + 2]
    assert run_train.parse_args(given).dataloader_num_workers == 3
    assert run_train.parse_args([*given, "--dataloader_num_workers", "0"]).dataloader_num_workers == 0
    assert run_eval.parse_args(["--model", str(tiny_clip_dir), "--data_dir", str(tmp_path)]).num_workers == 3


@pytest.mark.parametrize(
    "script, flag", [("run_train", "--dataloader_num_workers"), ("run_eval", "--num_workers")]
)
def test_negative_worker_counts_are_refused_by_name(tmp_path, tiny_clip_dir, capsys, script, flag):
    import run_eval
    import run_train

    if script == "run_train":
        argv = train_args(tmp_path, tiny_clip_dir, tmp_path / "out", flag, "-1")
        parse = run_train.parse_args
    else:
        argv = ["--model", str(tiny_clip_dir), "--data_dir", str(tmp_path), flag, "-1"]
        parse = run_eval.parse_args
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    assert f"{flag} must not be negative" in capsys.readouterr().err


def tiny_training(tiny_clip_dir, **accelerator_options):
    """A tiny model and its fused optimizer prepared by Accelerate on the CPU, and a fresh loss tally."""
    from accelerate import Accelerator

    from clipseg_tools.training import LossTally, make_optimizer
    from modeling_clipseg_custom import ClipSegCustomModel

    model = ClipSegCustomModel.from_clip(
        str(tiny_clip_dir), image_size=32, reduce_dim=16, extract_layers=[0, 1]
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    accelerator = Accelerator(cpu=True, **accelerator_options)
    model, optimizer = accelerator.prepare(model, make_optimizer(trainable, 1e-2, 1e-4))
    return accelerator, model, optimizer, trainable, LossTally.on(accelerator.device)


def step(accelerator, model, optimizer, batch, tally):
    """run_train.py's training step, as its loop calls it with --max_grad_norm 1."""
    from clipseg_tools.training import training_step

    training_step(accelerator, model, optimizer, batch, tally, max_grad_norm=1.0)


def tiny_batch(labels):
    import torch

    return {
        "pixel_values": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
        "input_ids": torch.tensor([[0, 5, 6, 1], [0, 7, 1, 1]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "image_index": torch.tensor([0, 1]),
        "labels": labels,
    }


def pc_plus_batch(labels):
    """tiny_batch with an example image for its second phrase (PC+), as collate_training makes it."""
    import torch

    return {
        **tiny_batch(labels),
        "conditional_pixel_values": torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8),
        "visual_index": torch.tensor([1]),
        "text_weight": torch.tensor([1.0, 0.3]),
    }


def test_pc_plus_mixes_each_phrase_with_its_example_image_and_leaves_the_others_alone(tiny_clip_dir):
    import torch

    from clipseg_tools.transforms import model_inputs

    model = tiny_training(tiny_clip_dir)[1]
    batch = model_inputs(pc_plus_batch(torch.rand(2, 32, 32) > 0.5), "cpu")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        mixed = model(
            pixel_values=batch["pixel_values"],
            input_ids=ids,
            conditional_pixel_values=batch["conditional_pixel_values"],
            visual_index=batch["visual_index"],
            text_weight=batch["text_weight"],
            image_index=batch["image_index"],
        ).conditional_embeddings
        text_only = model.text_embeddings(ids[:1], mask[:1])
        own_mix = model(
            pixel_values=batch["pixel_values"][1:],
            input_ids=ids[1:],
            attention_mask=mask[1:],
            conditional_pixel_values=batch["conditional_pixel_values"],
            text_weight=0.3,
        ).conditional_embeddings
    assert torch.allclose(mixed[0], text_only[0], atol=1e-6)
    assert torch.allclose(mixed[1], own_mix[0], atol=1e-6)
    assert not torch.allclose(mixed[1], model.text_embeddings(ids[1:], mask[1:])[0], atol=1e-3)


def test_non_finite_losses_skip_their_steps_on_the_device_are_counted_and_stop_the_run(tiny_clip_dir, caplog):
    import torch

    from clipseg_tools.checkpoints import TrainerState
    from clipseg_tools.errors import CommandError
    from clipseg_tools.training import count_skipped_steps

    accelerator, model, optimizer, trainable, tally = tiny_training(tiny_clip_dir)
    broken = tiny_batch(torch.full((2, 32, 32), float("nan")))  # a broken target: the loss is NaN
    finite = tiny_batch(torch.rand(2, 32, 32) > 0.5)
    weights = lambda: [p.detach().clone() for p in trainable]  # noqa: E731
    before = weights()
    state = TrainerState()

    step(accelerator, model, optimizer, broken, tally)
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))  # not trained on
    assert all(p.grad is None for p in trainable)  # its non-finite gradients are dropped
    assert all(optimizer.state[p]["step"] == 0 for p in trainable)  # nor counted as an Adam step
    assert tally.skipped == 1 and tally.batches == 0 and tally.loss == 0
    state.global_step = 1
    count_skipped_steps(tally, state, max_nonfinite_losses=1)
    assert state.nonfinite_losses == 1 and tally.skipped == 0
    assert "steps 1-1: 1 optimizer step(s) skipped for a non-finite loss" in caplog.text
    caplog.clear()

    step(accelerator, model, optimizer, finite, tally)
    assert not any(torch.equal(a, b) for a, b in zip(before, weights()))  # the next step trains
    assert all(optimizer.state[p]["step"] == 1 for p in trainable)
    assert tally.batches == 1 and 0 < tally.loss < 10
    state.global_step = 2
    count_skipped_steps(tally, state, max_nonfinite_losses=1)
    assert state.nonfinite_losses == 1 and caplog.text == ""

    step(accelerator, model, optimizer, broken, tally)
    state.global_step = 3
    with pytest.raises(CommandError, match="2 non-finite losses .*--max_nonfinite_losses 1"):
        count_skipped_steps(tally, state, max_nonfinite_losses=1)


def test_with_accumulation_a_non_finite_batch_skips_its_whole_optimizer_step(tiny_clip_dir):
    import torch

    accelerator, model, optimizer, trainable, tally = tiny_training(
        tiny_clip_dir, gradient_accumulation_steps=2
    )
    broken = tiny_batch(torch.full((2, 32, 32), float("nan")))
    finite = tiny_batch(torch.rand(2, 32, 32) > 0.5)
    before = [p.detach().clone() for p in trainable]
    for batch in (broken, finite):  # the finite batch after it belongs to the same optimizer step
        step(accelerator, model, optimizer, batch, tally)
    assert all(torch.equal(a, p) for a, p in zip(before, trainable))
    assert tally.skipped == 1 and tally.batches == 1 and not tally.step_nonfinite
    for _ in range(2):  # the next optimizer step trains again
        step(accelerator, model, optimizer, finite, tally)
    assert not all(torch.equal(a, p) for a, p in zip(before, trainable))
    assert tally.skipped == 1 and tally.batches == 3


def skip_together_when_one_process_has_a_nan(tiny_clip_dir):
    """Run by two processes: process 0's batch has a NaN loss, process 1's a finite one."""
    import torch

    torch.manual_seed(0)
    accelerator, model, optimizer, trainable, tally = tiny_training(tiny_clip_dir)
    assert accelerator.num_processes == 2
    labels = torch.rand(2, 32, 32) > 0.5
    broken = tiny_batch(torch.full((2, 32, 32), float("nan")) if accelerator.process_index == 0 else labels)
    before = [p.detach().clone() for p in trainable]
    step(accelerator, model, optimizer, broken, tally)
    assert all(torch.equal(a, p) for a, p in zip(before, trainable)), "a process stepped"
    assert tally.skipped == 1
    step(accelerator, model, optimizer, tiny_batch(labels), tally)
    assert not all(torch.equal(a, p) for a, p in zip(before, trainable))
    assert tally.skipped == 1
    checksums = accelerator.gather(sum(p.detach().double().sum() for p in trainable).reshape(1))
    assert checksums[0] == checksums[1], "the processes' weights parted"


def test_one_process_non_finite_loss_skips_the_step_on_every_process(tiny_clip_dir):
    run_on_two_processes(
        "test_train", "skip_together_when_one_process_has_a_nan", str(tiny_clip_dir), timeout=180
    )


def test_the_training_loader_leaves_its_batches_on_the_host(tiny_clip_dir):
    """`model_inputs` moves them without blocking; Accelerate's placement would wait for the device."""
    import torch
    from torch.utils.data import DataLoader

    from clipseg_tools.training import prepare_for_training

    accelerator, model, optimizer, trainable, tally = tiny_training(tiny_clip_dir)
    loader = DataLoader([torch.zeros(2)] * 4, batch_size=2)
    *_, prepared = prepare_for_training(accelerator, model, optimizer, loader)
    assert prepared.device is None and len(list(prepared)) == 2


@pytest.mark.parametrize("prompts", ["phrases", "phrases and example images"])
def test_a_training_step_reads_nothing_back_from_the_device(tiny_clip_dir, monkeypatch, prompts):
    """On a GPU every read of a tensor's value by the host waits for the device; a training step makes none
    (logs and checkpoints read the tally's sums, once per log), with example images (PC+) too."""
    import traceback

    import torch

    accelerator, model, optimizer, trainable, tally = tiny_training(
        tiny_clip_dir, gradient_accumulation_steps=2
    )
    batch = (tiny_batch if prompts == "phrases" else pc_plus_batch)(torch.rand(2, 32, 32) > 0.5)
    for _ in range(2):  # the optimizer's state made
        step(accelerator, model, optimizer, batch, tally)

    def guarded(name):
        original = getattr(torch.Tensor, name)

        def read_back(tensor, *args, **kwargs):
            # The model checks image_index's values only when it is on the CPU (on a GPU: not read back).
            if traceback.extract_stack(limit=2)[0].name != "_check_image_index":
                raise AssertionError(f"the host read a tensor's value ({name})")
            return original(tensor, *args, **kwargs)

        return read_back

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    for _ in range(2):  # a batch inside an accumulation, then one with the optimizer step
        step(accelerator, model, optimizer, batch, tally)
    monkeypatch.undo()
    assert tally.batches == 4


def test_pc_plus_trains_on_batches_from_a_data_loader_worker(tmp_path, synthetic_data, tiny_clip_dir):
    out = tmp_path / "pc_plus"
    extra = ["--max_train_steps", "3", "--mix_visual_prompts", "--dataloader_num_workers", "1"]
    result = run_script(train_args(synthetic_data, tiny_clip_dir, out, *extra))
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [e["train_loss"] for e in json.loads((out / "training_log.json").read_text())["log_history"]]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)


def test_low_precision_backbone_trains_and_the_saved_model_keeps_the_float32_clip(
    tmp_path, synthetic_data, tiny_clip_dir
):
    out = tmp_path / "bf16_backbone"
    result = run_script(
        train_args(
            synthetic_data, tiny_clip_dir, out, "--max_train_steps", "4", "--backbone_dtype", "bfloat16"
        )
    )
    assert result.returncode == 0, result.stderr[-4000:]
    saved = load_file(out / "model.safetensors")
    original = load_file(tiny_clip_dir / "model.safetensors")
    clip_keys = [k for k in saved if k.startswith("clip.")]
    assert len(clip_keys) == len(original)
    for key in clip_keys:  # the published CLIP is the starting float32 one, not its bf16 training copy
        assert saved[key].dtype == original[key[5:]].dtype and torch_equal(saved[key], original[key[5:]]), key
    checkpoint = load_file(next((out / "checkpoints" / "step_4").glob("*.safetensors")))
    decoder = {k: v for k, v in saved.items() if k.startswith("decoder.")}
    assert decoder.keys() == checkpoint.keys() and all(
        torch_equal(decoder[k], checkpoint[k]) for k in decoder
    )
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in decoder.values())
    losses = [e["train_loss"] for e in json.loads((out / "training_log.json").read_text())["log_history"]]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)

    # Continuing it in another precision would not continue the same run: refused, the flag named.
    resumed = run_script(
        train_args(
            synthetic_data, tiny_clip_dir, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest",
        )
    )  # fmt: skip
    assert resumed.returncode != 0 and "--backbone_dtype bfloat16" in resumed.stderr, resumed.stderr[-2000:]


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path, synthetic_data, tiny_clip_dir):
    """Towers, decoder and loss compiled by inductor (forward and backward): the same losses as eager."""
    logs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        out = tmp_path / name
        result = run_script(train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "3", *extra))
        assert result.returncode == 0, result.stderr[-4000:]
        log = json.loads((out / "training_log.json").read_text())["log_history"]
        logs[name] = [entry["train_loss"] for entry in log]
    assert logs["compiled"] == pytest.approx(logs["eager"], rel=1e-4)

    # Two processes (DDP around the compiled model): it trains, and both hold the same decoder.
    out = tmp_path / "compiled_ddp"
    result = run_script(
        train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "3", "--compile"),
        launcher=two_process_launcher(29531),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert results["decoder_checksum_per_process"][0] == results["decoder_checksum_per_process"][1]


def test_export_onnx_saves_graphs_beside_the_model_and_pushes_them(tmp_path, synthetic_data, tiny_clip_dir):
    """`--export_onnx`: the saved model's graphs in onnx/, listed with the model's files (pushed with them,
    removed by an overwrite, never foreign), giving the saved model's maps with onnxruntime."""
    import numpy as np
    from PIL import Image

    from clipseg_tools import run_folder
    from clipseg_tools.onnx_runtime import OnnxClipSeg, onnx_folder
    from modeling_clipseg_custom import ClipSegCustomModel

    out = tmp_path / "out"
    argv = train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "2", "--export_onnx")
    result = run_script(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    listed = run_folder.model_files(out)
    assert {"onnx/vision.onnx", "onnx/image_prompt_int8.onnx", "onnx/onnx_config.json"} <= set(listed)
    assert run_folder.foreign_entries(out) == [] and not (out / ".partial").exists()
    settings = json.loads((out / "onnx" / "onnx_config.json").read_text())
    assert settings["source"] == "out"  # the run's name, not the folder it was written in
    assert 'OnnxSegmenter("out", precision="int8")' in (out / "README.md").read_text()

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    prompts = ["red circle", "blue square"]
    expected = ClipSegCustomModel.from_pretrained(out).eval().predict(photo, prompts)[0].numpy()
    got = OnnxClipSeg(onnx_folder(out)).predict(photo, prompts)[0]
    assert np.abs(got - expected).max() < 1e-5

    args, sent = push_run(out, synthetic_data, tiny_clip_dir)
    assert {"onnx/decoder.onnx", "onnx/decoder_int8.onnx", "onnx/tokenizer.json"} <= set(sent["files"])
    assert "onnx" in run_folder.remove_run(out) and not (out / "onnx").exists()
