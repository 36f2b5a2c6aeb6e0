"""Generate images from an exported cvae-tk ONNX file. Imports numpy and onnxruntime only, never torch.

    from toolkit.sampler import Sampler
    sampler = Sampler("export/digits.onnx")                 # device="auto" | "cpu" | "cuda"
    images = sampler.sample({"digit_3": 1}, n=8, seed=0)     # uint8 [8, H, W, 3]
    print(sampler.provider)                                  # which ONNX Runtime provider really runs

`attributes` may be a mapping name -> 0/1 (unnamed attributes are 0, or taken from `base`), a list
of such mappings, or an array [M, A] in the order of `sampler.attributes`; each condition gets `n`
images, so the result has M * n images, condition by condition. The same seed gives the same images
on the same provider. `temperature` scales the prior's spread (0: the prior mean).

On CUDA the inputs and outputs go through IO binding: inputs copied to the device once, the output
allocated there and copied to the host once per batch. With `cuda_graph=True` ONNX Runtime records
the whole decoder as one CUDA graph for a fixed batch of `batch_size` and replays it: every call
fills the same device buffers (a short last batch is padded, the padding dropped), so launches cost
one replay instead of one per kernel; this pays at small batches. Choose `batch_size` as the batch
you serve: with the default 256, a one-image call still computes 256 images. One Sampler may serve several
threads (graph replays take turns: they share one set of buffers).

The file is checked before anything runs: the cvae-tk metadata, the input names, and that the
graph's input and output shapes agree with the metadata and are of a sane size.
"""

from __future__ import annotations

import difflib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolkit.errors import UserError

FORMAT = "sampler/1"  # the contract version written by toolkit.export
# Sanity limits for what a file may declare: far beyond any real model, small enough that a
# hostile or broken file is refused before it asks for terabytes.
MAX_SIDE = 8192
MAX_WIDTH = 65536  # attributes or latent units
MAX_BATCH_BYTES = 16 * 2**30  # one batch of output images
MAX_RESULT_BYTES = 64 * 2**30  # the uint8 images one sample() call returns


def _cuda_device_present() -> bool:
    # Asking ONNX Runtime for CUDA on a machine without a GPU prints loud errors; the driver's
    # device nodes (Linux) are a cheap, quiet first check.
    return os.name == "nt" or Path("/dev/nvidiactl").exists()


