"""User mistakes on the command line and in the Python API get sentences, checked before any work, never a
traceback; what a latents file records is used when decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from codec.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def no_traceback(result) -> str:
    """The error message of a command that failed for the user's reason: exit status 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    error = result.output[result.output.index("Error: "):]
    assert not error.strip().startswith("Error: \n"), result.output
    return error


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(p)
    return p


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tiny_weights, photo, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = no_traceback(run("reconstruct", photo, "-o", tmp_path / "afile" / "x.png", "-w", tiny_weights))
    assert "is a file, not a folder" in out
    out = no_traceback(run("encode", photo, "-o", tmp_path / "afile" / "x.safetensors", "-w", tiny_weights))
    assert "is a file, not a folder" in out
    out = no_traceback(run("reconstruct", photo, "-o", tmp_path / "x.bmpx", "-w", tiny_weights))
    assert "'.bmpx' is not an image format" in out
    out = no_traceback(run("reconstruct", photo, "-o", tmp_path / "noext", "-w", tiny_weights))
    assert "no file extension" in out and ".partial" not in out
    out = no_traceback(run("convert", tiny_weights, tmp_path / "afile", "--to", "diffusers"))
    assert "is a file; give a folder" in out


def test_devices_that_do_not_exist_are_sentences(photo, tmp_path):
    if not torch.cuda.is_available():
        out = no_traceback(run("reconstruct", photo, "-o", tmp_path / "x.png", "-w", "mini", "--device", "cuda"))
        assert "not available here" in out and "cpu" in out
    out = no_traceback(run("reconstruct", photo, "-o", tmp_path / "x.png", "-w", "mini", "--device", "gpu"))
    assert "'gpu' is not a device" in out


def test_folders_and_images_given_where_a_file_is_expected(tiny_weights, photo, tmp_path):
    out = no_traceback(run("encode", tmp_path, "-o", tmp_path / "z.safetensors", "-w", tiny_weights))
    assert "is a folder" in out and "encode-dataset" in out
    out = no_traceback(run("decode", photo, "-o", tmp_path / "y.png", "-w", tiny_weights))
    assert "is an image, not a latents file" in out and "cascade reconstruct" in out


def test_a_truncated_latents_file_is_not_called_a_download(tiny_weights, photo, tmp_path):
    lat = tmp_path / "z.safetensors"
    assert run("encode", photo, "-o", lat, "-w", tiny_weights).exit_code == 0
    lat.write_bytes(lat.read_bytes()[:-20])
    out = no_traceback(run("decode", lat, "-o", tmp_path / "y.png", "-w", tiny_weights))
    assert "not a complete latents file" in out and "Download" not in out


def test_latents_record_their_model_and_decode_uses_it(photo, tmp_path, monkeypatch):
    monkeypatch.delenv("CASCADE_WEIGHTS", raising=False)
    lat = tmp_path / "z.safetensors"
    r = run("encode", photo, "-o", lat, "-w", "mini")
    assert r.exit_code == 0, r.output
    from codec.latents import load_latents

    assert load_latents(lat).model == "mini"
    r = run("decode", lat, "-o", tmp_path / "y.png", "--steps", "1", "--height", "96")
    assert r.exit_code == 0, r.output
    assert "decoding with mini, the model that encoded these latents" in r.output
    assert Image.open(tmp_path / "y.png").size == (144, 96)  # only --height: the original's 3:2 aspect is kept


def test_the_built_in_model_never_sends_downloads_into_the_package(photo, tmp_path):
    out = no_traceback(run("reconstruct", photo, "-o", tmp_path / "x.png", "-w", "mini", "--stage-b", "lite"))
    assert "the built-in 'mini' model has no stage_b_lite.safetensors" in out and "a folder of your own" in out
    assert "codec/mini/ :" not in out
    out = no_traceback(run("reconstruct", photo, "-o", tmp_path / "x.png", "-w", "mini", "--caption", "a cup"))
    assert "has no text_encoder/, tokenizer/" in out


def test_decode_takes_what_encode_returns_for_images_of_several_sizes():
    from codec import Codec

    codec = Codec.from_pretrained("mini", device="cpu")
    a = torch.rand(3, 64, 96)
    b = torch.rand(3, 96, 64)
    latents = codec.encode([a, b])
    assert isinstance(latents, list) and len(latents) == 2
    images = codec.decode(latents, steps=1)
    assert [im.size for im in images] == [(85, 43), (43, 85)]  # each at latent·32/0.75: 1×2 and 2×1 latents


def test_ctrl_c_says_what_happens_next(monkeypatch, tiny_weights, tmp_path):
    import datasets_tools.decode as D

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    import datasets_tools.encode as E

    monkeypatch.setattr(D, "LatentDataset", interrupted)
    monkeypatch.setattr(E, "store_model", interrupted)  # the first thing decode-dataset does with the store
    out = no_traceback(run("decode-dataset", tmp_path / "s.zarr", tmp_path / "o", "-w", tiny_weights))
    assert out.strip() == "Error: interrupted; run the same command again to continue where it stopped"


def test_ctrl_c_while_the_command_line_starts_is_a_sentence_too():
    """A Ctrl-C that lands while `cascade` imports its command modules ends it with exit 130 and a line, not a
    traceback (simulated: the import of one command module raises KeyboardInterrupt)."""
    import subprocess
    import sys

    code = ("import importlib.abc, sys\n"
            "class Stop(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'codec.cli.generate':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Stop())\n"
            "from codec.cli import main\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert "interrupted while starting" in r.stderr


def test_encode_needs_only_the_encoder(tiny_weights, photo, tmp_path):
    """`cascade encode` runs the EfficientNet alone: a folder with only effnet_encoder.safetensors encodes."""
    import shutil

    only = tmp_path / "only_encoder"
    only.mkdir()
    shutil.copy(tiny_weights / "effnet_encoder.safetensors", only)
    r = run("encode", photo, "-o", tmp_path / "z.safetensors", "-w", only)
    assert r.exit_code == 0, r.output
    out = no_traceback(run("decode", tmp_path / "z.safetensors", "-o", tmp_path / "y.png", "-w", only))
    assert "stage_a.safetensors" in out


def test_device_rule(monkeypatch):
    """auto is the CPU without a GPU (under torchrun too); with GPUs each torchrun process takes its own."""
    from codec.devices import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:1") == resolve_device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # an explicit index is kept
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    from codec.errors import UsageError

    with pytest.raises(UsageError, match="'cuda:2' is not available here"):
        resolve_device("cuda:2")


def test_training_takes_plain_cuda(monkeypatch):
    """`cascade train ... --device cuda` failed before training: set_device needs an index. Each process takes
    its own GPU under torchrun, the current one outside it."""
    from codec.training import distributed as D

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: chosen.append(dev))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for device in ("cuda", "auto", None):
        assert D.setup(device).device == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert D.setup("cuda").device == torch.device("cuda:3") == D.setup("auto").device
    assert chosen[-1] == torch.device("cuda:3") and all(d.index is not None for d in chosen)


def test_encode_dataset_has_one_device_option_and_the_storage_precision_name(tiny_weights, photo, tmp_path):
    out = no_traceback(run("encode-dataset", photo.parent, tmp_path / "s.zarr", "-w", tiny_weights,
                           "--device", "gpu"))
    assert "'gpu' is not a device" in out
    r = run("encode-dataset", photo.parent, tmp_path / "s.zarr", "-w", tiny_weights, "--size", "64",
            "--latent-dtype", "float32", "--workers", "0", "--no-progress")
    assert r.exit_code == 0, r.output
    from datasets_tools import LatentStore

    assert LatentStore.open(tmp_path / "s.zarr").attrs["dtype"] == "float32"


def test_info_describes_what_it_is_given(tiny_weights, photo, tmp_path):
    lat = tmp_path / "z.safetensors"
    assert run("encode", photo, "-o", lat, "-w", tiny_weights).exit_code == 0
    r = run("info", lat)
    assert r.exit_code == 0 and "1 latent(s) of shape 16×1×2" in r.output and "photo.png (96×64)" in r.output, \
        r.output
    assert f"model: {tiny_weights}" in r.output
    r = run("encode-dataset", photo.parent, tmp_path / "s.zarr", "-w", tiny_weights, "--size", "64", "--workers", "0",
            "--no-progress")
    assert r.exit_code == 0, r.output
    r = run("info", tmp_path / "s.zarr", "--ids")
    assert r.exit_code == 0 and r.output.split() == ["photo"], r.output  # ids are relative paths without suffix
    out = no_traceback(run("info", lat, "--ids"))
    assert "--ids lists the samples of a latent store" in out
    bucket = next(p for p in (tmp_path / "s.zarr").iterdir() if p.name.startswith("b"))
    out = no_traceback(run("info", bucket))  # used to say: download the weights into it
    assert f"is a part of the latent store {(tmp_path / 's.zarr').resolve()}" in out and "Download" not in out
    (tmp_path / "photos").mkdir()
    photo.rename(tmp_path / "photos" / photo.name)
    out = no_traceback(run("info", tmp_path / "photos"))
    assert "is a folder of 1 image(s) and holds no model weights" in out and "encode-dataset" in out
    (tmp_path / "empty").mkdir()  # a folder made for the weights: what to download into it stays the answer
    assert "Download these files into" in no_traceback(run("info", tmp_path / "empty"))


def test_one_meaning_per_option(photo, tmp_path):
    r = run("reconstruct", photo, "-o", tmp_path / "x.png", "-w", "mini", "--scale", "2")
    assert r.exit_code == 2 and "0<x<=1.5" in r.output
    assert "(0, 1.5]" in run("encode", "--help").output.replace("\n", " ").replace("  ", " ")
    r = run("decode-dataset", tmp_path / "s.zarr", tmp_path / "o", "--use-captions", "--caption", "x")
    assert r.exit_code == 2 and "give one of the two" in r.output
    assert "--model" in run("generate", "--help").output
    for command in ("decode", "generate"):  # a negative rescale factor was silently taken for "off"
        r = run(command, "x", "--cfg-rho", "-1")
        assert r.exit_code == 2 and "--cfg-rho" in r.output and "0<=x<=1" in r.output, r.output


