"""Generate and edit images with an exported cvae-tk ONNX file. Imports numpy, onnxruntime and
PIL (toolkit.images: 20 ms), never torch.

    from toolkit.sampler import Sampler
    sampler = Sampler("export/digits.onnx")                 # device="auto" | "cpu" | "cuda" | "tensorrt"
    images = sampler.sample({"digit_3": 1}, n=8, seed=0)     # uint8 [8, H, W, 3]
    print(sampler.provider)                                  # which ONNX Runtime provider really runs
    z = sampler.encode(photo, {"digit_3": 1})                # with export/digits-encoder.onnx beside it: [1, Z]
    edited = sampler.edit(photo, {"digit_3": 1}, {"digit_3": 0, "digit_8": 1})   # uint8 [H, W, 3]

Editing (`cvae-tk export --encoder`): the encoder file OUT-encoder.onnx is found beside OUT.onnx
(or given: encoder=PATH) and opened on first use; it must be of the same weights as the decoder
(their weights_sha256). A photo (a PIL image of any size, or uint8 [H0, W0, 3]; several: a list, or
uint8 [N, H0, W0, 3]) is prepared as its `preprocessing` metadata says, as the shard builder
prepared the training images: shown as a viewer shows it (EXIF orientation, transparency on white:
toolkit.images), centre crop of the stated side, bilinear resize to the model's H x W (PIL's, with
the crop as the resize box, exactly as toolkit/data/build.py calls it), values / 255. (The builder
also decodes JPEGs at reduced size and stores the shards as JPEG: a photo is not put through
either.) A "bbox" crop (CUB's box around the bird) is the data set's own: give the photo cropped.
`edit` decodes the posterior mean (temperature 0; t > 0 draws z = mean + t * std) with the changed
attributes through the decoder file: its `noise` input is z itself for the standard prior, and
(z - prior_mean) / prior_std of the changed attributes for a learned one (the encoder file gives
the prior too), so the decoder computes exactly decoder(z, attributes').

`attributes` may be a mapping name -> 0/1 (unnamed attributes are 0, or taken from `base`), a list
of such mappings, or an array [M, A] in the order of `sampler.attributes`; each condition gets `n`
images, so the result has M * n images, condition by condition. The same seed gives the same images
on the same provider. `temperature` scales the prior's spread (0: the prior mean).

device="tensorrt" runs the graph through ONNX Runtime's TensorRT provider in fp16 (needs an NVIDIA
GPU and `pip install 'cvae-tk[tensorrt]'`): one engine for batches 1..batch_size, built on first
use (seconds to minutes) and cached beside the file, in OUT.trt/<weights>/ (toolkit.sessions).

On CUDA (and TensorRT) the inputs and outputs go through IO binding: inputs copied to the device once, the output
allocated there and copied to the host once per batch. With `cuda_graph=True` ONNX Runtime records
the whole decoder as one CUDA graph for a fixed batch of `batch_size` and replays it: every call
fills the same device buffers (a short last batch is padded, the padding dropped), so launches cost
one replay instead of one per kernel; this pays at small batches. Choose `batch_size` as the batch
you serve: with the default 256, a one-image call still computes 256 images. One Sampler may serve several
threads (graph replays take turns: they share one set of buffers).

The file is checked before it serves (`toolkit.contract`): the cvae-tk metadata, the input names
and types, that the graph's declared inputs and output agree with the metadata and are of a sane
size, and then, running the graph once on one condition, that what it really returns is what the
metadata says (dtype, layout, size, finite values in [0, 1]). A call whose images would not fit in
the memory available is refused before anything is allocated.

`close()` (or `with Sampler(path) as sampler:`) releases the sessions and device buffers; later
calls are refused. ONNX Runtime sessions cannot be pickled, so a Sampler pickles as its
constructor's arguments (paths made absolute): the copy, in a pool's or a DataLoader's worker or in
Ray, opens the file again, checks it as above, and refuses it if its metadata changed meanwhile.
"""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from toolkit.contract import (  # noqa: F401 (FORMAT, MAX_SIDE, MAX_WIDTH, Tensor: re-exported)
    FORMAT,
    MAX_SIDE,
    MAX_WIDTH,
    EncoderContract,
    Tensor,
    check_model_file,
    check_pair,
    encoder_candidates,
    export_command,
    find_encoder,
    read_contract,
    read_encoder_contract,
)
from toolkit.errors import UserError
from toolkit.formats import attribute_columns, attribute_index
from toolkit.images import ImageError, as_viewed, centre_crop, to_uint8
from toolkit.memory import check_fits, gib
from toolkit.paths import as_path
from toolkit.sessions import (
    CUDA,
    DEVICES,
    TENSORRT,
    BoundRun,
    GraphRun,
    PlainRun,
    engine_cache_made,
    open_session,
    ort_message,
    session_plan,
)

