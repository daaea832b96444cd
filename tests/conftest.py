"""Shared fixtures: tiny random weights in the official file layout (written once per session)."""

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP spin-waiting makes them crawl on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def cpu_without_native_bf16():
    """Every test sees a CPU without native bf16, so ``dtype="auto"`` is fp32 on the CPU as the goldens and
    tolerances assume, on any machine. Tests of the bf16 choice opt in with :func:`cpu_with_native_bf16`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("codec.devices.cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
        yield


@pytest.fixture
def cpu_with_native_bf16(monkeypatch):
    """A CPU that reports AVX512_BF16, and a PyTorch with oneDNN to use it (for this test only)."""
    monkeypatch.setattr("codec.devices.cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)


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


@pytest.fixture(scope="session")
def cnet_run_files(tmp_path_factory, tiny_weights):
    """Tiny weights with a tiny canny ControlNet to continue from, and a folder of captioned shape images."""
    import shutil

    from PIL import Image, ImageDraw

    from codec.tiny import write_tiny_controlnet

    root = tmp_path_factory.mktemp("cnet_train")
    weights = root / "weights"
    shutil.copytree(tiny_weights, weights)
    start = write_tiny_controlnet(root / "start", "canny")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        im = Image.new("RGB", (96, 64 + 8 * i), (30 * i, 60, 90))
        draw = ImageDraw.Draw(im)
        draw.rectangle([8 + 4 * i, 10, 50, 50], fill=(230, 200, 30))
        draw.ellipse([40, 12 + 3 * i, 90, 60], fill=(200, 30, 60))
        im.save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"shapes number {i}")
    return weights, start, images
