import pytest

from toolkit.atomic import atomic_path, write_text


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
