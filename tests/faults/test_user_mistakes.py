"""Every user mistake at the command line is one line `error: ...` naming the thing and what was
expected, exit code 2 (1 for memory), no traceback, nothing written: the mistakes a careless or
hostile new user makes, each tried through `toolkit.cli.main` as `cvae-tk` runs it."""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.test_cli import snapshot
from tests.test_edit import cli  # `cvae-tk ARGS` in this process: (exit code, stdout, stderr)


def assert_one_line(result, *fragments: str, code: int = 2) -> str:
    status, out, err = result
    assert status == code, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def place(tmp_path):
    """A working folder with a file, a folder and a text file named like an image."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "folder.png").mkdir()  # a folder with an image's name
    (tmp_path / "notimg.png").write_text("not an image")
    (tmp_path / "earlier").mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "earlier" / f"{index:05d}.png")
    Image.new("RGB", (8, 8), (0, 120, 200)).save(tmp_path / "photo.png")
    return tmp_path


def sample(model, *args):
    return ["sample", model, "--attr", "a=1", *args]


def interpolate(run, *args):
    return ["interpolate", run, "--from-attr", "a=1", "--to-attr", "b=1", *args]


# (arguments with MODEL / RUN / SHARDS placeholders, words the line must hold)
MISTAKES = {
    # outputs that cannot be written, decided before any work
    "grid-unknown-extension": (sample("MODEL", "--grid", "out.xyz"), ["out.xyz", "unknown image extension"]),
    "grid-no-extension": (sample("MODEL", "--grid", "out"), ["out", "no image extension"]),
    "grid-is-a-folder": (sample("MODEL", "--grid", "folder.png"), ["folder.png", "it is a folder"]),
    "grid-parent-is-a-file": (sample("MODEL", "--grid", "afile/x.png"), ["afile", "is a file, not a folder"]),
    "out-dir-is-a-file": (sample("MODEL", "--out-dir", "afile"), ["afile", "it is a file, expected a folder"]),
    # an earlier sample's images: they were replaced in part and mixed with the new ones
    "out-dir-holds-earlier-images": (
        sample("MODEL", "-n", "2", "--out-dir", "earlier"),
        ["--out-dir earlier already holds 3 numbered image(s) (00000.png ...)", "choose an empty or new folder"],
    ),
    "export-out-is-a-folder": (["export", "RUN", "--out", "adir"], ["adir", "it is a folder"]),
    "interpolate-out-is-a-folder": (interpolate("RUN", "--out", "folder.png"), ["folder.png", "it is a folder"]),
    "edit-out-unknown-extension": (
        ["edit", "RUN", "photo.png", "--attr", "a=1", "--set", "b=1", "--out", "e.xyz"],
        ["e.xyz", "extension"],
    ),
    # the output is an input: the photo would be replaced by the pair (each rerun doubled its width)
    "edit-out-is-the-photo": (
        ["edit", "RUN", "photo.png", "--attr", "a=1", "--set", "b=1", "--out", "photo.png"],
        ["cannot write photo.png: it is photo.png, which this command reads"],
    ),
    "interpolate-out-is-an-image": (
        interpolate("RUN", "--from-image", "photo.png", "--to-image", "photo.png", "--out", "./photo.png"),
        ["it is photo.png, which this command reads"],
    ),
    "interpolate-out-parent-is-a-file": (interpolate("RUN", "--out", "afile/strip.png"), ["afile", "not a folder"]),
    "shards-out-is-a-file": (["shards", "digits", "--out", "afile"], ["afile", "expected a folder"]),
    "classifier-out-is-a-file": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--steps", "1", "--out", "afile"],
        ["afile", "expected a folder"],
    ),
    # a file name ending as a folder's (typer's Path dropped the / and wrote the file)
    "grid-trailing-slash": (
        sample("MODEL", "--grid", "out.png/"),
        ["--grid out.png/: names a folder (ends with /); expected a file such as out.png"],
    ),
    "grid-trailing-dot": (sample("MODEL", "--grid", "out.png/."), ["--grid out.png/.: names a folder (ends with /.)"]),
    "export-out-trailing-slash": (
        ["export", "RUN", "--out", "export/x.onnx/"],
        ["--out export/x.onnx/: names a folder (ends with /); expected a file such as export/x.onnx"],
    ),
    "edit-out-trailing-slash": (
        ["edit", "RUN", "photo.png", "--attr", "a=1", "--set", "b=1", "--out", "adir/e.png/"],
        ["--out adir/e.png/: names a folder"],
    ),
    "interpolate-out-trailing-slash": (
        interpolate("RUN", "--out", "strip.png//"),
        ["--out strip.png//: names a folder"],
    ),
    # an attribute set twice to different values (the last one won, silently)
    "attr-twice": (sample("MODEL", "--attr", "a=0", "--grid", "g.png"), ["--attr sets a twice, to 1 and to 0"]),
    "edit-set-twice": (
        ["edit", "RUN", "photo.png", "--set", "b=1", "--set", "b=0", "--out", "e.png"],
        ["--set sets b twice, to 1 and to 0"],
    ),
    # a model that is not a file (both said "model file not found")
    "inspect-a-folder": (["inspect", "adir"], ["adir is a folder", "expected an ONNX file"]),
    "sample-a-device": (sample("/dev/null", "--grid", "g.png"), ["/dev/null is not a regular file"]),
    # sizes: below the minimum, or beyond the memory of any machine
    "n-zero": (sample("MODEL", "-n", "0", "--grid", "g.png"), ["-n must be an integer in [1, 2**63), got 0"]),
    "n-negative": (sample("MODEL", "-n", "-1", "--grid", "g.png"), ["-n", "[1, 2**63)"]),
    "n-beyond-2**63": (sample("MODEL", "-n", str(2**63), "--out-dir", "new"), ["-n", "[1, 2**63)", str(2**63)]),
    "n-beyond-memory": (sample("MODEL", "-n", str(10**12), "--grid", "g.png"), ["memory", "available"]),
    "n-not-a-number": (sample("MODEL", "-n", "abc", "--grid", "g.png"), ["-n", "integer", "cvae-tk sample --help"]),
    "steps-one": (interpolate("RUN", "--steps", "1"), ["--steps must be an integer in [2, 2**63), got 1"]),
    "steps-beyond-2**63": (interpolate("RUN", "--steps", str(10**21)), ["--steps", "[2, 2**63)", str(10**21)]),
    # a count beyond what torch and numpy take (config.validate's bound of every integer key): was accepted
    # (classifier train then ran for ever)
    "classifier-steps-huge": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--steps", str(10**21)],
        ["--steps must be an integer in [1, 2**63), got " + str(10**21)],
    ),
    "shard-size-huge": (
        ["shards", "digits", "--out", "o", "--shard-size", str(10**21)],
        ["--shard-size must be an integer in [1, 2**63)"],
    ),
    "workers-negative": (
        ["shards", "folder", "--root", ".", "--attributes", "afile", "--out", "o", "--workers", "-1"],
        ["--workers must be an integer in [0, 2**63), got -1"],
    ),
    "steps-beyond-memory": (interpolate("RUN", "--steps", str(10**12)), ["--steps", "memory", "available"]),
    # numbers out of range
    "temperature-nan": (sample("MODEL", "--temperature", "nan", "--grid", "g.png"), ["temperature", "nan"]),
    "temperature-inf": (sample("MODEL", "--temperature", "inf", "--grid", "g.png"), ["temperature", "inf"]),
    "temperature-negative": (sample("MODEL", "--temperature", "-1", "--grid", "g.png"), ["temperature", "-1"]),
    "sample-seed-negative": (sample("MODEL", "--seed", "-1", "--grid", "g.png"), ["--seed", "[0, 2**63)", "-1"]),
    "sample-seed-2**64": (sample("MODEL", "--seed", str(2**64), "--grid", "g.png"), ["--seed", str(2**64)]),
    "interpolate-seed-negative": (interpolate("RUN", "--seed", "-1"), ["--seed", "-1"]),
    "interpolate-seed-huge": (interpolate("RUN", "--seed", str(10**30)), ["--seed", str(10**30)]),
    "eval-seed-negative": (["eval", "RUN", "--seed", "-5"], ["--seed", "-5"]),
    "shards-folder-seed-huge": (
        ["shards", "folder", "--root", ".", "--attributes", "afile", "--out", "o", "--seed", str(2**63)],
        ["--seed"],
    ),
    "classifier-lr-nan": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--lr", "nan"],
        ["--lr", "finite", "nan"],
    ),
    "classifier-lr-inf": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--lr", "inf"],
        ["--lr", "inf"],
    ),
    "classifier-lr-zero": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--lr", "0"],
        ["--lr", "> 0"],
    ),
    # inputs that are not what they should be
    "edit-not-an-image": (["edit", "RUN", "notimg.png", "--attr", "a=1", "--set", "b=1"], ["notimg.png"]),
    "edit-a-folder": (["edit", "RUN", "adir", "--attr", "a=1", "--set", "b=1"], ["adir", "folder"]),
    "edit-missing-image": (
        ["edit", "RUN", "missing.png", "--attr", "a=1", "--set", "b=1"],
        ["missing.png", "not found"],
    ),
    "eval-a-folder-that-is-not-a-run": (["eval", "adir"], ["adir", "config.json"]),
    "eval-a-file": (["eval", "afile"], ["afile"]),
    "sweep-launcher-unmatched-quote": (
        ["sweep", "recipe=digits", "data.shards=SHARDS", "--launcher", "python 'oops"],
        ["--launcher", "No closing quotation"],
    ),
    "sweep-launcher-blank": (
        ["sweep", "recipe=digits", "data.shards=SHARDS", "--launcher", "   "],
        ["an empty argument after --launcher"],  # every option alike (the API's run_sweep says "--launcher is empty")
    ),
    "sweep-launcher-no-program": (
        ["sweep", "recipe=digits", "data.shards=SHARDS", "--launcher", "no-such-launcher --x"],
        ["no-such-launcher", "no program"],
    ),
    "unknown-option": (sample("MODEL", "--gird", "g.png"), ["--gird"]),
    # commands taking options and key=value alike: a misspelt option read as a bad key ("expected key=value")
    "classifier-misspelt-option": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--step", "1"],
        ["No such option: --step (Possible options: --steps)", "cvae-tk classifier train --help"],
    ),
    "sweep-misspelt-option": (
        ["sweep", "recipe=digits", "data.shards=SHARDS", "--clasifier", "adir"],
        ["No such option: --clasifier (Possible options: --classifier)"],
    ),
    # a recipe key typed as an option, as other tools take them
    "train-key-as-option": (
        ["train", "recipe=digits", "data.shards=SHARDS", "--max_steps", "3"],
        ["'--max_steps': a key is written without dashes, as max_steps=VALUE"],
    ),
    "train-key-as-option-with-value": (
        ["train", "recipe=digits", "data.shards=SHARDS", "--max_steps=3"],
        ["as max_steps=3"],
    ),
    # a key classifier train reads, with dashes: was 'No such option: --seed (Possible options: --steps)'
    # and "does not read the recipe key '--data.shards'"
    "classifier-key-as-option": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--seed", "1"],
        ["'--seed': a key is written without dashes, as seed=VALUE"],
    ),
    "classifier-key-as-option-with-value": (
        ["classifier", "train", "recipe=digits", "--data.shards=SHARDS"],
        ["a key is written without dashes, as data.shards="],
    ),
    "classifier-option-as-key-with-dashes": (
        ["classifier", "train", "recipe=digits", "data.shards=SHARDS", "--max_steps", "3"],
        ["does not read the recipe key 'max_steps' (--max_steps): use --steps"],
    ),
    "unknown-command": (["smaple"], ["smaple"]),
}


def _cli_options(annotations):
    """(command words, option) for every option of `cvae-tk` whose annotation is one of `annotations`."""
    import typer

    from toolkit.cli import app

    def walk(command, words):
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*words, name])
        for param in getattr(command, "params", []) if not hasattr(command, "commands") else []:
            if param.param_type_name == "option" and param.type_descriptor.annotation in annotations:
                yield words, param

    return list(walk(typer.main.get_command(app), []))


def test_every_integer_option_refuses_what_torch_and_numpy_cannot_take_naming_itself(monkeypatch, capsys, tmp_path):
    from typing import Optional

    options = _cli_options((int, Optional[int]))
    assert len(options) >= 10  # the walk finds them
    for words, option in options:
        if option.opts == ["--opset"]:
            continue  # export's check_opset: 18 to the installed onnx's newest, before any work
        name = option.opts[0]
        line = assert_one_line(cli([*words, name, str(2**63), "x"], monkeypatch, capsys, tmp_path), name)
        # the range said: ours, or typer's for an option with a max of its own (--size, --port)
        assert f"2**63), got {2**63}" in line or "less than or equal to" in line, line


def test_every_option_naming_a_file_to_write_refuses_a_trailing_slash(monkeypatch, capsys, tmp_path):
    """--grid and each --out/... that is a file: read before typer's Path drops the /."""
    from typing import Optional

    from toolkit.atomic import file_name

    paths = _cli_options((Path, Optional[Path]))
    files = [(w, p) for w, p in paths if getattr(p.type_descriptor.parameter_info.parser, "func", None) is file_name]
    # every Path option is one of these: a new one is sorted into them here (a file to write: cli.output_file)
    written = {"edit --out", "export --out", "interpolate --out", "sample --grid"}
    folders = {"sample --out-dir", "sweep --out", "web --out", "classifier train --out"}
    folders |= {f"shards {name} --out" for name in ("digits", "celeba", "cub", "folder")}
    read = {f"{c} --classifier" for c in ("export", "eval", "edit", "interpolate", "sweep")} | {
        "interpolate --from-image", "interpolate --to-image", "web --ort-dist", "shards folder --attributes",
    } | {f"shards {name} --root" for name in ("celeba", "cub", "folder")}  # fmt: skip
    assert {" ".join([*w, p.opts[0]]) for w, p in files} == written
    assert sorted(" ".join([*w, p.opts[0]]) for w, p in paths) == sorted(written | folders | read)
    for words, option in files:
        name = option.opts[0]
        line = assert_one_line(cli([*words, name, "x.png/", "x"], monkeypatch, capsys, tmp_path), name)
        assert line == f"error: {name} x.png/: names a folder (ends with /); expected a file such as x.png"


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_is_one_line_and_writes_nothing(name, tiny_onnx, digits_shards, place, monkeypatch, capsys):
    args, words = MISTAKES[name]
    names = {"MODEL": str(tiny_onnx), "RUN": str(tiny_onnx.parent / "run"), "SHARDS": str(digits_shards)}
    args = [names.get(a, a.replace("SHARDS", str(digits_shards)) if isinstance(a, str) else a) for a in args]
    before = snapshot(place)
    assert_one_line(cli(args, monkeypatch, capsys, place), *words)
    assert snapshot(place) == before