class Sampler:
    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "auto",
        batch_size: int = 256,
        io_binding: bool | None = None,
        cuda_graph: bool = False,
    ):
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if cuda_graph and device == "cpu":
            raise UserError("cuda_graph=True needs device='cuda' (or 'auto' on a machine with a GPU)")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        self.path, self.batch_size = path, int(batch_size)
        self.session = self._open(path, device, self.batch_size if cuda_graph else None)
        self.provider = self.session.get_providers()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("cvae_tk.format") != FORMAT:
            raise UserError(f"{path} is an ONNX model but not a cvae-tk sampler export (no cvae_tk.format={FORMAT} metadata)")
        try:
            self.attributes: list[str] = json.loads(meta["attributes"])
            self.latent_dim = int(meta["latent_dim"])
            self.image_size: tuple[int, int] = tuple(json.loads(meta["image_size"]))
            if not isinstance(self.attributes, list) or len(self.image_size) != 2:
                raise ValueError("attributes must be a list of names and image_size [height, width]")
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f"{path}: cvae-tk metadata is incomplete or malformed ({error})") from None
        self.metadata = dict(meta)
        if self.provider == "CUDAExecutionProvider" and meta.get("precision") == "fp16":
            # fp16 convolutions run on tensor cores in channels-last layout: on an H200 this made
            # the paper decoder 1.7x faster at batch 1,024 (bench/RESULTS.md); fp32 gained nothing.
            self.session = self._open(path, device, self.batch_size if cuda_graph else None, prefer_nhwc=True)
            self.provider = self.session.get_providers()[0]
        self._index = {name: i for i, name in enumerate(self.attributes)}
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs[:2] != ["attributes", "noise"] or not set(inputs) <= {"attributes", "noise", "temperature"}:
            raise UserError(f"{path}: inputs {inputs}, expected attributes, noise (and optionally temperature)")
        self._temperature_input = "temperature" in inputs
        self._uint8_output = meta.get("output", "float32_nchw") == "uint8_nhwc"
        self._check_shapes(inputs)
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        if cuda_graph and self._device != "cuda":
            raise UserError(f"cuda_graph=True needs the CUDA provider, but ONNX Runtime runs {self.provider} here")
        self.cuda_graph = cuda_graph
        self.io_binding = self._device == "cuda" if io_binding is None else io_binding
        self._fixed_batch = cuda_graph  # every run fills the same buffers of batch_size rows
        self._fixed_lock = threading.Lock()
        self._fixed: tuple | None = None  # (binding, input OrtValues, output OrtValue) once allocated

    def _check_shapes(self, inputs: list[str]) -> None:
        """Refuse, before any run, a graph whose shapes disagree with its metadata or are absurd."""
        height, width = self.image_size
        sizes = {"attributes": len(self.attributes), "latent_dim": self.latent_dim, "image height": height, "image width": width}
        limits = {"attributes": MAX_WIDTH, "latent_dim": MAX_WIDTH, "image height": MAX_SIDE, "image width": MAX_SIDE}
        for what, value in sizes.items():
            if not isinstance(value, int) or not 1 <= value <= limits[what]:
                raise UserError(f"{self.path}: metadata declares {what} = {value!r}, expected an integer in 1..{limits[what]}")
        if len(set(self.attributes)) != len(self.attributes) or not all(isinstance(a, str) and a for a in self.attributes):
            raise UserError(f"{self.path}: metadata attributes must be distinct non-empty names")
        declared = {i.name: i.shape for i in self.session.get_inputs()}
        expected = {"attributes": len(self.attributes), "noise": self.latent_dim}
        for name, width_expected in expected.items():
            shape = declared[name]
            if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width_expected):
                raise UserError(f"{self.path}: input '{name}' has shape {shape}, expected [batch, {width_expected}] (from the metadata)")
        if "temperature" in inputs and [d for d in declared["temperature"] if d != 1]:
            raise UserError(f"{self.path}: input 'temperature' has shape {declared['temperature']}, expected [1]")
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if "images" not in outputs:
            raise UserError(f"{self.path}: no output named 'images' (outputs: {', '.join(outputs)})")
        uint8 = self._uint8_output
        image_dims = [height, width, 3] if uint8 else [3, height, width]
        static = outputs["images"][1:]
        if len(outputs["images"]) != 4 or any(isinstance(d, int) and d != e for d, e in zip(static, image_dims)):
            raise UserError(f"{self.path}: output 'images' has shape {outputs['images']}, expected [batch, {', '.join(map(str, image_dims))}]")
        batch_bytes = self.batch_size * height * width * 3 * (1 if uint8 else 4)
        if batch_bytes > MAX_BATCH_BYTES:
            raise UserError(
                f"batch_size {self.batch_size} of {height}x{width} images needs {batch_bytes / 2**30:.1f} GiB per batch "
                f"(limit {MAX_BATCH_BYTES / 2**30:.0f} GiB): use a smaller batch_size"
            )

    @staticmethod
    def _open(path: Path, device: str, graph_batch: int | None = None, prefer_nhwc: bool = False) -> ort.InferenceSession:
        want_cuda = device == "cuda" or (
            device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()
        )
        cuda_options = {"enable_cuda_graph": "1"} if graph_batch else {}
        if prefer_nhwc:
            cuda_options["prefer_nhwc"] = "1"
        providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if graph_batch:
            # A graph is recorded for one shape: fixing the batch lets ONNX Runtime fold away every
            # shape computation, so all nodes run on the GPU (a CUDA graph cannot hold CPU nodes).
            options.add_free_dimension_override_by_name("batch", graph_batch)
        if want_cuda and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()  # CUDA libraries from the nvidia-* wheels, without importing torch
            except Exception:
                pass
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises several types for unreadable files
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path} is not a loadable ONNX model: {first}") from None
        if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError(
                "device='cuda' was asked for, but ONNX Runtime cannot use CUDA on this machine "
                "(no GPU, or CUDA 13 / cuDNN 9 libraries missing); use device='cpu' or 'auto'"
            )
        return session

    # -- conditions ---------------------------------------------------------------------------

    def _unknown(self, name: str) -> UserError:
        close = difflib.get_close_matches(name, self.attributes, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return UserError(f"unknown attribute '{name}': {hint}valid attributes: {', '.join(self.attributes)}")

    def _from_mapping(self, mapping: Mapping, base: np.ndarray | None = None) -> np.ndarray:
        row = np.zeros(len(self.attributes), dtype=np.float32) if base is None else base.copy()
        for name, value in mapping.items():
            if name not in self._index:
                raise self._unknown(str(name))
            if isinstance(value, (bool, np.bool_)):
                value = int(value)
            if not isinstance(value, (int, float, np.integer, np.floating)) or value not in (0, 1):
                raise UserError(f"attribute '{name}' must be 0 or 1, got {value!r}")
            row[self._index[name]] = value
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
        if isinstance(attributes, Sequence) and not isinstance(attributes, (str, bytes)) and attributes and all(
            isinstance(item, Mapping) for item in attributes
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
            raise UserError("attributes must be a mapping name -> 0/1, a list of mappings, or an array [N, A] of 0/1") from None
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != len(self.attributes) or array.shape[0] == 0:
            raise UserError(f"attribute array has shape {array.shape}: expected [N, {len(self.attributes)}] ({len(self.attributes)} attributes)")
        if not np.isin(array, (0.0, 1.0)).all():
            raise UserError("attribute array values must be 0 or 1")
        return array

    # -- sampling -----------------------------------------------------------------------------

    def run(self, attributes: np.ndarray, noise: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """The raw graph, in batches of `batch_size`: float32 [B, A] and [B, Z] -> the model's output
        (float32 [B, 3, H, W] in [0, 1], or uint8 [B, H, W, 3] for a --uint8 export)."""
        return np.concatenate(list(self._outputs(attributes, noise, temperature)))

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
            if self._fixed_batch:
                yield self._run_fixed(feed)
            elif self.io_binding:
                yield self._run_bound(feed)
            else:
                yield self.session.run(["images"], feed)[0]

    def _run_fixed(self, feed: dict) -> np.ndarray:
        # The CUDA graph replays kernels on fixed device addresses: allocate the inputs and the
        # output once, then only copy new values into them (update_inplace) and replay. A short
        # batch is padded with zeros to batch_size and the padding's images are dropped.
        rows = len(feed["attributes"])
        padded = {}
        for name, array in feed.items():
            if name != "temperature" and rows < self.batch_size:
                array = np.concatenate([array, np.zeros((self.batch_size - rows, *array.shape[1:]), array.dtype)])
            padded[name] = array
        with self._fixed_lock:
            if self._fixed is None:
                binding = self.session.io_binding()
                # Own copies: on the CPU an OrtValue wraps the numpy buffer, which later updates overwrite.
                values = {name: ort.OrtValue.ortvalue_from_numpy(array.copy(), self._device, 0) for name, array in padded.items()}
                for name, value in values.items():
                    binding.bind_ortvalue_input(name, value)
                height, width = self.image_size
                shape = [self.batch_size, height, width, 3] if self._uint8_output else [self.batch_size, 3, height, width]
                dtype = np.uint8 if self._uint8_output else np.float32
                output = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self._device, 0)
                binding.bind_ortvalue_output("images", output)
                self._fixed = (binding, values, output)
            else:
                binding, values, _ = self._fixed
                for name, array in padded.items():
                    values[name].update_inplace(array)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0][:rows]

    def _run_bound(self, feed: dict) -> np.ndarray:
        # A binding per call: bindings are not shared between threads. Inputs go to the device
        # once; the output is allocated by ONNX Runtime on the device and copied to the host once.
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, self._device, 0))
        binding.bind_output("images", self._device, 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def sample(self, attributes, n: int = 1, seed: int | None = None, temperature: float = 1.0, base=None) -> np.ndarray:
        """`n` images per condition as uint8 [M * n, H, W, 3]."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise UserError(f"n must be an integer >= 1, got {n!r}")
        n = int(n)  # a numpy integer would wrap around in the size check below
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) or not 0 <= temperature < 1e3:
            raise UserError(f"temperature must be a number >= 0, got {temperature!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise UserError(f"seed must be None or an integer >= 0, got {seed!r}")
        conditions = self.conditions(attributes, base)
        height, width = self.image_size
        result_bytes = len(conditions) * n * height * width * 3
        if result_bytes > MAX_RESULT_BYTES:
            raise UserError(
                f"{len(conditions)} condition(s) x n={n} images of {height}x{width} would need {result_bytes / 2**30:.0f} GiB "
                f"(limit {MAX_RESULT_BYTES / 2**30:.0f} GiB): ask for fewer, in several calls"
            )
        rows = np.repeat(conditions, n, axis=0)
        noise = np.random.default_rng(seed).standard_normal((len(rows), self.latent_dim), dtype=np.float32)
        images = np.empty((len(rows), height, width, 3), np.uint8)
        start = 0
        for output in self._outputs(rows, noise, float(temperature)):  # to uint8 batch by batch: 1/4 of float memory
            if not self._uint8_output:
                output = np.round(np.clip(output, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
            images[start : start + len(output)] = output
            start += len(output)
        return images


def image_grid(images: np.ndarray, columns: int, padding: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 images [N, H, W, 3] into one uint8 picture, `columns` per row."""
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), fill, np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid
