"""Text-to-image pipeline on tiny random weights: conditions, sizes, seeds, modes, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from codec.cli import main
from codec.generation.clip_image import ImageEncoder, clip_preprocess
from codec.generation.pipeline import TextToImage, stage_c_latent_size
from codec.text import TextEncoder
from codec.presets import get_preset


@pytest.fixture(scope="module")
def pipe(tiny_weights):
    return TextToImage.from_pretrained(tiny_weights, device="cpu")


FAST = dict(steps_c=2, steps_b=2, output="tensor")


def test_stage_c_latent_size_matches_official_rounding():
    assert stage_c_latent_size(1024, 1024) == (24, 24)
    assert stage_c_latent_size(1536, 1152) == (36, 27)
    assert stage_c_latent_size(1000, 600) == (24, 15)
    assert stage_c_latent_size(2048, 1100) == (48, 26)


def test_conditions_use_the_empty_string_as_unconditional(pipe, tiny_weights):
    cond, uncond = pipe._conditions(["a red fox", "a blue car"], ["", ""], None, "text")
    assert cond["clip_text"].shape == (2, 77, get_preset("stage_c_tiny").config.c_clip_text)
    assert cond["clip_text_pooled"].shape == (2, 1, get_preset("stage_c_tiny").config.c_clip_text_pooled)
    assert cond["clip_img"].shape == (2, 1, get_preset("stage_c_tiny").config.c_clip_img)
    assert not cond["clip_img"].any() and not uncond["clip_img"].any()
    empty = TextEncoder.from_pretrained(tiny_weights).encode([""])
    torch.testing.assert_close(uncond["clip_text"], empty.hidden.expand(2, -1, -1))
    torch.testing.assert_close(uncond["clip_text_pooled"], empty.pooled.expand(2, -1, -1))
    assert not torch.allclose(cond["clip_text_pooled"][0], cond["clip_text_pooled"][1])


def test_clip_preprocess_is_the_official_transform():
    from torchvision import transforms as T

    x = torch.rand(2, 3, 300, 451, generator=torch.Generator().manual_seed(0))
    ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=False), T.CenterCrop(224),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])(x)
    torch.testing.assert_close(clip_preprocess(x), ref, rtol=1e-5, atol=1e-5)


def test_image_encoder_shape(tiny_weights):
    emb = ImageEncoder.from_pretrained(tiny_weights).encode(torch.rand(3, 3, 64, 80))
    assert emb.shape == (3, 1, get_preset("stage_c_tiny").config.c_clip_img)


def test_same_seed_same_images_other_seed_differs(pipe):
    a = pipe.generate("a lighthouse", height=256, width=320, seed=3, **FAST)
    b = pipe.generate("a lighthouse", height=256, width=320, seed=3, **FAST)
    c = pipe.generate("a lighthouse", height=256, width=320, seed=4, **FAST)
    assert a.images.shape == (1, 3, 256, 320) and a.latents.shape == (1, 16, 6, 8)
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert pipe._cache == {}  # models are released between calls unless keep_loaded


def test_prior_then_decode_is_generate(pipe):
    """The two steps of the pipeline, called one after the other, give what the one-call API gives: the decoder
    step goes on drawing from the prior's generator and records its own settings."""
    whole = pipe.generate("a lighthouse", height=256, width=320, seed=5, steps_c=2, steps_b=3, cfg_b=1.5,
                          output="tensor")
    prior = pipe.prior("a lighthouse", height=256, width=320, seed=5, steps=2)
    assert torch.equal(prior.latents, whole.latents) and prior.settings.steps_b == 10
    parts = pipe.decode(prior, steps=3, cfg=1.5, output="tensor")
    assert torch.equal(parts.images, whole.images) and parts.settings == whole.settings
    assert (parts.settings.steps_c, parts.settings.steps_b, parts.settings.cfg_b) == (2, 3, 1.5)


