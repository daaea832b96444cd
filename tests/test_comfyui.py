"""ComfyUI's all-in-one single-file checkpoints: the key layout ComfyUI's loader expects, reading them (as a file or
a folder) into the codec, the generation pipeline and the CLIP encoders, and `cascade convert --to comfyui` and back.

The layout facts (prefixes, what ComfyUI keys its model and VAE detection on, the transposed text projection) are
those written down in codec/layouts/comfyui.py, read off ComfyUI's source.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from codec import Codec
from codec.layouts import comfyui

from codec.layouts import diffusers as diffusers_layout

from codec.layouts import locate as layouts
from codec import weights as W
from codec.cli import main
from codec.layouts.convert import convert
from codec.presets import create_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

C_FILE, B_FILE = comfyui.FILES["stage_c_lite"], comfyui.FILES["stage_b_lite"]


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def comfy_folder(tiny_weights, tmp_path_factory):
    """The tiny official-layout weights converted to ComfyUI's layout (with tokenizer/ copied along)."""
    out = tmp_path_factory.mktemp("comfyui_layout")
    convert(tiny_weights, out, "comfyui", progress=False, log=_quiet)
    return out


def _tensors(path):
    return load_file(str(path))


# --------------------------------------------------------------------------------------------- the file layout
def test_stage_c_file_has_the_keys_comfyui_looks_for(comfy_folder, tiny_weights):
    keys = _tensors(comfy_folder / C_FILE)
    official_c = _tensors(tiny_weights / W.STAGE_C_FILES["lite"]["fp32"])
    # model: the official keys under model.diffusion_model., attention packed (ComfyUI splits it when loading)
    assert {k for k in keys if k.startswith("model.diffusion_model.")} == {f"model.diffusion_model.{k}"
                                                                            for k in official_c}
    for marker in ("clf.1.weight", "clip_txt_mapper.weight", "down_blocks.0.2.attention.attn.in_proj_weight"):
        assert f"model.diffusion_model.{marker}" in keys
    # VAE = StageC_coder: ComfyUI recognises it by this key, the Previewer sits beside the encoder
    assert "vae.encoder.backbone.1.0.block.0.1.num_batches_tracked" in keys
    assert "vae.encoder.mapper.0.weight" in keys and "vae.previewer.blocks.0.weight" in keys
    # CLIP-G in transformers' naming under clip_g.transformer., projection transposed as the hub file has it
    text = _tensors(tiny_weights / "text_encoder" / "model.safetensors")
    assert torch.equal(keys["text_encoder.clip_g.text_projection"], text["text_projection.weight"].t())
    assert "text_encoder.clip_g.transformer.text_projection.weight" not in keys
    assert torch.equal(keys["text_encoder.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"],
                       text["text_model.encoder.layers.0.self_attn.q_proj.weight"])
    vision = _tensors(tiny_weights / "image_encoder" / "model.safetensors")
    assert {k for k in keys if k.startswith("clip_l_vision.")} == {f"clip_l_vision.{k}" for k in vision}
    prefixes = ("model.diffusion_model.", "vae.encoder.", "vae.previewer.", "text_encoder.clip_g.", "clip_l_vision.")
    assert all(k.startswith(prefixes) for k in keys)
    # ComfyUI-only constants are not written (the hub file has none either)
    assert not {"vae.encoder.mean", "vae.encoder.std", "text_encoder.clip_g.logit_scale"} & set(keys)


def test_stage_b_file_has_the_keys_comfyui_looks_for(comfy_folder, tiny_weights):
    keys = _tensors(comfy_folder / B_FILE)
    assert "model.diffusion_model.clf.1.weight" in keys and "model.diffusion_model.clip_mapper.weight" in keys
    assert "model.diffusion_model.down_blocks.1.0.channelwise.0.weight" in keys
    assert "vae.vquantizer.codebook.weight" in keys  # ComfyUI's Stage A detection key
    stage_a = _tensors(tiny_weights / W.STAGE_A_FILE)
    assert all(torch.equal(keys[f"vae.{k}"], v) for k, v in stage_a.items())
    assert "text_encoder.clip_g.text_projection" in keys
    assert all(k.startswith(("model.diffusion_model.", "vae.", "text_encoder.clip_g.")) for k in keys)


def _header(shapes, metadata=None):
    infos = {k: W.TensorInfo(torch.float32, tuple(s), 0, 4 * math.prod(s)) for k, s in shapes.items()}
    return W.SafetensorsHeader("x.safetensors", infos, metadata or {}, 0)


