"""`cvae-tk sweep`: one run per beta in its own process, Table 1, Figures 3-5, loss curves; reuse and resume;
arguments checked before anything trains."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.test_cli import assert_user_error, run_cli
from toolkit import sweep
from toolkit.config import load_config
from toolkit.errors import UserError
from toolkit.evaluate import evaluate_run
from toolkit.figures import PAD, scale_for
from toolkit.sweep import parse_betas, run_sweep

DIGITS = [f"digit_{i}" for i in range(10)]
OUTPUTS = ["figure3.png", "figure4.png", "figure5.png", "loss_curves.png", "sweep.json", "table1.csv", "table1.md"]
TINY = [
    "max_steps=10",
    "batch_size=16",
    "log_every=5",
    "sample_every=1000",
    "checkpoint_every=100000",
    "data.num_workers=0",
]


def sweep_args(shards, *extra, betas="[0.5,0.9]"):
    return ["recipe=digits", f"betas={betas}", f"data.shards={shards}", *TINY, *extra]


@pytest.fixture(scope="module")
def untrained_classifier(tmp_path_factory) -> Path:
    """A classifier folder for the digits (untrained: the sweep only needs numbers in the accuracy columns)."""
    import torch

    from toolkit.classifier import AttributeClassifier, save_classifier

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sweep-classifier") / "classifier"
    save_classifier(AttributeClassifier(DIGITS, (32, 32), width=8, depth=2), out)
    return out


@pytest.fixture(scope="module")
def swept(digits_shards, untrained_classifier, tmp_path_factory):
    """A two-beta sweep of 10 steps each (two training processes): (OUT, result)."""
    out = tmp_path_factory.mktemp("sweep") / "sweep-digits"
    result = run_sweep(
        sweep_args(digits_shards), out=out, classifier=untrained_classifier, device="cpu", log=lambda _: None
    )
    return out, result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_sweep_writes_the_table_the_figures_and_sweep_json(swept):
    out, result = swept
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS + [sweep.OWNER, "beta-0.5", "beta-0.9"])
    assert not list(out.glob(".*.tmp"))
    for beta in ("0.5", "0.9"):
        run = out / f"beta-{beta}"
        assert (run / "model.safetensors").is_file() and (run / "metrics.json").is_file()
        # everything else equal: only beta and run_dir differ
        assert f"beta: {beta}" in (run / "recipe.yaml").read_text()
    recipes = [(out / f"beta-{b}" / "recipe.yaml").read_text().splitlines() for b in ("0.5", "0.9")]
    differing = [a for a, b in zip(*recipes) if a != b]
    assert [line.split(":")[0] for line in differing] == ["run_dir", "beta"], differing

    rows = read_csv(out / "table1.csv")
    assert list(rows[0]) == [
        "beta",
        "mse_per_image",
        "mse_per_pixel",
        "kl_per_image",
        "attr_acc",
        "attr_acc_floor",
        "attr_acc_top1",
        "attr_acc_floor_top1",
        "control",
        "diversity",
    ]
    assert [row["beta"] for row in rows] == ["0.9", "0.5"]  # descending, as the paper's Table 1
    for row in rows:
        # every cell numeric (a classifier was given) but control: the untrained classifier recognises nothing reliably
        assert row.pop("control") == ""
        values = {key: float(value) for key, value in row.items()}
        assert values["mse_per_image"] > 0 and values["kl_per_image"] >= 0
        assert values["mse_per_pixel"] == pytest.approx(values["mse_per_image"] / (3 * 32 * 32))
        assert 0 <= values["attr_acc"] <= 1 and 0 <= values["attr_acc_floor"] <= 1 and values["diversity"] >= 0
    metrics = json.loads((out / "beta-0.9" / "metrics.json").read_text())["metrics"]
    assert float(rows[0]["kl_per_image"]) == metrics["kl_per_image"]

    table = (out / "table1.md").read_text()
    header, rule, first, second = table.splitlines()[:4]
    assert header.startswith(
        "| beta | MSE per image | MSE per pixel | KL per image | attribute accuracy | accuracy floor |"
    )
    assert first.startswith("| 0.9 |") and second.startswith("| 0.5 |")
    assert "10 steps of batch 16" in table
    assert "recognises reliably on real test images: none here" in table  # why the control column is empty

    saved = json.loads((out / "sweep.json").read_text())
    assert saved["betas"] == [0.5, 0.9] and [r["action"] for r in saved["runs"]] == ["train", "train"]
    assert all("resume=latest" in r["command"] and r["step"] == 10 for r in saved["runs"])
    assert saved["classifier"] and saved["table"] == result["table"]
    # per attribute, as the caption says
    assert all(
        r["control"]["reliable"] == [] and set(r["control"]["per_attribute"]) == {f"digit_{i}" for i in range(10)}
        for r in saved["runs"]
    )


def test_the_figures_have_one_row_per_beta_at_the_image_size(swept):
    out, result = swept
    layouts = result["figures"]
    cell = 32 * scale_for((32, 32)) + PAD

    def check(name, rows, columns):
        with Image.open(out / f"{name}.png") as figure:
            width, height = figure.size
        layout = layouts[name]
        assert (layout["rows"], layout["columns"]) == (rows, columns)
        assert height == rows * cell + PAD
        assert width == layout["label_width"] + columns * cell + PAD and layout["label_width"] > 0

    check("figure3", 2, 10)  # one row per beta; one column per digit, the same noise in every row
    assert layouts["figure3"]["labels"] == ["beta=0.9", "beta=0.5"] and layouts["figure3"]["conditions"] == DIGITS
    check("figure4", 3, 8)  # ground truth, then one row per beta
    assert layouts["figure4"]["labels"][0] == "ground truth"
    check("figure5", 10, 8)  # one-hot digits: the base class, then switched to each of the 9 others
    assert layouts["figure5"]["beta"] == 0.9 and layouts["figure5"]["mode"] == "switch class"
    assert layouts["figure5"]["labels"][0].startswith("base: digit_")
    curves = layouts["loss_curves"]["points"]
    assert set(curves) == {"beta=0.9", "beta=0.5"}
    # steps 5 and 10
    assert all(points == {"train/loss": 2, "train/mse": 2, "train/kl": 2} for points in curves.values())
    with Image.open(out / "loss_curves.png") as curves_png:
        assert curves_png.size[0] > 600


def test_a_second_sweep_reuses_the_finished_runs(swept, digits_shards, monkeypatch):
    out, _ = swept
    weights = {p: p.stat().st_mtime_ns for p in out.glob("beta-*/model.safetensors")}
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("a finished run was retrained"))
    start = time.perf_counter()
    # no classifier this time (none beside the runs either): the accuracy columns are empty
    result = run_sweep(sweep_args(digits_shards, betas="[0.9,0.5]"), out=out, device="cpu", log=lambda _: None)
    assert time.perf_counter() - start < 60
    assert [r["action"] for r in result["runs"]] == ["reuse", "reuse"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("beta-*/model.safetensors")} == weights
    rows = read_csv(out / "table1.csv")
    assert [row["beta"] for row in rows] == ["0.9", "0.5"] and all(row["attr_acc"] == "" for row in rows)
    assert "| - |" in (out / "table1.md").read_text()


def test_an_interrupted_run_resumes_and_other_settings_are_refused(swept, digits_shards, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    (out / "beta-0.5" / "model.safetensors").unlink()  # as if killed before the end
    commands = []

    def fake_training(command, write=None, env=None):  # the trainer's resume itself is tested in test_train.py
        assert env == {"CVAE_TK_SWEEP": "1"}  # its advice on stopping: run the sweep again
        commands.append(command)
        shutil.copy(swept[0] / "beta-0.5" / "model.safetensors", out / "beta-0.5" / "model.safetensors")
        return 0, ""

    monkeypatch.setattr(sweep, "stream_process", fake_training)
    args = sweep_args(digits_shards)
    result = run_sweep(args, out=out, device="cpu", log=lambda _: None)
    assert [r["action"] for r in result["runs"]] == ["resume", "reuse"]
    (command,) = commands
    assert command[-1] == "resume=latest" and "beta=0.5" in command and f"run_dir={out / 'beta-0.5'}" in command

    commands.clear()
    with pytest.raises(UserError, match=r"beta-0.5 holds a run with other settings \(lr"):
        run_sweep(args + ["lr=0.01"], out=out, device="cpu", log=lambda _: None)
    assert commands == []  # refused before anything trained


@pytest.mark.parametrize("value", ["[]", "[1.5]", "[-0.1]", "[a]", "[0.5,0.5]", "true", "[0.5", ""])
def test_bad_betas_are_refused_before_anything_is_written(value, tmp_path):
    with pytest.raises(UserError, match="betas"):
        run_sweep(["recipe=digits", f"betas={value}"], out=tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_betas_parse_as_a_yaml_list():
    assert parse_betas("[0.25,0.5,0.75,0.9]") == [0.25, 0.5, 0.75, 0.9]
    assert parse_betas("[0, 1]") == [0.0, 1.0]
    assert parse_betas("0.5") == [0.5] and parse_betas("0.25,0.5") == [0.25, 0.5]
    # exponents without a dot, which YAML 1.1 reads as text (and `beta=1e-3` is a number to OmegaConf)
    assert parse_betas("[1e-3,5E-1]") == [0.001, 0.5] and parse_betas("1e-320") == [1e-320]
    assert load_config(["recipe=digits", "beta=1e-3"]).beta == 0.001
    assert sweep.split_arguments(["recipe=digits"])[0] == [0.25, 0.5, 0.75, 0.9]  # the paper's, by default


@pytest.mark.parametrize(
    "arg, words",
    [
        ("nosuchkey=1", "unknown config key 'nosuchkey'"),
        ("beta=0.5", "set by the sweep"),
        ("run_dir=x", "--out"),
        ("max_steps=-1", "max_steps"),
        # every run it trains gets resume=latest, which overwrite=true contradicts: each child refused it
        ("overwrite=true", "overwrite=true .on the command line. does not apply to a sweep"),
    ],
)
def test_bad_overrides_fail_before_any_run_folder_exists(arg, words, digits_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError, match=words.replace("'", ".")):
        run_sweep(sweep_args(digits_shards, arg), out=tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_failing_training_process_names_the_beta_and_its_folder(digits_shards, tmp_path):
    with pytest.raises(UserError) as error:
        run_sweep(
            sweep_args(digits_shards, betas="[0.75]"), out=tmp_path / "out", launcher="false", log=lambda _: None
        )
    message = str(error.value)
    assert "beta=0.75" in message and str(tmp_path / "out" / "beta-0.75") in message and "exit code 1" in message


def test_cli_sweep_errors_are_one_line(tmp_path):
    assert_user_error(run_cli(["sweep", "recipe=digits", "betas=[2]"], tmp_path), "betas", "[0, 1]")
    assert_user_error(run_cli(["sweep", "recipe=digits", "betas=[0.5]", "nosuchkey=1"], tmp_path), "nosuchkey")
    assert not (tmp_path / "runs").exists()


def test_figure5_rows_for_multi_hot_attributes():
    import torch

    from toolkit.figures import EDIT_LIMIT, attribute_rows

    names = [f"a{i}" for i in range(40)]
    base = torch.zeros(40)
    base[[3, 7]] = 1
    vectors, labels, mode = attribute_rows(base, names, ["a3", "a9"])
    assert mode == "toggle attribute" and labels == ["base: a3, a7", "- a3", "+ a9"]
    assert vectors[1].tolist() == [1.0 if i == 7 else 0.0 for i in range(40)] and vectors[2][[3, 7, 9]].tolist() == [
        1,
        1,
        1,
    ]
    frequencies = torch.full((40,), 0.01)
    frequencies[20:] = 0.45  # the most balanced attributes are chosen, in the data's order
    _, labels, _ = attribute_rows(base, names, None, frequencies)
    assert labels[1:] == [f"+ a{i}" for i in range(20, 20 + EDIT_LIMIT)]
    with pytest.raises(UserError, match="nope"):
        attribute_rows(base, names, ["nope"])


def test_many_class_one_hot_data_shows_the_classes_the_test_split_holds(tmp_path):
    """CUB species-only shards (200 classes, a sample holding a few): grids and Figures 3 and 5 show
    each class present in the test split alone, not the first test images' (mostly one) species."""
    import io

    import numpy as np

    from toolkit.data.shards import Sample, write_split
    from toolkit.figures import attribute_rows, sample_conditions, split_classes
    from toolkit.train import grid_conditions

    names = [f"species_{i}" for i in range(40)]
    present = [7, 7, 7, 3, 7, 31, 3, 12]  # test images' classes, in order

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (90, 120, 150)).save(buffer, format="PNG")
        return buffer.getvalue()

    samples = [Sample(f"img{i}", png(), "png", np.eye(40, dtype=np.uint8)[c]) for i, c in enumerate(present)]
    write_split(samples, tmp_path, "test", names, (8, 8), "test", shard_size=3)
    assert split_classes(tmp_path, 40, 16) == [7, 3, 31, 12] and split_classes(tmp_path, 40, 2) == [7, 3]
    assert grid_conditions(str(tmp_path), 40).argmax(dim=1).tolist() == [7, 3, 31, 12]
    conditions, labels = sample_conditions(tmp_path, names)
    assert (
        labels == ["species_7", "species_3", "species_31", "species_12"]
        and conditions.sum(dim=1).tolist() == [1.0] * 4
    )
    import torch

    vectors, labels, mode = attribute_rows(torch.eye(40)[7], names, classes=[7, 3, 31, 12])
    assert mode == "switch class" and labels == ["base: species_7", "-> species_3", "-> species_31", "-> species_12"]
    assert vectors.sum(dim=1).tolist() == [1.0] * 4  # never two species at once


