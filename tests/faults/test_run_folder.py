"""A run folder belongs to one run: another run's folder is refused unless resume= continues it or
overwrite=true replaces it; two trainings at once are refused by RUN/.lock (a stale lock is taken
over); resume refuses shards other than the checkpoint's, and accepts them rebuilt byte-identical."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.config import load_config
from toolkit.data.digits import ATTRIBUTES, SPLITS, digit_samples
from toolkit.data.shards import write_split
from toolkit.errors import UserError
from toolkit.train import CHECKPOINTS, LOCK, train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def config(shards, run_dir, *extra):
    return load_config(
        [
            "recipe=digits",
            f"run_dir={run_dir}",
            f"data.shards={shards}",
            "batch_size=16",
            "max_steps=2",
            "checkpoint_every=1",
            "log_every=1",
            "sample_every=1000",
            "data.num_workers=0",
            *extra,
        ]
    )


def test_another_run_is_refused_unless_resumed_or_replaced(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(config(digits_shards, run_dir, "max_steps=3"))
    for extra in ([], ["beta=0.1"], ["max_steps=5"]):  # the same run again, other settings, more steps
        with pytest.raises(
            UserError, match="already holds a finished model .* and 3 checkpoint.*resume=latest.*overwrite=true"
        ):
            train(config(digits_shards, run_dir, "max_steps=3", *extra))
    # resume= continues it
    train(config(digits_shards, run_dir, "max_steps=4", "resume=latest"))
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir()) == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]
    # overwrite=true replaces it: the old checkpoints, samples and logs go too
    old_logs = set((run_dir / "logs").rglob("events.out.tfevents*"))
    train(config(digits_shards, run_dir, "beta=0.1", "overwrite=true", "max_steps=1"))
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir()) == ["checkpoint-1"]
    assert not old_logs & set((run_dir / "logs").rglob("events.out.tfevents*"))
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "beta: 0.1" in recipe and "overwrite: false" in recipe  # a saved recipe never carries the deletion
    assert json.loads((run_dir / "config.json").read_text())["extra"]["step"] == 1


def test_a_file_managers_debris_neither_refuses_the_run_folder_nor_is_deleted(digits_shards, tmp_path):
    """A run folder a Mac user had looked at in Finder (.DS_Store, written again at once if deleted)
    was refused as 'holds files that are not a cvae-tk run's', also with overwrite=true."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".DS_Store").write_bytes(b"\0")
    (run_dir / "Thumbs.db").write_bytes(b"\0")
    train(config(digits_shards, run_dir, "max_steps=2"))
    (run_dir / CHECKPOINTS / ".DS_Store").write_bytes(b"\0")
    train(config(digits_shards, run_dir, "max_steps=3", "resume=latest"))
    train(config(digits_shards, run_dir, "max_steps=1", "overwrite=true"))
    assert (run_dir / ".DS_Store").is_file() and (run_dir / "Thumbs.db").is_file()
    assert json.loads((run_dir / "config.json").read_text())["extra"]["step"] == 1


def test_a_checkpoint_of_another_folder_does_not_open_an_occupied_one(digits_shards, tmp_path):
    train(config(digits_shards, tmp_path / "a"))
    train(config(digits_shards, tmp_path / "b"))
    with pytest.raises(
        UserError, match="resume=.*checkpoint-2 is a checkpoint of another folder, and run_dir=.*already holds"
    ):
        train(
            config(
                digits_shards, tmp_path / "b", f"resume={tmp_path / 'a' / CHECKPOINTS / 'checkpoint-2'}", "max_steps=3"
            )
        )
    # into a new folder it starts from that checkpoint (fine-tuning)
    train(
        config(digits_shards, tmp_path / "c", f"resume={tmp_path / 'a' / CHECKPOINTS / 'checkpoint-2'}", "max_steps=3")
    )


