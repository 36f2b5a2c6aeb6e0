import json
import subprocess
import sys

import torch
from PIL import Image

from conftest import ROOT
from toolkit.model import CVAE, load_model, read_spec
from toolkit.train import heldout_metrics


def test_run_folder_holds_everything_export_needs(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "samples.png", "samples", "logs"} <= names
    config = json.loads((trained_run / "config.json").read_text())
    assert config["attributes"] == [f"digit_{i}" for i in range(10)]
    assert config["image_size"] == [32, 32] and config["arch"] == "paper" and config["latent_dim"] == 16
    assert config["extra"]["step"] == 60 and config["extra"]["recipe"] == "digits"
    assert "max_steps: 60" in (trained_run / "recipe.yaml").read_text()
    # the grid: one row per attribute, 8 samples per row, 32x32 cells with 2-pixel padding
    assert Image.open(trained_run / "samples.png").size == (8 * 34 + 2, 10 * 34 + 2)
    assert sorted(p.name for p in (trained_run / "samples").iterdir()) == ["step-000030.png", "step-000060.png"]
    assert list((trained_run / "logs").rglob("events.out.tfevents*"))  # TensorBoard scalars


def test_short_training_lowers_the_test_loss(trained_run, digits_shards):
    trained = load_model(trained_run)
    torch.manual_seed(0)
    untrained = CVAE(read_spec(trained_run)).eval()
    before = heldout_metrics(untrained, str(digits_shards), torch.device("cpu"))
    after = heldout_metrics(trained, str(digits_shards), torch.device("cpu"))
    assert after["test/mse_per_image"] < 0.5 * before["test/mse_per_image"], (before, after)


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_runs_as_a_script_and_under_accelerate_launch(digits_shards, tmp_path):
    common = [f"data.shards={digits_shards}", "max_steps=3", "batch_size=8", "log_every=1", "sample_every=2"]
    # from another folder: `python toolkit/train.py` must not let toolkit/ shadow libraries
    script = run([sys.executable, str(ROOT / "toolkit" / "train.py"), "recipe=digits", "run_dir=a", *common], tmp_path)
    assert script.returncode == 0, script.stderr[-3000:]
    launched = run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no",
         str(ROOT / "toolkit" / "train.py"), "recipe=digits", "run_dir=b", *common],
        tmp_path,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    for run_dir in ("a", "b"):
        assert load_model(tmp_path / run_dir).spec.extra["step"] == 3
    assert (tmp_path / "a" / "samples" / "step-000002.png").is_file()