def test_an_os_error_the_checks_did_not_foresee_is_one_line_naming_the_file(tiny_onnx, tmp_path, monkeypatch, capsys):
    from toolkit import sampler

    def vanished(*args, **kwargs):  # e.g. the model's disk went away between the check and the read
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/mnt/gone/model.onnx")

    monkeypatch.setattr(sampler.Sampler, "sample", vanished)
    line = assert_one_line(cli(sample(tiny_onnx, "--grid", "g.png"), monkeypatch, capsys, tmp_path))
    assert line == "error: /mnt/gone/model.onnx: No such file or directory (ENOENT); no such file or folder"


def test_running_out_of_memory_is_one_line_with_exit_code_1(tiny_onnx, tmp_path, monkeypatch, capsys):
    from toolkit import sampler

    def too_much(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(sampler.Sampler, "sample", too_much)
    assert_one_line(cli(sample(tiny_onnx, "--grid", "g.png"), monkeypatch, capsys, tmp_path), "out of memory", code=1)
    assert snapshot(tmp_path) == []


def test_a_real_bug_keeps_its_traceback(tiny_onnx, tmp_path, monkeypatch):
    from toolkit import sampler
    from toolkit.cli import main

    def bug(*args, **kwargs):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(sampler.Sampler, "sample", bug)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cvae-tk", *sample(str(tiny_onnx), "--grid", "g.png")])
    with pytest.raises(KeyError):
        main()


def test_help_and_success_still_exit_0(tiny_onnx, tmp_path, monkeypatch, capsys):
    code, out, _ = cli(["sample", "--help"], monkeypatch, capsys, tmp_path)
    assert code == 0 and "--grid" in out
    code, out, err = cli(
        sample(tiny_onnx, "-n", "2", "--seed", str(2**63 - 1), "--grid", "g.png"), monkeypatch, capsys, tmp_path
    )
    assert code == 0 and err == "" and "wrote g.png" in out
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.format == "PNG"
    assert snapshot(tmp_path) == ["g.png"]


@pytest.mark.parametrize(
    "args, after",
    [
        (["sample", "model.onnx", "--grid", ""], " after --grid"),
        (["sample", "model.onnx", "--out-dir", " "], " after --out-dir"),
        (["shards", "digits", "--out", ""], " after --out"),
        (["export", "--onnx", ""], " after --onnx"),
        (["inspect", ""], ""),
    ],
    ids=["grid", "out-dir", "shards-out", "export-run", "inspect-model"],
)
def test_an_empty_argument_is_refused_not_read_as_the_current_folder(args, after, monkeypatch, capsys, tmp_path):
    """typer reads `--out ""` as Path(".") (an unset `$DIR`): images, shards or exports would land in
    the current folder, or a folder be taken for the input."""
    assert_one_line(cli(args, monkeypatch, capsys, tmp_path), f"an empty argument{after}: expected a value")
    assert list(tmp_path.iterdir()) == []


def test_shards_not_found_offer_only_an_option_the_command_has(tiny_onnx, place, monkeypatch, capsys):
    """A run's data.shards, relative, read from another folder: export --encoder / --int8 and edit said
    "pass --shards", an option only eval has."""
    run = place / "run"
    shutil.copytree(tiny_onnx.parent / "run", run)
    (run / "recipe.yaml").write_text("data:\n  shards: shards/gone\n")
    for args in (["export", "run", "--encoder", "--out", "x.onnx"], ["export", "run", "--int8", "--out", "x.onnx"]):
        line = assert_one_line(cli(args, monkeypatch, capsys, place), "data.shards=shards/gone", "from the folder")
        assert "--shards" not in line, line
    code, _, err = cli(["edit", "run", "photo.png", "--attr", "a=1", "--set", "b=1"], monkeypatch, capsys, place)
    assert code == 0 and "data.shards=shards/gone" in err and "--shards" not in err, err
    assert_one_line(cli(["eval", "run"], monkeypatch, capsys, place), "data.shards=shards/gone", "pass --shards")
