"""A full disk (ENOSPC) while a checkpoint, the final weights or the classifier is written: one clear
error, the previous checkpoint intact and resumable, nothing half-written under a final name.

ENOSPC is injected in-process, and made real: a small tmpfs mounted in a private mount namespace
(`unshare -m`, skipped where mounting is not allowed), where safetensors and torch.save fail with their
own exceptions (`SafetensorError: ... (os error 28)`, `RuntimeError: ... unexpected pos`), which
toolkit/atomic.py's `os_errors` turns into the OSError they stand for."""

import errno
import json
import os
from pathlib import Path

import accelerate.checkpointing as checkpointing
import pytest

from tests.faults.test_outputs import needs_mount, run_on_tmpfs
from tests.test_cli import assert_user_error
from toolkit import atomic
from toolkit.atomic import os_error_from, os_errors, save_state_dict
from toolkit.formats import CLASSIFIER_WEIGHTS, CONFIG, WEIGHTS
from toolkit.train import CHECKPOINTS, find_checkpoint, main


def args(shards, run_dir, *extra):
    return [
        "recipe=digits",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        "batch_size=16",
        "log_every=2",
        "sample_every=1000",
        "data.num_workers=0",
        "checkpoint_every=2",
        *extra,
    ]


def test_enospc_while_saving_a_checkpoint_stops_clearly_and_keeps_the_previous_one(
    digits_shards, tmp_path, monkeypatch, capsys
):
    real_save, written = checkpointing.save, []

    def disk_full_on_the_second_checkpoint(obj, f, *rest, **kwargs):
        if "checkpoint-4.tmp" in str(f) and written:  # the model file of checkpoint 4 fits, the next file does not
            raise OSError(errno.ENOSPC, "No space left on device")
        if "checkpoint-4.tmp" in str(f):
            written.append(f)
        return real_save(obj, f, *rest, **kwargs)

    monkeypatch.setattr(checkpointing, "save", disk_full_on_the_second_checkpoint)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(args(digits_shards, run_dir, "max_steps=6"))
    assert stopped.value.code == 2  # a UserError: one line, not a traceback
    message = capsys.readouterr().err.strip().splitlines()[-1]  # (the progress bar comes first)
    assert message.startswith("error: ")
    for words in (
        "No space left on device",
        "ENOSPC",
        str(run_dir / CHECKPOINTS / "checkpoint-4.tmp"),
        "checkpoint-2",
        "resume=latest",
    ):
        assert words in message, (words, message)

    folder = run_dir / CHECKPOINTS
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2"]  # the part written is removed: it held space
    assert find_checkpoint(run_dir, "latest") == folder / "checkpoint-2"
    assert not (run_dir / "model.safetensors").exists()

    monkeypatch.setattr(checkpointing, "save", real_save)  # space freed: resume
    main(args(digits_shards, run_dir, "max_steps=6", "resume=latest"))
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((run_dir / "config.json").read_text())["extra"]["step"] == 6
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


# --- the libraries' own exceptions for a full disk, translated (toolkit/atomic.py: os_errors) -------------


def test_a_safetensors_error_carrying_an_os_error_becomes_that_os_error():
    from safetensors import SafetensorError

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    translated = os_error_from(full, "/somewhere/model.safetensors")
    assert isinstance(translated, OSError) and translated.errno == errno.ENOSPC
    assert translated.strerror == os.strerror(errno.ENOSPC) and translated.filename == "/somewhere/model.safetensors"
    assert os_error_from(
        SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
    ).errno == (errno.EROFS)
    with pytest.raises(OSError) as raised, os_errors("x"):
        raise full
    assert raised.value.errno == errno.ENOSPC and raised.value.__cause__ is full


