"""The reconstruction benchmark: metrics against hand-computed values, the JPEG byte-budget search, codec specs,
the report schema, the grid, the missing-backbone path, random backbones, resume, latent stores, the CLI."""

import io
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from benchmarks.recon import ReconConfig, run_recon
from benchmarks.recon import codecs as C
from benchmarks.recon import formats as F
from benchmarks.recon import jpeg
from benchmarks.recon import metrics as M
from benchmarks.recon.grid import CELL, GAP, HEADER, LINE, GridRow, grid_size, make_grid
from benchmarks.recon.report import compare, header_lines, load_summary, read_rows, validate_summary
from codec.cli import main
from codec.errors import UsageError

SAMPLES = Path(__file__).resolve().parent.parent / "scripts" / "samples"


def photo_like(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth gradient with a few shapes and mild noise (uint8 HWC): compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([120 + 80 * np.sin(3 * x + seed), 100 + 90 * y, 140 - 60 * x * y], -1)
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 10, h // 4)
        img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (h, w) in enumerate([(200, 240), (192, 192), (230, 200), (210, 260)]):
        Image.fromarray(photo_like(h, w, i)).save(folder / f"p{i}.png")
    return folder


def u8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------- metrics
def test_identical_images_give_the_psnr_cap_and_ssim_one():
    a = u8(photo_like(192, 192, 0))
    assert M.psnr(a, a) == M.PSNR_CAP == 100.0
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert M.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-5)


def test_known_mse_gives_known_psnr():
    rng = np.random.default_rng(1)
    a = rng.integers(10, 246, (64, 80, 3)).astype(np.int16)
    b = a + np.where(rng.random(a.shape) < 0.5, -5, 5)  # every error is ±5: MSE = 25 exactly
    expected = 10 * math.log10(255 ** 2 / 25)  # 34.1514 dB
    assert M.psnr(u8(b.astype(np.uint8)), u8(a.astype(np.uint8))) == pytest.approx(expected, abs=1e-4)


def test_ssim_of_a_constant_shift():
    # Constant images: no variance, so SSIM is the luminance term alone, (2 μx μy + C1) / (μx² + μy² + C1).
    # Dark values keep float32's E[x²] − μ² exact and make C1 matter: (2·2·5 + 6.5025) / (4 + 25 + 6.5025).
    v, c, c1 = 2.0, 3.0, (0.01 * 255) ** 2
    expected = (2 * v * (v + c) + c1) / (v * v + (v + c) ** 2 + c1)  # 0.746514…
    a = torch.full((3, 64, 64), int(v), dtype=torch.uint8)
    assert M.ssim(a + int(c), a) == pytest.approx(expected, abs=1e-6)
    assert M.ssim(a, a + int(c)) == pytest.approx(expected, abs=1e-6)


def test_ms_ssim_needs_161_pixels():
    a = u8(photo_like(160, 200, 0))
    assert M.ms_ssim(a, a) is None
    with pytest.raises(ValueError, match="uint8"):
        M.psnr(a.float(), a.float())


def test_lpips_with_a_random_alexnet_trunk():
    lp = M.LPIPSMetric("alex", random_trunk=True)
    a = u8(photo_like(64, 64, 0))
    noisy = u8(np.clip(photo_like(64, 64, 0).astype(int) + np.random.default_rng(0).integers(-40, 40, (64, 64, 3)),
                       0, 255).astype(np.uint8))
    assert lp(a, a) == pytest.approx(0.0, abs=1e-7)
    d = lp(noisy, a)
    assert d > 0
    # Inputs go in as [-1, 1]: the same number as calling lpips directly on (x / 127.5 - 1).
    direct = lp.model(noisy[None].float() / 127.5 - 1, a[None].float() / 127.5 - 1).item()
    assert d == pytest.approx(direct, rel=1e-6)


