"""Nothing lost, nothing leaked, nothing run from a file: the output folder, checkpoints and resume under faults.

Runs are tiny (a few optimizer steps on the synthetic data and a tiny CLIP); a straight run's checkpoints are
copied into fresh folders and damaged, planted or cut short there, then resumed: the result must be the
straight run's weights, bit for bit, or a sentence that names the file.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from safetensors.torch import load_file
from test_train import REPO_ROOT, run_script, train_args

STEPS = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "0")


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


@pytest.fixture(scope="module")
def straight(synthetic_data, tiny_clip_dir, tmp_path_factory):
    """A run that was never stopped, with a checkpoint at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("straight") / "out"
    result = run_script(train_args(synthetic_data, tiny_clip_dir, out, *STEPS))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def interrupted_copy(straight: Path, folder: Path, steps=(2, 4)) -> Path:
    """The folder a run killed after its checkpoint at max(steps) leaves: checkpoints and nothing else."""
    for step in steps:
        shutil.copytree(straight / "checkpoints" / f"step_{step}", folder / "checkpoints" / f"step_{step}")
    return folder


def resume(synthetic_data, tiny_clip_dir, out, *extra, checkpoint="latest"):
    return run_script(
        train_args(
            synthetic_data, tiny_clip_dir, out, *STEPS, "--resume_from_checkpoint", str(checkpoint), *extra
        )
    )


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "flipped":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize(
    "name, how",
    [
        ("model.safetensors", "truncated"),
        ("optimizer.bin", "flipped"),
        ("random_states_0.pkl", "missing"),
        ("random_states_0.pkl", "flipped"),
        ("trainer_state.json", "truncated"),
        ("manifest.json", "truncated"),
    ],
)
def test_a_damaged_latest_checkpoint_is_named_and_the_run_resumes_exactly_from_the_one_before(
    tmp_path, synthetic_data, tiny_clip_dir, straight, name, how
):
    out = interrupted_copy(straight, tmp_path / "out")
    damage(out / "checkpoints" / "step_4" / name, how)
    result = resume(synthetic_data, tiny_clip_dir, out)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Passing over a damaged checkpoint" in result.stdout and name in result.stdout
    assert f"Resumed from {out / 'checkpoints' / 'step_2'} at step 2" in result.stdout
    assert same_weights(out, straight)

    # Asked for by name, the damaged checkpoint is refused with the file named (no fall-back).
    out = interrupted_copy(straight, tmp_path / "asked")
    damage(out / "checkpoints" / "step_4" / name, how)
    result = resume(synthetic_data, tiny_clip_dir, out, checkpoint=out / "checkpoints" / "step_4")
    assert result.returncode == 2 and name in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


class Payload:
    """What an attacker plants: unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path, synthetic_data, tiny_clip_dir, straight):
    from clipseg_tools import checkpoints

    marker = tmp_path / "payload_ran"
    out = interrupted_copy(straight, tmp_path / "out")
    # A custom state file beside the run's own (Accelerate unpickles those with safe loading off).
    (out / "checkpoints" / "step_4" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    # The random states replaced, and the manifest written again to match, as a careful attacker would.
    attacked = interrupted_copy(straight, tmp_path / "attacked")
    import torch

    torch.save({"random_state": Payload(marker)}, attacked / "checkpoints" / "step_4" / "random_states_0.pkl")
    checkpoints.write_manifest(attacked / "checkpoints" / "step_4")

    result = resume(synthetic_data, tiny_clip_dir, out)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "custom_checkpoint_0.pkl" in result.stdout and "ignored" in result.stdout
    assert f"Resumed from {out / 'checkpoints' / 'step_4'}" in result.stdout
    result = resume(synthetic_data, tiny_clip_dir, attacked)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "random_states_0.pkl holds more than tensors" in result.stdout
    assert not marker.exists(), "a pickled payload ran"
    assert same_weights(out, straight) and same_weights(attacked, straight)


def test_a_run_killed_inside_its_first_checkpoint_starts_again_with_latest(
    tmp_path, synthetic_data, tiny_clip_dir, straight
):
    out = tmp_path / "out"
    partial = out / "checkpoints" / ".step_2.partial"  # what a kill during the first save leaves
    shutil.copytree(straight / "checkpoints" / "step_2", partial)
    (partial / "manifest.json").unlink()
    plain = run_script(train_args(synthetic_data, tiny_clip_dir, out, *STEPS))
    assert plain.returncode == 2 and "--resume_from_checkpoint latest to continue it" in plain.stderr
    result = resume(synthetic_data, tiny_clip_dir, out)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "holds no complete checkpoint yet" in result.stdout and "starting from the beginning" in result.stdout
    )
    assert same_weights(out, straight)


def test_a_rewind_with_a_new_learning_rate_applies_it_whole_and_sets_later_checkpoints_aside(
    tmp_path, synthetic_data, tiny_clip_dir, straight
):
    import run_train

    out = interrupted_copy(straight, tmp_path / "out", steps=(2, 4, 6))
    result = resume(
        synthetic_data,
        tiny_clip_dir,
        out,
        "--learning_rate",
        "2e-3",
        checkpoint=out / "checkpoints" / "step_2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "changed settings, applied from step 2 on: --learning_rate 0.001 -> 0.002" in result.stdout
    aside = list((out / "checkpoints" / "set_aside").iterdir())
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_4", "step_6"]
    # 'latest' now means the rewound run: its step 6 carries the change.
    newest = json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert newest["setting_changes"] == [{"step": 2, "changed": {"learning_rate": [0.001, 0.002]}}]
    log = json.loads((out / "training_log.json").read_text())
    assert log["setting_changes"] == newest["setting_changes"]
    args = run_train.parse_args(train_args(synthetic_data, tiny_clip_dir, tmp_path / "x", *STEPS))
    args.learning_rate = 2e-3
    for entry in log["log_history"][2:]:  # the peak and the schedule both follow the new rate
        assert entry["learning_rate"] == pytest.approx(run_train.learning_rate_at(args, entry["step"]))
    assert not same_weights(out, straight)


def test_a_resume_on_another_number_of_processes_says_what_it_means(caplog):
    from clipseg_tools import checkpoints

    saved = checkpoints.TrainerState(global_step=4, settings={"num_processes": 2, "seed": 42})
    with caplog.at_level("WARNING"):
        checkpoints.note_changed_settings(saved, {"num_processes": 1, "seed": 42}, Path("step_4"))
    assert "--num_processes 2 -> 1" in caplog.text
    assert "exact resume needs the same number" in caplog.text
    assert saved.setting_changes == [{"step": 4, "changed": {"num_processes": [2, 1]}}]


def test_overwrite_removes_only_what_a_run_wrote_and_the_card_shows_no_local_path(
    tmp_path, synthetic_data, tiny_clip_dir, capsys
):
    import run_train

    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "data.csv").write_text("the user's")
    for times in ([], ["--overwrite_output_dir"]):
        with pytest.raises(SystemExit) as stop:
            run_train.parse_args(train_args(synthetic_data, tiny_clip_dir, out, *times))
        assert stop.value.code == 2
        assert "holds files that no run wrote (data.csv, mine)" in capsys.readouterr().err

    twice = run_script(
        train_args(
            synthetic_data,
            tiny_clip_dir,
            out,
            "--max_train_steps",
            "2",
            "--overwrite_output_dir",
            "--overwrite_output_dir",
        )  # fmt: skip
    )
    assert twice.returncode == 0, twice.stderr[-4000:]
    listed = json.loads((out / "run_files.json").read_text())["files"]
    assert "model.safetensors" in listed and "data.csv" not in listed
    again = run_script(
        train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "2", "--overwrite_output_dir")
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "removed the earlier run's" in again.stdout
    assert (out / "data.csv").read_text() == "the user's" and (out / "mine").is_dir()

    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "/tmp" not in card
    assert f'"clip_model_name_or_path": "{Path(tiny_clip_dir).name}"' in card
    assert '"output_dir"' not in card and '"cache_dir"' not in card


def read_only_folder(folder: Path):
    """`folder` on a read-only file system (a tmpfs mounted read-only), or made immutable; None if neither
    can be done here."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode == 0:
        return ["umount", str(folder)]
    frozen = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if frozen.returncode == 0:
        return ["chattr", "-i", str(folder)]
    return None


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(
    tmp_path, synthetic_data, tiny_clip_dir, capsys
):
    import run_train

    undo = read_only_folder(tmp_path / "ro")
    if undo is None:
        pytest.skip("neither a read-only mount nor an immutable folder can be made here")
    try:
        for out in (tmp_path / "ro", tmp_path / "ro" / "new" / "out"):
            with pytest.raises(SystemExit) as stop:
                run_train.parse_args(train_args(synthetic_data, tiny_clip_dir, out))
            assert stop.value.code == 2
            assert "is not writable" in capsys.readouterr().err
    finally:
        subprocess.run(undo, check=True)


