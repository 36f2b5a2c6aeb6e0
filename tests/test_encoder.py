"""The encoder export (`cvae-tk export --encoder`: OUT-encoder.onnx, format encoder/1) and editing
through ONNX (`Sampler.encode` / `Sampler.edit`, no torch): parity with PyTorch, the metadata
contract, preprocessing as the shards were built, atomic writing of the pair, and generic ONNX
tools (checker, quantize_dynamic) on both files."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.errors import UserError

DIGITS = [f"digit_{i}" for i in range(10)]
TINY_ATTRIBUTES = [f"a{i}" for i in range(5)]
TINY_SIZE, TINY_LATENT = 8, 4


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(trained_run, tmp_path_factory):
    """The session's digits run exported with its encoder: toolkit.export.Exported."""
    from toolkit.export import export_onnx

    return export_onnx(trained_run, tmp_path_factory.mktemp("pair") / "digits.onnx", encoder=True)


@pytest.fixture(scope="module")
def model(trained_run):
    from toolkit.model import load_model

    return load_model(trained_run).eval()


@pytest.fixture(scope="module")
def sampler(pair):
    from toolkit.sampler import Sampler

    return Sampler(pair[0], device="cpu")


@pytest.fixture(scope="module")
def digits():
    """Eight test-split digits: (PIL images 32x32, attribute mappings)."""
    from toolkit.data.digits import digit_samples

    images, attributes = [], []
    for sample, _ in zip(digit_samples("test", 32), range(8)):
        images.append(Image.open(io.BytesIO(sample.image)).convert("RGB"))
        attributes.append({name: int(v) for name, v in zip(DIGITS, sample.attributes)})
    return images, attributes


def tiny_shards(folder: Path, size: int = TINY_SIZE, build: dict | None = None) -> Path:
    """A train split of three random images, as write_split writes it (with `build` options if given)."""
    from toolkit.data.shards import Sample, write_split

    rng = np.random.default_rng(0)
    samples = []
    for index in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        samples.append(
            Sample(f"s{index}", buffer.getvalue(), "png", (rng.random(len(TINY_ATTRIBUTES)) > 0.5).astype(np.uint8))
        )
    write_split(
        samples, folder, "train", TINY_ATTRIBUTES, (size, size), "tiny", extra={"build": build} if build else None
    )
    return folder


def tiny_run(folder: Path, arch: str = "paper", prior: str = "standard", seed: int = 0) -> Path:
    """An untrained model (weights moved off their zero initialisation) saved as a run folder."""
    from toolkit.model import CVAE, ModelSpec, save_model

    torch.manual_seed(seed)
    options = {"width": 16, "levels": 2, "embed_dim": 16} if arch == "resnet" else {}
    model = CVAE(
        ModelSpec(list(TINY_ATTRIBUTES), (TINY_SIZE, TINY_SIZE), TINY_LATENT, arch, prior=prior, options=options)
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_model(model, folder)
    return folder


def meta_of(path) -> dict[str, str]:
    import onnx

    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


def edited_copy(source: Path, target: Path, changes: dict) -> Path:
    """`source` with metadata entries changed (None: removed), saved as `target`."""
    import onnx

    proto = onnx.load(str(source))
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    meta.update(changes)
    del proto.metadata_props[:]
    for key, value in meta.items():
        if value is not None:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(target))
    return target


# --- the files ---------------------------------------------------------------------------------------


def test_the_encoder_file_states_the_contract(pair):
    decoder, encoder = pair[0], pair.encoder
    assert encoder == decoder.with_name("digits-encoder.onnx") and encoder.is_file()
    assert pair.encoder_error < 1e-4
    ours, theirs = meta_of(encoder), meta_of(decoder)
    assert set(theirs) <= set(ours)  # every decoder key, and these:
    assert ours["cvae_tk.format"] == "encoder/1" and theirs["cvae_tk.format"] == "sampler/1"
    for key in (
        "attributes",
        "latent_dim",
        "image_size",
        "value_range",
        "arch",
        "prior",
        "recipe",
        "step",
        "weights_sha256",
        "opset",
    ):
        assert ours[key] == theirs[key], key
    assert (ours["precision"], ours["output"]) == ("fp32", "mean")
    assert json.loads(ours["inputs"]) == ["images", "attributes"] and json.loads(ours["outputs"]) == ["mean", "logvar"]
    # the fixture's shards were written without build options: neither cropped nor resized
    assert json.loads(ours["preprocessing"]) == {
        "crop": None,
        "size": [32, 32],
        "resize": "bilinear",
        "value_range": [0, 1],
        "layout": "NCHW",
        "channels": "RGB",
    }


