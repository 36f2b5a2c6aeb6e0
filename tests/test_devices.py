"""`--device` of eval, edit, interpolate, sweep and the classifier: auto, cpu, cuda or cuda:N, and
nothing else torch can name (mps, xpu, meta used to pass, then fail mid-work with a traceback)."""

import pytest
import torch

from tests.test_cli import assert_user_error, run_cli
from toolkit.devices import resolve_device
from toolkit.errors import UserError


def test_cpu_and_auto_are_taken():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["mps", "xpu", "meta", "ipu", "gpu", "cuda:x", "", "cpu cpu"])
def test_other_device_names_are_refused_in_one_line(name):
    with pytest.raises(UserError, match=f"unknown device '{name}': expected auto \\| cpu \\| cuda"):
        resolve_device(name)


def test_a_cuda_device_this_machine_lacks_is_refused():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UserError, match="no CUDA device is available here" if not count else f"has {count} CUDA"):
        resolve_device(f"cuda:{max(count, 0) + 7}")


def test_the_commands_refuse_it_before_any_work(tmp_path):
    done = run_cli(["classifier", "train", "recipe=digits", "--steps", "1", "--device", "mps", "--out", "c"], tmp_path)
    assert_user_error(done, "unknown device 'mps'")
    assert not (tmp_path / "c").exists()
