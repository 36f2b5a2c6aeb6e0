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
allocated there and copied to the host once per batch. One Sampler may serve several threads.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolkit.errors import UserError

FORMAT = "sampler/1"  # the contract version written by toolkit.export


def _cuda_device_present() -> bool:
    # Asking ONNX Runtime for CUDA on a machine without a GPU prints loud errors; the driver's
    # device nodes (Linux) are a cheap, quiet first check.
    return os.name == "nt" or Path("/dev/nvidiactl").exists()


class Sampler:
    def __init__(self, path: str | os.PathLike, device: str = "auto", batch_size: int = 256, io_binding: bool | None = None):
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        self.path, self.batch_size = path, batch_size
        self.session = self._open(path, device)
        self.provider = self.session.get_providers()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("cvae_tk.format") != FORMAT:
            raise UserError(f"{path} is an ONNX model but not a cvae-tk sampler export (no cvae_tk.format={FORMAT} metadata)")
        try:
            self.attributes: list[str] = json.loads(meta["attributes"])
            self.latent_dim = int(meta["latent_dim"])
            self.image_size: tuple[int, int] = tuple(json.loads(meta["image_size"]))
        except (KeyError, ValueError) as error:
            raise UserError(f"{path}: cvae-tk metadata is incomplete or malformed ({error})") from None
        self.metadata = dict(meta)
        self._index = {name: i for i, name in enumerate(self.attributes)}
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs[:2] != ["attributes", "noise"] or not set(inputs) <= {"attributes", "noise", "temperature"}:
            raise UserError(f"{path}: inputs {inputs}, expected attributes, noise (and optionally temperature)")
        self._temperature_input = "temperature" in inputs
        self._uint8_output = meta.get("output", "float32_nchw") == "uint8_nhwc"
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.io_binding = self._device == "cuda" if io_binding is None else io_binding

    @staticmethod
    def _open(path: Path, device: str) -> ort.InferenceSession:
        want_cuda = device == "cuda" or (
            device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()
        )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        if want_cuda and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()  # CUDA libraries from the nvidia-* wheels, without importing torch
            except Exception:
                pass
        try:
            session = ort.InferenceSession(str(path), providers=providers)
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
            if isinstance(value, bool):
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
            array = np.asarray(attributes, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserError("attributes must be a mapping name -> 0/1, a list of mappings, or an array [N, A]") from None
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
        if not self._temperature_input and temperature != 1.0:
            noise = noise * np.float32(temperature)  # the same as the graph's own temperature input
        outputs = []
        for start in range(0, len(attributes), self.batch_size):
            feed = {
                "attributes": np.ascontiguousarray(attributes[start : start + self.batch_size], np.float32),
                "noise": np.ascontiguousarray(noise[start : start + self.batch_size], np.float32),
            }
            if self._temperature_input:
                feed["temperature"] = np.array([temperature], np.float32)
            outputs.append(self._run_bound(feed) if self.io_binding else self.session.run(["images"], feed)[0])
        return np.concatenate(outputs)

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
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) or not 0 <= temperature < 1e3:
            raise UserError(f"temperature must be a number >= 0, got {temperature!r}")
        rows = np.repeat(self.conditions(attributes, base), n, axis=0)
        noise = np.random.default_rng(seed).standard_normal((len(rows), self.latent_dim), dtype=np.float32)
        images = self.run(rows, noise, float(temperature))
        if self._uint8_output:
            return images
        return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


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
