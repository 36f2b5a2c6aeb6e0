"""A full disk (ENOSPC) while a checkpoint is written: one clear error, the previous checkpoint
intact and resumable, nothing half-written that resume=latest could pick."""

import errno
import json

import accelerate.checkpointing as checkpointing
import pytest

from toolkit.train import CHECKPOINTS, TRAINER_STATE, find_checkpoint, main


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
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-4.tmp"]
    assert not (folder / "checkpoint-4.tmp" / TRAINER_STATE).exists()
    assert find_checkpoint(run_dir, "latest") == folder / "checkpoint-2"
    assert not (run_dir / "model.safetensors").exists()

    monkeypatch.setattr(checkpointing, "save", real_save)  # space freed: resume
    main(args(digits_shards, run_dir, "max_steps=6", "resume=latest"))
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((run_dir / "config.json").read_text())["extra"]["step"] == 6
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
