"""cvae-tk: attribute-conditioned image generators (Conditional VAEs), from shards to ONNX samplers.

Importing the package stays light (no torch): `toolkit.sampler` must work where torch is absent.
"""

__version__ = "0.1.0"