def test_a_full_disk_while_preparing_data_or_saving_a_checkpoint_is_one_sentence(
    tmp_path, synthetic_data, tiny_clip_dir
):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
    ).returncode:
        pytest.skip("a small file system cannot be mounted here")
    try:  # the data's preparation, then (with the data cached elsewhere) the first checkpoint, fill the disk
        preparing = run_script(
            train_args(synthetic_data, tiny_clip_dir, small / "out", "--max_train_steps", "2")
        )
        cache = ("--cache_dir", str(tmp_path / "hf_cache"))
        saving = run_script(
            train_args(synthetic_data, tiny_clip_dir, small / "out", "--max_train_steps", "2", *cache)
        )
    finally:
        subprocess.run(["umount", str(small)], check=True)
    for result in (preparing, saving):
        assert result.returncode == 1, result.stderr[-3000:]
        assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "the disk is full" in result.stderr and "--resume_from_checkpoint latest" in result.stderr


def test_the_model_is_saved_before_the_final_evaluation_and_outlives_its_failure(
    tmp_path, synthetic_data, tiny_clip_dir
):
    import run_train
    from clipseg_tools.errors import FAILED, CommandError

    out = tmp_path / "out"
    argv = train_args(
        synthetic_data, tiny_clip_dir, out, "--max_train_steps", "2", "--dataloader_num_workers", "0"
    )
    full_shm = OSError(28, "No space left on device: '/dev/shm/torch_1234'")
    with (
        mock.patch.object(run_train, "run_evaluation", side_effect=full_shm),
        pytest.raises(CommandError) as failed,
    ):
        run_train.main(argv)
    assert failed.value.exit_code == FAILED
    assert f"the trained model is saved in {out} without scores" in str(failed.value)
    assert (out / "model.safetensors").is_file() and "No evaluation was run" in (
        out / "README.md"
    ).read_text()
    assert "eval_fgiou_0.3" not in json.loads((out / "all_results.json").read_text())

    # An evaluation split without images is found before any training.
    empty = train_args(synthetic_data, tiny_clip_dir, tmp_path / "empty", "--validation_split", "miniv")
    with pytest.raises(CommandError, match="--validation_split miniv has no images"):
        run_train.main(empty)
    assert not (tmp_path / "empty").exists()


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(
    tmp_path, synthetic_data, tiny_clip_dir
):
    from clipseg_tools.run_folder import LOCK_FILE, run_lock

    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out):
        result = run_script(train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "2"))
    assert result.returncode == 2
    assert f"is in use by a run that is still going (pid {os.getpid()}" in result.stderr
    assert not (out / "checkpoints").exists()

    (out / LOCK_FILE).write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")  # its run was killed
    result = run_script(train_args(synthetic_data, tiny_clip_dir, out, "--max_train_steps", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking over the lock of a run that ended without releasing it (pid 999999" in result.stdout
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_wait_past_the_timeout_names_the_processes_waited_for():
    from types import SimpleNamespace

    import run_train
    from clipseg_tools.errors import CommandError

    args = SimpleNamespace(ddp_timeout=15)
    accelerator = SimpleNamespace(num_processes=2, process_index=0)
    timed_out = RuntimeError("[gloo/unbound_buffer.cc:129] Timed out waiting 15000ms for send operation")
    with pytest.raises(
        CommandError, match="process 0 of 2 waited --ddp_timeout 15 s for process 1 and gave up"
    ):
        with run_train.waits_named(args, accelerator):
            raise timed_out
    with pytest.raises(RuntimeError, match="other"), run_train.waits_named(args, accelerator):
        raise RuntimeError("other")


def test_a_full_disk_or_shared_memory_ends_with_one_sentence(capsys):
    from clipseg_tools.cli import run_command

    failures = {
        "the disk is full writing /out/model.safetensors": OSError(
            28, "No space left on device", "/out/model.safetensors"
        ),
        "shared memory (/dev/shm) is full": RuntimeError(
            "DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that dataloader's workers are "
            "out of shared memory."
        ),
        "the disk is full": RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    }
    for said, error in failures.items():
        with pytest.raises(SystemExit) as stop:
            run_command(mock.Mock(side_effect=error))
        assert stop.value.code == 1
        assert said in capsys.readouterr().err
    with pytest.raises(ValueError):  # anything else keeps its traceback
        run_command(mock.Mock(side_effect=ValueError("a bug")))


def test_a_tracker_that_is_not_installed_is_refused_by_name(tmp_path, synthetic_data, tiny_clip_dir, capsys):
    import run_train

    argv = train_args(
        synthetic_data, tiny_clip_dir, tmp_path / "out", "--with_tracking", "--report_to", "wandb"
    )
    with mock.patch("accelerate.tracking.is_wandb_available", return_value=False), pytest.raises(SystemExit):
        run_train.parse_args(argv)
    assert (
        "--report_to wandb: the wandb package is not installed (pip install wandb)" in capsys.readouterr().err
    )


KILL_POINTS = [
    "half:model.safetensors@step_4",  # in the middle of each file of a checkpoint
    "half:optimizer.bin@step_4",
    "half:random_states_0.pkl@step_4",
    "half:trainer_state.json@step_4",
    "half:manifest.json@step_4",
    "before_rename:step_4",  # around the rename that completes it
    "after_rename:step_4",
    "remove_old",  # halfway through removing the checkpoint before it
    "half:model.safetensors@/.partial/",  # the final save: in the middle of a file
    "half:all_results.json@/.partial/",
    "merge:3",  # after 3 of its files got their place
    "before_eval",  # saved, not yet evaluated
    "merge:12",  # the card and results with the scores, halfway in
]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_at_any_point_of_a_save_resumes_to_the_same_weights_bitwise(
    tmp_path, synthetic_data, tiny_clip_dir, straight, point
):
    out = tmp_path / "out"
    keep = ("--checkpoints_total_limit", "1") if point == "remove_old" else ()
    argv = train_args(synthetic_data, tiny_clip_dir, out, *STEPS, *keep)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "kill_at.py"), point, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert killed.returncode == 9, f"not killed at {point}: {killed.stderr[-3000:]}"
    result = resume(synthetic_data, tiny_clip_dir, out, *keep)
    assert result.returncode == 0, result.stderr[-4000:]
    assert same_weights(out, straight)
    assert json.loads((out / "all_results.json").read_text()) == json.loads(
        (straight / "all_results.json").read_text()
    )
    assert not (out / ".partial").exists() and not (out / ".run.lock").exists()
