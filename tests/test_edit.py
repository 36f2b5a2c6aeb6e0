"""Editing real images and interpolations (`toolkit/edit.py`, `cvae-tk edit`, `cvae-tk interpolate`)
on the session's short digits run: sizes, reconstruction, attribute changes, strips, errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_cli import assert_user_error, run_cli
from toolkit.classifier import AttributeClassifier, save_classifier
from toolkit.cli import _assignments  # the one parser of sample's, edit's and interpolate's NAME=0|1
from toolkit.data.stream import eval_batches
from toolkit.edit import (
    attribute_vector,
    edit_image,
    encode,
    interpolate_attributes,
    interpolate_images,
    load_image,
    load_run_model,
    predict_attributes,
)
from toolkit.errors import UserError
from toolkit.model import CONFIG, WEIGHTS, load_model

DIGITS = [f"digit_{i}" for i in range(10)]
SIZE = (50, 40)  # (W, H) of the test images: not the model's 32x32, not square


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def mse(a: Image.Image, b: Image.Image) -> float:
    return float(((as_float(a) - as_float(b)) ** 2).mean())


@pytest.fixture(scope="module")
def model(trained_run):
    return load_model(trained_run)


@pytest.fixture(scope="module")
def test_digits(digits_shards) -> tuple[list[Image.Image], list[int]]:
    """The first 64 test images (32x32 PIL) and their labels."""
    images, attributes = next(iter(eval_batches(digits_shards, "test", 64)))
    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array], attributes.argmax(dim=1).tolist()


@pytest.fixture(scope="module")
def three(test_digits, tmp_path_factory) -> Path:
    """A test-split 3, saved as a 50x40 PNG."""
    images, labels = test_digits
    path = tmp_path_factory.mktemp("images") / "three.png"
    images[labels.index(3)].resize(SIZE, Image.BICUBIC).save(path)
    return path


@pytest.fixture(scope="module")
def one(test_digits, tmp_path_factory) -> Path:
    images, labels = test_digits
    path = tmp_path_factory.mktemp("images") / "one.png"
    images[labels.index(1)].resize(SIZE, Image.BICUBIC).save(path)
    return path


def fixed_classifier(folder: Path, digit: int) -> Path:
    """A classifier that always predicts `digit` (zero head weights, biases +-4): no training needed."""
    torch.manual_seed(0)
    classifier = AttributeClassifier(DIGITS, (32, 32), width=4, depth=2)
    with torch.no_grad():
        classifier.head.weight.zero_()
        classifier.head.bias.fill_(-4.0)
        classifier.head.bias[digit] = 4.0
    save_classifier(classifier, folder, {"test_accuracy": {"top1": 1.0, "mean": 1.0}})
    return folder


def cli(args, monkeypatch, capsys, cwd: Path) -> tuple[int, str, str]:
    """`cvae-tk ARGS` in this process (fast): (exit code, stdout, stderr)."""
    from toolkit.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["cvae-tk", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        main()
    captured = capsys.readouterr()
    return exit.value.code or 0, captured.out, captured.err


# --- the API ----------------------------------------------------------------------------------------


def test_edit_keeps_the_input_size_and_reconstructs(model, test_digits):
    images, labels = test_digits
    reconstruction_errors, unrelated_distances = [], []
    for index in range(16):
        image = images[index].resize(SIZE, Image.BICUBIC)
        other = images[next(k for k in range(index + 1, 64) if labels[k] != labels[index])].resize(SIZE, Image.BICUBIC)
        edited = edit_image(model, image, {f"digit_{labels[index]}": 1}, {})
        assert edited.size == SIZE and edited.mode == "RGB"
        reconstruction_errors.append(mse(edited, image))
        unrelated_distances.append(mse(other, image))
    # a short-trained model reconstructs blurrily, but much nearer the input than another digit is
    assert np.mean(reconstruction_errors) < 0.8 * np.mean(unrelated_distances), (
        reconstruction_errors,
        unrelated_distances,
    )


def test_changing_the_digit_changes_the_output(model, three):
    image = load_image(three)
    same = edit_image(model, image, {"digit_3": 1}, {})
    edited = edit_image(model, image, {"digit_3": 1}, {"digit_3": 0, "digit_8": 1})
    assert edited.size == same.size == SIZE
    assert np.abs(as_float(edited) - as_float(same)).mean() > 0.01
    # a vector works as well as a mapping, and the changes go on top of it
    vector = np.eye(10, dtype=np.float32)[3]
    assert np.array_equal(
        np.asarray(edit_image(model, image, vector, {"digit_3": 0, "digit_8": 1})), np.asarray(edited)
    )


def test_interpolate_images_ends_at_the_reconstructions(model, test_digits):
    images, labels = test_digits
    a, b = images[labels.index(3)], images[labels.index(1)]
    frames = interpolate_images(model, a, {"digit_3": 1}, b, {"digit_1": 1}, steps=5)
    assert len(frames) == 5 and all(frame.size == (32, 32) for frame in frames)
    for frame, image, label in ((frames[0], a, "digit_3"), (frames[-1], b, "digit_1")):
        expected = edit_image(model, image, {label: 1}, {})  # 32x32 input: no resizing
        assert np.abs(as_float(frame) - as_float(expected)).max() <= 1 / 255 + 1e-6
    assert mse(frames[0], frames[-1]) > 1e-4


def test_interpolate_attributes_moves_one_prior_sample(model):
    frames = interpolate_attributes(model, {"digit_1": 1}, {"digit_7": 1}, steps=4, seed=3)
    assert len(frames) == 4 and all(frame.size == (32, 32) for frame in frames)
    noise = torch.randn(1, model.spec.latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ends = model.generate(torch.eye(10)[[1, 7]], noise.expand(2, -1))
    for frame, expected in zip((frames[0], frames[-1]), ends):
        assert np.abs(as_float(frame) - expected.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6
    again = interpolate_attributes(model, {"digit_1": 1}, {"digit_7": 1}, steps=4, seed=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(frames, again))
    other = interpolate_attributes(model, {"digit_1": 1}, {"digit_7": 1}, steps=4, seed=4)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(frames[0]))


def test_predicted_attributes(model, three, tmp_path):
    from toolkit.classifier import load_classifier

    classifier = load_classifier(fixed_classifier(tmp_path / "classifier", 3))
    assert predict_attributes(classifier, model, load_image(three)) == {
        name: int(name == "digit_3") for name in DIGITS
    }


def test_attribute_names_holding_an_equals_sign_can_be_set():
    """A class folder may be named 'a=b' (and a table's column so); `--attr a=b=1` was refused as not
    NAME=0 or NAME=1, so that class could not be drawn, edited or interpolated."""
    given = ["a=b=1", "c,d=0", "with space = 1"]
    assert _assignments(given, "--set") == {"a=b": 1, "c,d": 0, "with space": 1}
    for wrong in (["a=b"], ["=1"]):
        with pytest.raises(UserError, match=r"--attr expects NAME=0 or NAME=1, got '"):
            _assignments(wrong, "--attr")


def test_api_errors(model, tmp_path):
    with pytest.raises(UserError, match=r"unknown attribute 'digt_3': did you mean digit_3"):
        attribute_vector(DIGITS, {"digt_3": 1})
    with pytest.raises(UserError, match=r"unknown attribute 'digit_10'"):
        edit_image(model, Image.new("RGB", (8, 8)), {"digit_1": 1}, {"digit_10": 1})
    with pytest.raises(UserError, match=r"'digit_3' must be 0 or 1, got 2"):
        attribute_vector(DIGITS, {"digit_3": 2})
    with pytest.raises(UserError, match=r"--set expects NAME=0 or NAME=1, got 'digit_3=yes'"):
        _assignments(["digit_3=yes"], "--set")
    with pytest.raises(UserError, match=r"has 3 values, the model 10"):
        attribute_vector(DIGITS, [1, 0, 0])
    with pytest.raises(UserError, match=r"steps must be an integer >= 2"):
        interpolate_attributes(model, {"digit_1": 1}, {"digit_7": 1}, steps=1)
    with pytest.raises(UserError, match=r"image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match=r"notes.png is not an image PIL can read"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(UserError, match=r"is not a trained run"):
        load_run_model(tmp_path)
    with pytest.raises(UserError, match=r"run folder not found"):
        load_run_model(tmp_path / "nothing")


def test_image_paths_as_python_file_apis_take_them(tmp_path):
    import os

    from toolkit.edit import save_strip

    frames = [Image.new("RGB", (4, 6), (255, 0, 0)), Image.new("RGB", (4, 6), (0, 0, 255))]
    assert save_strip(frames, os.fsencode(tmp_path / "strip.png")) == tmp_path / "strip.png"
    assert load_image(os.fsencode(tmp_path / "strip.png")).size == (8, 6)
    with pytest.raises(TypeError, match=r"^load_image\(path\): expected the image file as .*, got NoneType$"):
        load_image(None)
    with pytest.raises(TypeError, match=r"^load_image\(path\): .*, got int$"):
        load_image(3)  # os.path.exists would take it for a file descriptor
    with pytest.raises(TypeError, match=r"^save_strip\(images, path\): .*, got NoneType$"):
        save_strip(frames, None)


def test_encode_uses_the_posterior_mean(model, test_digits):
    images, labels = test_digits
    x = torch.from_numpy(as_float(images[0])).permute(2, 0, 1)[None]
    y = torch.eye(10)[[labels[0]]]
    with torch.no_grad():
        mu, _ = model.encoder(x, y)
    assert torch.allclose(encode(model, images[0], {f"digit_{labels[0]}": 1}), mu[0], atol=1e-5)


# --- the commands ----------------------------------------------------------------------------------


def test_cli_edit_with_given_attributes(trained_run, three, tmp_path):
    """As a user runs it (a subprocess): --attr, the default output name, (2W) x H."""
    result = run_cli(
        [
            "edit",
            trained_run,
            three,
            "--attr",
            "digit_3=1",
            "--set",
            "digit_3=0",
            "--set",
            "digit_8=1",
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attributes: digit_3 (given)" in result.stdout
    assert "changes: digit_3 1 -> 0, digit_8 0 -> 1" in result.stdout
    pair = Image.open(tmp_path / "three-edit.png")
    assert pair.size == (2 * SIZE[0], SIZE[1])
    assert np.array_equal(np.asarray(pair.convert("RGB"))[:, : SIZE[0]], np.asarray(load_image(three)))


def test_cli_edit_with_the_runs_classifier(trained_run, three, tmp_path, monkeypatch, capsys):
    """No --attr: the classifier beside the run (RUN/../classifier) predicts them."""
    run = tmp_path / "runs" / "digits"
    run.mkdir(parents=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy(trained_run / name, run / name)
    fixed_classifier(tmp_path / "runs" / "classifier", 3)
    code, out, err = cli(
        ["edit", run, three, "--set", "digit_8=1", "--out", "pair.png"], monkeypatch, capsys, tmp_path
    )
    assert code == 0, err
    assert "attributes: digit_3 (p=0.98) (predicted by the classifier in" in out
    assert "changes: digit_8 0 -> 1" in out
    with Image.open(tmp_path / "pair.png") as pair:
        assert pair.size == (2 * SIZE[0], SIZE[1])
        shown = np.asarray(pair)
    expected = edit_image(load_model(run), load_image(three), {"digit_3": 1}, {"digit_8": 1})
    assert np.array_equal(shown[:, SIZE[0] :], np.asarray(expected))


def test_cli_interpolate(trained_run, three, one, tmp_path, monkeypatch, capsys):
    code, out, err = cli(
        [
            "interpolate",
            trained_run,
            "--from-image",
            three,
            "--to-image",
            one,
            "--from-attr",
            "digit_3=1",
            "--to-attr",
            "digit_1=1",
            "--steps",
            "6",
            "--out",
            "images.png",
        ],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 0, err
    strip = Image.open(tmp_path / "images.png")
    assert strip.size == (6 * 32, 32)
    model = load_model(trained_run)
    first = edit_image(model, load_image(three).resize((32, 32), Image.BICUBIC), {"digit_3": 1}, {})
    assert np.abs(as_float(strip.crop((0, 0, 32, 32))) - as_float(first)).max() < 0.2  # resizing twice vs once

    code, out, err = cli(
        ["interpolate", trained_run, "--from-attr", "digit_1=1", "--to-attr", "digit_7=1", "--seed", "3"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 0, err
    strip = np.asarray(Image.open(tmp_path / "interpolation.png"))
    assert strip.shape == (32, 8 * 32, 3)
    frames = interpolate_attributes(model, {"digit_1": 1}, {"digit_7": 1}, steps=8, seed=3)
    assert np.array_equal(strip, np.concatenate([np.asarray(f) for f in frames], axis=1))


def test_cli_error_as_a_user_sees_it(trained_run, three, tmp_path):
    """A subprocess: exit 2, one `error:` line, no traceback, nothing written."""
    line = assert_user_error(
        run_cli(["edit", trained_run, three, "--attr", "digt_3=1", "--set", "digit_8=1"], tmp_path),
        "unknown attribute 'digt_3'",
    )
    assert "did you mean digit_3" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["edit", "{run}", "{image}", "--attr", "digit_3=1", "--set", "digit_8=2"],
            "--set expects NAME=0 or NAME=1, got 'digit_8=2'",
        ),
        (["edit", "{run}", "{image}", "--attr", "digit_3=1"], "say what to change: --set"),
        (["edit", "{run}", "{notes}", "--set", "digit_8=1"], "is not an image PIL can read"),
        (["edit", "{run}", "{empty}/missing.png", "--set", "digit_8=1"], "image not found"),
        # the session's run has no classifier beside it: say how to get the attributes
        (["edit", "{run}", "{image}", "--set", "digit_8=1"], "pass them with --attr NAME=1"),
        (["edit", "{run}", "{image}", "--set", "digit_8=1"], "`cvae-tk classifier train recipe=digits`"),
        (["edit", "{empty}", "{image}", "--attr", "digit_3=1", "--set", "digit_8=1"], "is not a trained run"),
        (
            ["edit", "{run}", "{image}", "--set", "digit_8=1", "--classifier", "{empty}/nope"],
            "classifier folder not found",
        ),
        (
            ["interpolate", "{run}", "--from-attr", "digit_1=1", "--to-attr", "digit_7=1", "--steps", "1"],
            "--steps must be an integer in [2, 2**63)",
        ),
        (["interpolate", "{run}", "--from-attr", "digit_1=1", "--to-attr", "dgit_7=1"], "did you mean digit_7"),
        (["interpolate", "{run}", "--from-image", "{image}"], "needs both --from-image and --to-image"),
        (["interpolate", "{run}", "--from-attr", "digit_1=1"], "say what to interpolate"),
        (["interpolate", "{run}", "--from-image", "{image}", "--to-image", "{other}"], "--from-attr / --to-attr"),
    ],
)
def test_cli_errors(args, fragment, trained_run, three, one, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    values = {
        "run": trained_run,
        "image": three,
        "other": one,
        "notes": tmp_path / "notes.txt",
        "empty": tmp_path / "empty",
    }
    code, out, err = cli([a.format(**values) for a in args], monkeypatch, capsys, tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err, (code, out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt"]


# --- geometry, sizes and settings that do nothing ---------------------------------------------------


def test_edit_and_interpolate_see_the_crop_the_shards_were_built_with(tmp_path, monkeypatch, capsys):
    """A run whose shards were built with --crop center:20: the photo used to be squashed whole into
    the model's size, which the model never saw in training (and the ONNX encoder and the web page
    crop it). Now the centre 20x20 is encoded, as the Sampler prepares it, the edit is laid over that
    square and the rest of the photo kept; a photo smaller than the crop is one line before the
    model loads; shards that are gone leave the photo whole, with a warning."""
    from tests.test_encoder import tiny_run, tiny_shards
    from toolkit.export import export_onnx
    from toolkit.sampler import Sampler

    shards = tiny_shards(tmp_path / "shards", build={"source": "x", "image": {"size": [8, 8], "crop": 20}})
    run = tiny_run(tmp_path / "run")
    (run / "recipe.yaml").write_text(f"data:\n  shards: {shards}\n")
    sampler = Sampler(export_onnx(run, tmp_path / "tiny.onnx", encoder=True, shards=shards)[0], device="cpu")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(tmp_path / "other.png")

    code, out, err = cli(
        ["edit", run, "photo.png", "--attr", "a0=1", "--set", "a1=1", "--out", "pair.png"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 0 and err == "", err
    edited = np.asarray(Image.open(tmp_path / "pair.png"))[:, 30:].astype(np.int16)
    original = np.asarray(photo).astype(np.int16)
    left, top = 5, 2  # the centre 20x20 of 30x24
    inside = (slice(top, top + 20), slice(left, left + 20))
    outside = np.ones((24, 30), bool)
    outside[inside] = False
    assert np.array_equal(edited[outside], original[outside])
    onnx_edit = Image.fromarray(sampler.edit(photo, {"a0": 1}, {"a1": 1})).resize((20, 20), Image.BICUBIC)
    assert np.abs(edited[inside] - np.asarray(onnx_edit).astype(np.int16)).max() <= 3

    code, out, err = cli(
        ["interpolate", run, "--from-image", "photo.png", "--to-image", "other.png"]
        + ["--from-attr", "a0=1", "--to-attr", "a2=1", "--steps", "2", "--out", "strip.png"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 0, err
    first = np.asarray(Image.open(tmp_path / "strip.png"))[:, :8].astype(np.int16)
    assert np.abs(first - sampler.edit(photo, {"a0": 1}).astype(np.int16)).max() <= 1

    Image.new("RGB", (40, 16)).save(tmp_path / "small.png")
    monkeypatch.setattr("toolkit.edit.load_run_model", lambda *a: pytest.fail("the model was loaded"))
    code, out, err = cli(
        ["edit", run, "small.png", "--attr", "a0=1", "--set", "a1=1", "--out", "e.png"], monkeypatch, capsys, tmp_path
    )
    assert (
        code == 2
        and err.count("\n") == 1
        and "the image is 40 wide x 16 high, smaller than the centre crop of 20" in err
    )
    assert not (tmp_path / "e.png").exists()
    monkeypatch.undo()

    shutil.rmtree(shards)
    code, out, err = cli(
        ["edit", run, "photo.png", "--attr", "a0=1", "--set", "a1=1", "--out", "whole.png"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 0 and "warning: cannot tell how the training images were cropped" in err
    assert "the image is resized whole" in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        # settings that do nothing
        (["edit", "{run}", "{image}", "--attr", "digit_3=1", "--set", "digit_3=1"], "--set digit_3=1 changes nothing"),
        (["edit", "{run}", "{image}", "--attr", "digit_3=1", "--set", "digit_5=0"], "--set digit_5=0 changes nothing"),
        (
            ["edit", "{run}", "{image}", "--attr", "digit_3=1", "--set", "digit_8=1", "--classifier", "{empty}"],
            "--classifier does nothing when --attr gives",
        ),
        (
            ["interpolate", "{run}", "--from-image", "{image}", "--to-image", "{other}", "--seed", "3"],
            "--seed does nothing between two images",
        ),
        (
            ["interpolate", "{run}", "--from-attr", "digit_1=1", "--to-attr", "digit_7=1", "--classifier", "{empty}"],
            "--classifier does nothing between two attribute sets",
        ),
        (
            ["interpolate", "{run}", "--from-image", "{image}", "--to-image", "{other}"]
            + ["--from-attr", "digit_3=1", "--to-attr", "digit_1=1", "--classifier", "{empty}"],
            "--classifier does nothing when --from-attr and --to-attr give both",
        ),
        (
            ["interpolate", "{run}", "--from-attr", "digit_1=1", "--to-attr", "digit_1=1"],
            "--from-attr and --to-attr give the same attribute set (digit_1): every frame would be the same image",
        ),
        (["interpolate", "{run}", "--from-image", "{image}", "--to-image", "{copy}"], "are the same image"),
        # names and sizes from config.json, before any image or weights are read
        (["edit", "{run}", "{empty}/missing.png", "--attr", "digt_3=1", "--set", "digit_8=1"], "did you mean digit_3"),
        (
            ["interpolate", "{run}", "--from-image", "{empty}/a.png", "--to-image", "{empty}/b.png"]
            + ["--from-attr", "digt_3=1", "--to-attr", "digit_1=1"],
            "did you mean digit_3",
        ),
        (
            ["interpolate", "{run}", "--from-image", "{empty}/a.png", "--to-image", "{empty}/b.png"]
            + ["--steps", str(10**9)],
            "use fewer --steps",
        ),
        (
            ["edit", "{image}", "{image}", "--attr", "digit_3=1", "--set", "digit_8=1"],
            "is not a folder: expected a run folder",
        ),
    ],
)
def test_mistakes_and_settings_that_do_nothing_are_refused_before_the_model_loads(
    args, fragment, trained_run, three, one, tmp_path, monkeypatch, capsys
):
    (tmp_path / "empty").mkdir()
    shutil.copyfile(three, tmp_path / "copy.png")  # the same pixels under another name
    values = {
        "run": trained_run,
        "image": three,
        "other": one,
        "copy": tmp_path / "copy.png",
        "empty": tmp_path / "empty",
    }
    monkeypatch.setattr("toolkit.edit.load_run_model", lambda *a: pytest.fail("the model was loaded"))
    code, out, err = cli([a.format(**values) for a in args], monkeypatch, capsys, tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err, (code, out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.png", "empty"]


def test_an_edit_beyond_the_memory_available_is_refused_before_the_model_loads(
    trained_run, three, tmp_path, monkeypatch, capsys
):
    """A photo near Pillow's limit (~178 million pixels) needs GBs for the edit and its pair (measured:
    3 GB for 12000x12000): on a small machine the kernel killed it without a word."""
    monkeypatch.setattr("toolkit.memory.available_bytes", lambda: 10_000)  # the pair alone is 12,000 bytes
    monkeypatch.setattr("toolkit.edit.load_run_model", lambda *a: pytest.fail("the model was loaded"))
    code, out, err = cli(
        ["edit", trained_run, three, "--attr", "digit_3=1", "--set", "digit_8=1"], monkeypatch, capsys, tmp_path
    )
    assert code == 2 and "editing an image 50 wide x 40 high needs" in err and "give a smaller image" in err, err
    assert not list(tmp_path.iterdir())


def test_names_that_are_not_utf8_are_printed_as_their_bytes(trained_run, three, tmp_path):
    """Under a UTF-8 locale Python's stdout is strict: `wrote <name>` of a photo named b'caf\\xe9.png'
    was a UnicodeEncodeError traceback after the pair was written. The name's bytes are printed, as ls does."""
    import os
    import subprocess

    photo = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")
    shutil.copyfile(three, photo)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), PYTHONIOENCODING="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "edit", trained_run, photo, "--attr", "digit_3=1", "--set", "digit_8=1"],
        cwd=tmp_path,
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert b"wrote caf\xe9-edit.png (100x40: original | edit)" in result.stdout


