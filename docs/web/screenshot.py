"""Make docs/web/studio.png: the `cvae-tk web` page of an export, in headless Chromium.

    .venv/bin/python docs/web/screenshot.py export/digits.onnx [--out docs/web/studio.png] [--check digit_3 ...]
                                            [--seed 3] [--temperature 0.8] [--count 16]

Builds the page into a temporary folder, serves it on 127.0.0.1, sets the attributes (--check,
default digit_3), seed, temperature and number of samples through the page's own controls
(tests/web/drive.mjs, as the browser tests do), and saves the screenshot. Needs node, the npm
packages and Chromium (bash scripts/setup-js.sh).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "web"))
sys.path.insert(0, str(ROOT))

from test_web import Driver  # noqa: E402

from toolkit.web import build_page, serve, url  # noqa: E402


def main(export: str, out: str, checks: list[str], seed: int = 3, temperature: float = 0.8, count: int = 16) -> None:
    with tempfile.TemporaryDirectory() as folder:
        server = serve(build_page(export, Path(folder) / "page"), 0)
        driver = Driver()
        try:
            driver("open", url=url(server))
            driver("fill", selector="#count", value=str(count))
            driver("fill", selector="#seed", value=str(seed))
            driver.eval(
                f"(() => {{ const e = document.querySelector('#temperature'); e.value = '{temperature}'; e.dispatchEvent(new Event('input')); }})()"
            )
            for name in checks:  # many attributes sit in closed groups: open the one that holds it first
                driver.eval(
                    f"(() => {{ const box = document.querySelector('input[name={name}]'); const group = box.closest('details'); "
                    f"if (group) group.open = true; }})()"
                )
                driver("check", selector=f"input[name={name}]")
            driver.eval("cvae.idle()")
            driver("screenshot", path=str(Path(out).resolve()))
        finally:
            driver.close()
            server.shutdown()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--out", default=str(ROOT / "docs" / "web" / "studio.png"))
    parser.add_argument("--check", action="append", help="an attribute to switch on (repeat; default digit_3)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--count", type=int, default=16)
    args = parser.parse_args()
    main(args.export, args.out, args.check or ["digit_3"], args.seed, args.temperature, args.count)