def test_files_that_are_not_a_runs_are_refused_and_never_removed(digits_shards, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "recipe.yaml").write_text("beta: 0.3\n")
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(UserError, match=r"holds files that are not a cvae-tk run's \(notes.txt\)"):
            train(config(digits_shards, tmp_path, *extra))
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "recipe.yaml").is_file()
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda path, tmp: path.write_text("mine"), "is a file, expected a folder"),
        (lambda path, tmp: path.symlink_to(tmp / "gone"), "is a symbolic link to {tmp}/gone, which does not exist"),
        (lambda path, tmp: path.symlink_to(path), "is a symbolic link that leads back to itself"),
        (
            lambda path, tmp: ((tmp / "f").write_text("x"), path.symlink_to(tmp / "f")),
            "is a symbolic link to a file ({tmp}/f)",
        ),
        (lambda path, tmp: os.mkfifo(path), "is a named pipe, expected a folder"),
    ],
)
def test_a_run_dir_that_is_no_folder_is_said_for_what_it_is(digits_shards, tmp_path, make, words):
    """A run_dir that is a link to nothing (a disk not mounted) was reported as 'is a file' by the
    sweep's check, and by train as 'cannot create run_dir: File exists'; nothing there is changed."""
    from toolkit.run_folder import claim_run_dir

    run_dir = tmp_path / "run"
    make(run_dir, tmp_path)
    words = words.format(tmp=tmp_path)
    for attempt in (
        lambda: train(config(digits_shards, run_dir)),
        lambda: claim_run_dir(config(digits_shards, run_dir, "resume=latest"), run_dir, None),
    ):
        with pytest.raises(UserError) as caught:
            attempt()
        assert words in str(caught.value) and "\n" not in str(caught.value), caught.value
    assert os.path.lexists(run_dir) and not (tmp_path / "gone").exists()