def test_the_encoder_matches_pytorch_at_several_batch_sizes(pair, model, digits):
    import onnxruntime as ort

    session = ort.InferenceSession(str(pair.encoder), providers=["CPUExecutionProvider"])
    images = np.stack([np.asarray(image, np.float32).transpose(2, 0, 1) / 255 for image in digits[0]])
    attributes = np.array([[a[name] for name in DIGITS] for a in digits[1]], np.float32)
    for batch in (1, 3, 8):
        mean, logvar = session.run(["mean", "logvar"], {"images": images[:batch], "attributes": attributes[:batch]})
        with torch.no_grad():
            mu, lv = model.encoder(torch.from_numpy(images[:batch]), torch.from_numpy(attributes[:batch]))
        assert mean.shape == (batch, model.spec.latent_dim)
        assert np.abs(mean - mu.numpy()).max() < 1e-4 and np.abs(logvar - lv.numpy()).max() < 1e-4


def test_every_onnx_tool_takes_both_files(pair, tmp_path):
    """onnx's full check, and onnxruntime.quantization.quantize_dynamic (which failed on the stale
    value_info shapes of the weights, and on the encoder's computed convolution kernel)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_dynamic

    feeds = {
        pair[0]: {"attributes": np.eye(10, dtype=np.float32)[:2], "noise": np.zeros((2, 16), np.float32)},
        pair.encoder: {
            "images": np.full((2, 3, 32, 32), 0.5, np.float32),
            "attributes": np.eye(10, dtype=np.float32)[:2],
        },
    }
    for path, feed in feeds.items():
        proto = onnx.load(str(path))
        assert proto.model_version == 1
        initializers = {init.name for init in proto.graph.initializer}
        assert not [value.name for value in proto.graph.value_info if value.name in initializers]
        onnx.checker.check_model(proto, full_check=True)
        quantized = tmp_path / f"{path.stem}-dynamic.onnx"
        # 7-bit weights, as toolkit.quantize makes them: 8-bit ones overflow the kernels of CPUs without VNNI
        quantize_dynamic(str(path), str(quantized), reduce_range=True)
        int8 = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
        fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for got, want in zip(int8.run(None, feed), fp32.run(None, feed)):
            assert got.shape == want.shape and np.isfinite(got).all()
            assert np.abs(got - want).max() < 0.25 * (np.abs(want).max() + 1)  # quantized, but the same model


@pytest.mark.parametrize("arch, prior", [("paper", "learned"), ("resnet", "standard"), ("resnet", "learned")])
def test_each_arch_and_prior_exports_an_encoder_whose_edit_is_pytorchs(tmp_path, arch, prior):
    from toolkit.export import export_onnx
    from toolkit.model import load_model
    from toolkit.sampler import Sampler

    run = tiny_run(tmp_path / "run", arch, prior)
    exported = export_onnx(run, tmp_path / "tiny.onnx", encoder=True, shards=tiny_shards(tmp_path / "shards"))
    assert exported.encoder_error < 1e-4
    outputs = json.loads(meta_of(exported.encoder)["outputs"])
    assert outputs == (["mean", "logvar", "prior_mean", "prior_logvar"] if prior == "learned" else ["mean", "logvar"])

    model = load_model(run).eval()
    sampler = Sampler(exported[0], device="cpu")
    photo = np.random.default_rng(1).integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    before, change = {"a0": 1, "a2": 1}, {"a0": 0, "a4": 1}
    edited = sampler.edit(photo, before, change)
    with torch.no_grad():
        x = torch.from_numpy(photo.astype(np.float32) / 255).permute(2, 0, 1)[None]
        y = torch.tensor([[1.0, 0, 1, 0, 0]])
        y_after = torch.tensor([[0.0, 0, 1, 0, 1]])
        mu, _ = model.encoder(x, y)
        expected = model.decoder(mu, y_after)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(sampler.encode(photo, before) - mu.numpy()).max() < 1e-4
    # the learned prior is undone exactly: the decoder file decodes z itself, not the prior's sample around it
    assert np.abs(edited.astype(np.int16) - np.round(expected * 255).astype(np.int16)).max() <= 1


# --- the Sampler: encode and edit without torch ------------------------------------------------------


def test_encode_matches_the_torch_encode_for_one_or_many_images(sampler, model, digits):
    from toolkit.edit import encode

    images, attributes = digits
    one = sampler.encode(images[0], attributes[0])
    assert one.shape == (1, sampler.latent_dim) and one.dtype == np.float32
    assert np.abs(one[0] - encode(model, images[0], attributes[0]).numpy()).max() < 1e-5
    # a list of PIL images, one attribute set each; the same as uint8 [N, H, W, 3]
    many = sampler.encode(images, attributes)
    stacked = sampler.encode(np.stack([np.asarray(image) for image in images]), attributes)
    assert many.shape == (8, sampler.latent_dim) and np.array_equal(many, stacked)
    assert np.abs(many[0] - one[0]).max() < 1e-6
    # one mapping for every image
    assert np.allclose(
        sampler.encode(images[:3], {"digit_3": 1})[1], sampler.encode(images[1], {"digit_3": 1})[0], atol=1e-6
    )


def test_onnx_edit_agrees_with_the_torch_edit_and_toggling_changes_the_image(sampler, model, digits):
    from toolkit.edit import edit_image

    image, attributes = digits[0][0], digits[1][0]
    present = next(name for name, value in attributes.items() if value)
    other = "digit_8" if present != "digit_8" else "digit_1"
    changes = {present: 0, other: 1}
    edited = sampler.edit(image, attributes, changes)
    expected = np.asarray(edit_image(model, image, attributes, changes))
    assert edited.shape == (32, 32, 3) and edited.dtype == np.uint8
    assert np.abs(edited.astype(np.int16) - expected.astype(np.int16)).max() <= 1
    reconstruction = sampler.edit(image, attributes)
    assert (
        np.abs(
            reconstruction.astype(np.int16) - np.asarray(edit_image(model, image, attributes)).astype(np.int16)
        ).max()
        <= 1
    )
    assert np.abs(edited.astype(np.int16) - reconstruction.astype(np.int16)).mean() > 1.0  # the toggle does something


def test_edit_temperature_draws_around_the_mean_and_is_seeded(sampler, digits):
    image, attributes = digits[0][1], digits[1][1]
    mean_edit = sampler.edit(image, attributes, temperature=0.0)
    a, b = (
        sampler.edit(image, attributes, temperature=1.0, seed=3),
        sampler.edit(image, attributes, temperature=1.0, seed=3),
    )
    c = sampler.edit(image, attributes, temperature=1.0, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, mean_edit)


def test_photos_of_any_size_and_mode_are_prepared(sampler):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    prepared = sampler.preprocess(photo)
    expected = np.asarray(photo.resize((32, 32), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255
    assert prepared.shape == (1, 3, 32, 32) and np.abs(prepared[0] - expected).max() < 1e-6
    # transparency is laid on white, as the shard builder does (toolkit.images)
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert np.allclose(sampler.preprocess(clear), 1.0)


def test_preprocessing_is_the_shard_builders_centre_crop_and_resize(tmp_path):
    """Shards built with --size 8 --crop center:20 from 30x24 PNGs: the encoder's metadata says so,
    and Sampler.preprocess of the original file gives the shard's pixels (up to the shard's JPEG
    encoding), where ignoring the crop would not."""
    from toolkit.data.build import ImageSpec, _decode, build_shards
    from toolkit.data.folder import read_folder
    from toolkit.export import export_onnx
    from toolkit.sampler import Sampler

    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    lines = ["file," + ",".join(TINY_ATTRIBUTES)]
    yy, xx = np.mgrid[0:24, 0:30]
    for index in range(4):  # smooth images (JPEG keeps them well) with a border that the crop removes
        pixels = np.stack([(xx * 8 + 40 * index) % 256, yy * 10, np.full_like(xx, 60 * index)], -1).astype(np.uint8)
        pixels[:3], pixels[:, :4] = 255, 0
        Image.fromarray(pixels).save(photos / f"p{index}.png")
        lines.append(f"p{index}.png," + ",".join(str(int(v)) for v in rng.integers(0, 2, len(TINY_ATTRIBUTES))))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    table = read_folder(photos, tmp_path / "labels.csv", test_fraction=0.25)
    build_shards(table, tmp_path / "shards", ImageSpec.parse("8", "center:20"), workers=1, progress=False)

    exported = export_onnx(
        tiny_run(tmp_path / "run"), tmp_path / "tiny.onnx", encoder=True, shards=tmp_path / "shards"
    )
    assert json.loads(meta_of(exported.encoder)["preprocessing"])["crop"] == {"kind": "center", "side": 20}
    sampler = Sampler(exported[0], device="cpu")

    key = table.splits["train"][0]
    with tarfile.open(next((tmp_path / "shards" / "train").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg") and m.name.startswith(key.key))
        shard = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    prepared = sampler.preprocess(Image.open(key.path))[0]
    uncropped = (
        np.asarray(Image.open(key.path).convert("RGB").resize((8, 8), Image.BILINEAR), np.float32).transpose(2, 0, 1)
        / 255
    )
    # the shard holds a JPEG (q95, chroma subsampled: ~4 levels on these colours); ignoring the crop costs ~30
    assert np.abs(prepared - shard).mean() * 255 < 6
    assert np.abs(uncropped - shard).mean() * 255 > 3 * np.abs(prepared - shard).mean() * 255
    # before that JPEG, exactly the builder's pixels (its decode, then its crop-and-resize call)
    decoded, box = _decode(key.path, ImageSpec.parse("8", "center:20"), None)
    built = np.asarray(decoded.resize((8, 8), Image.BILINEAR, box=box), np.float32).transpose(2, 0, 1) / 255
    assert np.array_equal(prepared, built)

    with pytest.raises(UserError, match="smaller than the centre crop of 20"):
        sampler.preprocess(np.zeros((16, 40, 3), np.uint8))


@pytest.mark.parametrize(
    "build, crop",
    [
        (
            {"source": "x", "image": {"size": [8, 8], "crop": 148, "quality": 95}, "shard_size": None},
            {"kind": "center", "side": 148},
        ),
        (
            {
                "source": "x",
                "image": {"size": [8, 8], "crop": None, "quality": 95},
                "shard_size": None,
                "bbox_crop": "square 1.5 x longer side",
            },
            "bbox",
        ),
        ({"source": "scikit-learn digits", "size": 8, "shard_size": 100}, None),
    ],
)
def test_the_preprocessing_comes_from_the_manifests_build_options(tmp_path, build, crop):
    from toolkit.export import run_preprocessing

    shards = tiny_shards(tmp_path / "shards", build=build)
    assert run_preprocessing(tmp_path, (8, 8), shards)["crop"] == crop


def test_bad_images_are_refused_in_one_line(sampler):
    for images, fragment in (
        (np.zeros((32, 32, 3), np.float32), "float32"),
        (np.zeros((32, 32), np.uint8), "uint8 [32, 32]"),
        ([], "no images given"),
        ("photo.png", "str"),
    ):
        with pytest.raises(UserError, match=re.escape(fragment)):
            sampler.encode(images, {"digit_1": 1})
    with pytest.raises(UserError, match="3 attribute sets for 2 images"):
        sampler.encode(np.zeros((2, 32, 32, 3), np.uint8), [{"digit_1": 1}] * 3)
    with pytest.raises(UserError, match="unknown attribute 'digit_33'"):
        sampler.edit(np.zeros((32, 32, 3), np.uint8), {"digit_3": 1}, {"digit_33": 1})
    with pytest.raises(UserError, match="edit takes one image"):
        sampler.edit(np.zeros((2, 32, 32, 3), np.uint8), {"digit_3": 1})


# --- finding, pairing, refusing ----------------------------------------------------------------------


def test_the_encoder_is_found_beside_the_decoder_or_given(pair, tmp_path, digits):
    import shutil

    from toolkit.sampler import Sampler

    lone = tmp_path / "lone.onnx"
    shutil.copy(pair[0], lone)
    with pytest.raises(UserError, match=r"lone-encoder.onnx\), which is not there: export it with .*--encoder"):
        Sampler(lone, device="cpu").encode(digits[0][0], digits[1][0])
    given = Sampler(lone, device="cpu", encoder=pair.encoder).encode(digits[0][0], digits[1][0])
    assert np.array_equal(given, Sampler(pair[0], device="cpu").encode(digits[0][0], digits[1][0]))
    with pytest.raises(UserError, match="encoder file not found"):
        Sampler(lone, device="cpu", encoder=tmp_path / "nothing.onnx")
    with pytest.raises(UserError, match="is a cvae-tk encoder .*not a sampler") as refused:
        Sampler(pair.encoder, device="cpu")
    assert f"open the decoder beside it, {pair[0]} (`cvae-tk sample {pair[0]}`" in str(refused.value)


def test_an_int8_file_finds_the_encoder_of_the_fp32_export_it_was_quantized_from(pair, tmp_path, digits):
    """`cvae-tk export --int8 --encoder --out x.onnx` writes x.onnx, x-encoder.onnx and x-int8.onnx:
    the int8 file (the CPU serving file) found no encoder (it looked for x-int8-encoder.onnx), so
    Sampler.edit failed and `cvae-tk web` built a page without photo editing. It takes the fp32
    file's, of the same weights; one of other weights is still refused."""
    import shutil

    from toolkit.sampler import Sampler
    from toolkit.web.build import model_manifest

    int8 = edited_copy(pair[0], tmp_path / "x-int8.onnx", {"precision": "int8"})
    shutil.copy(pair.encoder, tmp_path / "x-encoder.onnx")
    sampler = Sampler(int8, device="cpu")
    assert sampler.encoder_path == tmp_path / "x-encoder.onnx"
    expected = Sampler(pair[0], device="cpu").encode(digits[0][0], digits[1][0])
    assert np.array_equal(sampler.encode(digits[0][0], digits[1][0]), expected)
    assert model_manifest(int8)["encoder"]["file"] == "x-encoder.onnx"
    edited_copy(pair.encoder, tmp_path / "x-encoder.onnx", {"weights_sha256": "0" * 64})
    with pytest.raises(UserError, match="not the encoder of .*different weights"):
        Sampler(int8, device="cpu").encode(digits[0][0], digits[1][0])
    # an fp32 file is never paired with another file's encoder
    fp32 = tmp_path / "y.onnx"
    shutil.copy(pair[0], fp32)
    edited_copy(pair[0], tmp_path / "y-int8.onnx", {"precision": "int8"})
    shutil.copy(pair.encoder, tmp_path / "y-int8-encoder.onnx")
    with pytest.raises(UserError, match=r"\(y-encoder.onnx\), which is not there"):
        Sampler(fp32, device="cpu").encode(digits[0][0], digits[1][0])
    # an int8 file without either encoder: both names it looked for (was only z-int8-encoder.onnx)
    edited_copy(pair[0], tmp_path / "z-int8.onnx", {"precision": "int8"})
    with pytest.raises(UserError, match=r"\(z-int8-encoder.onnx or z-encoder.onnx\), neither of which is there"):
        Sampler(tmp_path / "z-int8.onnx", device="cpu").encode(digits[0][0], digits[1][0])


