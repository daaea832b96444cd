"""cascade-codec: Stable Cascade's Stage A + EfficientNet + Stage B as a 42× image codec."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Codec", "__version__"]


def __getattr__(name: str):
    # Importing the package stays cheap (the CLI's --help must be fast); the API loads on first use.
    if name == "Codec":
        from .codec import Codec

        return Codec
    raise AttributeError(name)