def test_torch_saves_short_write_is_enospc_only_on_a_disk_with_no_room(tmp_path, monkeypatch):
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 952512 vs 952400")
    quota = os_error_from(short, tmp_path / "optimizer.bin")  # room left: a quota or size limit, still one line
    assert quota.errno == errno.EIO and "though the disk has room" in quota.strerror
    assert quota.filename == str(tmp_path / "optimizer.bin")
    assert os_error_from(short) is None  # no path: not known to be a write
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 0)
    translated = os_error_from(short, tmp_path / "checkpoint-4.tmp" / "optimizer.bin")  # not there yet: its disk
    assert translated.errno == errno.ENOSPC and translated.filename == str(
        tmp_path / "checkpoint-4.tmp" / "optimizer.bin"
    )


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), ValueError("os error"), KeyError("model.weight"), RuntimeError("unexpected pos")]
)
def test_any_other_exception_is_left_alone(error, monkeypatch):
    """A bug keeps its traceback, even on a full disk: only a writer's short write is the disk's doing."""
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 0)
    assert os_error_from(error) is None
    with pytest.raises(type(error)) as raised, os_errors():
        raise error
    assert raised.value is error


def test_save_state_dict_turns_a_safetensors_enospc_into_an_os_error_naming_the_final_file(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError) as raised:
        save_state_dict(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary


def test_the_final_weights_on_a_full_disk_stop_clearly_and_resume_latest_writes_them(
    digits_shards, tmp_path, monkeypatch, capsys
):
    import safetensors.torch
    from safetensors import SafetensorError

    run_dir = tmp_path / "run"
    real_save_file = safetensors.torch.save_file

    def full_for_the_final_weights(tensors, filename, metadata=None):
        if Path(filename).parent == run_dir:  # the checkpoints' files (under checkpoints/) fit
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_for_the_final_weights)
    with pytest.raises(SystemExit) as stopped:
        main(args(digits_shards, run_dir, "max_steps=2"))
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    for words in (
        "error: could not write the final model",
        str(run_dir / WEIGHTS),
        "No space left on device (ENOSPC)",
        str(run_dir / CHECKPOINTS / "checkpoint-2"),
        "resume=latest",
    ):
        assert words in message, (words, message)
    assert not (run_dir / WEIGHTS).exists() and not (run_dir / CONFIG).exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)  # space freed
    main(args(digits_shards, run_dir, "max_steps=2", "resume=latest"))
    assert json.loads((run_dir / CONFIG).read_text())["extra"]["step"] == 2
    assert (run_dir / WEIGHTS).stat().st_size > 0


def test_new_weights_whose_config_cannot_be_written_are_removed(digits_shards, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_write_text = Path.write_text

    def full_for_the_config(path, text, *args, **kwargs):
        if path.parent == run_dir and CONFIG in path.name:  # its temporary name
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write names no file
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_the_config)
    with pytest.raises(SystemExit) as stopped:
        main(args(digits_shards, run_dir, "max_steps=2"))
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(run_dir / CONFIG) in message and "ENOSPC" in message and "checkpoint-2" in message, message
    assert not (run_dir / WEIGHTS).exists() and not (run_dir / CONFIG).exists()


# --- a real full disk: a small tmpfs in a private mount namespace (`unshare -m`) ------------------------------


def assert_one_error_line(result, *fragments: str) -> str:
    """Exit 2, no traceback, and the one `error:` line last on stderr (the progress bar comes before it)."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def train_on_tmpfs(shards, tmp_path, size: str, *extra):
    """`cvae-tk train` (digits, batch 16) into MNT/run, MNT a `size` tmpfs; the result and MNT's listing."""
    mnt = tmp_path / "mnt"
    result = run_on_tmpfs(
        mnt,
        f"size={size}",
        ["train", *args(shards, mnt / "run", *extra)],
    )
    return mnt, result


# Sizes for the digits `paper` model: its model.safetensors is 625 KB, optimizer.bin 1.26 MB; the
# checkpoint of step 2 comes before any sample grid (they are written at the last step only).