@pytest.mark.parametrize("component", ["stage_b_lite", "stage_b_large", "stage_c_lite", "stage_c_large"])
def test_full_size_models_have_the_shapes_comfyui_sizes_them_by(component):
    """ComfyUI builds the model from one shape (2048/1536 rows of clip_txt_mapper, 640/576 wide channelwise); the
    full-size presets written in this layout show those, and are read back as the same preset."""
    with torch.device("meta"):
        model = create_model(component)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = comfyui.plan_to_comfyui(shapes, component)
    mapped = {k: shape for k, (shape, _) in plan.items()}
    if component.startswith("stage_c"):
        assert mapped["model.diffusion_model.clip_txt_mapper.weight"][0] == (2048 if "large" in component else 1536)
    else:
        width = mapped["model.diffusion_model.down_blocks.1.0.channelwise.0.weight"][-1]
        assert width == (640 if "large" in component else 576)
    assert comfyui.model_component(_header(mapped)) == component
    assert comfyui.components(_header(mapped)) == [component]


def test_clip_configs_derived_from_full_size_shapes():
    """A file without our metadata: the CLIP-G and CLIP-L encoders' configurations come from the shapes."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, \
        CLIPVisionModelWithProjection

    big_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")
    vit_l = dict(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                 num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")
    with torch.device("meta"):
        text = CLIPTextModelWithProjection(CLIPTextConfig(**big_g))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_l))
    for model, component, expected in ((text, "text_encoder", big_g), (vision, "image_encoder", vit_l)):
        derived = comfyui.clip_config({k: tuple(v.shape) for k, v in model.state_dict().items()}, component)
        assert expected.items() <= derived.items(), component
    assert comfyui.clip_config({k: tuple(v.shape) for k, v in text.state_dict().items()},
                               "text_encoder")["eos_token_id"] == 49407


def test_plans_both_ways_are_exact_inverses_with_the_transpose():
    g = torch.Generator().manual_seed(0)
    state = {"text_projection.weight": torch.randn(3, 5, generator=g),
             "text_model.final_layer_norm.weight": torch.randn(5, generator=g)}
    there = diffusers_layout.apply_plan(state, comfyui.plan_to_comfyui({k: tuple(v.shape) for k, v in state.items()},
                                                               "text_encoder"))
    assert there["text_encoder.clip_g.text_projection"].shape == (5, 3)
    back = diffusers_layout.apply_plan(there, comfyui.plan_from_comfyui({k: tuple(v.shape) for k, v in there.items()},
                                                                "text_encoder"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


# --------------------------------------------------------------------------------------------- reading
def _same(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in state.items())


def test_codec_reads_the_stage_b_file_and_the_encoder_beside_it(comfy_folder, tiny_weights, tiny_codec):
    codec = Codec.from_pretrained(comfy_folder / B_FILE, device="cpu")
    _same(codec.stage_b, _tensors(tiny_weights / "stage_b_lite.safetensors"))
    _same(codec.stage_a, _tensors(tiny_weights / W.STAGE_A_FILE))
    _same(codec.effnet, _tensors(tiny_weights / W.EFFNET_FILE))
    info = codec.info()["components"]
    assert info["stage_b"]["layout"] == info["stage_a"]["layout"] == info["effnet"]["layout"] == "comfyui"
    assert "0.43" in info["stage_a"]["detail"]
    image = torch.rand(1, 3, 64, 64)
    assert torch.equal(codec.encode(image), tiny_codec.encode(image))
    assert torch.equal(codec.decode(codec.encode(image), steps=1, output="tensor", seed=1),
                       tiny_codec.decode(tiny_codec.encode(image), steps=1, output="tensor", seed=1))


def test_stage_b_file_alone_decodes_and_says_where_the_encoder_is(comfy_folder, tmp_path):
    shutil.copyfile(comfy_folder / B_FILE, tmp_path / B_FILE)
    shutil.copyfile(comfy_folder / W.EMPTY_CAPTION_FILE, tmp_path / W.EMPTY_CAPTION_FILE)
    codec = Codec.from_pretrained(tmp_path, device="cpu")  # a folder holding it works as the file does
    assert codec.effnet is None
    out = codec.decode(torch.randn(1, 16, 2, 2), height=32, width=32, steps=1, output="tensor")
    assert out.shape == (1, 3, 32, 32)
    with pytest.raises(W.WeightsError, match=r"nor does ComfyUI's Stage B file"):
        codec.encode(torch.rand(1, 3, 64, 64))


def test_generation_from_the_stage_c_file_matches_the_official_layout(comfy_folder, tiny_weights):
    """Stage C, the text encoder, the Previewer from the Stage C file; Stage B and A from the Stage B file beside
    it; the tokenizer from tokenizer/: same latents and images as the official layout."""
    from codec.generation.pipeline import TextToImage

    results, previews = [], []
    for source in (tiny_weights, comfy_folder / C_FILE):
        pipe = TextToImage.from_pretrained(source, device="cpu")
        shots = []
        results.append(pipe.generate("a red cube", height=256, width=256, seed=3, steps_c=2, steps_b=1,
                                     output="tensor", preview=lambda i, n, im, shots=shots: shots.append(im)))
        previews.append(shots)
    assert pipe._locations()[0].layout == pipe._locations()[1].layout == "comfyui"
    assert torch.equal(results[0].latents, results[1].latents) and torch.equal(results[0].images, results[1].images)
    assert [list(p[0].getdata()) for p in previews[0]] == [list(p[0].getdata()) for p in previews[1]]


@pytest.mark.slow  # img2img generations from a converted file
def test_image_encoder_and_img2img_from_the_stage_c_file(comfy_folder, tiny_weights):
    from codec.generation.clip_image import ImageEncoder
    from codec.generation.pipeline import TextToImage

    image = torch.rand(2, 3, 300, 240)
    ours = ImageEncoder.from_pretrained(comfy_folder / C_FILE).encode(image)
    assert torch.equal(ours, ImageEncoder.from_pretrained(tiny_weights).encode(image))
    outs = [TextToImage.from_pretrained(src, device="cpu").generate(
        "x", image=image[:1], mode="img2img", height=256, width=256, steps_c=2, steps_b=1, output="tensor").latents
        for src in (tiny_weights, comfy_folder)]
    assert torch.equal(*outs)


def _as_comfyui_saves_it(path, out):
    """The Stage C file as ComfyUI's own checkpoint saver writes it: attention split into attn.to_q/k/v, the
    projection as a Linear weight of the transformer, and the constants logit_scale, encoder mean/std."""
    sd = _tensors(path)
    for key in [k for k in sd if k.endswith("attn.in_proj_weight") or k.endswith("attn.in_proj_bias")]:
        base, leaf = key.rsplit(".in_proj_", 1)
        for name, part in zip(("to_q", "to_k", "to_v"), sd.pop(key).chunk(3)):
            sd[f"{base}.{name}.{leaf}"] = part.clone()
    sd["text_encoder.clip_g.transformer.text_projection.weight"] = sd.pop(
        "text_encoder.clip_g.text_projection").t().contiguous()
    sd["text_encoder.clip_g.logit_scale"] = torch.tensor(4.6055)
    sd["vae.encoder.mean"] = torch.tensor([0.485, 0.456, 0.406])
    sd["vae.encoder.std"] = torch.tensor([0.229, 0.224, 0.225])
    save_file(sd, str(out), metadata=W.read_header(path).metadata)


def test_files_saved_by_comfyui_itself_read_the_same(comfy_folder, tmp_path):
    from codec.text import TextEncoder

    shutil.copytree(comfy_folder / "tokenizer", tmp_path / "tokenizer")
    _as_comfyui_saves_it(comfy_folder / C_FILE, tmp_path / C_FILE)
    src_a, src_b = W.WeightSource(comfy_folder / C_FILE), W.WeightSource(tmp_path / C_FILE)
    for component in ("stage_c_lite", "text_encoder", "effnet", "previewer", "image_encoder"):
        a = dict(W.iter_checkpoint(layouts.open_component(src_a, layouts.locate(src_a, component, torch.float32))[0]))
        b = dict(W.iter_checkpoint(layouts.open_component(src_b, layouts.locate(src_b, component, torch.float32))[0]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    caption = ["a cat"]
    ref = TextEncoder.from_pretrained(comfy_folder / C_FILE).encode(caption)
    got = TextEncoder.from_pretrained(tmp_path).encode(caption)
    assert torch.equal(ref.hidden, got.hidden) and torch.equal(ref.pooled, got.pooled)


def test_the_file_given_sets_the_size(tmp_path):
    from codec.tiny import write_tiny_weights

    write_tiny_weights(tmp_path / "official", stage_b="large", clip=False)
    convert(tmp_path / "official", tmp_path / "comfy", "comfyui", progress=False, log=_quiet)
    codec = Codec.from_pretrained(tmp_path / "comfy" / comfyui.FILES["stage_b_large"], device="cpu", encoder=False)
    assert codec.components["stage_b"].layout == "comfyui"
    _same(codec.stage_b, _tensors(tmp_path / "official" / "stage_b.safetensors"))
    with pytest.raises(W.WeightsError, match=r"(?s)stage_b_lite\.safetensors.*stable_cascade_stage_b_lite\.safetensors"
                                             r".*the large Stage B: pass stage_b='large' or --stage-b large"):
        Codec.from_pretrained(tmp_path / "comfy", device="cpu")  # a folder: lite unless asked


def test_a_non_released_size_without_our_metadata_is_refused(comfy_folder, tmp_path):
    sd = _tensors(comfy_folder / C_FILE)
    save_file(sd, str(tmp_path / C_FILE))  # no cascade-codec configurations: only the shapes are left
    with pytest.raises(W.WeightsError, match="neither released size.*1536"):
        Codec.from_pretrained(tmp_path / C_FILE, device="cpu")


def test_missing_tokenizer_is_explained(comfy_folder, tmp_path):
    from codec.text import TextEncoder

    shutil.copyfile(comfy_folder / C_FILE, tmp_path / C_FILE)
    with pytest.raises(W.WeightsError, match=r"no tokenizer/ folder.*holds the text encoder's weights, not its "
                                             r"tokenizer"):
        TextEncoder.from_pretrained(tmp_path / C_FILE)


# --------------------------------------------------------------------------------------------- convert, info
def _all_tensors(folder):
    names = ["*.safetensors", "text_encoder/*.safetensors", "image_encoder/*.safetensors"]
    return {str(p.relative_to(folder)): load_file(str(p)) for n in names for p in sorted(folder.glob(n))}


def test_round_trip_through_comfyui_is_bit_identical(tiny_weights, comfy_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("codec.weights.checkpoint._CHUNK_BYTES", 1 << 12)  # chunk boundaries inside tensors change nothing
    lines = []
    summary = convert(comfy_folder, tmp_path, "official", progress=False, log=lines.append)
    before, after = _all_tensors(tiny_weights), _all_tensors(tmp_path)
    assert set(before) == set(after) and "text_encoder/model.safetensors" in after and len(summary.written) == 7
    for name, tensors in before.items():
        assert tensors.keys() == after[name].keys(), name
        for k, v in tensors.items():
            assert after[name][k].dtype == v.dtype and torch.equal(after[name][k], v), (name, k)
    for folder in ("text_encoder", "image_encoder"):  # transformers loads what was taken out of the file
        assert json.loads((tmp_path / folder / "config.json").read_text()) == \
            json.loads((tiny_weights / folder / "config.json").read_text())
    assert W.read_header(tmp_path / W.PREVIEWER_FILE).config == W.read_header(tiny_weights / W.PREVIEWER_FILE).config


def test_convert_cli_to_comfyui_casts_only_the_model(tiny_weights, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tiny_weights), str(tmp_path), "--to", "comfyui", "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert "converted 2 model file(s)" in r.output
    header = W.read_header(tmp_path / C_FILE)
    dtypes = {k: i.dtype for k, i in header.tensors.items()}
    assert {d for k, d in dtypes.items() if k.startswith("model.diffusion_model.")} == {torch.bfloat16}
    assert {d for k, d in dtypes.items() if k.startswith("text_encoder.") and d.is_floating_point} == {torch.float32}
    assert json.loads(header.metadata["cascade_codec.config.stage_c_lite"])["c_clip_img"] == 16
    assert (tmp_path / "tokenizer").is_dir() and not (tmp_path / W.EFFNET_FILE).exists()
    r = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert f"{C_FILE}: Stage C lite" in r.output and f"{B_FILE}: Stage A" in r.output
    assert f"encoder ← {C_FILE}: EfficientNet encoder" in r.output


def test_converting_one_file_converts_what_it_holds(comfy_folder, tmp_path):
    lines = []
    convert(comfy_folder / B_FILE, tmp_path, "official", progress=False, log=lines.append)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert written == ["stage_a.safetensors", "stage_b_lite.safetensors", "text_encoder/model.safetensors"]
    assert any("holds no tokenizer" in line for line in lines)


def test_encode_dataset_reads_the_encoder_inside_the_stage_c_file(comfy_folder, tiny_weights, tmp_path):
    """encode-dataset finds the EfficientNet inside stable_cascade_stage_c*.safetensors, as load_encoder does, and
    stores the same latents as from the official effnet_encoder.safetensors (the store records that file)."""
    from datasets_tools import LatentDataset, LatentStore, encode_dataset
    from test_dataset_helpers import make_folder

    make_folder(tmp_path / "src", 3)
    stage_c_file = next(comfy_folder.glob("stable_cascade_stage_c*.safetensors"))
    stores = {}
    for name, weights in (("official", tiny_weights), ("comfyui", stage_c_file)):
        encode_dataset(tmp_path / "src", tmp_path / f"{name}.zarr", weights, size=64, workers=0, dtype="float32",
                       progress=False, log=_quiet)
        stores[name] = {item["id"]: item["latent"] for item in LatentDataset(tmp_path / f"{name}.zarr")}
    assert stores["official"].keys() == stores["comfyui"].keys() and len(stores["official"]) == 3
    for sid, latent in stores["official"].items():
        torch.testing.assert_close(stores["comfyui"][sid], latent, rtol=0, atol=0)
    assert LatentStore.open(tmp_path / "comfyui.zarr").attrs["encoder"]["file"].endswith(stage_c_file.name)