def test_lpips_trunk_file_is_loaded_from_the_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name, _ = M.lpips_backbone_file("alex")
    assert name == "alexnet-owt-7be5be79.pth"
    with pytest.raises(M.MetricUnavailable, match=name):
        M.LPIPSMetric("alex")
    torch.manual_seed(3)
    features = {f"features.{k}": v for k, v in alexnet().features.state_dict().items()}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(features, tmp_path / "hub" / "checkpoints" / name)
    lp = M.LPIPSMetric("alex")
    assert lp.source == str(tmp_path / "hub" / "checkpoints" / name)
    assert torch.equal(lp.model.net.slice1[0].weight, features["features.0.weight"])
    assert torch.equal(getattr(lp.model.net.slice5, "10").bias, features["features.10.bias"])
    torch.save({"features.0.weight": features["features.0.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not torchvision's alex ImageNet weights"):
        M.LPIPSMetric("alex", tmp_path / "partial.pth")


class RandomInception(torch.nn.Module):
    """torchvision's Inception-v3 architecture, random weights, pool3 output: the FID extractor's contract.
    Inputs are resized to 80 px (the architecture's minimum is 75) instead of 299 to keep the test fast."""

    def __init__(self):
        from torchvision.models import inception_v3

        super().__init__()
        torch.manual_seed(0)
        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        self.net.fc = torch.nn.Identity()
        self.num_features = 2048

    def forward(self, x):
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(80, 80), mode="bilinear",
                                            antialias=True, align_corners=False)
        return self.net(x)


@pytest.mark.slow  # three eigen-decompositions of 2048×2048 matrices
def test_rfid_with_a_random_inception_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = RandomInception()
    originals = [u8(photo_like(96, 96, i)) for i in range(3)]
    recons = [u8(photo_like(96, 96, i + 10)) for i in range(3)]
    acc, status = M.fid_metric(None, ["x", "same"], extractor=ext)
    assert status.available and "custom" in status.detail
    direct = FrechetInceptionDistance(feature=ext)
    for o, r in zip(originals, recons):
        acc.add_original(o)
        acc.add_reconstruction("x", r)
        acc.add_reconstruction("same", o)
        direct.update(o[None], real=True)
        direct.update(r[None], real=False)
    value, _ = acc.compute("x")
    assert value == pytest.approx(direct.compute().item(), rel=1e-4)
    assert abs(acc.compute("same")[0]) < 1e-2 * value


# ----------------------------------------------------------------------------------------- JPEG
def test_fractional_quality_tables_agree_with_pillow_at_integer_qualities():
    img = Image.open(SAMPLES / "chelsea.jpg").convert("RGB")
    for q in (1, 7, 33, 50, 71, 95):
        written = Image.open(io.BytesIO(jpeg.encode(img, q))).quantization
        assert [list(t) for t in written.values()] == jpeg.quality_tables(q)
    assert jpeg.quality_tables(30.5) not in (jpeg.quality_tables(30), jpeg.quality_tables(31))


@pytest.mark.parametrize("budget", [6000, 9000, 18432])  # JPEG XL cannot go below ~5,400 bytes here
@pytest.mark.parametrize("name", list(F.FORMATS))
def test_budget_search_lands_within_2_percent_under_budget(name, budget):
    fmt = F.FORMATS[name]
    if fmt.missing():
        pytest.skip(fmt.missing())
    img = Image.open(SAMPLES / "astronaut.jpg").convert("RGB")
    r = F.encode_under_budget(fmt, img, budget)
    assert not r.over_budget and len(r.data) <= budget
    lo, hi = fmt.knob_range
    step = 1 if fmt.integer_knob else (hi - lo) / 100
    closer = min(hi, r.knob + step) if fmt.size_grows_with_knob else max(lo, r.knob - step)
    assert len(fmt.encode(img, closer)) > budget  # really the setting with the largest file that fits
    if fmt.integer_knob:  # AVIF: libavif has 64 quantisers, so the next size can be a few % away
        assert len(r.data) >= 0.9 * budget
    else:
        assert len(r.data) >= 0.98 * budget
    assert np.asarray(fmt.decode(r.data)).shape == (512, 512, 3)


def test_budget_too_small_is_reported_not_hidden():
    img = Image.open(SAMPLES / "astronaut.jpg").convert("RGB")
    r = F.encode_under_budget(F.FORMATS["jpeg"], img, 300)
    assert r.over_budget and r.knob == 1.0 and len(r.data) > 300


def test_every_codec_names_its_library_and_version():
    for name, fmt in F.FORMATS.items():
        info = fmt.library()
        assert info["library"] and (info["version"] or fmt.missing()), name


def test_missing_jxl_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_imagecodecs(name, *args, **kwargs):
        if name == "imagecodecs":
            raise ImportError("No module named 'imagecodecs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imagecodecs)
    codec = C.build(C.parse_spec("jxl-budget")[0])
    with pytest.raises(UsageError, match=r"cascade-codec\[jxl\]"):
        codec.prepare(C.Context())


# ----------------------------------------------------------------------------------------- codecs
def test_codec_specs_expand_sweeps_and_name_them():
    cfgs = C.parse_specs(["sc:scale=0.5,0.75,1.0,steps=4", "jpeg", "jpeg-budget", "bicubic:values=300"])
    labels = [c.label for c in cfgs]
    assert labels[:3] == ["sc:steps=4,scale=0.5", "sc:steps=4,scale=0.75", "sc:steps=4,scale=1.0"]
    assert labels[3:8] == [f"jpeg:quality={q}" for q in (10, 25, 50, 75, 90)]
    assert labels[8:] == ["jpeg-budget", "bicubic:values=300"]
    assert cfgs[0].params == {"stage_b": "auto", "steps": 4, "cfg": "default", "cfg_rho": 0.7, "sampler": None,
                              "scale": 0.5, "resize": "nearest"}
    assert C.parse_spec("sc:cfg=none")[0].params["cfg"] is None
    assert C.parse_spec("vae:path=/models/sdxl-vae/")[0].label == "vae:name=sdxl-vae"
    assert [c.label for c in C.parse_spec("jpeg2000")] == [f"jpeg2000:ratio={r}" for r in (400, 200, 100, 50, 20)]
    assert [c.label for c in C.parse_specs(["webp:quality=30", "avif-budget:scale=0.5", "jxl-budget"])] == [
        "webp:quality=30", "avif-budget:scale=0.5", "jxl-budget"]
    for bad, msg in [("heic", "unknown codec"), ("jpeg2000:ratio=1", "2…4000"), ("sc:steps=0", "steps=0"), ("sc:foo=1", "no key 'foo'"),
                     ("jpeg:quality=101", "1…100"), ("vae", "needs path"), ("sc:0.5", "key=value")]:
        with pytest.raises(ValueError, match=msg):
            C.parse_spec(bad)
    with pytest.raises(ValueError, match="twice"):
        C.parse_specs(["jpeg:quality=10", "jpeg:quality=10,20"])


def test_bicubic_keeps_the_latent_number_of_values():
    assert C.sc_latent_shape(1024, 1024, 0.75) == (16, 24, 24)
    assert C.bicubic_size(1024, 1024, 16 * 24 * 24) == (55, 55)  # 9,075 ≤ 9,216 values
    for h, w, v in [(1024, 1536, 9216), (600, 400, 1000), (512, 512, 12)]:
        bh, bw = C.bicubic_size(h, w, v)
        assert 3 * bh * bw <= v
        assert 3 * (bh + 1) * round((bh + 1) * w / h) > v


def test_diffusers_vae_codec_from_a_local_folder(tmp_path):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8).save_pretrained(tmp_path / "tiny-vae")
    codec = C.build(C.parse_spec(f"vae:path={tmp_path / 'tiny-vae'}")[0])
    codec.prepare(C.Context(device="cpu"))
    from benchmarks.recon.data import BenchItem

    out = codec.run(BenchItem(0, "x", "x", image=u8(photo_like(60, 66, 0))))  # padded to 60×66 → 60×66 (stride 2)
    assert out.image.shape == (3, 60, 66) and out.image.dtype == torch.uint8
    assert out.nbytes == 4 * 30 * 33 * 2 and out.extra["latent_shape"] == [4, 30, 33]
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.build(C.parse_spec(f"vae:path={tmp_path}")[0]).prepare(C.Context())


# ----------------------------------------------------------------------------------------- runs and reports
def run_cfg(photos, out, **kw) -> ReconConfig:
    base = dict(dataset=str(photos), output=str(out), codecs=["jpeg:quality=20,60", "bicubic"], size=192,
                progress=False, grid_images=2)
    base.update(kw)
    return ReconConfig(**base)


def test_missing_backbones_are_reported_and_the_other_metrics_computed(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    s = run_recon(run_cfg(photos, tmp_path / "r"), log=lambda m: None)
    assert not s["metrics"]["lpips"]["available"] and not s["metrics"]["rfid"]["available"]
    hub = str(tmp_path / "empty_torch_home" / "hub" / "checkpoints")
    assert "alexnet-owt-7be5be79.pth" in s["metrics"]["lpips"]["message"] and hub in s["metrics"]["lpips"]["message"]
    assert "weights-inception-2015-12-05-6726825d.pth" in s["metrics"]["rfid"]["message"]
    assert "--fid-weights" in s["metrics"]["rfid"]["message"]
    for c in s["codecs"]:
        assert c["lpips"] is None and c["rfid"] is None
        assert c["n"] == 4 and c["psnr"]["n"] == 4 and c["ssim"]["mean"] > 0 and c["ms_ssim"]["mean"] > 0
    rows = list(read_rows(tmp_path / "r" / "per_image.csv"))
    assert len(rows) == 4 * 3 and all(r["lpips"] is None and r["psnr"] > 10 for r in rows)
    table = (tmp_path / "r" / "table.md").read_text()
    assert "alexnet-owt-7be5be79.pth" in table and "| n/a |" in table
    # What every report states.
    for text in ("N = 4 images", "192×192", "centre 192×192 square", "bilinear-antialias"):
        assert text in table


def test_report_schema_plot_and_grid(photos, tmp_path):
    s = run_recon(run_cfg(photos, tmp_path / "r"), log=lambda m: None)
    out = tmp_path / "r"
    on_disk = json.loads((out / "summary.json").read_text())
    assert validate_summary(on_disk) == on_disk and on_disk["schema_version"] == 1
    assert on_disk["config"]["codecs"] == ["jpeg:quality=20,60", "bicubic"]
    assert on_disk["config"]["size"] == 192 and on_disk["environment"]["torch"] == torch.__version__
    assert on_disk["dataset"]["n"] == 4 and on_disk["dataset"]["resize_kernel"].startswith("bilinear-antialias")
    assert [c["label"] for c in s["codecs"]] == ["jpeg:quality=20", "jpeg:quality=60", "bicubic"]
    assert s["codecs"][0]["encoder"]["library"] in ("libjpeg-turbo", "libjpeg") and s["codecs"][2]["encoder"] is None
    q20, q60, bic = s["codecs"]
    assert q20["bpp_mean"] < q60["bpp_mean"] and q20["psnr"]["mean"] < q60["psnr"]["mean"]
    assert bic["extra"]["values"] == 16 * 4 * 4  # 192·0.75 = 144 → 128 px encoder input → 4×4 latent
    assert bic["bytes_mean"] == 3 * 9 * 9  # 243 ≤ 256 values, as uint8
    assert s["files"]["plot"] == "rate_quality.png" and (out / "rate_quality.png").stat().st_size > 0
    assert s["files"]["html"] == "report.html"
    page = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="[a-z]+:|<link|<script src', page)  # offline: nothing fetched from elsewhere
    srcs = [unquote(src) for src in re.findall(r'<img [^>]*src="([^"]+)"', page)]
    assert len(srcs) == 1 + 2 * 4 and all((out / src).is_file() for src in srcs)  # plot; 2 × (original + 3)
    with Image.open(out / "grid.png") as g:
        rows = [GridRow("x", torch.zeros(3, 192, 192, dtype=torch.uint8), [])] * 2
        assert g.size == grid_size(rows, 4, len(header_lines(s)))
    broken = dict(on_disk)
    del broken["dataset"]
    with pytest.raises(ValueError, match="dataset"):
        validate_summary(broken)
    with pytest.raises(ValueError, match="schema"):
        validate_summary({"schema": "something else"})


def test_grid_images_are_spread_over_the_set(photos, tmp_path):
    from benchmarks.recon.run import grid_indices

    assert grid_indices(100, 3) == {0, 33, 66} and grid_indices(2, 3) == {0, 1} and grid_indices(5, 0) == set()
    run_recon(run_cfg(photos, tmp_path / "r", codecs=["bicubic"]), log=lambda m: None)
    shown = sorted(p.name for p in (tmp_path / "r" / "grid_images").glob("*_original.png"))
    assert shown == ["00000_original.png", "00002_original.png"]  # 2 of the 4 photos: the 1st and the 3rd


def test_grid_size():
    rows = [GridRow("a", torch.zeros(3, 64, 64, dtype=torch.uint8), [(torch.zeros(3, 64, 64, dtype=torch.uint8),
                                                                      "c")] * 2),
            GridRow("b", torch.zeros(3, 32, 64, dtype=torch.uint8), [(None, "missing")] * 2)]
    img = make_grid(rows, ["original", "x", "y"], ["title one", "title two"], cell=64)
    assert (GAP, LINE, HEADER, CELL) == (6, 16, 46, 256)
    # width: 6 + 3·(64 + 6); height: 2 title lines + header + (64 + 16 + 64 + 12) + (32 + 16 + 64 + 12)
    assert img.size == (216, 32 + 46 + 156 + 124)


def test_resume_after_interruption_gives_identical_numbers(photos, tmp_path, tiny_weights):
    class TinyFeatures(torch.nn.Module):  # a small fixed extractor: exercises the rFID state across a resume
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

        def forward(self, x):
            return self.conv(x.float() / 255).mean((2, 3))

    kw = dict(codecs=["sc:steps=2,scale=0.5", "jpeg:quality=30", "bicubic"], weights=str(tiny_weights), size=64)
    full = run_recon(run_cfg(photos, tmp_path / "full", **kw), log=lambda m: None, fid_extractor=TinyFeatures())
    calls = {"n": 0}
    original = C.Bicubic.run

    def flaky(self, item):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, item)

    C.Bicubic.run = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recon(run_cfg(photos, tmp_path / "part", **kw), log=lambda m: None, fid_extractor=TinyFeatures())
    finally:
        C.Bicubic.run = original
    partial = list(read_rows(tmp_path / "part" / "per_image.csv"))
    assert {r["image_index"] for r in partial} == {0, 1, 2}  # image 2 was half done when interrupted
    logs = []
    resumed = run_recon(run_cfg(photos, tmp_path / "part", **kw), log=logs.append, fid_extractor=TinyFeatures())
    assert any("resuming" in m and "2 of 4" in m for m in logs)
    key = ("image_index", "codec", "bytes", "psnr", "ssim", "ms_ssim")
    rows_full = [tuple(r[k] for k in key) for r in read_rows(tmp_path / "full" / "per_image.csv")]
    rows_resumed = [tuple(r[k] for k in key) for r in read_rows(tmp_path / "part" / "per_image.csv")]
    assert rows_full == rows_resumed and len(rows_full) == 12
    for a, b in zip(full["codecs"], resumed["codecs"]):
        assert (a["psnr"], a["ssim"], a["rfid"], a["bytes_mean"]) == (b["psnr"], b["ssim"], b["rfid"], b["bytes_mean"])
        assert a["rfid"] is not None
    assert full["codecs"][0]["title"].endswith("[TINY RANDOM WEIGHTS]")
    # Another seed changes Stable Cascade's numbers; a report folder refuses other settings.
    other = run_recon(run_cfg(photos, tmp_path / "seed1", seed=1, fid=False, limit=2,
                              **{**kw, "codecs": kw["codecs"][:1]}), log=lambda m: None)
    first_two = [r["psnr"] for r in read_rows(tmp_path / "full" / "per_image.csv") if r["codec"] == "sc:steps=2,scale=0.5"]
    assert [r["psnr"] for r in read_rows(tmp_path / "seed1" / "per_image.csv")] != first_two[:2]
    assert other["codecs"][0]["n"] == 2
    with pytest.raises(ValueError, match="seed"):
        run_recon(run_cfg(photos, tmp_path / "full", seed=5, **kw), log=lambda m: None)


def test_latent_store_decode_only(photos, tmp_path, tiny_weights):
    from datasets_tools.encode import encode_dataset

    encode_dataset(photos, tmp_path / "lat.zarr", tiny_weights, size=96, workers=0, progress=False, log=lambda m: None)
    s = run_recon(ReconConfig(str(tmp_path / "lat.zarr"), str(tmp_path / "r"), ["sc:steps=1", "jpeg-budget"],
                              weights=str(tiny_weights), progress=False, grid_images=1), log=lambda m: None)
    sc, jb = s["codecs"]
    assert s["dataset"]["kind"] == "store" and s["dataset"]["n"] == 4
    assert sc["bytes_mean"] == 16 * 3 * 3 * 2 and sc["encode_s_per_image"] is None  # decode-only
    rows = list(read_rows(tmp_path / "r" / "per_image.csv"))
    assert {(r["height"], r["width"]) for r in rows} == {(128, 128)}  # 96 / 0.75
    assert all(r["extra"]["budget"] == 288 for r in rows if r["codec"] == "jpeg-budget")
    with pytest.raises(ValueError, match="leave out --size"):
        run_recon(ReconConfig(str(tmp_path / "lat.zarr"), str(tmp_path / "r2"), ["jpeg"], size=128))
    with pytest.raises(ValueError, match="decode-only"):
        run_recon(ReconConfig(str(tmp_path / "lat.zarr"), str(tmp_path / "r3"), ["sc:scale=0.5"],
                              weights=str(tiny_weights), progress=False))


# ----------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("name", ["recon", "compare"])
def test_cli_help_explains_every_option(name):
    result = CliRunner().invoke(main, ["bench", name, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    command = main.commands["bench"].commands[name]
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert param.help, f"bench {name} --{param.name} has no help text"


def test_cli_recon_then_compare(photos, tmp_path):
    r = CliRunner().invoke(main, ["bench", "recon", str(photos), "-o", str(tmp_path / "a"), "--size", "192",
                                  "--codec", "jpeg:quality=30", "--no-progress", "--no-lpips", "--no-fid",
                                  "--grid-images", "0"])
    assert r.exit_code == 0, r.output
    assert "| jpeg:quality=30 |" in r.output and "disabled with --no-lpips" in r.output
    r = CliRunner().invoke(main, ["bench", "recon", str(photos), "-o", str(tmp_path / "b"), "--size", "192",
                                  "--codec", "jpeg:quality=30,70", "--no-progress", "--no-lpips", "--no-fid",
                                  "--grid-images", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "| jpeg:quality=30 |" in r.output and "(+0)" in r.output and "only in B: jpeg:quality=70" in r.output
    page = (tmp_path / "b" / "compare.html").read_text()
    assert "A: jpeg:quality=30" in page and "B: jpeg:quality=70" in page and not re.search(r'(src|href)="[a-z]+:', page)
    assert (tmp_path / "b" / "compare_rate_quality.png").stat().st_size > 0 and "compare.html" in r.output
    assert compare(load_summary(tmp_path / "a"), load_summary(tmp_path / "b")).count("\n") > 4
    (tmp_path / "junk.json").write_text("{}")
    r = CliRunner().invoke(main, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "junk.json")])
    assert r.exit_code == 1 and "not a cascade bench recon summary" in r.output
    r = CliRunner().invoke(main, ["bench", "recon", str(photos), "-o", str(tmp_path / "c"), "--codec", "heic"])
    assert r.exit_code == 1 and "unknown codec 'heic'" in r.output


def test_tar_shards_give_the_same_numbers_as_the_folder(photos, tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for p in sorted(photos.iterdir()):
            tf.add(p, arcname=p.name)
    kw = dict(codecs=["jpeg:quality=40"], grid_images=0, lpips=False, fid=False)
    a = run_recon(run_cfg(photos, tmp_path / "a", **kw), log=lambda m: None)
    b = run_recon(run_cfg(tmp_path / "shard-000.tar", tmp_path / "b", **kw), log=lambda m: None)
    assert b["dataset"]["n"] == 4 and a["codecs"][0]["psnr"] == b["codecs"][0]["psnr"]
    assert [r["image_id"] for r in read_rows(tmp_path / "b" / "per_image.csv")] == [f"shard-000/p{i}" for i in range(4)]