@needs_mount
def test_a_real_full_disk_in_the_checkpoints_safetensors_is_one_line(digits_shards, tmp_path):
    mnt, result = train_on_tmpfs(digits_shards, tmp_path, "400k", "max_steps=4")
    assert_one_error_line(
        result,
        f"could not write the checkpoint {mnt / 'run' / CHECKPOINTS / 'checkpoint-2.tmp'}",
        "No space left on device (ENOSPC)",
        "there is no complete checkpoint yet",
        "resume=latest",
    )
    listing = result.listing
    assert not [name for name in listing if name.startswith("run/checkpoints/checkpoint-")]  # the part is removed
    assert "run/model.safetensors" not in listing


@needs_mount
def test_a_real_full_disk_in_the_checkpoints_torch_save_is_one_line(digits_shards, tmp_path):
    """The model fits, optimizer.bin does not: torch.save's 'unexpected pos', which carries no errno."""
    mnt, result = train_on_tmpfs(digits_shards, tmp_path, "1200k", "max_steps=4")
    assert_one_error_line(
        result,
        f"could not write the checkpoint {mnt / 'run' / CHECKPOINTS / 'checkpoint-2.tmp'}",
        "No space left on device (ENOSPC)",
    )
    listing = result.listing
    assert not [name for name in listing if name.startswith("run/checkpoints/checkpoint-")]  # the part is removed
    assert "run/model.safetensors" not in listing


@needs_mount
def test_a_real_full_disk_in_the_final_weights_is_one_line(digits_shards, tmp_path):
    """The checkpoint of step 2 (1.9 MB), the grids and their TensorBoard copies (~0.6 MB) fit in
    2700 KB; the final model.safetensors (625 KB) does not, flushed TensorBoard events or not."""
    mnt, result = train_on_tmpfs(digits_shards, tmp_path, "2700k", "max_steps=2")
    assert_one_error_line(
        result,
        f"could not write the final model {mnt / 'run' / WEIGHTS}",
        "No space left on device (ENOSPC)",
        str(mnt / "run" / CHECKPOINTS / "checkpoint-2"),
        "resume=latest",
    )
    listing = result.listing
    assert "run/checkpoints/checkpoint-2/trainer_state.json" in listing  # the last step's checkpoint is complete
    assert "run/model.safetensors" not in listing and "run/config.json" not in listing
    assert not [name for name in listing if name.startswith("run/.")]  # nor its temporary


@needs_mount
def test_a_real_full_disk_in_the_classifiers_weights_is_one_line(digits_shards, tmp_path):
    mnt = tmp_path / "mnt"
    result = run_on_tmpfs(
        mnt,
        "size=40k",
        ["classifier", "train", "recipe=digits", f"data.shards={digits_shards}", "--steps", 3, "--out", mnt / "c"],
    )
    line = assert_user_error(result, str(mnt / "c" / CLASSIFIER_WEIGHTS), "No space left on device (ENOSPC)")
    assert "free some space" in line
    assert not [name for name in result.listing if name.endswith((".safetensors", ".json", ".tmp"))]


def test_a_real_file_size_limit_in_the_checkpoints_torch_save_is_one_line(digits_shards, tmp_path):
    """Bytes refused with room left on the disk (a quota, a file size limit: here `ulimit -f`, which
    Python turns into EFBIG by ignoring SIGXFSZ): model.safetensors (625 KB) fits under 800 KB,
    optimizer.bin (1.26 MB) does not, and torch.save's 'unexpected pos' carries no errno."""
    import resource
    import subprocess

    from tests.faults.test_outputs import CLI, ENV

    limit = 800 * 1024
    result = subprocess.run(
        [*CLI, "train", *args(digits_shards, tmp_path / "run", "max_steps=4")],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=tmp_path,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert_one_error_line(
        result,
        f"could not write the checkpoint {tmp_path / 'run' / CHECKPOINTS / 'checkpoint-2.tmp'}",
        "the write fell short though the disk has room (a disk quota or file size limit reached?) (EIO)",
        "there is no complete checkpoint yet",
    )
    assert list((tmp_path / "run" / CHECKPOINTS).iterdir()) == []  # the part written is removed
    assert not (tmp_path / "run" / WEIGHTS).exists()