def test_a_folder_holding_the_users_own_table_is_refused_before_anything_trains(digits_shards, tmp_path, monkeypatch):
    """`--out notes` holding the user's table1.md used to be overwritten after hours of training."""
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("training started"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "table1.md").write_text("my table")
    with pytest.raises(UserError, match="--out .*notes holds files that cvae-tk did not write there \\(table1.md\\)"):
        run_sweep(sweep_args(digits_shards), out=notes, log=lambda _: None)
    assert [p.name for p in notes.iterdir()] == ["table1.md"]


def test_an_earlier_sweep_is_written_again_also_one_from_before_the_owner_file(swept, digits_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    assert (out / sweep.OWNER).is_file()
    (out / sweep.OWNER).unlink()  # written before the mark existed: its sweep.json tells
    run_sweep(sweep_args(digits_shards), out=out, device="cpu", log=lambda _: None)
    assert (out / sweep.OWNER).is_file()


def copy_sweep(swept_out: Path, to: Path, shards: Path) -> Path:
    """A copy of the swept folder whose runs name `shards` (a copy of the digits) as their data.shards."""
    shutil.copytree(swept_out, to)
    for recipe in to.glob("beta-*/recipe.yaml"):
        text = recipe.read_text()
        start = text.index("shards: ") + len("shards: ")
        recipe.write_text(text[:start] + str(shards) + text[text.index("\n", start) :])
    return to


def write_digits(out: Path, size: int = 32, shard_size: int = 1000) -> Path:
    from toolkit.data.digits import ATTRIBUTES, SPLITS, digit_samples
    from toolkit.data.shards import write_split

    shutil.rmtree(out, ignore_errors=True)
    for split in SPLITS:
        write_split(
            digit_samples(split, size), out, split, ATTRIBUTES, (size, size), "scikit-learn digits", shard_size
        )
    return out


def test_a_run_is_never_reused_or_measured_on_shards_rebuilt_since_it_was_trained(
    swept, digits_shards, tmp_path, monkeypatch
):
    """The shards at data.shards rebuilt (other shard sizes: the same attribute names and image size)
    after the runs were trained: the sweep reused the runs and their metrics.json (a table of other data),
    `cvae-tk eval` measured on them silently; rebuilt at 16x16, the figures were a traceback after the table."""
    shards = write_digits(tmp_path / "shards")
    out = copy_sweep(swept[0], tmp_path / "sweep", shards)
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("training started"))
    assert [run.action for run in sweep.plan(sweep_args(shards), out)[0]] == [
        "reuse",
        "reuse",
    ]  # a byte-identical rebuild

    write_digits(shards, shard_size=50)
    with pytest.raises(UserError) as error:
        run_sweep(sweep_args(shards), out=out, device="cpu", log=lambda _: None)
    assert str(error.value).startswith(
        f"{out / 'beta-0.5'} was trained on other shards than data.shards={shards} holds now (the train split: its manifest differs"
    )
    with pytest.raises(
        UserError, match=f"no longer holds the shards {out / 'beta-0.5'} was trained on .*pass --shards"
    ):
        evaluate_run(out / "beta-0.5", device="cpu", write=False)
    measured = evaluate_run(out / "beta-0.5", device="cpu", shards=shards, write=False)  # asked for: measured
    assert measured["metrics"]["count"] == 179

    # no checkpoint left to tell: the model's own image size and attribute names still do
    for folder in out.glob("beta-*/checkpoints"):
        shutil.rmtree(folder)
    write_digits(shards, size=16)
    with pytest.raises(UserError, match=r"beta-0.5 was trained on other shards .*\(16x16 images, the model 32x32\)"):
        run_sweep(sweep_args(shards), out=out, device="cpu", log=lambda _: None)
    assert not list(out.glob(".*.tmp"))