@pytest.mark.parametrize(
    "name, changes, command",
    [
        ("d.onnx", {}, "--out {folder}/d.onnx --encoder`"),
        ("d-fp16.onnx", {"precision": "fp16"}, "--out {folder}/d-fp16.onnx --fp16 --encoder`"),
        ("d-int8.onnx", {"precision": "int8"}, "--out {folder}/d.onnx --int8 --encoder`"),
        ("mine.onnx", {"precision": "int8"}, "--int8 --encoder` (its fp32 export's encoder: pass encoder=PATH)"),
    ],
)
def test_the_advice_for_a_missing_encoder_exports_the_same_variant(pair, tmp_path, digits, name, changes, command):
    """'export it with `cvae-tk export --onnx RUN --out d-fp16.onnx --encoder`': followed, that replaced
    the fp16 (uint8, temperature, int8) file with a plain fp32 one. The command now has the file's
    variant flags, and for an int8 file names the fp32 export it is quantized from."""
    from toolkit.sampler import Sampler

    path = edited_copy(pair[0], tmp_path / name, changes)
    with pytest.raises(UserError) as caught:
        Sampler(path, device="cpu").encode(digits[0][0], digits[1][0])
    assert command.format(folder=tmp_path) in str(caught.value), str(caught.value)


def test_an_encoder_of_other_weights_is_refused(pair, tmp_path):
    from toolkit.sampler import Sampler

    other = edited_copy(pair.encoder, tmp_path / "other-encoder.onnx", {"weights_sha256": "0" * 64})
    with pytest.raises(UserError, match="not the encoder of .*different weights"):
        Sampler(pair[0], device="cpu", encoder=other)
    wrong_size = edited_copy(pair.encoder, tmp_path / "wrong-encoder.onnx", {"latent_dim": "15"})
    with pytest.raises(UserError, match="output 'mean' has shape"):
        Sampler(pair[0], device="cpu", encoder=wrong_size)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"preprocessing": None}, "metadata has no 'preprocessing'"),
        (
            {
                "preprocessing": '{"crop": null, "size": [16, 16], "resize": "bilinear", "value_range": [0, 1], "layout": "NCHW", "channels": "RGB"}'
            },
            "preprocessing size = [16, 16], expected [32, 32]",
        ),
        (
            {
                "preprocessing": '{"crop": {"kind": "center", "side": 0}, "size": [32, 32], "resize": "bilinear", "value_range": [0, 1], "layout": "NCHW", "channels": "RGB"}'
            },
            "preprocessing crop",
        ),
        ({"outputs": '["mean"]'}, "metadata outputs"),
        ({"cvae_tk.format": "encoder/2"}, "newer than this cvae-tk reads (encoder/1)"),
    ],
)
def test_an_encoder_whose_metadata_disagrees_is_refused_by_inspect_and_the_sampler(pair, tmp_path, changes, fragment):
    from toolkit.inspection import inspect_onnx
    from toolkit.sampler import Sampler

    path = edited_copy(pair.encoder, tmp_path / "bad-encoder.onnx", changes)
    for read in (lambda: inspect_onnx(path), lambda: Sampler(pair[0], device="cpu", encoder=path)):
        with pytest.raises(UserError) as caught:
            read()
        assert fragment in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_inspect_describes_the_encoder(pair):
    from toolkit.inspection import inspect_onnx

    lines = inspect_onnx(pair.encoder)
    assert "cvae_tk.format: encoder/1" in lines and "model_version: 1" in lines
    assert "input images: float32 [batch, 3, 32, 32]" in lines and "output mean: float32 [batch, 16]" in lines


