"""Hostile files: checkpoints and weights carrying a pickle payload, shard tars whose member names
point outside (`../../x`, `/abs/x`), manifests naming shards outside their folder or inside a
command, and writer inputs (keys, split names, CSV file names) that would escape the output folder.

Every payload here would create a marker file if it ever ran; each test checks it did not.
"""

import io
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.data.shards import Sample, encode_attributes, serialize, write_split
from toolkit.data.sources import safe_key
from toolkit.data.stream import epoch_batches, eval_batches, read_manifest
from toolkit.errors import UserError
from toolkit.safe_load import verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates `marker` (pathlib.Path.touch): proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def write_payload(path: Path, marker: Path, raw: bool = False) -> None:
    """A torch.save file (zip, pickle protocol 2) or, raw, a bare pickle (protocol 5) holding the payload."""
    path.unlink(missing_ok=True)
    if raw:
        path.write_bytes(pickle.dumps({"state": Payload(marker)}, protocol=5))
    else:
        torch.save({"state": Payload(marker)}, path)


# --- checkpoints and weights -------------------------------------------------------------------


@pytest.fixture
def resumable(trained_run, digits_shards, tmp_path):
    """A copy of the trained run's last checkpoint in a fresh run folder, and the args to resume it."""
    source = max((trained_run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / source.name
    shutil.copytree(source, checkpoint)
    args = [
        "recipe=digits",
        f"run_dir={run_dir}",
        f"data.shards={digits_shards}",
        "max_steps=1000",
        "batch_size=16",
        "data.num_workers=0",
        "log_every=1",
        "sample_every=100000",
        "resume=latest",
    ]
    return checkpoint, args


def test_a_genuine_checkpoint_passes_the_check(resumable):
    checkpoint, _ = resumable
    names = {p.name for p in checkpoint.iterdir()}
    # what accelerate 1.x writes for this trainer: the scheduler is a custom checkpoint (loaded by
    # accelerate with weights_only=False), the RNG states a torch pickle of numpy arrays
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= names
    verify_checkpoint(checkpoint)


@pytest.mark.parametrize(
    "name, raw",
    [
        # the LR scheduler: accelerate itself would unpickle it (weights_only=False)
        (
            "custom_checkpoint_0.pkl",
            False,
        ),
        ("custom_checkpoint_0.pkl", True),
        ("optimizer.bin", False),
        ("random_states_0.pkl", False),  # accelerate would only log "Could not load random states" and go on
    ],
)
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(resumable, tmp_path, name, raw):
    from toolkit.config import load_config
    from toolkit.train import train

    checkpoint, args = resumable
    marker = tmp_path / "payload-ran"
    write_payload(checkpoint / name, marker, raw)
    with pytest.raises(UserError, match=r"refusing to load .*never unpickled") as caught:
        train(load_config(args))
    assert not marker.exists(), "the payload ran"
    assert str(checkpoint / name) in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_cli_refuses_it_in_one_line(resumable, tmp_path):
    checkpoint, args = resumable
    marker = tmp_path / "payload-ran"
    write_payload(checkpoint / "custom_checkpoint_0.pkl", marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "toolkit" / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: refusing to load {checkpoint / 'custom_checkpoint_0.pkl'}: it is not plain tensors and numbers "
        "(unpickling it would call getattr, which can run code); a checkpoint file is only ever loaded as data "
        "(torch.load weights_only=True), never unpickled"
    ], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_damaged_checkpoint_files_are_named_in_one_line(resumable):
    checkpoint, _ = resumable
    data = (checkpoint / "optimizer.bin").read_bytes()
    (checkpoint / "optimizer.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        UserError, match=rf"^{re.escape(str(checkpoint / 'optimizer.bin'))} is not a readable checkpoint file: "
    ):
        verify_checkpoint(checkpoint)
    (checkpoint / "optimizer.bin").write_bytes(data)
    (checkpoint / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(
        UserError, match=rf"^{re.escape(str(checkpoint / 'model.safetensors'))} is not a readable safetensors"
    ):
        verify_checkpoint(checkpoint)


def test_weights_files_are_safetensors_only(trained_run, tmp_path):
    """model.safetensors (load_model: export, evaluate, edit, sweep) and classifier.safetensors holding
    a pickle payload are refused as unreadable safetensors, never unpickled."""
    from toolkit.classifier import AttributeClassifier, load_classifier, save_classifier
    from toolkit.export import export_onnx
    from toolkit.model import load_model

    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "config.json", run / "config.json")
    for raw in (False, True):
        write_payload(run / "model.safetensors", marker, raw)
        with pytest.raises(
            UserError, match=rf"^{re.escape(str(run / 'model.safetensors'))} is not a readable safetensors file"
        ):
            load_model(run)
        with pytest.raises(UserError, match=r"is not a readable safetensors file"):
            export_onnx(run, tmp_path / "out.onnx")
        assert not (tmp_path / "out.onnx").exists()

    folder = tmp_path / "classifier"
    save_classifier(AttributeClassifier(["a", "b"], (32, 32), width=4, depth=2), folder)
    write_payload(folder / "classifier.safetensors", marker)
    with pytest.raises(
        UserError, match=rf"^{re.escape(str(folder / 'classifier.safetensors'))} does not hold the weights"
    ):
        load_classifier(folder)
    assert not marker.exists(), "the payload ran"


# --- shard tars read by the loaders ------------------------------------------------------------

ATTRIBUTES = ["a", "b"]


def png_bytes(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_split(folder: Path, members: list, count: int, split: str = "test") -> Path:
    """folder/split/split-000000.tar holding `members` as given (names are not checked), plus a manifest.

    A member is (name, bytes), or ("symlink" | "hardlink" | "dir", name, target)."""
    (folder / split).mkdir(parents=True)
    with tarfile.open(folder / split / f"{split}-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if member[0] in ("symlink", "hardlink", "dir"):
                info = tarfile.TarInfo(member[1])
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}[
                    member[0]
                ]
                info.linkname = member[2]
                tar.addfile(info)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    manifest = {
        "attributes": ATTRIBUTES,
        "count": count,
        "shards": {f"{split}-000000.tar": count},
        "image_size": [8, 8],
    }
    (folder / split / "manifest.json").write_text(json.dumps(manifest))
    return folder


def sample_members(key: str, value: int = 0) -> list:
    return [
        (f"{key}.attr.npy", encode_attributes(np.array([1, value % 2], np.uint8))),
        (f"{key}.png", png_bytes(value)),
    ]


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


def test_member_names_pointing_outside_are_read_in_memory_and_never_extracted(tmp_path, monkeypatch):
    work = tmp_path / "work" / "deep" / "er"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # where a relative `../../x` would land if anything extracted it
    absolute = tmp_path / "escaped" / "abs"  # where an absolute member name would land
    shards = hostile_split(
        tmp_path / "shards",
        sample_members("../../x", 1) + sample_members(str(absolute), 2) + sample_members("ok", 3),
        count=3,
    )
    before = files_under(tmp_path)

    keys = [key for _, _, keys in epoch_batches(shards, "test", batch_size=1, with_keys=True) for key in keys]
    assert sorted(keys) == sorted(["../../x", str(absolute), "ok"])  # a key is a string, never a path
    images = torch.cat([images for images, _ in eval_batches(shards, "test", batch_size=8)])
    assert images.shape == (3, 3, 8, 8)

    assert files_under(tmp_path) == before, "something was written"
    assert not absolute.parent.exists() and not (work.parent.parent / "x.png").exists()


def test_links_folders_and_stray_members_are_skipped_unread(tmp_path):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    members = [
        ("dir", "ok", ""),
        *sample_members("ok"),
        ("ok.__key__", b"other"),
        ("ok.__url__", b"pipe:touch x"),  # would clash with webdataset's own fields
        ("ok.pickle", payload),
        ("ok.pyd", payload),
        ("ok.pth", payload),  # webdataset's decoders would unpickle these
        ("__meta__", b"x"),
        ("noextension", b"x"),
        ("symlink", "ok2.jpg", "/etc/passwd"),
        ("hardlink", "ok2.jpeg", "ok.png"),
        *sample_members("ok2", 1),
    ]
    shards = hostile_split(tmp_path / "shards", members, count=2)
    before = files_under(tmp_path)
    keys = [key for _, _, keys in epoch_batches(shards, "test", batch_size=1, with_keys=True) for key in keys]
    assert sorted(keys) == ["ok", "ok2"]
    assert not marker.exists(), "a member was unpickled"
    assert files_under(tmp_path) == before


ATTR = encode_attributes(np.array([1, 0], np.uint8))


@pytest.mark.parametrize(
    "members, incomplete",
    [
        ([("symlink", "x.png", "/etc/passwd"), ("x.attr.npy", ATTR)], [("x", "image (.png or .jpg)")]),
        ([("hardlink", "x.attr.npy", "/etc/passwd"), ("x.png", png_bytes())], [("x", ".attr.npy")]),
        # two keys
        (
            [("../x.png", png_bytes()), ("x.attr.npy", ATTR)],
            [("../x", ".attr.npy"), ("x", "image (.png or .jpg)")],
        ),
    ],
)
def test_a_sample_left_without_a_field_is_skipped_and_reported_like_any_unreadable_sample(
    tmp_path, capsys, members, incomplete
):
    shards = hostile_split(tmp_path / "shards", members + sample_members("ok"), count=1 + len(incomplete))
    tar = shards / "test" / "test-000000.tar"
    reasons = [
        f"sample {key!r} has no {missing} member; the shard was not written by `cvae-tk shards`, or it is damaged"
        for key, missing in incomplete
    ]
    batches = eval_batches(shards, "test", batch_size=8, max_skipped_fraction=1.0)
    assert sum(len(images) for images, _ in batches) == 1
    assert batches.skips.skipped == len(incomplete) and batches.skips.by_shard == {
        str(tar): [len(incomplete), reasons[0]]
    }
    err = capsys.readouterr().err
    assert all(f"warning: skipped 1 sample(s) of {tar}: {reason}" in err for reason in reasons), err
    # past the bound (default 1 %): one line naming the shard and the reason, no traceback
    with pytest.raises(UserError, match="too many unreadable samples in the test split") as caught:
        list(eval_batches(shards, "test", batch_size=8))
    assert reasons[0] in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "name",
    [
        "../../../evil.tar",
        "/etc/passwd",
        "sub/test-000000.tar",
        ".hidden.tar",
        "x.tar; touch MARKER",
        "$(touch MARKER).tar",
        "x.tar\nother",
        "..",
        "",
    ],
)
def test_a_manifest_naming_shards_outside_the_split_or_inside_a_command_is_refused(tmp_path, name):
    marker = tmp_path / "MARKER"
    name = name.replace("MARKER", str(marker))
    shards = tmp_path / "shards"
    (shards / "test").mkdir(parents=True)
    (shards / "test" / "manifest.json").write_text(
        json.dumps({"attributes": ATTRIBUTES, "count": 1, "shards": {name: 1}})
    )
    message = (
        f"lists the shard {name!r}: expected a plain file name such as test-000000.tar "
        "(letters, digits, '_', '-', '.'; no '/', no leading '.')"
    )
    with pytest.raises(UserError) as caught:
        read_manifest(shards, "test")
    assert str(caught.value) == f"{shards / 'test' / 'manifest.json'} {message}"
    # through a pipe: URL the name would have been pasted into a shell command
    with pytest.raises(UserError) as caught:
        list(eval_batches(f"pipe:cat {shards}/{{}}", "test"))
    assert str(caught.value) == f"pipe:cat {shards}/test/manifest.json {message}"
    assert not marker.exists(), "a command from the manifest ran"


# --- the writer: keys, split names and CSV file names cannot escape the output folder ------------


@pytest.mark.parametrize(
    "key", ["../../x", "/tmp/x", "a/b", "..", ".", "a.b", "", "a\\b", "..\\..\\x", "a\nb", "a\x00b"]
)
def test_the_writer_refuses_keys_that_are_not_one_flat_name(key):
    with pytest.raises(ValueError, match="without '.', '/', '\\\\' or control characters"):
        serialize(Sample(key, png_bytes(), "png", np.zeros(2, np.uint8)), 2)


@pytest.mark.parametrize("split", ["../escaped", "/tmp/escaped", "a/b", "..", ".", "", "te st"])
def test_the_writer_refuses_split_names_that_would_leave_the_output_folder(tmp_path, split):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="split name"):
        write_split([Sample("k", png_bytes(), "png", np.zeros(2, np.uint8))], out, split, ATTRIBUTES, (8, 8), "test")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "relative_path",
    ["../../etc/passwd", "/abs/x.jpg", "a/b.c/d.jpg", "a\\b.jpg", ".jpg", "x\ny.jpg", "..hidden.jpg", "a/../../b.png"],
)
def test_safe_keys_are_always_one_flat_name(relative_path):
    key = safe_key(relative_path)
    encoded = serialize(Sample(key, png_bytes(), "png", np.zeros(2, np.uint8)), 2)  # the writer accepts it
    with tarfile.open(fileobj=io.BytesIO(encoded.data + bytes(1024))) as tar:
        names = tar.getnames()
    assert names == [f"{key}.attr.npy", f"{key}.png"]
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in names)