def test_a_metrics_json_measured_on_other_shards_is_measured_again(
    swept, digits_shards, untrained_classifier, tmp_path, monkeypatch
):
    """`cvae-tk eval RUN --shards OTHER` writes RUN/metrics.json; the sweep then took it for its table."""
    out = tmp_path / "sweep"
    shutil.copytree(swept[0], out)
    other = write_digits(tmp_path / "other", shard_size=50)
    evaluate_run(out / "beta-0.5", classifier=untrained_classifier, device="cpu", shards=other)
    measured = []

    def evaluate(run_dir, **options):
        measured.append(Path(run_dir).name)
        return sweep_evaluate(run_dir, **options)

    sweep_evaluate = sweep.evaluate_run
    monkeypatch.setattr(sweep, "evaluate_run", evaluate)
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("a finished run was retrained"))
    run_sweep(sweep_args(digits_shards), out=out, classifier=untrained_classifier, device="cpu", log=lambda _: None)
    assert "beta-0.5" in measured
    assert all(
        json.loads((out / f"beta-{b}" / "metrics.json").read_text())["shards"] == str(digits_shards)
        for b in ("0.5", "0.9")
    )


def test_a_sweep_that_fails_while_drawing_leaves_the_earlier_files_whole(
    swept, untrained_classifier, digits_shards, tmp_path, monkeypatch
):
    """table1.md used to be replaced before the figures were drawn: a failure there left a new table
    beside the older sweep's figures and sweep.json."""
    out = tmp_path / "sweep"
    shutil.copytree(swept[0], out)
    before = {name: (out / name).read_bytes() for name in OUTPUTS}

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(sweep.figures, "attribute_figure", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        run_sweep(
            sweep_args(digits_shards, betas="[0.9]"),
            out=out,
            classifier=untrained_classifier,
            device="cpu",
            log=lambda _: None,
        )
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [sweep.OWNER]  # no temporaries, no lock


def test_an_out_holding_a_sweep_of_other_settings_is_refused_and_machine_settings_reuse(
    swept, digits_shards, monkeypatch
):
    """Another beta list with another lr into the same --out trained beside the first sweep's runs
    and replaced its table and figures; a changed loader worker count refused the finished runs."""
    out = swept[0]
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError) as error:
        run_sweep(sweep_args(digits_shards, "lr=0.01", betas="[0.25]"), out=out, log=lambda _: None)
    assert str(error.value) == (
        f"--out {out} holds the runs of a sweep with other settings (beta-0.5: lr: 0.001 there, 0.01 now): "
        "its table and figures would be replaced by this one's; choose another --out"
    )
    assert not (out / "beta-0.25").exists()
    runs, _, _ = sweep.plan(sweep_args(digits_shards, "data.num_workers=1", "log_every=2"), out)
    assert [run.action for run in runs] == ["reuse", "reuse"]
    assert runs[0].reason.startswith("finished, same settings apart from data.num_workers: 0 -> 1")
    assert [run.action for run in sweep.plan(sweep_args(digits_shards, betas="[0.25,0.5]"), out)[0]] == [
        "train",
        "reuse",
    ]