def test_stage_c_noise_follows_the_official_rng_order(pipe, monkeypatch):
    """The first Stage C input is torch.randn(shape) right after torch.manual_seed(seed)."""
    import codec.generation.pipeline as P

    seen = {}
    real_sample = P.sample

    def spy(model, cond, shape=None, **kw):
        if "stage_c" not in seen:
            seen["stage_c"] = (shape, kw["generator"].get_state().clone())
        return real_sample(model, cond, shape=shape, **kw)

    monkeypatch.setattr(P, "sample", spy)
    pipe.generate("x", height=256, width=256, seed=11, **FAST)
    shape, state = seen["stage_c"]
    torch.manual_seed(11)
    expected = torch.randn(*shape)
    g = torch.Generator()
    g.set_state(state)
    assert torch.equal(torch.randn(*shape, generator=g), expected)


def test_batches_prompts_and_images_per_prompt(pipe):
    r = pipe.generate(["a cat", "a dog"], num_images=2, height=256, width=256, batch_size=3, seed=0, **FAST)
    assert r.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert r.images.shape == (4, 3, 256, 256)
    # the same prompt twice in one batch still gets different noise
    assert not torch.equal(r.latents[0], r.latents[1])


@pytest.mark.parametrize("height,width", [(600, 1000), (832, 1216), (517, 389)])
def test_odd_sizes(pipe, height, width):
    r = pipe.generate("a street", height=height, width=width, steps_c=1, steps_b=1, output="pil")
    assert r.images[0].size == (width, height)
    assert r.latents.shape[-2:] == stage_c_latent_size(height, width)


def test_negative_prompt_changes_the_result(pipe):
    a = pipe.generate("a cat", height=256, width=256, seed=1, **FAST)
    b = pipe.generate("a cat", "blurry", height=256, width=256, seed=1, **FAST)
    assert not torch.equal(a.latents, b.latents)


@pytest.mark.slow  # four 256–1536 px generations
def test_variation_uses_the_image_embedding(pipe):
    img = torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(2))
    plain = pipe.generate("", height=384, width=256, seed=5, **FAST)
    var1 = pipe.generate("", image=img, mode="variation", height=384, width=256, seed=5, **FAST)
    var2 = pipe.generate("", image=img.flip(-1), mode="variation", height=384, width=256, seed=5, **FAST)
    assert not torch.equal(plain.latents, var1.latents)
    assert not torch.equal(var1.latents, var2.latents)
    # default size: the image's aspect at a 1024 px short side
    default = pipe.generate("", image=img, steps_c=1, steps_b=1, output="pil")
    assert default.images[0].size == (1024, 1536)


def test_img2img_strength(pipe, monkeypatch):
    import codec.generation.pipeline as P

    calls = []
    real_sample = P.sample

    def spy(model, cond, **kw):
        calls.append({k: kw.get(k) for k in ("steps", "t_start", "x_init")})
        return real_sample(model, cond, **kw)

    monkeypatch.setattr(P, "sample", spy)
    img = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(3))
    r = pipe.generate("", image=img, mode="img2img", strength=0.5, height=256, width=256, steps_c=6, steps_b=1,
                      output="tensor")
    assert calls[0]["steps"] == 3 and calls[0]["t_start"] == 0.5
    assert calls[0]["x_init"].shape == r.latents.shape == (1, 16, 6, 6)
    weak = pipe.generate("", image=img, mode="img2img", strength=0.05, height=256, width=256, steps_c=20,
                         steps_b=1, output="tensor")
    source = pipe._img2img_latents(img[None], 256, 256)
    # little noise → the result stays close to the image's own latent
    assert (weak.latents - source).norm() < 0.5 * (r.latents - source).norm()


