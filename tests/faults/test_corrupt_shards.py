"""A cut-off tar and a corrupt image among real shards (written as `cvae-tk shards digits` writes
them): training goes on, counts and reports the skipped samples (which shard, why), resumes
exactly, and stops with one clear message once the skipped fraction passes
`data.max_skipped_fraction`; evaluation counts the same way."""

import io
import json
import shutil
import tarfile
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from toolkit.config import load_config
from toolkit.data.digits import ATTRIBUTES, digit_samples
from toolkit.data.shards import write_split
from toolkit.data.stream import eval_batches
from toolkit.errors import UserError
from toolkit.evaluate import reconstruction_metrics
from toolkit.figures import read_scalars
from toolkit.model import CVAE, load_model
from toolkit.train import BatchStream, Skips, TrainingStopped, main, restore_skips, skip_counts, train

SIZE = 8  # the digits at their own 8x8: a step takes milliseconds
TRAIN, TRAIN_SHARD, TEST_SHARD = 400, 100, 50  # 4 train shards of 100; the 179 test images in shards of 50


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "digits"
    write_split(
        islice(digit_samples("train", SIZE), TRAIN), out, "train", ATTRIBUTES, (SIZE, SIZE), "digits", TRAIN_SHARD
    )
    write_split(digit_samples("test", SIZE), out, "test", ATTRIBUTES, (SIZE, SIZE), "digits", TEST_SHARD)
    return out


@pytest.fixture
def shards(clean, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(clean, copy)
    return copy


def members(tar):
    with tarfile.open(tar) as archive:
        return archive.getmembers()  # per sample: <key>.attr.npy, then <key>.png


def cut_in_member(tar, index):
    """Truncate the tar in the middle of its member `index`'s data, as an interrupted copy leaves it."""
    member = members(tar)[index]
    tar.write_bytes(tar.read_bytes()[: member.offset_data + member.size // 2])


def corrupt_image(tar, sample):
    """Overwrite the PNG bytes of the tar's `sample`-th sample; the tar itself stays well-formed."""
    member = [m for m in members(tar) if m.name.endswith(".png")][sample]
    data = bytearray(tar.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = (b"not a png " * member.size)[: member.size]
    tar.write_bytes(bytes(data))


def damage_train(shards):
    """3 of the 400 train samples lost (0.75 %): 2 behind a cut in train-000001.tar, 1 undecodable image in train-000002.tar."""
    cut_in_member(shards / "train" / "train-000001.tar", 2 * 98 + 1)  # in sample 98's PNG: 98 of 100 samples remain
    corrupt_image(shards / "train" / "train-000002.tar", 30)


def config(shards, run_dir, *extra):
    return load_config(
        [
            "recipe=digits",
            f"run_dir={run_dir}",
            f"data.shards={shards}",
            "batch_size=40",
            "log_every=1",
            "sample_every=1000",
            "checkpoint_every=1000",
            "model.latent_dim=8",
            *extra,
        ]
    )


def replayed_skips(cfg, micro_batches):
    """What the run's reader counted over its first `micro_batches` batches, read again."""
    stream = BatchStream(cfg, rank=0, world=1)
    batches = stream.batches(0)
    for _ in range(micro_batches):
        next(batches)
    batches.close()
    return stream.skips


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cut_tar_and_a_corrupt_image_are_skipped_counted_and_reported(shards, tmp_path, capfd, workers):
    damage_train(shards)
    # 400 / 40 = 10 batches an epoch: every skip leaves a pass short, made up by reading the shards again
    common = [f"data.num_workers={workers}", "max_steps=20"]
    run = train(config(shards, tmp_path / "run", *common))
    assert load_model(run).spec.extra["step"] == 20  # training went on to the end
    err = capfd.readouterr().err
    assert "train-000001.tar: broke off after 98 of 100 samples: ReadError: unexpected end of data" in err
    assert "skipped 1 sample(s) of " in err and "train-000002.tar: sample " in err and "could not be decoded" in err
    assert "unreadable sample(s) of the train split skipped" in err  # the summary at the end

    logged = read_scalars(run, ("train/skipped_samples",))["train/skipped_samples"]
    assert [step for step, _ in logged] == list(range(1, 21))
    counts = [int(value) for _, value in logged]
    assert counts == sorted(counts) and counts[-1] == 6  # two epochs, each meeting the 3 lost samples once
    # deterministic: the reader, replayed for the same 20 batches, counts exactly what was logged, in the same shards
    skips = replayed_skips(config(shards, tmp_path / "unused", *common), 20)
    assert (skips.skipped, skips.read) == (6, 800)  # the fraction: 6 / 800 = 0.75 %
    cut, corrupt = (str(shards / "train" / f"train-00000{n}.tar") for n in (1, 2))
    assert sorted(skips.by_shard) == [cut, corrupt]
    assert skips.by_shard[cut] == [4, "broke off after 98 of 100 samples: ReadError: unexpected end of data"]
    assert skips.by_shard[corrupt][0] == 2 and skips.by_shard[corrupt][1].startswith("sample digits_")
    assert skips.by_shard[corrupt][1].endswith(
        "could not be decoded: UnidentifiedImageError: cannot identify image file <_io.BytesIO>"
    )

    # and a resumed run (mid-epoch) still ends with exactly the weights of the uninterrupted one
    train(config(shards, tmp_path / "resumed", f"data.num_workers={workers}", "max_steps=7", "checkpoint_every=7"))
    resumed = train(config(shards, tmp_path / "resumed", *common, "checkpoint_every=7", "resume=latest"))
    a, b = load_file(str(run / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def skipped_logged(run) -> list[tuple[int, int]]:
    return [
        (step, int(value)) for step, value in read_scalars(run, ("train/skipped_samples",))["train/skipped_samples"]
    ]


def trainer_state(run, step) -> dict:
    return json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())


@pytest.mark.parametrize("stop", [7, 10])  # inside the second epoch's reading; at the end of the first (10 batches)
def test_a_resumed_run_counts_on_from_what_it_skipped_before(shards, tmp_path, stop):
    damage_train(shards)
    common = ["data.num_workers=0", "max_steps=20"]
    straight = train(config(shards, tmp_path / "straight", *common))
    train(config(shards, tmp_path / "resumed", "data.num_workers=0", f"max_steps={stop}", f"checkpoint_every={stop}"))
    resumed = train(config(shards, tmp_path / "resumed", *common, "resume=latest"))
    # the log and the counts the bound is checked against go on as the uninterrupted run's
    assert skipped_logged(resumed) == skipped_logged(straight) and skipped_logged(straight)[-1] == (20, 6)
    assert trainer_state(resumed, 20)["skips"] == trainer_state(straight, 20)["skips"]
    [counts] = trainer_state(straight, 20)["skips"]
    assert counts["lost_in_shards"] + counts["undecodable"] == 6 and sorted(counts["by_shard"]) == [
        str(shards / "train" / f"train-00000{n}.tar") for n in (1, 2)
    ]


def test_a_checkpoint_without_skip_counts_resumes_counting_from_zero(shards, tmp_path):
    damage_train(shards)
    run = tmp_path / "run"
    train(config(shards, run, "data.num_workers=0", "max_steps=10", "checkpoint_every=10"))
    record = run / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    state = json.loads(record.read_text())
    assert sum(c["lost_in_shards"] + c["undecodable"] for c in state["skips"]) == 3  # the first epoch's
    record.write_text(json.dumps({**state, "skips": [{"samples_read": -1}]}))  # edited by hand: refused, naming it
    with pytest.raises(UserError, match="its 'skips' record is not one that a save writes"):
        train(config(shards, run, "data.num_workers=0", "max_steps=20", "resume=latest"))

    del state["skips"]
    record.write_text(json.dumps(state))  # as an older toolkit wrote it
    train(config(shards, run, "data.num_workers=0", "max_steps=20", "resume=latest"))
    assert skipped_logged(run)[-1] == (20, 3)  # the second epoch's only, as before the counts were kept


def test_each_rank_resumes_its_own_counts_and_another_number_of_ranks_the_same_sums(shards):
    def counts(read, lost, undecodable, shard):
        return {
            "samples_read": read,
            "lost_in_shards": lost,
            "undecodable": undecodable,
            "by_shard": {shard: [lost + undecodable, "why"]},
        }

    saved = [counts(100, 2, 0, "a.tar"), counts(120, 0, 1, "b.tar")]  # two ranks saved

    def restored(rank, world):
        skips = Skips("train", "shards", 400, check=False)
        restore_skips(skips, saved, rank, world)
        return skip_counts(skips)

    assert [restored(rank, 2) for rank in (0, 1)] == saved  # the same ranks: each its own
    alone = restored(0, 1)  # one rank now: it takes the sums (what the bound and the log use)
    assert (alone["samples_read"], alone["lost_in_shards"], alone["undecodable"]) == (220, 2, 1)
    assert alone["by_shard"] == {"a.tar": [2, "why"], "b.tar": [1, "why"]}
    four = [restored(rank, 4) for rank in range(4)]  # more ranks: rank 0 the sums, the others none
    assert four[0] == alone and all(c == skip_counts(Skips("train", "shards", 400)) for c in four[1:])


def test_past_the_bound_training_stops_with_one_clear_message(shards, tmp_path):
    damage_train(shards)  # 0.75 % lost: within the default 1 %, not within 0.1 %
    with pytest.raises(TrainingStopped) as caught:
        train(config(shards, tmp_path / "run", "max_steps=20", "data.max_skipped_fraction=0.001"))
    message = str(caught.value)
    assert message.startswith(f"too many unreadable samples in the train split of {shards}: ")
    assert "% of the split's 400 samples" in message  # early on, weighed against the whole split
    assert "more than data.max_skipped_fraction=0.001 allows" in message
    assert "train-000001.tar (2 skipped: broke off after 98 of 100 samples" in message
    assert ". Stopped after step " in message and message.endswith(", not saved")  # no checkpoint yet to name
    assert "rebuild or replace those shards, or raise data.max_skipped_fraction" in message
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_many_corrupt_shards_stop_the_command_with_one_line(shards, tmp_path, capsys):
    for number in range(4):  # every train shard cut in half: 50 % lost, far past the default 1 %
        cut_in_member(shards / "train" / f"train-{number:06d}.tar", 2 * 50 + 1)
    with pytest.raises(SystemExit) as caught:
        main(
            [
                "recipe=digits",
                f"run_dir={tmp_path / 'run'}",
                f"data.shards={shards}",
                "batch_size=40",
                "max_steps=20",
                "sample_every=1000",
                "data.num_workers=0",
            ]
        )
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: too many unreadable samples in the train split of {shards}: ")
    assert "more than data.max_skipped_fraction=0.01 allows" in error and "raise data.max_skipped_fraction" in error


def test_the_bound_is_a_checked_config_key():
    assert load_config(["recipe=digits"]).data.max_skipped_fraction == 0.01
    assert load_config(["recipe=digits", "data.max_skipped_fraction=0"]).data.max_skipped_fraction == 0
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(UserError, match=r"data\.max_skipped_fraction.*\[0, 1\]"):
            load_config(["recipe=digits", f"data.max_skipped_fraction={bad}"])


def test_evaluation_skips_and_counts_the_same_way(clean, shards, capfd):
    cut_in_member(shards / "test" / "test-000001.tar", 2 * 5 + 1)  # 5 of its 50 samples remain
    corrupt_image(shards / "test" / "test-000002.tar", 7)  # test sample 107
    # the readable samples, exactly once, in order; the lost ones counted: 46 of 179 (25.7 %)
    batches = eval_batches(shards, "test", batch_size=64, max_skipped_fraction=0.5)
    images = torch.cat([batch[0] for batch in batches])
    everything = torch.cat([batch[0] for batch in eval_batches(clean, "test", batch_size=64)])
    kept = list(range(55)) + list(range(100, 107)) + list(range(108, 179))
    assert torch.equal(images, everything[kept])
    assert (batches.skips.skipped, batches.skips.delivered) == (46, 133)
    err = capfd.readouterr().err
    assert "test-000001.tar: broke off after 5 of 50 samples" in err and "test-000002.tar: sample " in err
    # metrics are of the images read, with the bound passed through
    model = CVAE(_spec(clean)).eval()
    assert reconstruction_metrics(model, shards, "test", sampled=False, max_skipped_fraction=0.5)["count"] == 133
    # past the bound (default 1 %): one clear error, raised as soon as the skips pass 1 % of the split
    with pytest.raises(UserError) as caught:
        list(eval_batches(shards, "test", batch_size=64))
    assert str(caught.value).startswith(
        f"too many unreadable samples in the test split of {shards}: 45 skipped = 25.14% of the split's 179"
    )
    assert "data.max_skipped_fraction=0.01" in str(caught.value)
    # a shard gone altogether: all its samples (29, from the manifest) skipped, the pass goes on
    (shards / "test" / "test-000003.tar").unlink()
    batches = eval_batches(shards, "test", batch_size=64, max_skipped_fraction=0.5)
    assert torch.equal(torch.cat([batch[0] for batch in batches]), everything[kept[:-29]])
    assert (
        batches.skips.skipped == 46 + 29 and batches.skips.by_shard[str(shards / "test" / "test-000003.tar")][0] == 29
    )
    assert "test-000003.tar: unreadable: FileNotFoundError" in capfd.readouterr().err


def _spec(shards):
    from toolkit.data.stream import read_manifest
    from toolkit.model import ModelSpec

    manifest = read_manifest(shards, "test")
    return ModelSpec(attributes=manifest["attributes"], image_size=tuple(manifest["image_size"]), latent_dim=8)


def test_a_failed_pipe_command_is_reported_with_its_exit_status(shards):
    (shards / "test" / "test-000001.tar").unlink()
    batches = eval_batches(f"pipe:cat {shards}", "test", batch_size=64, max_skipped_fraction=1.0)
    assert sum(len(images) for images, _ in batches) == 179 - TEST_SHARD
    url = f"pipe:cat {shards}/test/test-000001.tar"
    lost, reason = batches.skips.by_shard[url]
    assert lost == TEST_SHARD and reason == (
        f"unreadable: the command `cat {shards}/test/test-000001.tar` failed (exit status 1)"
    ), reason


def test_an_image_of_the_wrong_size_is_skipped_before_its_pixels_are_decoded(shards, monkeypatch):
    from PIL import Image

    tar = shards / "test" / "test-000000.tar"
    member = [m for m in members(tar) if m.name.endswith(".png")][0]
    huge = io.BytesIO()
    Image.new("L", (SIZE * 500, SIZE * 500)).save(huge, "PNG")  # compresses to a few kB
    replace_member(tar, member.name, huge.getvalue())
    converted = []
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: converted.append(self.size) or self.copy())
    batches = eval_batches(shards, "test", batch_size=64, max_skipped_fraction=1.0)
    sum(len(images) for images, _ in batches)
    assert batches.skips.skipped == 1 and (SIZE * 500, SIZE * 500) not in converted
    assert "is 4000x4000, not the split's 8x8" in batches.skips.by_shard[str(tar)][1]


def replace_member(tar, name, data):
    with tarfile.open(tar) as archive:
        entries = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(tar, "w") as archive:
        for m, payload in entries:
            if m.name == name:
                payload, m.size = data, len(data)
            archive.addfile(m, io.BytesIO(payload))


def test_a_damaged_test_split_costs_the_metrics_never_the_finished_run(shards, tmp_path, capfd):
    (shards / "test" / "test-000002.tar").unlink()  # 50 of the 179 test images: far past the 1 % bound
    run = train(config(shards, tmp_path / "run", "max_steps=12"))  # 400 / 40: an epoch-end evaluation at step 10
    model = load_model(run)
    assert model.spec.extra["step"] == 12 and "test_mse_per_image" not in model.spec.extra
    err = capfd.readouterr().err
    assert "warning: step 10: no test metrics: too many unreadable samples in the test split" in err
    assert "warning: no final test metrics: too many unreadable samples in the test split" in err


def _manifest(shards) -> dict:
    import json

    return json.loads((shards / "train" / "manifest.json").read_text())


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda m: b'{"attributes": [', ["is not a JSON manifest"]),
        (lambda m: b"\xff\xfe not text", ["is not a JSON manifest"]),
        (lambda m: [m], ["expected a JSON object, got list"]),
        (lambda m: "a string", ["expected a JSON object, got str"]),
        (lambda m: {k: v for k, v in m.items() if k != "count"}, ["it has no 'count'"]),
        (lambda m: {k: v for k, v in m.items() if k != "attributes"}, ["it has no 'attributes'"]),
        (lambda m: {**m, "attributes": "digit_0"}, ["'attributes' must be a non-empty list"]),
        (lambda m: {**m, "attributes": ["a", "a"] + m["attributes"][2:]}, ["names an attribute twice"]),
        (lambda m: {**m, "shards": list(m["shards"])}, ["'shards' must map shard file names to sample counts"]),
        (
            lambda m: {**m, "shards": {**m["shards"], "train-000000.tar": -5}},
            ["has the count -5, expected an integer >= 0"],
        ),
        (lambda m: {**m, "shards": {**m["shards"], "train-000000.tar": "100"}}, ["has the count '100'"]),
        (lambda m: {**m, "shards": {**m["shards"], "train-000000.tar": True}}, ["has the count True"]),
        (lambda m: {**m, "count": m["count"] + 1}, ["'count' is 401, expected the sum of the shard counts (400)"]),
        (lambda m: {**m, "count": 1.5}, ["'count' is 1.5"]),
        (lambda m: {**m, "image_size": [8]}, ["'image_size' is [8], expected [height, width] or null"]),
        (lambda m: {**m, "image_size": "8x8"}, ["'image_size' is '8x8'"]),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_it(clean, tmp_path, damage, words):
    import json

    shards = tmp_path / "shards"
    shutil.copytree(clean, shards)
    damaged = damage(_manifest(shards))
    path = shards / "train" / "manifest.json"
    path.write_bytes(damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode())
    for read in (
        lambda: eval_batches(shards, "train"),
        lambda: train(config(shards, tmp_path / "run", "max_steps=1")),
    ):
        with pytest.raises(UserError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(str(path)) and "\n" not in message, message
        for word in words:
            assert word in message
    assert not (tmp_path / "run").exists()