def test_an_int8_precision_is_a_valid_claim(pair, tmp_path):
    from toolkit.sampler import Sampler

    path = edited_copy(pair[0], tmp_path / "int8.onnx", {"precision": "int8"})
    assert Sampler(path, device="cpu").contract.precision == "int8"


# --- writing the pair: both or neither ---------------------------------------------------------------


def test_a_run_whose_shards_are_gone_writes_nothing(tmp_path):
    from toolkit.export import export_onnx

    run = tiny_run(tmp_path / "run")  # no recipe.yaml: no shards to read the preprocessing from
    with pytest.raises(UserError, match="cannot state how the encoder's images are prepared.*nothing was written"):
        export_onnx(run, tmp_path / "out" / "tiny.onnx", encoder=True)
    with pytest.raises(UserError, match=r"no train split in .*nothing was written"):
        export_onnx(run, tmp_path / "out" / "tiny.onnx", encoder=True, shards=tmp_path / "missing")
    assert not (tmp_path / "out").exists()


def test_a_failed_encoder_parity_check_leaves_the_old_pair_as_it_was(tmp_path, monkeypatch):
    import toolkit.export
    from toolkit.export import export_onnx

    run, shards = tiny_run(tmp_path / "run"), tiny_shards(tmp_path / "shards")
    out = tmp_path / "tiny.onnx"
    first = export_onnx(run, out, encoder=True, shards=shards)
    old = (out.read_bytes(), first.encoder.read_bytes())
    monkeypatch.setattr(toolkit.export, "encoder_parity_error", lambda *args, **kwargs: 0.5)
    with pytest.raises(UserError, match="encoder failed its parity check.*nothing was written"):
        export_onnx(tiny_run(tmp_path / "run2", seed=1), out, encoder=True, shards=shards)
    assert (out.read_bytes(), first.encoder.read_bytes()) == old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_decoder_that_cannot_be_renamed_takes_the_new_encoder_with_it(tmp_path, monkeypatch):
    import os

    import toolkit.atomic
    from toolkit.export import export_onnx

    run, shards, out = tiny_run(tmp_path / "run"), tiny_shards(tmp_path / "shards"), tmp_path / "out" / "tiny.onnx"
    real = os.replace

    def replace(source, target):
        if Path(target) == out:
            raise OSError(28, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(toolkit.atomic.os, "replace", replace)
    with pytest.raises(UserError, match="could not write .*tiny.onnx and tiny-encoder.onnx.*nothing was written"):
        export_onnx(run, out, encoder=True, shards=shards)
    assert list(out.parent.iterdir()) == []
    # an earlier pair stays the pair it was: the old encoder, set aside while the new one was placed, is back
    monkeypatch.setattr(toolkit.atomic.os, "replace", real)
    export_onnx(run, out, encoder=True, shards=shards)
    before = {path.name: path.read_bytes() for path in out.parent.iterdir()}
    monkeypatch.setattr(toolkit.atomic.os, "replace", replace)
    with pytest.raises(UserError, match="could not write"):
        export_onnx(run, out, encoder=True, shards=shards)
    assert {path.name: path.read_bytes() for path in out.parent.iterdir()} == before


def test_the_cli_writes_and_reports_both_files(trained_run, tmp_path):
    from tests.test_cli import run_cli

    result = run_cli(["export", "--onnx", trained_run, "--out", tmp_path / "d.onnx", "--encoder"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "encoder parity: max abs difference" in result.stdout
        and f"wrote {tmp_path / 'd-encoder.onnx'}" in result.stdout
    )
    assert meta_of(tmp_path / "d-encoder.onnx")["cvae_tk.format"] == "encoder/1"


def test_encode_and_edit_work_where_torch_cannot_be_imported(pair):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_sampler import BLOCKED_TORCH

    blocker = BLOCKED_TORCH[: BLOCKED_TORCH.index("from toolkit.sampler import Sampler")]
    script = blocker + (
        "from toolkit.sampler import Sampler\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "sampler = Sampler(sys.argv[1], device='cpu')\n"
        "z = sampler.encode(Image.new('RGB', (40, 30), (200, 10, 10)), {'digit_3': 1})\n"
        "edited = sampler.edit(np.zeros((32, 32, 3), np.uint8), {'digit_3': 1}, {'digit_3': 0, 'digit_8': 1})\n"
        "assert not any(name == 'torch' or name.startswith('torch.') for name in sys.modules), 'torch was imported'\n"
        "print('edited', z.shape, edited.shape)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", script, str(pair[0])], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "edited (1, 16) (32, 32, 3)" in result.stdout


def test_a_given_encoder_goes_with_a_pickled_copy_and_close_releases_it(tmp_path):
    import os
    import pickle
    import weakref

    from toolkit.export import export_onnx
    from toolkit.sampler import Sampler

    exported = export_onnx(
        tiny_run(tmp_path / "run"), tmp_path / "tiny.onnx", encoder=True, shards=tiny_shards(tmp_path / "shards")
    )
    given = tmp_path / "elsewhere" / "its-encoder.onnx"  # not beside the decoder: only the argument finds it
    given.parent.mkdir()
    os.replace(exported.encoder, given)
    sampler = Sampler(exported[0], device="cpu", encoder=os.fsencode(given))
    photo = np.random.default_rng(1).integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    before, change = {"a0": 1, "a2": 1}, {"a0": 0, "a4": 1}
    copy = pickle.loads(pickle.dumps(sampler))
    assert copy.encoder_path == given
    assert np.array_equal(copy.encode(photo, before), sampler.encode(photo, before))
    assert np.array_equal(copy.edit(photo, before, change), sampler.edit(photo, before, change))

    encoder = weakref.ref(sampler._encoder_session)
    sampler.close()
    assert encoder() is None
    for call in (lambda: sampler.encode(photo, before), lambda: sampler.edit(photo, before, change)):
        with pytest.raises(UserError, match="this Sampler was closed"):
            call()


def test_an_export_onto_links_replaces_their_targets_and_keeps_the_links(tmp_path):
    from toolkit.export import export_onnx

    run, shards, real = tiny_run(tmp_path / "run"), tiny_shards(tmp_path / "shards"), tmp_path / "real"
    real.mkdir()
    for name in ("tiny.onnx", "tiny-encoder.onnx"):
        (real / name).write_bytes(b"old")
        (tmp_path / name).symlink_to(real / name)
    exported = export_onnx(run, tmp_path / "tiny.onnx", encoder=True, shards=shards)
    for name in ("tiny.onnx", "tiny-encoder.onnx"):
        assert (tmp_path / name).is_symlink() and (real / name).read_bytes().startswith(b"\x08")  # ONNX, not b"old"
    assert sorted(p.name for p in real.iterdir()) == ["tiny-encoder.onnx", "tiny.onnx"]  # nothing set aside is left
    assert exported.encoder == tmp_path / "tiny-encoder.onnx"