MAX_BATCH_BYTES = 16 * 2**30  # one batch of output images
MAX_RESULT_BYTES = 64 * 2**30  # the images one sample() or run() call returns (and less than the memory available)
MAX_TEMPERATURE = 1e3  # scales the noise: beyond this a sample is noise
CLOSED = "this Sampler was closed (close(), or the end of its `with` block): make a new Sampler(path)"


def _declared(values) -> list[Tensor]:
    """ONNX Runtime's NodeArgs as contract Tensors ('tensor(float)' -> 'float32')."""
    names = {"float": "float32", "double": "float64"}
    tensors = []
    for value in values:
        kind = value.type[len("tensor(") : -1] if value.type.startswith("tensor(") else value.type
        tensors.append(Tensor(value.name, names.get(kind, kind), tuple(value.shape)))
    return tensors


def _attribute_value(name, value):
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if not isinstance(value, (int, float, np.integer, np.floating)) or value not in (0, 1):
        raise UserError(f"attribute '{name}' must be 0 or 1, got {value!r}")
    return value


class Sampler:
    def __init__(
        self,
        path: str | os.PathLike | bytes,
        device: str = "auto",
        batch_size: int = 256,
        io_binding: bool | None = None,
        cuda_graph: bool = False,
        encoder: str | os.PathLike | bytes | None = None,
    ):
        path = as_path(path, "Sampler(path): expected the .onnx file written by `cvae-tk export`")
        if encoder is not None:
            encoder = as_path(encoder, "Sampler(encoder=): expected the encoder's .onnx file")
        if device not in DEVICES:
            raise UserError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {device!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        # a switch must be a bool: 'no' (or 'false', 0.0 from a config file) is true to Python and would turn it on
        for option, value, unset in (
            ("io_binding", io_binding, " or None (the device chooses)"),
            ("cuda_graph", cuda_graph, ""),
        ):
            if not (isinstance(value, (bool, np.bool_)) or (unset and value is None)):
                raise UserError(f"{option} must be True or False{unset}, got {value!r}")
        io_binding = None if io_binding is None else bool(io_binding)
        cuda_graph = bool(cuda_graph)
        if cuda_graph and device in ("cpu", "tensorrt"):
            raise UserError(
                "cuda_graph=True needs device='cuda' (or 'auto' on a machine with a GPU)"
                + ("; TensorRT runs its own fused engine" if device == "tensorrt" else "")
            )
        check_model_file(path)
        self.path, self.batch_size = path, int(batch_size)
        # What a pickled copy is made from (a session cannot be pickled): absolute paths, as another
        # process may run in another folder (Ray's workers do).
        self._arguments = dict(
            path=path.absolute(),
            device=device,
            batch_size=self.batch_size,
            io_binding=io_binding,
            cuda_graph=cuda_graph,
            encoder=None if encoder is None else encoder.absolute(),
        )
        # The provider and its options (fp16: channels-last; a CUDA graph: a fixed batch) are
        # chosen from the file before its one session opens.
        plan = session_plan(path, device, self.batch_size if cuda_graph else None, max_batch=self.batch_size)
        with engine_cache_made(plan):  # TensorRT's engines: removed again if the file is refused here
            self.session = open_session(path, device, plan)
            self._check_session(cuda_graph, io_binding)
        self._encoder_lock = threading.Lock()
        self._encoder_session: ort.InferenceSession | None = None
        self.encoder_contract: EncoderContract | None = None
        if encoder is not None:  # given: checked now; found beside the decoder: opened on first use
            self.encoder_path = encoder
            check_model_file(self.encoder_path, "encoder")
            self._encoder()
        else:
            self.encoder_path = find_encoder(path, self.contract)

    # -- lifetime: close, `with`, pickling ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self.session is None

    def close(self) -> None:
        """Release the ONNX Runtime sessions (decoder and encoder) and the device buffers their runs
        hold (IO binding, a CUDA graph's); idempotent. Any later call raises UserError."""
        with self._encoder_lock:  # not while another thread is opening the encoder
            self.session = self._encoder_session = None
            # the runner holds the session and its buffers; a call in flight in another thread
            # fails at its next batch, clearly
            self._run = _closed_run

    def _check_open(self) -> None:
        if self.closed:
            raise UserError(CLOSED)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # ONNX Runtime sessions cannot be pickled: the constructor's arguments are, and the copy
        # opens its own session (a pool's worker, a DataLoader worker, a Ray actor)
        self._check_open()
        return {"arguments": self._arguments, "metadata": self.metadata}

    def __setstate__(self, state: dict) -> None:
        Sampler.__init__(self, **state["arguments"])
        if self.metadata != state["metadata"]:  # a copy must compute what the original computes
            self.close()
            raise UserError(
                f"{self.path} changed since this Sampler was pickled (its metadata differ: exported again?): "
                "pickle a Sampler of the file as it is now"
            )

    def _check_session(self, cuda_graph: bool, io_binding: bool | None) -> None:
        """The file's contract read from the open session and checked (one run on one condition),
        and the way each batch will run chosen."""
        self.provider = self.session.get_providers()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.contract = contract = read_contract(
            self.path, meta, _declared(self.session.get_inputs()), _declared(self.session.get_outputs())
        )
        self.attributes: list[str] = list(contract.attributes)
        self.latent_dim = contract.latent_dim
        self.image_size: tuple[int, int] = contract.image_size
        self.metadata = dict(meta)
        self._index = attribute_index(self.attributes)
        self._temperature_input = contract.temperature_input
        self._uint8_output = contract.uint8
        self._check_batch_size()
        self._device = "cuda" if self.provider in (CUDA, TENSORRT) else "cpu"
        if cuda_graph and self._device != "cuda":
            raise UserError(f"cuda_graph=True needs the CUDA provider, but ONNX Runtime runs {self.provider} here")
        self.cuda_graph = cuda_graph
        self.io_binding = self._device == "cuda" if io_binding is None else io_binding
        # How each batch runs, chosen once (toolkit.sessions): a CUDA graph's fixed buffers, IO
        # binding, or plain session.run.
        if cuda_graph:
            self._run = GraphRun(
                self.session, self._device, self.batch_size, contract.image_dims, contract.output_dtype
            )
        elif self.io_binding:
            self._run = BoundRun(self.session, self._device)
        else:
            self._run = PlainRun(self.session)
        if not cuda_graph:  # a graph session runs only its fixed batch; its output buffer has the promised shape
            self._probe()

    def _check_batch_size(self) -> None:
        height, width = self.image_size
        # one batch's output as the graph returns it, plus its uint8 copy
        batch_bytes = self.batch_size * height * width * 3 * (1 if self._uint8_output else 5)
        if batch_bytes > MAX_BATCH_BYTES:
            raise UserError(
                f"batch_size {self.batch_size} of {height}x{width} images needs {batch_bytes / 2**30:.1f} GiB per batch "
                f"(limit {MAX_BATCH_BYTES / 2**30:.0f} GiB): use a smaller batch_size"
            )
        check_fits(batch_bytes, f"batch_size {self.batch_size} of {height}x{width} images", "use a smaller batch_size")

    def _check_output(self, output, rows: int) -> np.ndarray:
        """The graph's real output must be what the metadata says (a file can declare one shape and
        compute another; ONNX Runtime only warns)."""
        expected = (rows, *self.contract.image_dims)
        if (
            not isinstance(output, np.ndarray)
            or output.dtype != self.contract.output_dtype
            or output.shape != expected
        ):
            got = f"{output.dtype} {list(output.shape)}" if isinstance(output, np.ndarray) else type(output).__name__
            raise UserError(
                f"{self.path}: the graph returned images of {got}, but its metadata promises "
                f"{self.contract.output_dtype} {list(expected)} (output={self.contract.output}, image_size={list(self.image_size)})"
            )
        if not self._uint8_output:  # min and max: one pass finds NaN (it propagates) and values out of range
            low, high = float(np.min(output)), float(np.max(output))
            if not (np.isfinite(low) and np.isfinite(high)):
                raise UserError(
                    f"{self.path}: the graph returned NaN or infinite pixels (broken weights, or inputs far outside the prior's range?)"
                )
            if low < -1e-3 or high > 1 + 1e-3:
                raise UserError(
                    f"{self.path}: the graph's images range from {low:.3g} to {high:.3g}, but its metadata's value_range is [0, 1]"
                )
        return output

    def _probe(self) -> None:
        """Run the graph once on one condition: what it computes must be what the metadata says,
        before any caller's run (a file's declared shapes may lie)."""
        feed = {
            "attributes": np.zeros((1, len(self.attributes)), np.float32),
            "noise": np.zeros((1, self.latent_dim), np.float32),
        }
        if self._temperature_input:
            feed["temperature"] = np.ones(1, np.float32)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 3  # ONNX Runtime's own shape-mismatch warning: the error below says it
        try:
            (output,) = self.session.run(["images"], feed, quiet)
        except Exception as error:
            raise UserError(
                f"{self.path}: the graph does not run on the inputs its metadata describes: {ort_message(error)}"
            ) from None
        self._check_output(output, 1)

    # -- conditions ---------------------------------------------------------------------------

    def _unknown(self, name: str) -> UserError:
        close = difflib.get_close_matches(name, self.attributes, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return UserError(f"unknown attribute '{name}': {hint}valid attributes: {', '.join(self.attributes)}")

    def _from_mapping(self, mapping: Mapping, base: np.ndarray | None = None) -> np.ndarray:
        row = np.zeros(len(self.attributes), dtype=np.float32) if base is None else base.copy()
        for index, value in attribute_columns(
            self._index, mapping, lambda name: self._unknown(str(name)), _attribute_value
        ).items():
            row[index] = value
        return row

    def conditions(self, attributes, base=None) -> np.ndarray:
        """Turn any accepted `attributes` argument into a float32 array [M, A]; mappings start from
        `base` (a mapping or a vector [A]; default all 0)."""
        if base is not None:
            base = self._from_mapping(base)[None] if isinstance(base, Mapping) else self._vectors(base)
            if len(base) != 1:
                raise UserError(f"base must be one attribute vector, got {len(base)}")
            base = base[0]
        if isinstance(attributes, Mapping):
            return self._from_mapping(attributes, base)[None]
        if (
            isinstance(attributes, Sequence)
            and not isinstance(attributes, (str, bytes))
            and attributes
            and all(isinstance(item, Mapping) for item in attributes)
        ):
            return np.stack([self._from_mapping(item, base) for item in attributes])
        return self._vectors(attributes)

    def _vectors(self, attributes) -> np.ndarray:
        try:
            array = np.asarray(attributes)
            if array.dtype.kind not in "biuf":  # text, objects: numpy would parse "1" as a number
                raise TypeError(array.dtype)
            array = array.astype(np.float32)
        except (TypeError, ValueError, OverflowError):
            raise UserError(
                "attributes must be a mapping name -> 0/1, a list of mappings, or an array [N, A] of 0/1"
            ) from None
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != len(self.attributes) or array.shape[0] == 0:
            raise UserError(
                f"attribute array has shape {array.shape}: expected [N, {len(self.attributes)}] ({len(self.attributes)} attributes)"
            )
        if not np.isin(array, (0.0, 1.0)).all():
            raise UserError("attribute array values must be 0 or 1")
        return array

    # -- sampling -----------------------------------------------------------------------------

    def run(self, attributes: np.ndarray, noise: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """The raw graph, in batches of `batch_size`: float32 [B, A] and [B, Z] -> the model's output
        (float32 [B, 3, H, W] in [0, 1], or uint8 [B, H, W, 3] for a --uint8 export)."""
        self._check_open()
        temperature = _temperature(temperature)
        arrays = {}
        for name, array, width in (
            ("attributes", attributes, len(self.attributes)),
            ("noise", noise, self.latent_dim),
        ):
            if (
                not isinstance(array, np.ndarray)
                or array.dtype.kind not in "biuf"
                or array.ndim != 2
                or array.shape[1] != width
            ):
                what = f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
                raise UserError(f"{name} must be a numeric array [B, {width}], got {what}")
            with np.errstate(over="ignore"):  # the graph takes float32: 1e300 is infinite there
                array = array.astype(np.float32, copy=False)
            if not np.isfinite(array).all():
                raise UserError(f"{name} holds NaN or infinite values (as float32, which ends at 3.4e38)")
            arrays[name] = array
        if len(attributes) != len(noise) or len(attributes) == 0:
            raise UserError(
                f"attributes and noise must have the same number of rows (>= 1), got {len(attributes)} and {len(noise)}"
            )
        self._check_result(len(attributes), float_output=not self._uint8_output)
        return np.concatenate(list(self._outputs(arrays["attributes"], arrays["noise"], temperature)))

    def _check_result(self, rows: int, float_output: bool) -> None:
        """Refuse a call whose result would not fit in memory, before anything is allocated."""
        height, width = self.image_size
        per_row = height * width * 3 * (4 if float_output else 1) + 4 * (len(self.attributes) + self.latent_dim)
        needed = rows * per_row + min(rows, self.batch_size) * height * width * 3 * 5  # + one batch in flight
        what = f"{rows} image(s) of {height}x{width}"
        if needed > MAX_RESULT_BYTES:
            raise UserError(
                f"{what} would need {gib(needed)} (limit {gib(MAX_RESULT_BYTES)} per call): ask for fewer, in several calls"
            )
        check_fits(needed, what, "ask for fewer images per call, in several calls")

    def _outputs(self, attributes: np.ndarray, noise: np.ndarray, temperature: float):
        """The model's output, batch by batch."""
        if not self._temperature_input and temperature != 1.0:
            noise = noise * np.float32(temperature)  # the same as the graph's own temperature input
        for start in range(0, len(attributes), self.batch_size):
            feed = {
                "attributes": np.ascontiguousarray(attributes[start : start + self.batch_size], np.float32),
                "noise": np.ascontiguousarray(noise[start : start + self.batch_size], np.float32),
            }
            if self._temperature_input:
                feed["temperature"] = np.array([temperature], np.float32)
            output = self._run(feed)
            yield self._check_output(output, len(feed["attributes"]))

    def sample(
        self, attributes, n: int = 1, seed: int | None = None, temperature: float = 1.0, base=None
    ) -> np.ndarray:
        """`n` images per condition as uint8 [M * n, H, W, 3]."""
        self._check_open()
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise UserError(f"n must be an integer >= 1, got {n!r}")
        n = int(n)  # a numpy integer would wrap around in the size check below
        temperature = _temperature(temperature)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise UserError(f"seed must be None or an integer >= 0, got {seed!r}")
        conditions = self.conditions(attributes, base)
        height, width = self.image_size
        self._check_result(len(conditions) * n, float_output=False)
        rows = np.repeat(conditions, n, axis=0)
        noise = np.random.default_rng(seed).standard_normal((len(rows), self.latent_dim), dtype=np.float32)
        images = np.empty((len(rows), height, width, 3), np.uint8)
        start = 0
        for output in self._outputs(rows, noise, float(temperature)):  # to uint8 batch by batch: 1/4 of float memory
            if not self._uint8_output:
                output = to_uint8(output)
            images[start : start + len(output)] = output
            start += len(output)
        return images

    # -- editing (the encoder file) -------------------------------------------------------------

    def _encoder(self) -> ort.InferenceSession:
        """The encoder's session, opened and checked once: its contract, that it belongs to this
        decoder (same attributes, sizes, prior and weights), and one run on one image."""
        with self._encoder_lock:
            self._check_open()
            if self._encoder_session is not None:
                return self._encoder_session
            path = self.encoder_path
            if not path.is_file():
                looked = (
                    [path] if self._arguments["encoder"] is not None else encoder_candidates(self.path, self.contract)
                )
                names = " or ".join(name.name for name in looked)
                there = "which is not there" if len(looked) == 1 else "neither of which is there"
                raise UserError(
                    f"editing needs the encoder beside {self.path} ({names}), {there}: export it with "
                    f"{export_command(self.path, self.contract)}, or pass encoder=PATH"
                )
            device = "cuda" if self._device == "cuda" else "cpu"
            session = open_session(path, device, session_plan(path, device))
            meta = session.get_modelmeta().custom_metadata_map
            contract = read_encoder_contract(
                path, meta, _declared(session.get_inputs()), _declared(session.get_outputs())
            )
            check_pair(self.path, self.contract, path, contract)
            height, width = self.image_size
            try:
                outputs = session.run(
                    list(contract.outputs),
                    {
                        "images": np.zeros((1, 3, height, width), np.float32),
                        "attributes": np.zeros((1, len(self.attributes)), np.float32),
                    },
                )
            except Exception as error:
                raise UserError(
                    f"{path}: the encoder does not run on the inputs its metadata describes: {ort_message(error)}"
                ) from None
            for name, output in zip(contract.outputs, outputs):
                if (
                    not isinstance(output, np.ndarray)
                    or output.dtype != np.float32
                    or output.shape != (1, self.latent_dim)
                ):
                    got = (
                        f"{output.dtype} {list(output.shape)}"
                        if isinstance(output, np.ndarray)
                        else type(output).__name__
                    )
                    raise UserError(
                        f"{path}: the encoder returned {name} of {got}, but its metadata promises float32 [1, {self.latent_dim}]"
                    )
                if not np.isfinite(output).all():
                    raise UserError(f"{path}: the encoder's {name} holds NaN or infinite values (broken weights?)")
            self.encoder_contract, self._encoder_session = contract, session
            return session

    def preprocess(self, images) -> np.ndarray:
        """Photos -> float32 [N, 3, H, W] in [0, 1], prepared as the encoder's `preprocessing` says
        (see the module doc). images: a PIL image or uint8 [H0, W0, 3], a list of them (any sizes),
        or uint8 [N, H0, W0, 3]."""
        self._encoder()
        crop = self.encoder_contract.preprocessing.crop
        height, width = self.image_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise UserError(
                "no images given: expected a PIL image, a uint8 array [H, W, 3], a list of them, or uint8 [N, H, W, 3]"
            )
        check_fits(
            len(items) * 3 * height * width * 4,
            f"{len(items)} image(s) prepared at {height}x{width}",
            "encode fewer images per call",
        )
        batch = np.empty((len(items), 3, height, width), np.float32)
        for index, item in enumerate(items):
            if isinstance(item, Image.Image):
                try:
                    image = as_viewed(item)
                except ImageError as error:
                    raise UserError(f"image {index}: {error}") from None
            elif (
                isinstance(item, np.ndarray)
                and item.dtype == np.uint8
                and item.ndim == 3
                and item.shape[2] == 3
                and min(item.shape[:2]) >= 1
            ):
                image = Image.fromarray(np.ascontiguousarray(item), "RGB")
            else:
                what = f"{item.dtype} {list(item.shape)}" if isinstance(item, np.ndarray) else type(item).__name__
                raise UserError(
                    f"image {index} is {what}: expected a PIL image or a uint8 RGB array [H, W, 3] (values 0..255)"
                )
            box = (0.0, 0.0, float(image.width), float(image.height))
            if isinstance(crop, int):
                if crop > min(image.size):
                    raise UserError(
                        f"image {index} is {image.width}x{image.height}, smaller than the centre crop of {crop} the model's shards "
                        f"were made with: give a photo framed as the data set's (at least {crop}x{crop})"
                    )
                box = centre_crop(box, crop)
            # as the shard builder: crop and resize in one step (sub-pixel box), PIL's bilinear filter
            image = image.resize((width, height), Image.BILINEAR, box=box)
            batch[index] = np.asarray(image, np.float32).transpose(2, 0, 1) / np.float32(255)
        return batch

    def _condition_rows(self, attributes, count: int) -> np.ndarray:
        rows = self.conditions(attributes)
        if len(rows) == 1 and count > 1:
            rows = np.repeat(rows, count, axis=0)
        if len(rows) != count:
            raise UserError(f"{len(rows)} attribute sets for {count} images: give one set for all, or one per image")
        return rows

    def _encode_outputs(self, images: np.ndarray, attributes: np.ndarray, names) -> list[np.ndarray]:
        """The encoder's `names` outputs for prepared images, in batches of batch_size."""
        session = self._encoder()
        parts = []
        for start in range(0, len(images), self.batch_size):
            feed = {
                "images": np.ascontiguousarray(images[start : start + self.batch_size]),
                "attributes": np.ascontiguousarray(attributes[start : start + self.batch_size], np.float32),
            }
            parts.append(session.run(list(names), feed))
        return [np.concatenate([part[i] for part in parts]) for i in range(len(names))]

    def encode(self, images, attributes) -> np.ndarray:
        """The posterior mean z = mu(x, y) of each photo given its attributes: float32 [N, Z].
        attributes: as for `sample` (a mapping, unnamed 0; a list of mappings; an array [N, A]):
        one set for every image, or one per image."""
        prepared = self.preprocess(images)
        rows = self._condition_rows(attributes, len(prepared))
        return self._encode_outputs(prepared, rows, ["mean"])[0]

    def edit(self, image, attributes, changes=None, temperature: float = 0.0, seed: int | None = None) -> np.ndarray:
        """One photo re-drawn with `changes` ({name: 0 | 1}) applied to its `attributes` (its full set:
        a mapping, unnamed 0, or a vector [A]): the decoding of its z with the changed attributes,
        uint8 [H, W, 3] at the model's size. temperature 0 (the default) decodes the posterior mean;
        t > 0 draws z = mean + t * exp(logvar / 2) * noise (seeded). No changes: the reconstruction."""
        temperature = _temperature(temperature)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise UserError(f"seed must be None or an integer >= 0, got {seed!r}")
        if changes is not None and not isinstance(changes, Mapping):
            raise UserError(f"changes must be a mapping name -> 0/1, got {type(changes).__name__}")
        prepared = self.preprocess(image)
        if len(prepared) != 1:
            raise UserError(f"edit takes one image, got {len(prepared)}: call it once per image")
        before = self.conditions(attributes)
        if len(before) != 1:
            raise UserError(f"edit takes the image's one attribute set, got {len(before)}")
        after = self.conditions(changes or {}, base=before[0])
        mean, logvar = self._encode_outputs(prepared, before, ["mean", "logvar"])
        z = mean
        if temperature > 0:
            z = mean + np.float32(temperature) * np.exp(0.5 * logvar) * np.random.default_rng(seed).standard_normal(
                mean.shape, dtype=np.float32
            )
        noise = z
        if self.encoder_contract.prior == "learned":  # the decoder computes prior_mean + prior_std * noise: invert it
            prior_mean, prior_logvar = self._encode_outputs(prepared, after, ["prior_mean", "prior_logvar"])
            noise = (z - prior_mean) * np.exp(-0.5 * prior_logvar)
        output = next(self._outputs(after, noise.astype(np.float32), 1.0))
        if not self._uint8_output:
            output = to_uint8(output)
        return output[0]


def _closed_run(feed) -> None:
    raise UserError(CLOSED)


def _temperature(value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not 0 <= value <= MAX_TEMPERATURE
    ):
        raise UserError(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, got {value!r}")
    return float(value)


GRID_PADDING = 2  # pixels around each image of a grid


def grid_size(count: int, columns: int, height: int, width: int, padding: int = GRID_PADDING) -> tuple[int, int]:
    """(width, height) in pixels of `image_grid`'s picture of `count` images of height x width."""
    rows = -(-count // columns)
    return columns * (width + padding) + padding, rows * (height + padding) + padding


def image_grid(images: np.ndarray, columns: int, padding: int = GRID_PADDING, fill: int = 255) -> np.ndarray:
    """Tile uint8 images [N, H, W, 3] into one uint8 picture, `columns` per row."""
    count, height, width, channels = images.shape
    grid_width, grid_height = grid_size(count, columns, height, width, padding)
    grid = np.full((grid_height, grid_width, channels), fill, np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid
