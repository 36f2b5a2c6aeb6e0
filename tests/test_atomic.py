from pathlib import Path

import pytest

from toolkit.atomic import atomic_path, atomic_paths, check_output, write_text
from toolkit.errors import UserError


def test_success_renames_and_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    write_text(target, "old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"  # the previous file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # and no temporary file is left
    write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_files_written_together_are_renamed_only_when_all_are_written(tmp_path):
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    write_text(weights, "old weights")
    write_text(config, "old config")
    with pytest.raises(OSError):
        with atomic_paths(weights, config) as (weights_tmp, config_tmp):
            weights_tmp.write_text("new weights")
            raise OSError(28, "No space left on device")  # while writing the config
    assert weights.read_text() == "old weights" and config.read_text() == "old config"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with atomic_paths(weights, config) as (weights_tmp, config_tmp):
        weights_tmp.write_text("new weights")
        config_tmp.write_text("new config")
    assert weights.read_text() == "new weights" and config.read_text() == "new config"


def test_the_first_of_files_written_together_is_renamed_last(tmp_path, monkeypatch):
    import os

    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(b).name), real_replace(a, b)))
    with atomic_paths(tmp_path / "model.safetensors", tmp_path / "config.json") as temporaries:
        for path in temporaries:
            path.write_text("x")
    assert renamed == ["config.json", "model.safetensors"]  # the weights mark a finished set


@pytest.mark.parametrize("length", [250, 255])
def test_a_final_name_as_long_as_the_file_system_allows_is_written(tmp_path, length):
    # its hidden temporary name is longer than the final one: it is cut to fit, not refused
    target = tmp_path / ("x" * (length - 4) + ".png")
    check_output(target)
    write_text(target, "fits")
    assert target.read_text() == "fits" and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize("where", ["file", "folder on the way", "output folder"])
def test_a_name_longer_than_the_file_system_allows_is_refused_before_any_work(tmp_path, where):
    long = "y" * 300
    path, folder = {
        "file": (tmp_path / f"{long}.png", False),
        "folder on the way": (tmp_path / long / "grid.png", False),
        "output folder": (tmp_path / "runs" / long, True),
    }[where]
    with pytest.raises(
        UserError, match="the name 'y{40}...' is 30[04] bytes long, the file system .* takes at most 255"
    ):
        check_output(path, folder=folder)
    assert list(tmp_path.iterdir()) == []


def test_every_output_gets_the_mode_a_plain_open_gives(tmp_path):
    # safetensors creates its files 0600: a run's model.safetensors was unreadable to the other
    # users of a shared file system, while every other file was 0644
    import os

    import torch

    from toolkit.atomic import save_state_dict

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    save_state_dict(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    write_text(tmp_path / "config.json", "{}")
    expected = plain.stat().st_mode & 0o777
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert expected == 0o666 & ~os.umask(os.umask(0o022))


def test_an_output_name_that_is_a_link_is_written_through_and_the_link_kept(tmp_path):
    """The class: every atomic write (atomic_path) onto a link, and check_output of it."""
    target = tmp_path / "real" / "model.onnx"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "model.onnx"
    link.symlink_to(target)
    assert check_output(link) == link  # checked as its target, reported as the user named it
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]  # no temporary left beside it


def test_a_link_to_nothing_on_the_way_is_refused_before_any_work(tmp_path):
    """A link to a missing folder would make mkdir fail (EEXIST) after the work; a link to a missing file
    as the output name would create a file somewhere the user did not name."""
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    for path, folder in ((tmp_path / "runs" / "a" / "x.png", False), (tmp_path / "runs", True)):
        with pytest.raises(UserError, match=r"runs is a link to .*gone, which does not exist"):
            check_output(path, folder=folder)
    (tmp_path / "x.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(UserError, match=r"x.png is a link to .*missing.png, which does not exist"):
        check_output(tmp_path / "x.png")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UserError, match="loop is a loop of links"):
        check_output(tmp_path / "loop" / "x.png")
    assert not (tmp_path / "gone").exists() and not (tmp_path / "missing.png").exists()


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_output_name_is_refused_not_taken_as_the_current_folder(empty):
    for folder in (False, True):
        with pytest.raises(UserError, match="got an empty value"):
            check_output(empty, folder=folder)
