"""``compile=True`` / ``--compile``: the models run through torch.compile and give the same images and latents as
eager; the flag reaches the codec from every command that has it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from codec import Codec
from codec.cli import main


@pytest.fixture
def compiled_calls(monkeypatch):
    """``compile_model`` replaced by a recorder that returns the function unchanged (no compiling: fast)."""
    import codec.codec as codec_module
    import datasets_tools.encode as encode_module

    calls: list[str] = []

    def record(fn):
        calls.append(type(getattr(fn, "__self__", fn)).__name__)
        return fn

    monkeypatch.setattr(codec_module, "compile_model", record)
    monkeypatch.setattr(encode_module, "compile_model", record)
    return calls


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "photos" / "a.png"
    p.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    return p


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compile_flag_reaches_the_models_of_every_command(compiled_calls, tiny_weights, photo, tmp_path):
    r = run("reconstruct", photo, "-o", tmp_path / "r.png", "-w", tiny_weights, "--steps", "1", "--compile")
    assert r.exit_code == 0, r.output
    assert sorted(compiled_calls) == ["EfficientNetEncoder", "StageA", "StageB"]
    compiled_calls.clear()
    r = run("encode", photo, "-o", tmp_path / "z.safetensors", "-w", tiny_weights, "--compile")
    assert r.exit_code == 0, r.output
    assert compiled_calls == ["EfficientNetEncoder"]
    compiled_calls.clear()
    r = run("decode", tmp_path / "z.safetensors", "-o", tmp_path / "d.png", "-w", tiny_weights, "--steps", "1",
            "--compile")
    assert r.exit_code == 0, r.output
    assert sorted(compiled_calls) == ["StageA", "StageB"]
    compiled_calls.clear()
    r = run("encode-dataset", photo.parent, tmp_path / "store", "-w", tiny_weights, "--size", "32", "--workers", "0",
            "--no-progress", "--compile")
    assert r.exit_code == 0, r.output
    assert compiled_calls == ["EfficientNetEncoder"]
    compiled_calls.clear()
    r = run("decode-dataset", tmp_path / "store", tmp_path / "out", "-w", tiny_weights, "--steps", "1", "--compile")
    assert r.exit_code == 0, r.output
    assert sorted(compiled_calls) == ["StageA", "StageB"]
    compiled_calls.clear()
    r = run("reconstruct", photo, "-o", tmp_path / "r2.png", "-w", tiny_weights, "--steps", "1")
    assert r.exit_code == 0 and compiled_calls == []  # off by default


def test_a_codec_compiles_each_model_once_and_again_only_when_it_is_replaced(compiled_calls, tiny_weights):
    codec = Codec.from_pretrained(tiny_weights, device="cpu", dtype="fp32", compile=True)
    z = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        codec.decode(z, steps=2, output="tensor")
    assert sorted(compiled_calls) == ["StageA", "StageB"]
    codec.stage_b = Codec.from_pretrained(tiny_weights, device="cpu", dtype="fp32").stage_b
    codec.decode(z, steps=1, output="tensor")
    assert sorted(compiled_calls) == ["StageA", "StageB", "StageB"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_compiled_mini_codec_decodes_and_encodes_as_eager(dtype):
    # real torch.compile (inductor): about 1–2 min on a 2-core CPU the first time (its cache then makes reruns quick)
    eager = Codec.from_pretrained("mini", device="cpu", dtype=dtype)
    compiled = Codec.from_pretrained("mini", device="cpu", dtype=dtype, compile=True)
    z = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    kwargs = {"steps": 2, "cfg": 1.5, "seed": 3, "output": "tensor"}  # CFG: the doubled batch goes through the graph
    want, got = eager.decode(z, **kwargs), compiled.decode(z, **kwargs)
    assert got.shape == want.shape == (2, 3, 256, 256)
    tol = 1e-4 if dtype == "fp32" else 2e-2  # bf16: the compiled graph may fuse and round in another order
    assert ((got - want).norm() / want.norm()).item() < tol
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(compiled.encode(images), eager.encode(images), rtol=1e-4, atol=1e-4)
