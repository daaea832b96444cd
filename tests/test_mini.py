"""The built-in ``mini`` codec (trained by this project, shipped in the package): loading by name, offline, and an
end-to-end check that it actually reconstructs — each sample photo comes back closer to itself than to the others.

The sample photos (scripts/samples, from scikit-image) were never seen in training (that used Debian wallpapers).
"""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from codec import Codec
from codec import weights as W
from codec.images import load_image, pil_to_tensor

SAMPLES = Path(__file__).resolve().parent.parent / "scripts" / "samples"


@pytest.fixture(scope="module")
def mini():
    return Codec.from_pretrained("mini", device="cpu")


def test_mini_loads_by_name_from_the_package_without_network(mini, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = W.WeightSource("mini")
    assert src.builtin == "mini" and src.folder == W.BUILTIN_MODELS["mini"].folder and src.repo_id is None
    assert src.folder.is_relative_to(Path(W.__file__).resolve().parent.parent)
    info = mini.info()
    assert info["source"] == "mini (built-in)"
    assert info["components"]["stage_b"]["file"].endswith("stage_b_mini.safetensors")
    total = sum(p.stat().st_size for p in src.folder.glob("*.safetensors"))
    assert total <= 40 * 1024 * 1024, f"mini weights are {total} bytes, over the 40 MB budget"
    notes = {c.note for c in mini.components.values()}
    assert all(n and "mini" in n for n in notes), notes


def _photos(side: int) -> torch.Tensor:
    """The sample photos, centre square crop, resized to side² (RGB in [0,1])."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for path in sorted(SAMPLES.glob("*.jpg")):
        x = pil_to_tensor(load_image(path))
        s = min(x.shape[-2:])
        out.append(TF.resize(TF.center_crop(x, [s, s]), [side, side], antialias=True))
    return torch.stack(out)


def _thumbnails(x: torch.Tensor) -> torch.Tensor:
    """The bicubic thumbnail holding as many values as the 16×6×6 latent (as `cascade bench recon`'s ``bicubic``
    codec: PIL bicubic down to 13×13, then up), for each image of ``x``."""
    from PIL import Image

    from benchmarks.recon.codecs import bicubic_size
    from codec.images import to_pil

    side = x.shape[-1]
    h, w = bicubic_size(side, side, 16 * 6 * 6)
    return torch.stack([pil_to_tensor(im.resize((w, h), Image.Resampling.BICUBIC)
                                      .resize((side, side), Image.Resampling.BICUBIC)) for im in to_pil(x)])


def test_mini_reconstructs_each_photo_about_as_faithfully_as_the_thumbnail(mini):
    side = W.BUILTIN_MODELS["mini"].native_size
    x = _photos(side)
    rec = mini.decode(mini.encode(x), height=side, width=side, seed=0, output="tensor")
    mse = ((rec[:, None] - x[None]) ** 2).mean(dim=(2, 3, 4))  # [reconstruction, original]
    print("MSE reconstruction × original:\n", mse)
    # Measured at release (seed 0; the multi-scale codec of 2026-12-05): each of the 4 comes back closest to its own
    # original, own-original MSE averaging 0.12× the MSE to the other originals (the release before last: 0.28×).
    own = mse.diagonal()
    others = mse.masked_select(~torch.eye(len(x), dtype=torch.bool))
    assert torch.equal(mse.argmin(dim=1), torch.arange(len(x))), mse
    assert own.mean() < 0.2 * others.mean(), mse
    # and against the thumbnail with the latent's number of values: PSNR 15.65 / 22.10 / 18.69 / 23.86 dB (astronaut,
    # chelsea, coffee, rocket) against 15.34 / 22.02 / 18.19 / 24.45 at release — mean 20.08 against 20.00 — so:
    # the mean at least the thumbnail's (0.3 dB for other CPUs' rounding), no photo more than 1 dB below it.
    thumb = _thumbnails(x)
    psnr = lambda y: -10 * torch.log10(((y.clamp(0, 1) - x) ** 2).mean(dim=(1, 2, 3)))  # noqa: E731
    ours, theirs = psnr(rec), psnr(thumb)
    print("PSNR mini", ours, "thumbnail", theirs)
    assert ours.mean() > theirs.mean() - 0.3, (ours, theirs)
    assert (ours > theirs - 1.0).all(), (ours, theirs)


def test_cli_model_mini_and_info(tmp_path):
    from codec.cli import main

    r = CliRunner().invoke(main, ["info", "mini"])
    assert r.exit_code == 0, r.output
    assert "weights: mini (built-in" in r.output and "stage_b_mini.safetensors" in r.output
    assert "sampler defaults (stage_b_mini.safetensors)" in r.output and "prediction" in r.output
    out = tmp_path / "z.safetensors"
    r = CliRunner().invoke(main, ["encode", str(SAMPLES / "coffee.jpg"), "-o", str(out), "--model", "mini"])
    assert r.exit_code == 0, r.output
    assert out.is_file()