def test_attribute_names_match_in_either_unicode_normalization(tmp_path, monkeypatch, capsys):
    """'é' typed as 'e' + a combining accent (macOS) against a run whose name is one code point was
    'unknown attribute' for edit and interpolate from a run folder (the ONNX Sampler matched it): names
    are matched as the text they show (NFC), and messages spell them as the model does."""
    import unicodedata

    from toolkit.edit import model_names
    from toolkit.model import CVAE, ModelSpec, save_model

    nfc, nfd = (unicodedata.normalize(form, "é") for form in ("NFC", "NFD"))
    names = ["a", "b", nfc]
    assert model_names(names, {nfd: 1, "a": 0}) == {nfc: 1, "a": 0}
    assert torch.equal(attribute_vector(names, {"a": 1}, {nfd: 1}), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(UserError, match="given as 1 and as 0 .* another Unicode normalization"):
        model_names(names, {nfc: 1, nfd: 0})
    torch.manual_seed(0)
    model = CVAE(ModelSpec(attributes=names, image_size=(8, 8), latent_dim=4)).eval()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    assert (
        edit_image(model, photo, {nfd: 1}, {"a": 1}).tobytes()
        == edit_image(model, photo, {nfc: 1}, {"a": 1}).tobytes()
    )
    frames = interpolate_attributes(model, {nfd: 1}, {"a": 1}, steps=2, seed=0)
    assert frames[0].tobytes() == interpolate_attributes(model, {nfc: 1}, {"a": 1}, steps=2, seed=0)[0].tobytes()

    save_model(model, tmp_path / "run")
    code, out, err = cli(
        ["edit", "run", "photo.png", "--attr", f"{nfd}=1", "--set", f"{nfd}=0", "--out", "pair.png"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 0 and f"changes: {nfc} 1 -> 0" in out, err
    code, out, err = cli(
        ["interpolate", "run", "--from-attr", f"{nfd}=1", "--to-attr", "a=1", "--steps", "2", "--out", "strip.png"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert code == 0 and f"from: {nfc}  to: a" in out, err
