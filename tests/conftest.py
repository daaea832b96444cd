"""Shared fixtures: tiny random weights in the official file layout (written once per session)."""

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP spin-waiting makes them crawl on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A folder of tiny *random* weights with the official file names (see codec/tiny.py)."""
    from codec.tiny import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture(scope="session")
def tiny_codec(tiny_weights):
    from codec import Codec

    return Codec.from_pretrained(tiny_weights, device="cpu")


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory):
    """A folder with a tiny *random* CLIP text encoder and tokenizer (``text_encoder/``, ``tokenizer/``)."""
    pytest.importorskip("transformers")
    from codec.tiny import write_tiny_text_encoder

    return write_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text"))