def test_a_folder_data_set_cannot_name_files_outside_its_root_and_writes_only_flat_members(tmp_path):
    from toolkit.data.build import ImageSpec, build_shards
    from toolkit.data.folder import read_folder

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    names = ["a/img.one.jpg", "b.c/d/img.jpg", "weird name (1).jpg", "x/..y.jpg"]
    for index, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name)
    (tmp_path / "secret.jpg").write_bytes((root / names[0]).read_bytes())

    for bad in ("../secret.jpg", "a/../../secret.jpg", str(tmp_path / "secret.jpg"), "..\\secret.jpg"):
        table = tmp_path / "bad.csv"
        table.write_text(f'file,Smiling\n{names[0]},1\n"{bad}",0\n')
        with pytest.raises(UserError, match=r"line 3: .* is not a path inside the image folder"):
            read_folder(root, table)

    table = tmp_path / "labels.csv"
    table.write_text("file,Smiling\n" + "".join(f'"{name}",{k % 2}\n' for k, name in enumerate(names)))
    out = tmp_path / "shards" / "mine"
    before = files_under(tmp_path)
    build_shards(read_folder(root, table, test_fraction=0.25), out, ImageSpec.parse("8"), workers=1, progress=False)
    created = files_under(tmp_path) - before
    assert created and all(path in (out.parent, out) or out in path.parents for path in created), sorted(created)
    members = []
    for tar_path in out.rglob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members += tar.getnames()
    assert len(members) == 2 * len(names)
    for member in members:
        key, _, field = member.partition(".")
        assert field in ("attr.npy", "jpg") and key and "/" not in key and "\\" not in key, member
    read = sorted(
        k for split in ("train", "test") for _, _, ks in epoch_batches(out, split, 1, with_keys=True) for k in ks
    )
    assert read == sorted(safe_key(name) for name in names)