def test_a_second_sweep_into_one_out_is_refused_while_the_first_writes(swept, digits_shards, monkeypatch):
    import os
    import socket

    out = swept[0]
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("training started"))
    lock = out / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n")
    try:
        with pytest.raises(
            UserError, match=f"another sweep \\(pid {os.getpid()} on this machine\\) is writing --out {out}"
        ):
            run_sweep(sweep_args(digits_shards, betas="[0.25]"), out=out, log=lambda _: None)
    finally:
        lock.unlink()
    assert not (out / "beta-0.25").exists()


def test_a_betas_list_cut_by_the_shell_or_rounded_together_is_said_so():
    with pytest.raises(UserError, match=r"'\[0.5,' is not a list .*the shell cut the list at a space"):
        sweep.split_arguments(["recipe=digits", "betas=[0.5,", "0.9]"])
    with pytest.raises(UserError, match=r"betas=0.5 is followed by '0.9'; the shell cut the list at a space"):
        sweep.split_arguments(["recipe=digits", "betas=0.5", "0.9"])
    with pytest.raises(
        UserError, match=r"0.1234567 and 0.1234568 are the same beta at 6 significant digits \(0.123457\)"
    ):
        parse_betas("[0.1234567,0.1234568]")
    with pytest.raises(UserError, match=r"0.1 is given more than once"):
        parse_betas("[0.1,0.10]")