def test_bench_recon_on_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    out = no_traceback(run("bench", "recon", tmp_path / "empty", "-o", tmp_path / "rep", "--codec", "bicubic"))
    assert "no images found" in out and not (tmp_path / "rep" / "summary.json").exists()


def test_encode_dataset_refuses_two_crop_policies(photo, tmp_path):
    r = run("encode-dataset", photo.parent, tmp_path / "s.zarr", "--buckets", "--keep-aspect", "-w", "mini")
    assert r.exit_code == 2, r.output
    assert "--buckets and --keep-aspect are different crop policies; give one" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "s.zarr").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_outputs_where_no_file_can_be_created_are_refused_before_the_work(tiny_weights, photo, tmp_path):
    """os.access says yes to root everywhere (and knows nothing of /proc or /sys): each command tried to write its
    output after the work and died with a traceback. Now creating a file there is tried first."""
    import yaml

    nowhere = Path("/proc/cascade-new-user-pass")
    lat = tmp_path / "z.safetensors"
    assert run("encode", photo, "-o", lat, "-w", tiny_weights).exit_code == 0
    commands = [
        ("encode", photo, "-o", nowhere / "z.safetensors", "-w", tiny_weights),
        ("decode", lat, "-o", nowhere / "y.png", "-w", tiny_weights, "--steps", "1"),
        ("reconstruct", photo, "-o", nowhere / "x.png", "-w", tiny_weights, "--steps", "1"),
        ("generate", "a cup", "-o", nowhere / "g.png", "-w", tiny_weights, "--steps-c", "1", "--steps-b", "1"),
        ("bench", "recon", photo.parent, "-o", nowhere, "--codec", "bicubic", "--size", "64"),
        ("demo-weights", nowhere),
        ("convert", tiny_weights, nowhere, "--to", "diffusers"),
        ("encode-dataset", photo.parent, nowhere / "s.zarr", "-w", tiny_weights, "--size", "64"),
    ]
    for args in commands:
        out = no_traceback(run(*args))
        assert f"{nowhere}" in out and "cannot write there" in out and "choose another place" in out, (args[0], out)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(nowhere), "data": {"images": str(photo.parent),
                                      "image_size": 64}, "batch_size": 1, "max_steps": 1,
                                      "model": {"preset": "tiny"}}))
    out = no_traceback(run("train", "stage-a", config))
    assert f"{config}: output_dir: {nowhere}: cannot write there" in out


def test_demo_weights_into_a_file_is_a_sentence(photo):
    out = no_traceback(run("demo-weights", photo))
    assert f"{photo} is a file; give a folder" in out


def test_train_configs_that_are_no_yaml_file_are_sentences(photo, tmp_path):
    out = no_traceback(run("train", "stage-a", tmp_path))
    assert "is a folder; give the YAML config file" in out
    out = no_traceback(run("train", "stage-a", photo))  # binary: read_text raised UnicodeDecodeError
    assert f"{photo} is not a text file; give the YAML config file" in out
    (tmp_path / "empty.yaml").write_text("")
    out = no_traceback(run("train", "stage-a", tmp_path / "empty.yaml"))
    assert "empty.yaml is empty; a config needs at least output_dir, data, batch_size and max_steps" in out


def test_decode_dataset_takes_no_progress_like_encode_dataset(tiny_weights, photo, tmp_path):
    r = run("encode-dataset", photo.parent, tmp_path / "s.zarr", "-w", tiny_weights, "--size", "64", "--workers",
            "0", "--no-progress")
    assert r.exit_code == 0, r.output
    r = run("decode-dataset", tmp_path / "s.zarr", tmp_path / "out", "-w", tiny_weights, "--steps", "1",
            "--no-progress")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert (tmp_path / "out" / "photo.png").is_file()


@pytest.mark.parametrize("resumable", [True, False])
def test_a_full_disk_is_a_sentence_not_a_traceback(resumable):
    """ENOSPC (or a quota) in the middle of a job: what to do, and whether the job resumes; any other OSError is a
    bug and keeps its traceback."""
    import errno

    import click

    from codec.cli.common import RESUMES, user_errors

    @click.command()
    @user_errors(**({"interrupted": RESUMES} if resumable else {}))
    def job():
        raise OSError(errno.ENOSPC, "No space left on device", "out/x.png")

    r = CliRunner().invoke(job, [])
    out = no_traceback(r)
    assert "no space left on device writing out/x.png; free some space or write to another disk" in out
    assert ("run the same command again to continue where it stopped" in out) is resumable

    @click.command()
    @user_errors
    def bug():
        raise OSError(errno.EBADF, "Bad file descriptor")

    assert isinstance(CliRunner().invoke(bug, []).exception, OSError)
