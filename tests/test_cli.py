"""The `cascade` CLI as a user runs it: help texts, an encode → decode round trip on tiny weights, errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from codec.cli import main

COMMANDS = ["encode", "decode", "reconstruct", "info", "demo-weights", "encode-dataset", "decode-dataset", "convert"]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(128, 96), (128, 96), (100, 70)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in COMMANDS])
def test_help_explains_every_option(cmd):
    result = run(*cmd, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    if cmd:
        from codec.cli import main as group

        command = group.commands[cmd[0]]
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{cmd[0]} --{param.name} has no help text"


def test_encode_decode_roundtrip(tiny_weights, images, tmp_path):
    out = tmp_path / "lat.safetensors"
    r = run("encode", *images, "-o", out, "-w", tiny_weights)
    assert r.exit_code == 0, r.output
    assert "wrote 3 latent(s)" in r.output
    from codec.weights import read_header

    header = read_header(out)
    assert json.loads(header.metadata["sizes"]) == [[128, 96], [128, 96], [100, 70]]
    assert set(header.tensors) == {"latents.0", "latents.1", "latents.2"}
    assert header.tensors["latents.0"].shape == (1, 16, 3, 2)

    r = run("decode", out, "-o", tmp_path / "dec.png", "-w", tiny_weights, "--steps", "2")
    assert r.exit_code == 0, r.output
    sizes = [Image.open(tmp_path / f"dec_{i:03d}.png").size for i in range(3)]
    assert sizes == [(96, 128), (96, 128), (70, 100)]


def test_encode_npy_and_decode_with_explicit_size(tiny_weights, images, tmp_path):
    out = tmp_path / "lat.npy"
    assert run("encode", *images[:2], "-o", out, "-w", tiny_weights, "--latent-dtype", "fp16").exit_code == 0
    arr = np.load(out)
    assert arr.shape == (2, 16, 3, 2) and arr.dtype == np.float16
    r = run("decode", out, "-o", tmp_path / "x.png", "-w", tiny_weights, "--steps", "1", "--height", "50",
            "--width", "40", "--no-cfg", "--sampler", "ddim")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "x_000.png").size == (40, 50)
    r = run("encode", *images, "-o", tmp_path / "mixed.npy", "-w", tiny_weights)
    assert r.exit_code == 1 and "write .safetensors instead" in r.output


def test_reconstruct(tiny_weights, images, tmp_path):
    r = run("reconstruct", images[2], "-o", tmp_path / "r.jpg", "-w", tiny_weights, "--steps", "1")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "r.jpg").size == (70, 100)


def test_info_lists_files_and_labels_tiny_weights(tiny_weights):
    r = run("info", tiny_weights)
    assert r.exit_code == 0, r.output
    assert "stage_b_lite.safetensors" in r.output and "TINY RANDOM" in r.output


def test_user_errors_are_sentences_not_tracebacks(tiny_weights, tmp_path, images):
    r = run("encode", tmp_path / "missing.png", "-o", tmp_path / "z.safetensors", "-w", tiny_weights)
    assert r.exit_code == 1 and "missing.png: no such file" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    r = run("encode", bad, "-o", tmp_path / "z.safetensors", "-w", tiny_weights)
    assert r.exit_code == 1 and "bad.jpg: not an image" in r.output
    r = run("encode", images[0], "-o", tmp_path / "z.safetensors", "-w", tmp_path)
    assert r.exit_code == 1 and "is missing effnet_encoder.safetensors" in r.output  # encode needs only the encoder
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 4, 8, 8), np.float32))
    r = run("decode", wrong, "-o", tmp_path / "w.png", "-w", tiny_weights)
    assert r.exit_code == 1 and "expected EfficientNet latents of shape (B, 16, h, w)" in r.output
    r = run("encode", images[0], "-o", tmp_path / "z.txt", "-w", tiny_weights)
    assert r.exit_code == 1 and "must end in .safetensors or .npy" in r.output


def test_decode_dataset(tiny_weights, tmp_path):
    from datasets_tools.encode import encode_dataset

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(src / f"{name}.png")
    encode_dataset(src, tmp_path / "s.zarr", tiny_weights, size=32, workers=0, progress=False)
    r = run("decode-dataset", tmp_path / "s.zarr", tmp_path / "out", "-w", tiny_weights, "--steps", "1",
            "--ids", "a,c")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    assert Image.open(tmp_path / "out" / "a.png").size == (43, 43)  # 32 px encoder input → 1×1 latent → 32/0.75
    r = run("decode-dataset", tmp_path / "s.zarr", tmp_path / "out", "-w", tiny_weights, "--steps", "1")
    assert r.exit_code == 0 and "decoded 1 sample(s)" in r.output and "2 already there" in r.output
    r = run("decode-dataset", tmp_path / "s.zarr", tmp_path / "out", "-w", tiny_weights, "--ids", "zzz")
    assert r.exit_code == 1 and "no sample(s) with id zzz" in r.output


def test_decode_dataset_decodes_with_the_model_that_encoded_the_store(tiny_weights, tmp_path, monkeypatch):
    import zarr

    from datasets_tools.encode import encode_dataset, store_model

    monkeypatch.delenv("CASCADE_WEIGHTS", raising=False)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(src / "a.png")
    encode_dataset(src, tmp_path / "s.zarr", tiny_weights, size=32, workers=0, progress=False)
    assert store_model(tmp_path / "s.zarr") == str(tiny_weights)
    runs = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["runs"]  # provenance of every run
    assert [(r["device"], r["precision"], r["processes"]) for r in runs] == [("cpu", "float32", 1)]
    info = run("info", tmp_path / "s.zarr").output
    assert f"(model: {tiny_weights})" in info and "encoded on cpu × 1 process(es) in float32" in info
    r = run("decode-dataset", tmp_path / "s.zarr", tmp_path / "out", "--steps", "1")  # no -w: the store's model
    assert r.exit_code == 0, r.output
    assert f"decoding with {tiny_weights}, the model that encoded these latents" in r.output
    assert (tmp_path / "out" / "a.png").is_file()
    # a store written before the model was recorded: the built-in model is still known by its encoder's digest
    encode_dataset(src, tmp_path / "m.zarr", "mini", size=64, workers=0, progress=False)
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="r+")
    attrs = dict(group.attrs)
    del attrs["model"]
    group.attrs.put(attrs)
    assert "model" not in zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs
    assert store_model(tmp_path / "m.zarr") == "mini"
    assert store_model(tmp_path / "s.zarr") != "mini"


def test_decoded_file_names_mirror_ids_and_never_collide():
    from datasets_tools.decode import output_name

    ids = ["a/x", "a__x", "x", "x.jpg", "../up", "/abs", "a//b", "%41", "", "a\\b", "a/%2F"]
    names = [output_name(i, "png") for i in ids]
    assert names[:4] == ["a/x.png", "a__x.png", "x.png", "x.jpg.png"]
    assert len(set(names)) == len(names)
    for name in names[4:]:  # not a plain relative path: one percent-encoded file name at the top
        assert "/" not in name and "\\" not in name and name.startswith("%") and ".." not in name.split("/")