def test_attribute_names_in_table1_md_read_as_they_are_spelled():
    """The control caption lists attribute names: `|` split a line of the table's text, `*em*` and
    `<b>` were set as emphasis and HTML, a newline broke the caption."""
    names = ["a|b", "*em*", "<b>", "new\nline", "x_y", "é"]
    report = {
        "settings": {"control_conditions": 8},
        "control": {"reliable": names, "per_attribute": {name: {"real_balanced": 0.9} for name in names}},
    }
    caption = sweep.control_caption(report)
    assert "\n" not in caption
    assert r"a\|b (0.90), \*em\* (0.90), \<b\> (0.90), new\\nline (0.90), x\_y (0.90), é (0.90)" in caption


def test_figure_labels_are_one_line_of_characters_the_font_draws():
    """An attribute named with a newline was a ValueError from PIL after the training (Figure 5's
    labels); é was drawn as a box by PIL's default font; a 300-letter name made the label column as wide."""
    import torch

    from toolkit.figures import LABEL_CHARS, label_text, labelled_grid

    labels = ["+ new\nline", "+ é", "+ 日本", "+ " + "L" * 300, '- a|b "q" `t`', "+ zero\u200bwidth"]
    image, layout = labelled_grid([torch.rand(2, 3, 8, 8) for _ in labels], labels, scale=8)
    assert layout["labels"] == labels  # sweep.json keeps the names as they are
    assert [label_text(label) for label in labels] == [
        "+ new\\nline",
        "+ é",
        "+ \\u65e5\\u672c",
        "+ " + "L" * (LABEL_CHARS - 5) + "...",
        '- a|b "q" `t`',
        "+ zero\\u200bwidth",
    ]
    assert layout["label_width"] < 400 and image.size[0] == layout["size"][0]