def test_the_same_run_killed_before_its_first_checkpoint_starts_again(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(config(digits_shards, run_dir, "checkpoint_every=1000", "max_steps=1"))
    for name in ("model.safetensors", "config.json", CHECKPOINTS):  # what a kill before the first save leaves
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    with pytest.raises(UserError, match="a run with other settings \\(beta: 0.9 there, 0.5 now\\)"):
        train(config(digits_shards, run_dir, "beta=0.5"))
    # the same settings (more steps): nothing to lose, so it starts
    train(config(digits_shards, run_dir, "max_steps=2"))
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("recipe", ["max_steps: [", "- a list\n", "\xff\xfe", None])
def test_a_run_folder_whose_recipe_yaml_cannot_be_read_is_said_so(digits_shards, tmp_path, recipe):
    """It was said to be 'without its recipe.yaml' while naming that very file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if recipe is None:
        (run_dir / "recipe.yaml").mkdir()
    else:
        (run_dir / "recipe.yaml").write_bytes(recipe.encode("latin-1"))
    with pytest.raises(UserError) as caught:
        train(config(digits_shards, run_dir))
    assert "a run's files (recipe.yaml) whose recipe.yaml cannot be read" in str(caught.value)
    assert "without its recipe.yaml" not in str(caught.value) and (run_dir / "recipe.yaml").exists()


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_two_trainings_into_one_folder_the_second_is_refused_and_a_stale_lock_is_taken_over(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "toolkit.cli",
        "train",
        "recipe=digits",
        f"run_dir={run_dir}",
        f"data.shards={digits_shards}",
        "batch_size=16",
        "data.num_workers=0",
        "log_every=1",
        "sample_every=1000",
    ]
    first = subprocess.Popen(
        [*args, "max_steps=100000", "checkpoint_every=1"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(run_dir / CHECKPOINTS / "checkpoint-1" / "trainer_state.json", first)
        holder = json.loads((run_dir / LOCK).read_text())
        assert (holder["pid"], holder["host"]) == (first.pid, socket.gethostname())
        second = subprocess.run(
            [*args, "max_steps=3", "resume=latest"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: another training (pid {first.pid} on this machine) is writing run_dir={run_dir}: wait for it to end, "
            "or choose another run_dir (two at once in one folder would mix their checkpoints)"
        )
        os.kill(first.pid, signal.SIGKILL)  # leaves its lock behind
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == first.pid
    step = max(
        int(p.name.split("-")[1]) for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if not p.name.endswith(".tmp")
    )
    third = subprocess.run(
        [*args, f"max_steps={step + 1}", "resume=latest", "checkpoint_every=1000"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert (
        f"warning: taking over the stale lock {run_dir / LOCK} (pid {first.pid} is gone: a training that was killed)"
        in third.stderr
    )
    assert not (run_dir / LOCK).exists()  # released at the end


def test_a_lock_of_another_host_is_reported_and_the_lock_is_released_on_errors(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(UserError, match=f"locked by a training on elsewhere \\(pid 1\\).*delete {run_dir / LOCK}"):
        train(config(digits_shards, run_dir))
    (run_dir / LOCK).unlink()
    with pytest.raises(UserError, match="need about"):  # refused after the lock was taken
        train(config(digits_shards, run_dir, "model.latent_dim=1000000000"))
    assert not (run_dir / LOCK).exists()
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="need about"):
        train(config(digits_shards, tmp_path / "new", "model.latent_dim=1000000000"))
    assert not (tmp_path / "new").exists()  # a folder made only to be refused is removed again


def build(out, order=1):
    for split in SPLITS:
        samples = list(digit_samples(split, 32))[:: order if split == "train" else 1]
        write_split(samples, out, split, ATTRIBUTES, (32, 32), "scikit-learn digits", shard_size=1000)
    return out


def test_resume_refuses_other_shards_and_accepts_a_byte_identical_rebuild(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(config(digits_shards, run_dir))
    # the same names, counts and attributes, the images dealt to the shards in another order, under the
    # first build's manifest (tars replaced, the manifest kept): only the tars' bytes tell
    other = build(tmp_path / "reversed", order=-1)
    shutil.copy(digits_shards / "train" / "manifest.json", other / "train" / "manifest.json")
    with pytest.raises(
        UserError,
        match="the train split of data.shards=.*reversed is not the one it was trained on \\(train-00000.\\.tar holds other bytes",
    ):
        train(config(other, run_dir, "max_steps=3", "resume=latest"))
    fewer = tmp_path / "fewer"
    shutil.copytree(digits_shards, fewer)
    manifest = json.loads((fewer / "train" / "manifest.json").read_text())
    manifest["shards"]["train-000001.tar"] -= 1
    manifest["count"] -= 1
    (fewer / "train" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the train split .* is not the one it was trained on \\(its manifest differs"):
        train(config(fewer, run_dir, "max_steps=3", "resume=latest"))
    # byte-identical elsewhere: resumes
    train(config(build(tmp_path / "rebuilt"), run_dir, "max_steps=3", "resume=latest"))


def test_resume_accepts_a_checkpoint_from_before_manifests_held_checksums(digits_shards, tmp_path):
    # a checkpoint written when manifests had no `files`, resumed on the same shards rebuilt with them
    old = tmp_path / "old"
    shutil.copytree(digits_shards, old)
    for split in SPLITS:
        manifest = json.loads((old / split / "manifest.json").read_text())
        del manifest["files"]
        (old / split / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    train(config(old, run_dir))
    train(config(digits_shards, run_dir, "max_steps=3", "resume=latest"))
    # the same tars under a manifest whose recorded checksums are other: refused, naming them
    altered = tmp_path / "altered"
    shutil.copytree(digits_shards, altered)
    manifest = json.loads((altered / "train" / "manifest.json").read_text())
    first = next(iter(manifest["files"]))
    manifest["files"][first]["sha256"] = "0" * 64
    (altered / "train" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        UserError, match="is not the one it was trained on \\(the tars' recorded sha256 checksums differ"
    ):
        train(config(altered, run_dir, "max_steps=4", "resume=latest"))