def _alpha_bar(t: float, s: float = 0.008) -> float:
    """ᾱ(t) of the unshifted cosine schedule (improved DDPM), written out rather than taken from codec.diffusion."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2


def test_img2img_noises_the_image_latent_with_shift_1_as_official(pipe, monkeypatch):
    """Official img2img: ``gdf.diffuse(latent, t=strength)`` at its default shift 1, ε the first draw after the
    seed — x_t = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε on the *unshifted* schedule — although Stage C then samples with shift_c 2.
    (Noising with shift 2 would give a² = sigmoid(λ − 2 ln 2): 0.27 instead of 0.60 at t = 0.6.)"""
    import codec.generation.pipeline as P

    starts = []
    real_sample = P.sample

    def spy(model, cond, **kw):
        starts.append(kw.get("x_init"))
        return real_sample(model, cond, **kw)

    monkeypatch.setattr(P, "sample", spy)
    img = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(3))
    pipe.generate("", image=img, mode="img2img", strength=0.6, shift_c=2.0, height=256, width=256, steps_c=2,
                  steps_b=1, seed=9, output="tensor")
    x0 = pipe._img2img_latents(img[None], 256, 256)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    ab = _alpha_bar(0.6)
    expected = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    torch.testing.assert_close(starts[0], expected, rtol=1e-5, atol=1e-5)


def test_stage_b_continues_stage_c_random_stream_as_official(pipe):
    """Official pipeline: one ``torch.manual_seed(seed)``, then Stage C and Stage B draw from the same stream. Stage C
    (DDPM, eta 1) draws its start noise and one noise per step, 1 + steps_c tensors of its latent's shape; so Stage B's
    start noise is the next draw, and the images are Stage B decoding the latents from that point of the stream."""
    steps_c, steps_b, seed = 2, 2, 5
    r = pipe.generate("a red fox", height=256, width=256, seed=seed, steps_c=steps_c, steps_b=steps_b,
                      output="tensor")
    g = torch.Generator().manual_seed(seed)
    for _ in range(1 + steps_c):
        torch.randn(r.latents.shape, generator=g)
    cond, _ = pipe._conditions(["a red fox"], [""], None, "text")
    codec = pipe._codec()
    kw = dict(height=256, width=256, steps=steps_b, cfg=1.1, clip=cond["clip_text_pooled"], sampler="ddpm",
              cfg_rho=0.7, shift=1.0, output="tensor")
    expected = codec.decode(r.latents, generator=g, seed=None, **kw)
    diff = (r.images - expected).abs().max().item()
    assert diff == 0, f"Stage B did not start at draw {2 + steps_c} of the seed's stream (max |Δ| {diff:.3g})"
    # and the stream matters: a freshly seeded Stage B gives other images
    assert not torch.equal(r.images, codec.decode(r.latents, seed=seed, **kw))


def test_fp16_runs_stage_c_in_the_overflow_safe_mode(tiny_weights, pipe):
    half = TextToImage.from_pretrained(tiny_weights, dtype="fp16", device="cpu")
    model = half._stage_c()
    assert model.compute_dtype == torch.float32 and model.clip_txt_mapper.weight.dtype == torch.float16
    ref = pipe.generate("a cat", height=256, width=256, seed=2, **FAST)
    out = half.generate("a cat", height=256, width=256, seed=2, **FAST)
    assert torch.isfinite(out.latents).all()
    rel = (out.latents - ref.latents).norm() / ref.latents.norm()
    assert rel < 0.05, rel


def test_missing_stage_c_file_is_named(tmp_path, tiny_weights):
    import shutil

    from codec.weights import WeightsError

    for f in tiny_weights.iterdir():
        if f.is_file() and not f.name.startswith("stage_c"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(WeightsError, match="stage_c_lite.safetensors"):
        TextToImage.from_pretrained(tmp_path, device="cpu")


@pytest.mark.slow  # five generations and two CLI runs
def test_lora_file_changes_stage_c_and_brings_its_token(tiny_weights, tmp_path, pipe):
    from codec.generation.lora import LoraNetwork, save_lora
    from codec.generation.tokens import add_train_tokens, attach_token_delta

    model = pipe._stage_c()
    net = LoraNetwork.create(model, rank=2, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.weights:
            lora.lora_down.copy_(torch.randn(lora.lora_down.shape, generator=g) * 0.1)
    enc = TextEncoder.from_pretrained(tiny_weights)
    tokens = [["[sks]", "^a</w>$"]]
    delta = attach_token_delta(enc, add_train_tokens(enc, tokens))
    with torch.no_grad():
        delta.embeddings.normal_(generator=g)
    path = save_lora(LoraNetwork(net.targets, list(net.weights), delta), tmp_path / "lora.safetensors",
                     tokens=tokens, pool_at="eos")

    def run(p, prompt):
        return p.generate(prompt, height=256, width=256, seed=0, **FAST).latents

    full = TextToImage.from_pretrained(tiny_weights, device="cpu", loras=[(path, 1.0)])
    off = TextToImage.from_pretrained(tiny_weights, device="cpu", loras=[(path, 0.0)])
    assert not torch.equal(run(full, "a photo of a cat"), run(pipe, "a photo of a cat"))
    # strength 0 leaves Stage C as it was: prompts without the token are unchanged, the token still acts
    assert torch.equal(run(off, "a photo of a cat"), run(pipe, "a photo of a cat"))
    assert not torch.equal(run(off, "a photo of [sks]"), run(pipe, "a photo of [sks]"))
    res = _run(["generate", "a photo of [sks]", "-w", str(tiny_weights), "-o", str(tmp_path / "l.png"),
                "--lora", f"{path}:0.5", "--size", "256", "--steps-c", "1", "--steps-b", "1"])
    assert res.exit_code == 0, res.output
    res = _run(["generate", "x", "-w", str(tiny_weights), "-o", str(tmp_path / "m.png"), "--lora", "nope.safetensors"])
    assert res.exit_code == 1 and "nope.safetensors" in res.output


@pytest.fixture(scope="module")
def control_weights(tiny_weights, tmp_path_factory):
    import shutil

    from codec.tiny import write_tiny_controlnet

    folder = tmp_path_factory.mktemp("control_weights")
    shutil.copytree(tiny_weights, folder, dirs_exist_ok=True)
    for kind in ("canny", "inpainting", "super_resolution"):
        write_tiny_controlnet(folder, kind)
    return folder


# canny in the fast run; the other kinds (5 s each) with the slow tests
@pytest.mark.parametrize("kind", ["canny", pytest.param("inpainting", marks=pytest.mark.slow),
                                  pytest.param("super_resolution", marks=pytest.mark.slow)])
def test_controlnet_guides_stage_c(control_weights, kind):
    p = TextToImage.from_pretrained(control_weights, device="cpu")
    g = torch.Generator().manual_seed(4)
    img = torch.rand(3, 128, 192, generator=g)
    img[:, 32:96, 48:144] = 1.0  # a bright box gives canny edges
    extra = {"control_mask": (torch.rand(1, 128, 192, generator=g) > 0.5).float()} if kind == "inpainting" else {}
    kw = dict(steps_c=2, steps_b=1, seed=0, output="tensor", height=256, width=384)
    if kind == "super_resolution":
        kw.pop("height"), kw.pop("width")
    guided = p.generate("x", controlnet=kind, control_image=img, **extra, **kw)
    weak = p.generate("x", controlnet=kind, control_image=img, control_strength=0.0, **extra, **kw)
    plain = p.generate("x", **{**kw, "height": guided.settings.height, "width": guided.settings.width})
    if kind == "super_resolution":
        assert guided.images.shape[-2:] == (256, 384)  # twice the control image
    else:
        assert guided.latents.shape == plain.latents.shape == (1, 16, 6, 9)
        assert torch.equal(weak.latents, plain.latents)  # strength 0 = no ControlNet
    assert not torch.allclose(guided.latents, weak.latents)


def test_cli_generate_with_controlnet(control_weights, tmp_path):
    img = tmp_path / "edges.png"
    Image.fromarray((torch.rand(96, 128, 3) * 255).byte().numpy()).save(img)
    res = _run(["generate", "a house", "-w", str(control_weights), "-o", str(tmp_path / "c.png"), "--controlnet",
                "canny", "--control-image", str(img), "--size", "256x256", "--steps-c", "1", "--steps-b", "1"])
    assert res.exit_code == 0, res.output
    res = _run(["generate", "a house", "-w", str(control_weights), "-o", str(tmp_path / "c.png"), "--controlnet",
                "canny"])
    assert res.exit_code != 0 and "go together" in res.output


# --------------------------------------------------------------------------------------------- CLI


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_generate_prompt_file_writes_images_with_settings(tmp_path, tiny_weights):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "seed": 7}) + "\n\n" + json.dumps({"prompt": "a dog"}) + "\n")
    out = tmp_path / "out" / "img.png"
    res = _run(["generate", "--prompts", str(prompts), "-o", str(out), "-w", str(tiny_weights), "--size", "256x320",
                "--steps-c", "1", "--steps-b", "1", "--n", "2", "--save-latents"])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["img_p000_000.png", "img_p000_000.safetensors", "img_p000_001.png", "img_p000_001.safetensors",
                     "img_p001_000.png", "img_p001_000.safetensors", "img_p001_001.png", "img_p001_001.safetensors"]
    im = Image.open(out.parent / "img_p000_000.png")
    assert im.size == (256, 320)
    assert im.text["prompt"] == "a cat" and json.loads(im.text["cascade_codec"])["seed"] == 7
    assert json.loads(Image.open(out.parent / "img_p001_000.png").text["cascade_codec"])["seed"] == 1
    # the saved latents decode with `cascade decode` at the recorded size
    dec = tmp_path / "dec.png"
    res = _run(["decode", str(out.parent / "img_p000_000.safetensors"), "-o", str(dec), "-w", str(tiny_weights),
                "--steps", "1"])
    assert res.exit_code == 0, res.output
    assert Image.open(dec).size == (256, 320)


@pytest.mark.parametrize("args,message", [
    (["--size", "12x"], "is not WxH"),
    (["--mode", "img2img"], "needs --image"),
    (["--size", "100x100"], "outside 256–4096"),
])
def test_cli_generate_errors(tmp_path, tiny_weights, args, message):
    res = _run(["generate", "a cat", "-w", str(tiny_weights), "-o", str(tmp_path / "x.png"), *args])
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output


def test_cli_generate_bad_image_is_a_clear_error(tmp_path, tiny_weights):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    res = _run(["generate", "-w", str(tiny_weights), "--image", str(bad), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "bad.jpg" in res.output and "Traceback" not in res.output


def test_missing_weights_are_named_in_one_round_text_encoder_included(tmp_path, tiny_weights):
    """generate without weights used to ask for Stage C/B/A first and for the 2.8 GB text encoder only after
    they were downloaded."""
    import shutil

    from codec.weights import WeightsError

    with pytest.raises(WeightsError) as e:
        TextToImage.from_pretrained(tmp_path, device="cpu")
    for name in ("stage_c_lite", "stage_b_lite", "stage_a.safetensors", "text_encoder/", "tokenizer/"):
        assert name in str(e.value)
    for f in tiny_weights.iterdir():  # every model file, the text encoder's folders left out
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(WeightsError, match=r"has no text encoder .* text_encoder/ and tokenizer/"):
        TextToImage.from_pretrained(tmp_path, device="cpu")
    shutil.copytree(tiny_weights / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(WeightsError, match=r"download the text_encoder/ folder") as e:
        TextToImage.from_pretrained(tmp_path, device="cpu")
    assert "tokenizer/" not in str(e.value)