def test_an_interrupted_sweep_lets_its_training_process_stop_by_itself(tmp_path):
    """Ctrl-C reaches the sweep and its training process alike; the sweep killed the child at once,
    before it could release its run folder's lock (the next sweep took over a 'stale' lock)."""
    import os
    import signal
    import sys

    child = (
        "import os, time\n"
        "try:\n"  # ready only once the Ctrl-C would be caught: it came between the print and the try
        "    print('ready', os.getpid(), flush=True)\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        f"    time.sleep(0.5); open({str(tmp_path / 'released')!r}, 'w').close()\n"
    )

    seen = []

    def terminal(text):  # what a Ctrl-C does: SIGINT to the child, KeyboardInterrupt in the sweep
        seen.append(text)
        words = "".join(seen).split()
        if len(words) == 2 and "".join(seen).endswith("\n"):
            os.kill(int(words[1]), signal.SIGINT)
            raise KeyboardInterrupt

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        sweep.stream_process([sys.executable, "-c", child], write=terminal)
    assert (tmp_path / "released").is_file() and time.perf_counter() - start < sweep.STOP_GRACE_S


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_training_process_does_not_outlive_the_sweep_that_started_it(tmp_path, signal_name):
    """A sweep killed outright (SIGKILL, a scheduler's SIGTERM: no `finally` runs) left its training
    child running, holding the GPU and the run folder's lock."""
    import os
    import signal
    import subprocess

    import psutil

    child = "import os, time; open('child.pid', 'w').write(str(os.getpid())); time.sleep(120)"
    parent = f"from toolkit.sweep import stream_process; stream_process([{sys.executable!r}, '-c', {child!r}])"
    root = Path(__file__).resolve().parents[1]
    sweep_process = subprocess.Popen(
        [sys.executable, "-c", parent], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "child.pid").is_file() or not (tmp_path / "child.pid").read_text():
        assert time.monotonic() < deadline and sweep_process.poll() is None, "the child did not start"
        time.sleep(0.05)
    training = psutil.Process(int((tmp_path / "child.pid").read_text()))
    sweep_process.send_signal(getattr(signal, signal_name))
    sweep_process.wait(timeout=30)
    try:
        training.wait(timeout=15)
    except psutil.TimeoutExpired:
        training.kill()
        pytest.fail("the training process outlived the sweep")


