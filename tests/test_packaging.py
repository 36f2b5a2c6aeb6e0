"""What a user gets from `pip install .` or a wheel (not an editable install): every module, the web
page's files and the recipes, which live at the repository's root (`recipes/`) and were left out of
the wheel: `cvae-tk train recipe=digits` then found no recipe."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_every_module_the_page_and_the_recipes(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("cvae_tk-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = ROOT / "toolkit"
    expected = {
        path.relative_to(ROOT).as_posix()
        for path in source.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts  # every file: a new data file needs package-data
    }
    expected |= {f"toolkit/recipes/{path.name}" for path in (ROOT / "recipes").glob("*.yaml")}
    assert len(expected) > 40
    assert sorted(expected - names) == []  # a new subpackage must be named in pyproject.toml's packages


def test_an_installed_wheel_reads_its_own_recipes(tmp_path):
    """Installed from the wheel, `recipe=digits` is found in the package (toolkit/recipes), from any folder."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip"]
    for command in (
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        [
            *pip,
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(site),
            "--find-links",
            str(wheel_dir),
            "cvae-tk",
        ],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "import toolkit.config as c; print(c.PACKAGED_RECIPES); print(c.find_recipe('digits'))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.split() == [
        str(site / "toolkit" / "recipes"),
        str(site / "toolkit" / "recipes" / "digits.yaml"),
    ]
