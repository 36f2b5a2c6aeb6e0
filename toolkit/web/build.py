"""`cvae-tk web EXPORT.onnx --out DIR`: a static page that runs an export in the browser.

DIR gets everything the page needs and nothing it must fetch from elsewhere (it works offline):

    index.html, app.js, style.css   the page (toolkit/web/static)
    NAME.onnx [NAME-encoder.onnx]   the export, and its encoder when one lies beside it
    model.json                      both files' metadata_props, parsed (onnxruntime-web cannot read
                                    custom metadata, so the page never parses ONNX itself)
    ort/                            onnxruntime-web's WebGPU build (ort.webgpu.min.mjs) and the one
                                    wasm module it loads; the same module runs the wasm (CPU)
                                    backend where the browser has no WebGPU
    .cvae-tk-web                    says the folder holds a page: a rebuild replaces the files above,
                                    and a folder holding them without it (the user's own site) is refused

Any static file host serves DIR; `serve` (cvae-tk web --serve) is a quick look on 127.0.0.1.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

import toolkit
from toolkit.atomic import atomic_path, check_output, write_text
from toolkit.contract import Contract, EncoderContract, check_model_file, check_pair, find_encoder
from toolkit.errors import UserError
from toolkit.inspection import load_checked
from toolkit.ownership import FolderLock, claim_folder
from toolkit.paths import is_utf8, shown

PAGE_FILES = ("index.html", "app.js", "style.css")
# What the page loads from onnxruntime-web's dist/ (checked by loading the page: the request log of
# tests/web/test_web.py): the WebGPU build, which also runs the plain wasm backend, and its one module.
ORT_FILES = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
ORT_PACKAGE = Path("node_modules") / "onnxruntime-web" / "dist"
MANIFEST = "model.json"
FORMAT = "web/1"
# Written into --out before anything else and kept by every rebuild: the folder holds a cvae-tk page,
# whose files a rebuild may replace (a page built before it is told by its model.json).
OWNER = ".cvae-tk-web"

MIME_TYPES = {
    ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming refuses anything else
    ".mjs": "text/javascript",  # module scripts must have a JavaScript type
    ".js": "text/javascript",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
}


def ort_dist_candidates() -> list[Path]:
    """Where onnxruntime-web's dist/ is looked for: the project's node_modules (beside the toolkit
    package, as `scripts/setup-js.sh` installs it) and the current folder's."""
    places = [Path(toolkit.__file__).resolve().parent.parent / ORT_PACKAGE, Path.cwd() / ORT_PACKAGE]
    return list(dict.fromkeys(places))


def find_ort_dist(ort_dist: str | Path | None = None) -> Path:
    """The folder holding ORT_FILES: `ort_dist` if given, else the first of `ort_dist_candidates`."""
    if ort_dist is not None:
        folder = Path(ort_dist)
        missing = [name for name in ORT_FILES if not (folder / name).is_file()]
        if missing:
            raise UserError(
                f"--ort-dist {folder} lacks {', '.join(missing)}: expected the dist/ folder of the "
                f"onnxruntime-web npm package (node_modules/onnxruntime-web/dist)"
            )
        return folder
    places = ort_dist_candidates()
    for folder in places:
        if all((folder / name).is_file() for name in ORT_FILES):
            return folder
    raise UserError(
        f"onnxruntime-web not found: no {ORT_FILES[0]} in {' or '.join(map(str, places))}; "
        f"run `bash scripts/setup-js.sh` (npm ci) or pass --ort-dist DIR (onnxruntime-web's dist/ folder)"
    )


def _ort_version(folder: Path) -> str | None:
    try:
        return str(json.loads((folder.parent / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a bare copy of dist/: the version is unknown, the page works the same


def read_model(path: Path) -> tuple[dict, Contract | EncoderContract]:
    """An ONNX export's metadata, checked as every reader checks it (toolkit.inspection), parsed;
    and its contract (toolkit.contract)."""
    proto, contract = load_checked(path)
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    parsed = {}
    for key, value in meta.items():  # JSON where the contract says so; the rest stays text
        try:
            parsed[key] = json.loads(value) if value[:1] in "[{" else value
        except ValueError:
            parsed[key] = value
    return {"file": path.name, "metadata": parsed, "bytes": path.stat().st_size}, contract


def model_manifest(export: Path, ort_version: str | None = None) -> dict:
    """What model.json holds: the decoder's and (if present) the encoder's metadata, plus the few
    facts the page needs, already parsed."""
    decoder, decoder_contract = read_model(export)
    if isinstance(decoder_contract, EncoderContract):
        raise UserError(f"{export} is an encoder: give the decoder (the sampler OUT.onnx beside it)")
    encoder_file = find_encoder(export, decoder_contract)
    encoder = None
    if encoder_file.is_file():  # as the Sampler checks it: the same names, sizes, prior and weights
        encoder, encoder_contract = read_model(encoder_file)
        check_pair(export, decoder_contract, encoder_file, encoder_contract)
    return {
        "format": FORMAT,
        "name": export.stem,
        "attributes": list(decoder_contract.attributes),
        "latent_dim": decoder_contract.latent_dim,
        "image_size": list(decoder_contract.image_size),
        "prior": decoder_contract.prior,
        "output": decoder_contract.output,
        "temperature_input": decoder_contract.temperature_input,
        "decoder": decoder,
        "encoder": encoder,
        "onnxruntime_web": ort_version,
        "toolkit_version": toolkit.__version__,
    }


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def build_page(export: str | Path, out: str | Path, ort_dist: str | Path | None = None) -> Path:
    """Write the page for `export` into `out` (see the module's doc); returns `out` (`serve` serves it)."""
    export, out = Path(export), Path(out)
    check_model_file(export)
    if export.suffix != ".onnx":  # copied into the page under its own name: `index.html` would replace the page
        raise UserError(
            f"{shown(export)}: expected an export whose name ends in .onnx (the page copies it under its own name "
            "beside index.html and asks for it by that name); rename it"
        )
    if not is_utf8(export.name):  # model.json names the file and the page asks for it by URL: UTF-8 text
        raise UserError(
            f"{shown(export)}: the file name is not valid UTF-8, and the page asks for the model by its name "
            "(in model.json, as a URL); rename it"
        )
    check_output(out, folder=True)  # user mistakes first, before anything is copied
    if out.resolve() == export.resolve().parent:
        raise UserError(
            f"--out {out} is the folder of {export.name} itself: write the page into a folder of its own "
            f"(it copies the export there and replaces the files of an earlier page)"
        )
    dist = find_ort_dist(ort_dist)
    manifest = model_manifest(export, _ort_version(dist))
    models = [export] + ([export.with_name(manifest["encoder"]["file"])] if manifest["encoder"] else [])
    names = [*PAGE_FILES, MANIFEST, *(f"ort/{name}" for name in ORT_FILES), *(model.name for model in models)]
    claim_folder(out, names, OWNER, earlier=_earlier_page)  # never the user's own site's index.html
    # two builds at once would pair one's model.json with the other's models, or remove them
    with FolderLock(out, "page build", "--out", "model files"):
        _write_page(out, dist, models, manifest)
    return out


def _write_page(out: Path, dist: Path, models: list[Path], manifest: dict) -> None:
    previous = _previous_models(out)
    # No model.json while the files change: a page half rebuilt (a full disk) fails to load instead
    # of pairing a new model with an old one. It is written last.
    (out / MANIFEST).unlink(missing_ok=True)
    static = resources.files("toolkit.web") / "static"
    for name in PAGE_FILES:
        with resources.as_file(static / name) as source:
            _copy(source, out / name)
    (out / "ort").mkdir(exist_ok=True)
    for name in ORT_FILES:
        _copy(dist / name, out / "ort" / name)
    for model in models:
        _copy(model, out / model.name)
    # last: the page waits for it
    write_text(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    for name in previous - {model.name for model in models}:  # an earlier page's model, now unreferenced
        (out / name).unlink(missing_ok=True)


def _earlier_page(out: Path) -> bool:
    try:
        return json.loads((out / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _previous_models(out: Path) -> set[str]:
    """The model files an earlier build wrote into `out` (named by its model.json)."""
    try:
        old = json.loads((out / MANIFEST).read_text())
        names = {old["decoder"]["file"]} | ({old["encoder"]["file"]} if old.get("encoder") else set())
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in names if isinstance(name, str) and Path(name).name == name and name.endswith(".onnx")}


def page_files(folder: Path) -> set[str]:
    """The URL paths (relative, '/'-separated) of the files a page in `folder` consists of: what `serve`
    answers, and nothing else (not the user's other files beside it, nor folder listings)."""
    return {*PAGE_FILES, MANIFEST, *(f"ort/{name}" for name in ORT_FILES), *_previous_models(folder)}


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def send_head(self):  # GET and HEAD
        name = unquote(urlsplit(self.path).path).lstrip("/") or "index.html"
        # Only the page's own files (not the user's others beside it, no folder listings), and only
        # inside the folder: a link among them that leads out of it is not followed. The rest is 404.
        if name not in page_files(Path(self.directory)):
            self.send_error(404, "File not found")
            return None
        target = Path(self.directory, name).resolve()
        if not target.is_relative_to(Path(self.directory).resolve()):
            print(f"warning: not serving {name}: it leads out of the page's folder, to {target}", file=sys.stderr)
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def list_directory(self, path):  # `/` while index.html is missing (a rebuild): no listing either
        self.send_error(404, "File not found")
        return None

    def end_headers(self):
        # Cross-origin isolation lets onnxruntime-web use several threads (SharedArrayBuffer);
        # no-store so a rebuilt page is never mixed with a cached old model.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):  # quiet: the URL is printed once
        pass


def bind(folder: str | Path, port: int = 8000) -> ThreadingHTTPServer:
    """A server for `folder` bound to 127.0.0.1:`port` (0: any free port), not serving yet: a port in
    use or not allowed is a UserError here, so `cvae-tk web --serve` says it before building the page."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be an integer from 0 to 65535, got {port!r}")
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), partial(_Handler, directory=os.fspath(folder)))
    except OSError as error:
        hint = " (ports below 1024 need root)" if 0 < port < 1024 and error.errno == errno.EACCES else ""
        raise UserError(
            f"cannot serve on 127.0.0.1:{port}: {error.strerror or error}{hint}; choose another --port (0: any free one)"
        ) from None
    server.daemon_threads = True
    return server


def serve(folder: str | Path, port: int | ThreadingHTTPServer = 8000) -> ThreadingHTTPServer:
    """Serve the page in `folder` on 127.0.0.1:`port` (0: any free port; or a server from `bind`) from
    a background thread; returns the server (its URL: `url(server)`; stop it with server.shutdown())."""
    folder = Path(folder)
    if not (folder / "index.html").is_file():
        raise UserError(f"{folder} holds no index.html: build the page first (cvae-tk web EXPORT.onnx --out {folder})")
    server = port if isinstance(port, ThreadingHTTPServer) else bind(folder, port)
    threading.Thread(target=server.serve_forever, name="cvae-tk web", daemon=True).start()
    return server


def url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def serve_forever(folder: Path, port: int | ThreadingHTTPServer = 8000) -> None:
    """Serve until Ctrl-C, then stop the server and return."""
    server = serve(folder, port)
    print(f"serving {folder} at {url(server)} (Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