def test_figure5_attributes_take_a_name_that_holds_a_comma_as_that_name():
    """Class folders and CSV headers may be named 'c,d': a value that is an attribute's name is that
    attribute (it was split into 'c' and 'd', so the class could not be chosen); any other value is a
    comma-separated list, and the option may be repeated, one name each."""
    names = ["a", "c,d", "e f", "c"]
    assert sweep.figure5_names(["c,d"], names, "s") == ["c,d"]
    assert sweep.figure5_names(["a,e f", "c"], names, "s") == ["a", "e f", "c"]
    assert sweep.figure5_names(["a", "c,d", "a"], names, "s") == ["a", "c,d"]  # each once, in the order given
    assert sweep.figure5_names(["a,c,a,c"], names, "s") == ["a", "c"]  # within one value too
    assert sweep.figure5_names(None, names, "s") is None and sweep.figure5_names([], names, "s") is None
    assert sweep.figure5_names("a,c", names, "s") == ["a", "c"]  # a text from Python: one value, not its letters
    for values, words in ((["a,x"], "'x'"), (["d"], "'d'"), ([","], "names no attribute")):
        with pytest.raises(UserError, match=words):
            sweep.figure5_names(values, names, "s")


def test_figure5_names_match_in_either_unicode_normalization_and_keep_the_models_spelling():
    """'é' typed as 'e' + a combining accent (macOS) against data whose name is one code point was 'unknown
    attribute' for --figure5-attributes and Figure 5's `only` (the ONNX Sampler matched it): names are
    matched as the text they show (NFC), once each, and labelled as the model spells them."""
    import unicodedata

    import torch

    from toolkit.figures import attribute_rows

    nfc, nfd = (unicodedata.normalize(form, "é") for form in ("NFC", "NFD"))
    names = ["a", "c,d", nfc]
    assert sweep.figure5_names([nfd], names, "s") == [nfc]
    assert sweep.figure5_names([f"a,{nfd}", nfc], names, "s") == ["a", nfc]
    vectors, labels, mode = attribute_rows(torch.tensor([1.0, 1.0, 0.0]), names, [nfd, "a", nfc])  # multi-hot
    assert mode == "toggle attribute" and labels == ["base: a, c,d", f"+ {nfc}", "- a"]
    assert vectors[1].tolist() == [1.0, 1.0, 1.0]
    _, labels, mode = attribute_rows(torch.tensor([1.0, 0.0, 0.0]), ["a", "b", nfc], [nfd, nfc])  # one-hot
    assert mode == "switch class" and labels == ["base: a", f"-> {nfc}"]


