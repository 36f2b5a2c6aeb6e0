"""Shared fixtures: the demo shards, one short training run and its ONNX export, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "faults"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/faults/ (killed processes, full disks, hostile files, user mistakes:
    RELIABILITY.md) carries the `faults` marker: `pytest -m "not faults"` is the quick run while
    changing code, `pytest -m faults` the fault suite alone."""
    for item in items:
        if FAULTS in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The embedded digits data set written as shards (train: 1618 images, test: 179), 32x32."""
    from toolkit.data.digits import ATTRIBUTES, SPLITS, digit_samples
    from toolkit.data.shards import write_split

    out = tmp_path_factory.mktemp("shards") / "digits"
    for split in SPLITS:
        write_split(digit_samples(split, 32), out, split, ATTRIBUTES, (32, 32), "scikit-learn digits", shard_size=1000)
    return out


@pytest.fixture(scope="session")
def trained_run(digits_shards, tmp_path_factory) -> Path:
    """A short training run on the digits shards (CPU); returns its run folder."""
    from toolkit.config import load_config
    from toolkit.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    config = load_config(
        [
            "recipe=digits",
            f"run_dir={run_dir}",
            f"data.shards={digits_shards}",
            "max_steps=60",
            "batch_size=32",
            "log_every=10",
            "sample_every=30",
            "data.num_workers=0",
        ]
    )
    return train(config)


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    """The trained run exported to ONNX."""
    from toolkit.export import export_onnx

    path, _ = export_onnx(trained_run, tmp_path_factory.mktemp("export") / "digits.onnx")
    return path


TINY_ATTRIBUTES = ["a", "b", "Smiling", "x y", "é"]  # a space and a non-ASCII letter in names, on purpose


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """An untrained (seeded) 8x8 `paper` model with 5 attributes and 4 latent units, exported to ONNX:
    the cheapest real sampler file, for tests of the Sampler's own logic."""
    import torch

    from toolkit.export import export_onnx
    from toolkit.model import CVAE, ModelSpec, save_model

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    save_model(CVAE(ModelSpec(attributes=list(TINY_ATTRIBUTES), image_size=(8, 8), latent_dim=4)), run_dir)
    path, _ = export_onnx(run_dir, run_dir.parent / "tiny.onnx")
    return path
