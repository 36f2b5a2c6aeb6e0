"""toolkit.data.stream's sample decoding: the JPEG fast path (torchcodec's libjpeg-turbo call) gives
PIL's pixels, refuses what PIL refuses, checks sizes before decoding and uses no deprecated decoder;
`.attr.npy` members read in place are np.load's vectors."""

from __future__ import annotations

import io
import multiprocessing
import warnings
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.data import stream
from toolkit.data.batches import to_unit_float
from toolkit.data.shards import encode_attributes
from toolkit.data.stream import WrongSize, _decode_image, _jpeg_frame, attribute_vector, decode


def _pil_pixels(data: bytes) -> np.ndarray:
    """What the stream decoded before the fast path: PIL, converted to RGB, as [3, H, W]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def _jpeg(size=(64, 64), mode="RGB", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    height, width = size
    # smooth gradients plus noise: every block has detail, and chroma that subsampling must interpolate
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


JPEGS = {
    "64x64 q95 (the shard builder's)": dict(quality=95),
    "4:4:4": dict(quality=90, subsampling=0),
    "4:2:2": dict(quality=90, subsampling=1),
    "4:2:0 q5": dict(quality=5, subsampling=2),
    "q100": dict(quality=100),
    "progressive": dict(quality=80, progressive=True),
    "optimized Huffman": dict(quality=80, optimize=True),
    "grey": dict(mode="L", quality=90),
    "odd 17x9": dict(size=(17, 9), quality=90),
    "1x1": dict(size=(1, 1)),
    "218x178": dict(size=(218, 178), quality=90),
}


@pytest.mark.parametrize("name", list(JPEGS))
def test_the_jpeg_fast_path_gives_pils_pixels(name, monkeypatch):
    options = dict(JPEGS[name])
    size, mode = options.pop("size", (64, 64)), options.pop("mode", "RGB")
    data = _jpeg(size, mode, **options)
    assert _jpeg_frame(data) == size  # so the fast path is the one taken
    calls = []
    real = stream.decode_jpeg
    monkeypatch.setattr(stream, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    pixels = _decode_image(data, size)
    assert calls and pixels.dtype == torch.uint8 and pixels.shape == (3, *size)
    np.testing.assert_array_equal(pixels.numpy(), _pil_pixels(data))


def test_decoding_calls_no_deprecated_decoder():
    # torchvision 0.29 deprecated its image decoders (to be removed) for torchcodec's: a reader
    # still on them would warn here first, and one day stop importing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, options in JPEGS.items():
            options = dict(options)
            size, mode = options.pop("size", (64, 64)), options.pop("mode", "RGB")
            assert _decode_image(_jpeg(size, mode, **options), size).shape == (3, *size), name


def test_what_the_fast_path_does_not_take_goes_through_pil():
    data = _jpeg()
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    for other in (cmyk.getvalue(), png.getvalue(), data + b"trailing bytes after the end marker"):
        if other.startswith(b"\xff\xd8") and not other.endswith(b"\xff\xd9"):
            assert _jpeg_frame(other) == (64, 64)  # a JPEG, but without its end marker last
        np.testing.assert_array_equal(_decode_image(other, (64, 64)).numpy(), _pil_pixels(other))
    assert _jpeg_frame(cmyk.getvalue()) is None  # 4 components
    for junk in (b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\x00\x00", png.getvalue()):
        assert _jpeg_frame(junk) is None


def test_a_truncated_jpeg_is_refused_as_pil_refuses_it():
    data = _jpeg(quality=95)
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(OSError, match="truncated"):
        _decode_image(cut, (64, 64))
    sample = {"__key__": "k", "jpg": cut, "attr.npy": encode_attributes(np.zeros(3, np.uint8))}
    with pytest.raises(OSError):
        decode(sample, expected_size=(64, 64))


def test_a_declared_size_other_than_the_splits_is_refused_before_decoding(monkeypatch):
    data = bytearray(_jpeg())
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = (60000).to_bytes(2, "big") + (50000).to_bytes(2, "big")  # a hostile header
    monkeypatch.setattr(stream, "decode_jpeg", lambda *a, **k: pytest.fail("decoded a wrongly sized image"))
    with pytest.raises(WrongSize, match="is 60000x50000, not the split's 64x64"):
        _decode_image(bytes(data), (64, 64))
    png = io.BytesIO()
    Image.new("RGB", (9, 7)).save(png, format="PNG")
    with pytest.raises(WrongSize, match="is 7x9, not the split's 64x64"):
        _decode_image(png.getvalue(), (64, 64))


def test_attribute_vectors_read_in_place_are_np_loads(monkeypatch):
    rng = np.random.default_rng(0)
    vectors = [(rng.random(length) > 0.5).astype(np.uint8) for length in (1, 2, 40, 312, 4000)]
    expected = [np.load(io.BytesIO(encode_attributes(vector))) for vector in vectors]
    with monkeypatch.context() as patch:  # the writer's vectors never reach np.load
        patch.setattr(stream.np, "load", lambda *a, **k: pytest.fail("np.load was called"))
        got = [attribute_vector(encode_attributes(vector)) for vector in vectors]
    for fast, slow in zip(got, expected):
        assert fast.dtype == np.uint8
        np.testing.assert_array_equal(fast, slow)
    # other .npy contents: np.load's answer, whatever it is
    for other in (np.ones(5, np.float32), np.array([True, False]), np.zeros((2, 3), np.uint8)):
        buffer = io.BytesIO()
        np.save(buffer, other)
        got = attribute_vector(buffer.getvalue())
        assert got.dtype == other.dtype and got.shape == other.shape
        np.testing.assert_array_equal(got, other)
    with pytest.raises(ValueError):
        attribute_vector(b"not an npy file at all, but long enough" * 4)


def test_a_huge_declared_jpeg_in_a_split_of_varied_sizes_meets_pils_bomb_check(monkeypatch):
    # --size original shards have no split size to compare with: the pixel count is the bound
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(stream, "decode_jpeg", lambda *a, **k: pytest.fail("decoded past the pixel limit"))
    with pytest.raises(Image.DecompressionBombError):
        _decode_image(_jpeg(), None)


# --- what crosses from the loader workers, and where batches land ----------------------------------

CUDA = "not __import__('toolkit.sessions').sessions.cuda_device_present()"


def _shard_images(shards, split: str) -> torch.Tensor:
    """Every image of `split` in shard order, each through the public `decode` (float, per image)."""
    manifest = stream.read_manifest(shards, split)
    images = []
    for name in manifest["shards"]:
        with open(shards / split / name, "rb") as file:
            images += [decode(sample)[0] for sample in stream._tar_samples(file, name)]
    return torch.stack(images)


def _crossed(batches, limit: int | None = None) -> list:
    """The batches as they come out of the DataLoader workers, before `Batches` hands them over
    (the first `limit` items: train_batches is endless)."""
    return [batch for batch, report, _ in islice(batches.loader, limit) if report is None]


def test_bound_for_the_cpu_the_workers_convert_and_the_floats_are_the_decoded_ones(digits_shards):
    batches = stream.epoch_batches(digits_shards, "train", batch_size=50, num_workers=2)
    crossed = _crossed(batches)
    assert crossed and all(batch[0].dtype == torch.float32 for batch in crossed)  # converted in the workers
    landed = list(batches)
    assert len(landed) == len(crossed) == len(batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(crossed, landed))
    # an ordered pass: exactly the per-image floats of the public decode
    ordered = torch.cat([images for images, _ in stream.eval_batches(digits_shards, "test", batch_size=64)])
    assert torch.equal(ordered, _shard_images(digits_shards, "test"))


@pytest.mark.parametrize("reader", ["epoch", "train"])
def test_bound_for_another_device_uint8_crosses_and_converts_to_the_cpus_values(digits_shards, reader):
    def make(device):
        if reader == "epoch":
            return stream.epoch_batches(digits_shards, "train", 50, num_workers=2, device=device)
        return stream.train_batches(digits_shards, 50, num_workers=2, device=device)

    # "meta" stands for a GPU here: not the CPU, so the images cross as uint8 (a quarter of the bytes)
    crossed, for_cpu = _crossed(make("meta"), 20), _crossed(make(None), 20)
    assert crossed and all(batch[0].dtype == torch.uint8 for batch in crossed)
    assert len(crossed) == len(for_cpu)
    for raw, want in zip(crossed, for_cpu):  # the same seed: the same batches in the same order
        assert torch.equal(to_unit_float(raw[0]), want[0]) and torch.equal(raw[1], want[1])


@pytest.mark.parametrize("reader", ["epoch", "train", "eval"])
def test_batches_are_converted_on_the_device_they_are_wanted_on(digits_shards, reader):
    def make(device):
        if reader == "epoch":
            return stream.epoch_batches(digits_shards, "train", 64, num_workers=1, device=device)
        if reader == "train":
            return stream.train_batches(digits_shards, 64, num_workers=1, device=device)
        return stream.eval_batches(digits_shards, "test", 64, device=device)

    on_cpu, default = next(iter(make("cpu"))), next(iter(make(None)))
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, default))
    # the meta device holds no values: what lands there was copied (as uint8), then converted there
    images, attributes = next(iter(make("meta")))
    assert images.device.type == attributes.device.type == "meta" and images.dtype == torch.float32
    # pinned (an asynchronous copy) only on a GPU's way
    assert make("cuda").loader.pin_memory and not make("cpu").loader.pin_memory and not make(None).loader.pin_memory


@pytest.mark.skipif(CUDA, reason="needs a GPU")
def test_on_cuda_batches_land_pinned_and_within_an_ulp_of_the_cpus(digits_shards):
    on_gpu = stream.epoch_batches(digits_shards, "train", 50, num_workers=2, device="cuda")
    on_cpu = stream.epoch_batches(digits_shards, "train", 50, num_workers=2)
    for (images, attributes), (want_images, want_attributes) in zip(on_gpu, on_cpu, strict=True):
        assert images.device.type == "cuda" and images.dtype == torch.float32
        assert torch.allclose(images.cpu(), want_images, rtol=2**-23, atol=0)  # CUDA: times the reciprocal of 255
        assert torch.equal(attributes.cpu(), want_attributes)


# --- one loader for every epoch: workers started once, the same batches as a loader per epoch ----


def _keys(batches, limit: int | None = None) -> list[str]:
    return [key for _, _, keys in islice(batches, limit) for key in keys]


def test_an_epoch_stream_starts_its_workers_once_and_gives_every_epochs_own_batches(digits_shards):
    def fresh(epoch: int) -> list[str]:  # a loader, and its workers, made for this epoch alone
        return _keys(
            stream.epoch_batches(digits_shards, "train", 50, epoch=epoch, seed=5, num_workers=2, with_keys=True)
        )

    want = {epoch: fresh(epoch) for epoch in range(3)}
    assert want[0] != want[1] and sorted(want[0]) != sorted(want[1])  # shuffled anew each epoch
    assert not multiprocessing.active_children()  # those loaders' workers are gone

    epochs = stream.EpochStream(digits_shards, "train", 50, seed=5, num_workers=2, with_keys=True)
    assert len(epochs.epoch(0)) == len(want[0]) // 50 and _keys(epochs.epoch(0)) == want[0]
    workers = {child.pid for child in multiprocessing.active_children()}
    assert len(workers) == 2  # they outlive the epoch
    assert _keys(epochs.epoch(0), 2) == want[0][:100]  # an epoch left after two batches...
    assert _keys(epochs.epoch(1)) == want[1]  # ...does not leak into the next
    assert _keys(epochs.epoch(2)) == want[2]
    assert {child.pid for child in multiprocessing.active_children()} == workers  # the same two, all along
    epochs.close()
    assert not multiprocessing.active_children()  # stopped when asked...
    assert _keys(epochs.epoch(1)) == want[1]  # ...and started again by a later epoch
    del epochs
    assert not multiprocessing.active_children()  # and they stop with their stream


def test_an_epoch_stream_bound_for_another_device_is_the_cpus_epoch_after_epoch(digits_shards):
    # "meta" stands for a GPU: uint8 crosses, so the workers run a pipeline of their own; nothing to
    # compare but the batch shapes and the order of the samples, which must follow the epoch
    keys = {
        device: [
            _keys(epochs.epoch(epoch))
            for epochs in [
                stream.EpochStream(digits_shards, "train", 50, seed=1, num_workers=2, with_keys=True, device=device)
            ]
            for epoch in (0, 1)
        ]
        for device in (None, "meta")
    }
    assert keys[None] == keys["meta"] and keys[None][0] != keys[None][1]


def test_a_resampled_stream_starts_its_workers_once_and_gives_every_seeds_own_batches(digits_shards):
    def fresh(seed: int) -> list[str]:  # a loader, and its workers, made for this seed alone
        return _keys(stream.train_batches(digits_shards, 50, seed=seed, num_workers=2, with_keys=True), 12)

    want = {seed: fresh(seed) for seed in (3, 4)}
    assert want[3] != want[4]
    assert not multiprocessing.active_children()

    streams = stream.ResampledStream(digits_shards, 50, num_workers=2, with_keys=True)
    assert _keys(streams.batches(3), 12) == want[3]  # endless: left after 12 batches...
    workers = {child.pid for child in multiprocessing.active_children()}
    assert len(workers) == 2
    assert _keys(streams.batches(4), 12) == want[4]  # ...without leaking into the next seed's
    assert _keys(streams.batches(3), 12) == want[3]
    assert {child.pid for child in multiprocessing.active_children()} == workers
    streams.close()
    assert not multiprocessing.active_children()
    assert _keys(streams.batches(4), 12) == want[4]
    del streams
    assert not multiprocessing.active_children()