def test_the_cli_hands_each_figure5_attributes_value_to_the_sweep_as_given(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app

    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda args, **options: seen.update(options))
    command = ["sweep", "recipe=digits", "--figure5-attributes", "c,d", "--figure5-attributes", "a,b"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert seen["figure5_attributes"] == ["c,d", "a,b"]  # resolved against the data's names by figure5_names


@pytest.mark.parametrize(
    "held, words",
    [
        ({"notes.txt": "mine"}, "holds files that are not a cvae-tk run's (notes.txt)"),
        ({"samples.png": ""}, "a run's files (samples.png) without its recipe.yaml"),
        (None, "is a file, expected a folder"),
        ("link", "is a symbolic link to "),
    ],
)
def test_a_beta_folder_its_training_would_refuse_is_refused_before_any_beta_trains(
    held, words, digits_shards, tmp_path, monkeypatch
):
    """The training process of beta=0.9 refused its folder only after beta=0.5 had trained (hours);
    the plan now asks each folder what training would, without changing it."""
    folder = tmp_path / "out" / "beta-0.9"
    folder.parent.mkdir(parents=True)
    if held == "link":  # a link to a folder that is not there (a disk not mounted): was 'is a file'
        folder.symlink_to(tmp_path / "gone")
    else:
        folder.write_text("mine") if held is None else folder.mkdir()
    for name, text in (held if isinstance(held, dict) else {}).items():
        (folder / name).write_text(text)
    monkeypatch.setattr(sweep, "stream_process", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError) as caught:
        run_sweep(sweep_args(digits_shards), out=tmp_path / "out", log=lambda _: None)
    assert words in str(caught.value) and "sweep into another --out" in str(caught.value)
    assert "overwrite=true" not in str(caught.value)  # a sweep does not take it
    if isinstance(held, dict):
        assert sorted(p.name for p in folder.iterdir()) == sorted(held)
    if held == "link":
        assert "gone, which does not exist" in str(caught.value) and "is a file" not in str(caught.value)
        assert folder.is_symlink() and not (tmp_path / "gone").exists()
    assert not (tmp_path / "out" / "beta-0.5").exists()


def test_an_interrupted_training_process_of_a_sweep_says_to_run_the_sweep_again(digits_shards, tmp_path):
    """A sweep's training process, interrupted, said 'continue with resume=latest' (a training command
    the user never typed); the sweep passes resume=latest to each beta when its own command runs again.
    The training process is now told it is a sweep's, and what it says while stopping reaches the terminal."""
    import os
    import signal

    from toolkit.entry import IN_SWEEP, SWEEP_AGAIN
    from toolkit.train import interrupted

    config = load_config(["recipe=digits", f"run_dir={tmp_path / 'run'}"])
    assert "resume=latest" in interrupted(config) or "run it again" in interrupted(config)
    os.environ[IN_SWEEP] = "1"
    try:
        line = interrupted(config)
    finally:
        del os.environ[IN_SWEEP]
    assert SWEEP_AGAIN in line and "resume=latest" not in line.replace(SWEEP_AGAIN, "")

    child = (
        "import os, sys, time\n"
        "try:\n"
        "    print('ready', os.getpid(), flush=True)\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        f"    time.sleep(0.3); print('stopped in a sweep:', os.environ.get({IN_SWEEP!r}), flush=True)\n"
    )
    seen = []

    def terminal(text):  # Ctrl-C: SIGINT to the child, KeyboardInterrupt in the sweep
        seen.append(text)
        words = "".join(seen).split()
        if len(words) == 2 and "".join(seen).endswith("\n"):
            os.kill(int(words[1]), signal.SIGINT)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.stream_process([sys.executable, "-c", child], write=terminal, env={IN_SWEEP: "1"})
    assert "stopped in a sweep: 1" in "".join(seen)

    # train_runs starts every training process so (a launcher standing in for one, stopped by a Ctrl-C)
    launcher = tmp_path / "launcher"
    launcher.write_text(f'#!/bin/sh\necho "error: interrupted; in a sweep: ${IN_SWEEP}"\nexit 130\n')
    launcher.chmod(0o755)
    with pytest.raises(UserError, match="in a sweep: 1"):
        run_sweep(sweep_args(digits_shards, betas="[0.75]"), out=tmp_path / "out", launcher=str(launcher), log=print)


def test_ctrl_c_in_a_sweep_is_one_line_saying_to_run_it_again(monkeypatch):
    """cvae-tk sweep interrupted said only 'aborted' (exit 1)."""
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.entry import SWEEP_AGAIN

    def interrupted(args, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    result = CliRunner().invoke(app, ["sweep", "recipe=digits"])
    assert result.exit_code == 130, result.output
    assert result.output.strip() == f"error: the sweep was interrupted (Ctrl-C): {SWEEP_AGAIN}"
