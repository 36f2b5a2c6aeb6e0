"""The in-browser studio: `cvae-tk web EXPORT.onnx --out DIR` (see toolkit/web/build.py)."""

from toolkit.web.build import build_page, find_ort_dist, model_manifest, serve, url

__all__ = ["build_page", "find_ort_dist", "model_manifest", "serve", "url"]
