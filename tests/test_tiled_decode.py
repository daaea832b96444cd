"""Stage A decoded in tiles equals the decode in one piece; huge decodes tile instead of being refused and show
progress over tiles."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from helpers import fill_

from codec.presets import create_model
from codec.stage_a import StageA
from codec.tiled_decode import decode_tiled, stage_a_halo, tile_side

ROOT = Path(__file__).resolve().parent.parent


def random_stage_a(name: str) -> StageA:
    """A Stage A with every weight random (a fresh one has zero gammas, so its blocks would mix nothing)."""
    return fill_(create_model(name), seed=1).eval()


def measured_radius(stage_a: StageA, n: int = 41) -> int:
    """How far (latent pixels) the centre 4×4 output pixels reach into the latent: where their gradient is not 0."""
    z = torch.randn(1, stage_a.c_latent, n, n, generator=torch.Generator().manual_seed(0), requires_grad=True)
    c = n // 2
    stage_a.decode(z)[..., 4 * c:4 * c + 4, 4 * c:4 * c + 4].sum().backward()
    ys, xs = torch.nonzero(z.grad.abs().sum((0, 1)), as_tuple=True)
    return max(c - int(ys.min()), int(ys.max()) - c, c - int(xs.min()), int(xs.max()) - c)


@pytest.mark.parametrize("name", ["stage_a_tiny", "stage_a_mini", "stage_a"])
def test_the_halo_covers_the_measured_receptive_field(name):
    stage_a = random_stage_a(name)
    measured = measured_radius(stage_a)
    assert measured == stage_a.config["bottleneck_blocks"] + 1  # one pixel per 3×3 block, one for the 2× upsampling
    assert measured <= stage_a_halo(stage_a) <= measured + 2  # a bound, and not a wasteful one


def test_tiled_equals_one_piece_and_a_short_halo_does_not():
    stage_a = random_stage_a("stage_a_mini")
    z = torch.randn(2, 4, 37, 29, generator=torch.Generator().manual_seed(2))
    whole = stage_a.decode(z)[..., :141, :113]
    radius = measured_radius(stage_a)
    for tile in (8, 11, 64):
        tiled = decode_tiled(stage_a, z, tile, crop=(141, 113), progress=False)
        assert tiled.shape == whole.shape
        assert (tiled - whole).abs().max() <= 1e-4 * whole.abs().max()
    short = decode_tiled(stage_a, z, 8, halo=radius - 1, crop=(141, 113), progress=False)
    assert (short - whole).abs().max() > 1e-4 * whole.abs().max()  # the test can tell a halo that is too short


def test_tile_side_fits_the_budget():
    assert tile_side(100.0, 100 * 40**2, halo=5) == 30
    assert tile_side(100.0, 100 * 20**2, halo=5) == 10
    assert tile_side(100.0, 100 * 17**2, halo=5) is None  # a 7-pixel core is not worth its halo


def test_a_decode_too_big_for_stage_a_is_tiled_and_equal(monkeypatch):
    """The mini codec with a Stage A budget of a few tiles decodes in tiles, to the same image, with bars over
    Stage B's steps and Stage A's tiles."""
    import codec.tiled_decode as T
    from codec import Codec

    codec = Codec.from_pretrained("mini", device="cpu")
    z = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(3))
    whole = codec.decode(z, height=300, width=230, steps=2, output="tensor")
    per_a = codec._decode_bytes_per_latent_pixel()[1]
    monkeypatch.setattr(codec, "stage_a_bytes", per_a * 40**2)
    tiles = []
    real = T.decode_tiled
    monkeypatch.setattr("codec.codec.decode_tiled", lambda *a, **k: tiles.append(a[2]) or real(*a, **k))
    tiled = codec.decode(z, height=300, width=230, steps=2, output="tensor", progress_bars=False)
    assert tiles == [40 - 2 * stage_a_halo(codec.stage_a)]
    assert (tiled - whole).abs().max() <= 1e-4


def test_a_huge_decode_is_refused_only_for_what_cannot_be_tiled(monkeypatch):
    """Stage B samples the whole latent and the decoded image is held whole: only those are refused; Stage A
    tiles to what is left."""
    import codec.codec as C
    from codec import Codec
    from codec.errors import UsageError

    codec = Codec.from_pretrained("mini", device="cpu")
    per_b, per_a = codec._decode_bytes_per_latent_pixel()
    stage_b, image = per_b * 5000**2, 30 * 20000**2  # a 20000² decode: Stage A latent 5000², 30 bytes an image pixel

    def free(n: float) -> None:
        monkeypatch.setattr(C, "available_bytes", lambda device: int(n))

    free(max(stage_b, image) + 2**30)
    assert codec.check_memory(1, 20000, 20000, 5000, 5000) >= 8  # Stage A in tiles: not refused
    free(stage_b * 0.9)
    with pytest.raises(UsageError, match=r"20000×20000 needs about .* GiB for the largest tensors of Stage B's "
                                         r"sampling, which runs on the whole latent"):
        codec.check_memory(1, 20000, 20000, 5000, 5000)
    free(max(stage_b * 1.1, image * 0.9))
    with pytest.raises(UsageError, match=r"needs about 11.2 GiB for the decoded image\(s\) themselves"):
        codec.check_memory(1, 20000, 20000, 5000, 5000)
    free(image + per_a * 20**2)
    with pytest.raises(UsageError, match=r"once the decoded image\(s\) \(11.2 GiB\) are held: too little for even a "
                                         r"small tile"):
        codec.check_memory(1, 20000, 20000, 5000, 5000)
    assert codec.check_memory(1, 256, 256, 64, 64) is None  # a small decode: one piece


def run_on_a_terminal(args: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal (progress bars show only on terminals)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new one is 0 columns wide
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


def test_a_cli_decode_that_needs_tiles_shows_them_and_succeeds(tmp_path):
    """`cascade decode --model mini` at a size that must be tiled (here: a Stage A budget made small, as on a
    machine with little memory) prints a bar over tiles with rate and ETA and writes the image."""
    from PIL import Image

    z = tmp_path / "z.npy"
    import numpy as np

    np.save(z, np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype("float32"))
    out = tmp_path / "big.png"
    script = ("import codec.codec as C; C.STAGE_A_BYTES = 4608 * 48**2; from codec.cli import main; "
              "main(prog_name='cascade')")
    rc, text = run_on_a_terminal([sys.executable, "-c", script, "decode", str(z), "-o", str(out), "--model", "mini",
                                  "--steps", "2", "--height", "400", "--width", "360"])
    assert rc == 0, text
    assert "Traceback" not in text
    assert "Stage A tiles: 100%" in text and "tile/s" in text, text  # rate; the ETA is the [elapsed<remaining]
    assert "decode: 100%" in text and "wrote 1 image(s)" in text, text
    assert Image.open(out).size == (360, 400)
