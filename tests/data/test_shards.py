import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from toolkit.data.shards import Sample, write_split
from toolkit.data.stream import eval_batches, read_manifest, train_batches
from toolkit.errors import UserError

NAMES = ["smiling", "glasses", "hat"]


def synthetic(count, size=(6, 5), seed=0):
    """Random RGB PNGs with random attribute vectors."""
    rng = np.random.default_rng(seed)
    samples, pixels = [], []
    for index in range(count):
        image = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        samples.append(
            Sample(f"img_{index:04d}", buffer.getvalue(), "png", rng.integers(0, 2, len(NAMES)).astype(np.uint8))
        )
        pixels.append(image)
    return samples, pixels


def test_round_trip_keys_images_and_attributes(tmp_path):
    samples, pixels = synthetic(7)
    manifest = write_split(samples, tmp_path, "train", NAMES, (6, 5), "synthetic", shard_size=3)
    assert manifest == json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["shards"] == {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 1}
    assert (manifest["count"], manifest["attributes"], manifest["image_size"]) == (7, NAMES, [6, 5])
    assert (manifest["source"], manifest["split"]) == ("synthetic", "train")
    # the tars hold exactly <key>.png and <key>.attr.npy, in order
    names = []
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "train" / shard) as tar:
            names += tar.getnames()
    assert names == [f"img_{i:04d}.{ext}" for i in range(7) for ext in ("attr.npy", "png")]  # TarWriter sorts fields
    # and the stream gives back the same pixels and attribute vectors, in order
    images, attributes = zip(
        *[(x, a) for batch in eval_batches(tmp_path, "train", batch_size=4) for x, a in zip(*batch)]
    )
    assert len(images) == 7
    for got, want, got_attr, sample in zip(images, pixels, attributes, samples):
        assert got.shape == (3, 6, 5)
        assert np.array_equal(np.round(got.permute(1, 2, 0).numpy() * 255).astype(np.uint8), want)
        assert np.array_equal(got_attr.numpy(), sample.attributes.astype(np.float32))


def test_rebuild_is_byte_identical_and_drops_stale_shards(tmp_path):
    samples, _ = synthetic(7)
    write_split(samples, tmp_path / "a", "test", NAMES, (6, 5), "synthetic", shard_size=3)
    write_split(samples, tmp_path / "b", "test", NAMES, (6, 5), "synthetic", shard_size=3)
    for name in ("test-000000.tar", "test-000001.tar", "test-000002.tar", "manifest.json"):
        assert (tmp_path / "a" / "test" / name).read_bytes() == (tmp_path / "b" / "test" / name).read_bytes()
    write_split(samples[:2], tmp_path / "a", "test", NAMES, (6, 5), "synthetic", shard_size=3)
    assert sorted(p.name for p in (tmp_path / "a" / "test").iterdir()) == ["manifest.json", "test-000000.tar"]


def test_a_failed_build_leaves_no_valid_looking_split(tmp_path):
    samples, _ = synthetic(5)
    write_split(samples, tmp_path, "train", NAMES, (6, 5), "synthetic", shard_size=2)

    def broken():
        yield from samples[:3]
        raise OSError("disk went away")

    with pytest.raises(OSError):
        write_split(broken(), tmp_path, "train", NAMES, (6, 5), "synthetic", shard_size=2)
    files = [p.name for p in (tmp_path / "train").iterdir()]
    assert "manifest.json" not in files and not any(name.endswith(".tmp") for name in files)
    with pytest.raises(UserError, match="manifest.json"):
        read_manifest(tmp_path, "train")


@pytest.mark.parametrize(
    "bad, message",
    [
        (Sample("a.b", b"x", "png", np.zeros(3, np.uint8)), "without '.'"),
        (Sample("a", b"x", "gif", np.zeros(3, np.uint8)), "extension"),
        (Sample("a", b"x", "png", np.zeros(2, np.uint8)), "expected 3"),
        (Sample("a", b"x", "png", np.array([0, 2, 1], np.uint8)), "0 or 1"),
    ],
)
def test_bad_samples_are_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        write_split([bad], tmp_path, "train", NAMES, (6, 5), "synthetic")
    assert not (tmp_path / "train" / "manifest.json").exists()


def test_digits_shards(digits_shards):
    train, test = read_manifest(digits_shards, "train"), read_manifest(digits_shards, "test")
    assert (train["count"], test["count"]) == (1618, 179)
    assert train["attributes"] == [f"digit_{i}" for i in range(10)] and train["image_size"] == [32, 32]
    images, attributes = next(iter(eval_batches(digits_shards, "test", batch_size=179)))
    assert images.shape == (179, 3, 32, 32) and images.dtype.is_floating_point
    assert 0 <= images.min() and images.max() <= 1 and images.max() > 0.9
    assert attributes.shape == (179, 10) and (attributes.sum(1) == 1).all()  # one-hot
    assert len(set(attributes.argmax(1).tolist())) == 10  # every digit is in the test split


def test_train_batches_are_shuffled_full_batches(digits_shards):
    stream = iter(train_batches(digits_shards, batch_size=50, seed=3, num_workers=0, shuffle_buffer=500))
    first = [next(stream) for _ in range(40)]  # more than one pass over 1618 images: it keeps going
    assert all(images.shape == (50, 3, 32, 32) and attributes.shape == (50, 10) for images, attributes in first)
    labels = first[0][1].argmax(1)
    assert len(set(labels.tolist())) > 5  # shuffled, not in file order
    again = iter(train_batches(digits_shards, batch_size=50, seed=3, num_workers=0, shuffle_buffer=500))
    assert np.array_equal(next(again)[0].numpy(), first[0][0].numpy())  # the seed fixes the order


def indexed_shards(out, sizes):
    """Shards of the given sizes; sample i's image is a flat grey of value i, so it can be told apart."""
    names, start = {}, 0
    for number, size in enumerate(sizes):
        samples = []
        for index in range(start, start + size):
            buffer = io.BytesIO()
            Image.fromarray(np.full((4, 4, 3), index, np.uint8)).save(buffer, format="PNG")
            samples.append(Sample(f"s{index:04d}", buffer.getvalue(), "png", np.zeros(len(NAMES), np.uint8)))
        write_split(samples, out / f"part{number}", "train", NAMES, (4, 4), "synthetic")
        names[f"train-{number:06d}.tar"] = size
        start += size
    # one split folder holding all shards, with a manifest listing them
    split = out / "all" / "train"
    split.mkdir(parents=True)
    for number in range(len(sizes)):
        (out / f"part{number}" / "train" / "train-000000.tar").rename(split / f"train-{number:06d}.tar")
    manifest = json.loads((out / "part0" / "train" / "manifest.json").read_text())
    manifest.update(shards=names, count=sum(sizes))
    (split / "manifest.json").write_text(json.dumps(manifest))
    return out / "all", start


def ids(batch):
    return [round(float(x) * 255) for x in batch[0][:, 0, 0, 0]]


def test_two_ranks_two_workers_get_equal_disjoint_batches(tmp_path):
    from toolkit.data.stream import epoch_batches

    shards, total = indexed_shards(tmp_path, [5, 9, 3, 12, 7, 1, 8, 6])
    for epoch in (0, 1):
        seen, counts = [], []
        for rank in (0, 1):
            loader = epoch_batches(
                shards, "train", batch_size=2, epoch=epoch, seed=4, rank=rank, world=2, num_workers=2
            )
            batches = list(loader)
            assert len(batches) == len(loader) > 0
            counts.append(len(batches))
            seen.append([i for batch in batches for i in ids(batch)])
        assert counts[0] == counts[1]  # equal steps on every rank: DDP cannot hang
        assert not set(seen[0]) & set(seen[1])  # disjoint across ranks
        everything = seen[0] + seen[1]
        assert len(everything) == len(set(everything))  # each sample at most once per epoch
        assert set(everything) <= set(range(total))
        assert len(everything) == 2 * counts[0] * 2  # ranks x batches x batch size, all full batches
    # one rank, batch 1: the epoch is complete, every sample exactly once
    single = [i for b in epoch_batches(shards, "train", 1, epoch=0, seed=4, num_workers=2) for i in ids(b)]
    assert sorted(single) == list(range(total))
    # a new epoch deals the shards differently
    first = [ids(b) for b in epoch_batches(shards, "train", 2, epoch=0, seed=4, rank=0, world=2, num_workers=2)]
    second = [ids(b) for b in epoch_batches(shards, "train", 2, epoch=1, seed=4, rank=0, world=2, num_workers=2)]
    assert first != second


def test_too_few_samples_for_the_ranks_is_a_clear_error(tmp_path):
    from toolkit.data.stream import epoch_batches

    shards, _ = indexed_shards(tmp_path, [3])
    with pytest.raises(UserError, match="rank"):
        epoch_batches(shards, "train", batch_size=2, world=2)


def test_tars_are_exactly_what_webdataset_tarwriter_writes(tmp_path):
    import webdataset as wds

    from toolkit.data.shards import FIXED_MTIME, encode_attributes

    samples, _ = synthetic(5)
    write_split(samples, tmp_path, "train", NAMES, (6, 5), "synthetic")
    reference = tmp_path / "reference.tar"
    with wds.TarWriter(str(reference), encoder=False, mtime=FIXED_MTIME) as writer:
        for sample in samples:
            writer.write(
                {"__key__": sample.key, "png": sample.image, "attr.npy": encode_attributes(sample.attributes)}
            )
    assert (tmp_path / "train" / "train-000000.tar").read_bytes() == reference.read_bytes()


def test_shards_and_manifest_can_be_read_through_a_pipe_url(tmp_path):
    samples, pixels = synthetic(5)
    write_split(samples, tmp_path, "test", NAMES, (6, 5), "synthetic", shard_size=2)
    url = f"pipe:cat {tmp_path}"  # any command printing the file: curl, aws s3 cp ... -
    assert read_manifest(url, "test")["count"] == 5
    images = [x for batch in eval_batches(url, "test", batch_size=2) for x in batch[0]]
    assert len(images) == 5
    assert np.array_equal(np.round(images[4].permute(1, 2, 0).numpy() * 255).astype(np.uint8), pixels[4])
    with pytest.raises(UserError) as failed:
        read_manifest(f"pipe:cat {tmp_path / 'nowhere'}", "test")
    command = f"cat {tmp_path / 'nowhere'}/test/manifest.json"
    assert str(failed.value) == f"could not read pipe:{command}: the command `{command}` failed (exit status 1)"
    with pytest.raises(UserError, match="the command `kill -9 .*` was killed by signal 9$"):
        read_manifest("pipe:kill -9 $$ #", "test")
    # the path may also sit inside the command: {} stands for <split>/<file>
    placeholder = f"pipe:cat {tmp_path}/{{}} -"
    assert read_manifest(placeholder, "test")["count"] == 5
    assert sum(len(batch[0]) for batch in eval_batches(placeholder, "test", batch_size=2)) == 5
