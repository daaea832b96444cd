"""Interop with 🤗 diffusers: key mapping checked against diffusers' own classes, fp32 parity of the
modules, loading the diffusers folder layout (written by diffusers itself), and `cascade convert`.

diffusers computes its timestep embedding after rounding the timestep to the model dtype,
so its bf16 outputs differ from ours by design; parity is tested in fp32.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from codec import Codec

from codec.layouts import diffusers as diffusers_layout

from codec.layouts import locate as layouts

from codec.layouts import official
from codec import weights as W
from codec.cli import main
from codec.stage_a import StageA
from codec.tiny import write_tiny_text_encoder

from helpers import assert_close_scaled, fill_
from codec.presets import create_model, get_preset

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

RES, TIME, ATTN = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
# get_preset("stage_b_tiny").kwargs() written by hand in diffusers' names (the same model), to check the config translation.
TINY_DECODER = dict(
    in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=32,
    block_out_channels=[8, 16, 32, 32], num_attention_heads=[0, 0, 2, 2], down_num_layers_per_block=[1, 1, 2, 1],
    up_num_layers_per_block=[1, 2, 1, 1], down_blocks_repeat_mappers=[1, 1, 1, 1],
    up_blocks_repeat_mappers=[2, 2, 1, 2], block_types_per_layer=[[RES, TIME], [RES, TIME], [RES, TIME, ATTN],
                                                                  [RES, TIME, ATTN]],
    clip_text_pooled_in_channels=24, clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3,
    dropout=[0, 0, 0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca"],
)
# get_preset("stage_c_tiny").kwargs() in diffusers' names.
TINY_PRIOR = dict(
    in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=64,
    block_out_channels=[64, 64], num_attention_heads=[2, 2], down_num_layers_per_block=[2, 3],
    up_num_layers_per_block=[3, 2], down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[[RES, TIME, ATTN], [RES, TIME, ATTN]], clip_text_in_channels=24,
    clip_text_pooled_in_channels=24, clip_image_in_channels=16, clip_seq=4, kernel_size=3, dropout=[0.1, 0.1],
    self_attn=True, timestep_conditioning_type=["sca", "crp"], switch_level=[False],
)
TINY_VQGAN = dict(levels=2, bottleneck_blocks=2, embed_dim=32, latent_channels=4, num_vq_embeddings=64,
                  scale_factor=0.3764)


def _unet(**config):
    return diffusers_layout.diffusers_class("stage_b")(**config).eval()


def _paella(**config):
    return diffusers_layout.diffusers_class("stage_a")(**config).eval()


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}  # key order differs (module definition order) and is irrelevant


# --------------------------------------------------------------------------------------------- key plans, configs


def test_configs_translate_both_ways():
    assert diffusers_layout.config_from_diffusers("stage_b", TINY_DECODER, "x") == get_preset("stage_b_tiny").kwargs()
    assert TINY_DECODER.items() <= diffusers_layout.config_to_diffusers("stage_b", get_preset("stage_b_tiny").kwargs()).items()
    ours_a = dict(get_preset("stage_a_tiny").kwargs(), scale_factor=0.3764)
    assert diffusers_layout.config_from_diffusers("stage_a", dict(TINY_VQGAN, in_channels=3, out_channels=3,
                                                         up_down_scale_factor=2), "x") == ours_a
    assert diffusers_layout.config_from_diffusers("stage_c", TINY_PRIOR, "x") == get_preset("stage_c_tiny").kwargs()
    assert TINY_PRIOR.items() <= diffusers_layout.config_to_diffusers("stage_c", get_preset("stage_c_tiny").kwargs()).items()
    with pytest.raises(W.WeightsError, match="not a Stage B"):
        diffusers_layout.config_from_diffusers("stage_b", dict(TINY_DECODER, effnet_in_channels=None), "cfg.json")


def test_stage_b_keys_match_diffusers_module_in_both_directions():
    ours, theirs = create_model("stage_b_tiny").state_dict(), _unet(**TINY_DECODER).state_dict()
    assert _shapes(diffusers_layout.state_dict_to_diffusers(ours, "stage_b")) == _shapes(theirs)
    assert _shapes(diffusers_layout.state_dict_to_official(theirs, "stage_b")) == _shapes(ours)
    assert "clip_mapper.weight" in ours and "down_blocks.2.2.attention.attn.in_proj_weight" in ours


def test_stage_c_keys_match_diffusers_module_in_both_directions():
    ours, theirs = create_model("stage_c_tiny").state_dict(), _unet(**TINY_PRIOR).state_dict()
    assert _shapes(diffusers_layout.state_dict_to_diffusers(ours, "stage_c")) == _shapes(theirs)
    assert _shapes(diffusers_layout.state_dict_to_official(theirs, "stage_c")) == _shapes(ours)
    assert "clip_txt_pooled_mapper.weight" in ours  # Stage C has diffusers' name already


def test_stage_a_keys_match_paella_module_in_both_directions():
    ours, theirs = create_model("stage_a_tiny").state_dict(), _paella(**TINY_VQGAN).state_dict()
    assert _shapes(diffusers_layout.state_dict_to_diffusers(ours, "stage_a")) == _shapes(theirs)
    assert _shapes(diffusers_layout.state_dict_to_official(theirs, "stage_a")) == _shapes(ours)


# From the configs diffusers' conversion scripts write (reference/diffusers.md §2.3).
PRESET_TABLE = {
    "stage_b_large": dict(block_out_channels=[320, 640, 1280, 1280], num_attention_heads=[0, 0, 20, 20],
                          down_num_layers_per_block=[2, 6, 28, 6], up_num_layers_per_block=[6, 28, 6, 2],
                          up_blocks_repeat_mappers=[3, 3, 2, 2], conditioning_dim=1280, switch_level=None),
    "stage_b_lite": dict(block_out_channels=[320, 576, 1152, 1152], num_attention_heads=[0, 9, 18, 18],
                         down_num_layers_per_block=[2, 4, 14, 4], up_num_layers_per_block=[4, 14, 4, 2],
                         up_blocks_repeat_mappers=[2, 2, 2, 2], conditioning_dim=1280, switch_level=None),
    "stage_c_large": dict(block_out_channels=[2048, 2048], num_attention_heads=[32, 32], conditioning_dim=2048,
                          down_num_layers_per_block=[8, 24], up_num_layers_per_block=[24, 8], switch_level=[False],
                          clip_text_in_channels=1280, clip_image_in_channels=768),
    "stage_c_lite": dict(block_out_channels=[1536, 1536], num_attention_heads=[24, 24], conditioning_dim=1536,
                         down_num_layers_per_block=[4, 12], up_num_layers_per_block=[12, 4], switch_level=[False]),
}


@pytest.mark.parametrize("component", sorted(PRESET_TABLE))
def test_full_size_presets_map_onto_diffusers_configs(component):
    """Built on the meta device (no memory): every full-size preset has diffusers' config and key set."""
    from dataclasses import asdict

    kind = official.kind_of(component)
    config = official.default_config(component)
    assert PRESET_TABLE[component].items() <= diffusers_layout.config_to_diffusers(kind, config).items()
    with torch.device("meta"):
        ours = create_model(component)
        theirs = diffusers_layout.diffusers_model(kind, asdict(ours.config))
    assert _shapes(diffusers_layout.state_dict_to_diffusers(ours.state_dict(), kind)) == _shapes(theirs.state_dict())


def test_qkv_split_and_pack_are_exact_inverses():
    sd = fill_(create_model("stage_b_tiny")).state_dict()
    mapped = diffusers_layout.state_dict_to_diffusers(sd, "stage_b")
    packed = sd["down_blocks.2.2.attention.attn.in_proj_weight"]
    c = packed.shape[1]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(mapped[f"down_blocks.2.2.attention.{name}.weight"], packed[i * c:(i + 1) * c])
    back = diffusers_layout.state_dict_to_official(mapped, "stage_b")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_incomplete_attention_is_a_user_error():
    theirs = dict(_unet(**TINY_DECODER).state_dict())
    del theirs["down_blocks.2.2.attention.to_k.weight"]
    with pytest.raises(W.WeightsError, match="cannot be packed into in_proj"):
        diffusers_layout.state_dict_to_official(theirs, "stage_b")


# --------------------------------------------------------------------------------------------- parity (fp32)


def _stage_b_cases():
    g = torch.Generator().manual_seed(1)
    return [
        dict(x=torch.randn(2, 4, 32, 32, generator=g), r=torch.tensor([0.3, 0.9]),
             effnet=torch.randn(2, 16, 3, 3, generator=g), clip=torch.randn(2, 1, 24, generator=g)),
        # odd size: the up path resizes to the skip size; pixels given
        dict(x=torch.randn(1, 4, 20, 28, generator=g), r=torch.tensor([0.5]),
             effnet=torch.randn(1, 16, 2, 3, generator=g), clip=torch.randn(1, 1, 24, generator=g),
             pixels=torch.randn(1, 3, 8, 8, generator=g)),
    ]


def _share_weights(ours, theirs, kind, filled="ours"):
    """Fill one model with random weights (``fill_``) and load them, key-mapped, into the other."""
    if filled == "ours":
        theirs.load_state_dict(diffusers_layout.state_dict_to_diffusers(fill_(ours).state_dict(), kind), strict=True)
    else:
        ours.load_state_dict(diffusers_layout.state_dict_to_official(fill_(theirs).state_dict(), kind), strict=True)
    return ours.eval(), theirs.eval()


def _diffusers_b(model, case):
    return model(sample=case["x"], timestep_ratio=case["r"], clip_text_pooled=case["clip"], effnet=case["effnet"],
                 pixels=case.get("pixels"), return_dict=False)[0]


@pytest.mark.parametrize("filled", ["ours", "diffusers"])
def test_stage_b_matches_diffusers_unet(filled):
    ours, theirs = _share_weights(create_model("stage_b_tiny"), _unet(**TINY_DECODER), "stage_b", filled)
    with torch.no_grad():
        for i, case in enumerate(_stage_b_cases()):
            assert_close_scaled(ours(**case), _diffusers_b(theirs, case), 1e-4, name=f"stage_b case {i}")


def _stage_c_cases():
    g = torch.Generator().manual_seed(3)
    return [
        dict(x=torch.randn(2, 16, 6, 6, generator=g), r=torch.tensor([0.2, 0.8]),
             clip_text=torch.randn(2, 77, 24, generator=g), clip_text_pooled=torch.randn(2, 1, 24, generator=g),
             clip_img=torch.randn(2, 1, 16, generator=g)),
        # two image embeddings (8 image tokens), non-square latent
        dict(x=torch.randn(1, 16, 5, 7, generator=g), r=torch.tensor([0.99]),
             clip_text=torch.randn(1, 77, 24, generator=g), clip_text_pooled=torch.randn(1, 1, 24, generator=g),
             clip_img=torch.randn(1, 2, 16, generator=g)),
    ]


@pytest.mark.parametrize("filled", ["ours", "diffusers"])
def test_stage_c_matches_diffusers_unet(filled):
    ours, theirs = _share_weights(create_model("stage_c_tiny"), _unet(**TINY_PRIOR), "stage_c", filled)
    with torch.no_grad():
        for i, case in enumerate(_stage_c_cases()):
            ref = theirs(sample=case["x"], timestep_ratio=case["r"], clip_text_pooled=case["clip_text_pooled"],
                         clip_text=case["clip_text"], clip_img=case["clip_img"], return_dict=False)[0]
            assert_close_scaled(ours(**case), ref, 1e-4, name=f"stage_c case {i}")


@pytest.mark.parametrize("scale", [0.43, 0.3764])
def test_stage_a_matches_paella(scale):
    ours, theirs = _share_weights(StageA(**dict(get_preset("stage_a_tiny").kwargs(), scale_factor=scale)),
                                  _paella(**dict(TINY_VQGAN, scale_factor=scale)), "stage_a")
    g = torch.Generator().manual_seed(2)
    x, z = torch.rand(2, 3, 24, 40, generator=g), torch.randn(2, 4, 6, 10, generator=g)
    with torch.no_grad():
        # diffusers' encode returns the unscaled latent; its pipeline decodes vqgan.decode(scale * latent)
        assert_close_scaled(ours.encode(x), theirs.encode(x).latents / scale, 1e-4, name="encode")
        assert_close_scaled(ours.decode(z), theirs.decode(z * scale).sample, 1e-4, name="decode")


# --------------------------------------------------------------------------------------------- diffusers layout


@pytest.fixture(scope="module")
def diffusers_models():
    torch.manual_seed(0)
    return fill_(_unet(**TINY_DECODER), 3), fill_(_paella(**TINY_VQGAN), 4)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, diffusers_models):
    """A diffusers-layout folder written by diffusers' own save_pretrained (fp32 + bf16 variant), plus CLIP."""
    unet, vqgan = diffusers_models
    root = tmp_path_factory.mktemp("diffusers_layout")
    unet.save_pretrained(root / "decoder_lite")
    copy.deepcopy(unet).to(torch.bfloat16).save_pretrained(root / "decoder_lite", variant="bf16")
    vqgan.save_pretrained(root / "vqgan")
    write_tiny_text_encoder(root)
    return root


def _assert_same_tensors(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_codec_loads_the_diffusers_layout(diffusers_folder, diffusers_models):
    unet, vqgan = diffusers_models
    codec = Codec.from_pretrained(diffusers_folder, device="cpu")
    _assert_same_tensors(codec.stage_b, diffusers_layout.state_dict_to_official(unet.state_dict(), "stage_b"))
    _assert_same_tensors(codec.stage_a, diffusers_layout.state_dict_to_official(vqgan.state_dict(), "stage_a"))
    assert codec.stage_a.scale_factor == pytest.approx(0.3764)
    info = codec.info()["components"]
    assert info["stage_b"]["layout"] == info["stage_a"]["layout"] == "diffusers"
    assert "Würstchen v2" in info["stage_a"]["detail"] and "effnet" not in info
    out = codec.decode(torch.randn(1, 16, 2, 2), height=32, width=32, steps=2, output="tensor")
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(W.WeightsError, match=r"has no effnet_encoder\.safetensors.*diffusers ships none.*"
                                             r"resolve/main/effnet_encoder\.safetensors"):
        codec.encode(torch.rand(1, 3, 64, 64))


def test_bf16_variant_is_picked_for_bf16(diffusers_folder, diffusers_models):
    codec = Codec.from_pretrained(diffusers_folder, device="cpu", dtype="bf16")
    assert codec.components["stage_b"].file.endswith("diffusion_pytorch_model.bf16.safetensors")
    _assert_same_tensors(codec.stage_b, diffusers_layout.state_dict_to_official(
        {k: v.bfloat16() for k, v in diffusers_models[0].state_dict().items()}, "stage_b"))


def test_sharded_diffusers_checkpoint_loads(tmp_path, diffusers_models):
    unet, vqgan = diffusers_models
    unet.save_pretrained(tmp_path / "decoder_lite", max_shard_size="200KB")
    vqgan.save_pretrained(tmp_path / "vqgan")
    assert (tmp_path / "decoder_lite" / diffusers_layout.DIFFUSERS_INDEX["fp32"]).is_file()
    loc = layouts.locate(W.WeightSource(tmp_path), "stage_b_lite", torch.float32)
    assert len(loc.files) > 1
    codec = Codec.from_pretrained(tmp_path, device="cpu")
    _assert_same_tensors(codec.stage_b, diffusers_layout.state_dict_to_official(unet.state_dict(), "stage_b"))


@pytest.mark.slow  # full generations; the layout mapping has fast tests
def test_generation_reads_the_diffusers_layout(tiny_weights, tmp_path):
    """A prior_lite/ written by diffusers loads into the pipeline and generates the same images as the same weights
    in the official layout."""
    import shutil

    from codec.layouts.convert import convert
    from codec.generation.pipeline import TextToImage

    prior = fill_(_unet(**TINY_PRIOR), 5)
    official = diffusers_layout.state_dict_to_official(prior.state_dict(), "stage_c")
    convert(tiny_weights, tmp_path / "d", "diffusers", progress=False, log=lambda s: None)
    shutil.rmtree(tmp_path / "d" / "prior_lite")
    prior.save_pretrained(tmp_path / "d" / "prior_lite")
    shutil.copytree(tiny_weights, tmp_path / "o")
    model = create_model("stage_c_tiny")
    model.load_state_dict(official)
    W.save_module(model, tmp_path / "o" / W.STAGE_C_FILES["lite"]["fp32"], get_preset("stage_c_tiny").kwargs())
    images = []
    for folder in ("d", "o"):
        pipe = TextToImage.from_pretrained(tmp_path / folder, device="cpu")
        if folder == "d":
            _assert_same_tensors(pipe._stage_c(), official)
            assert pipe._locations()[0].layout == "diffusers"
        images.append(pipe.generate("a cat", height=256, width=256, seed=2, steps_c=2, steps_b=1, output="tensor"))
    assert torch.equal(images[0].latents, images[1].latents) and torch.equal(images[0].images, images[1].images)


def test_encoder_loader_explains_the_missing_effnet(diffusers_folder):
    from codec.codec import load_encoder

    with pytest.raises(W.WeightsError, match="exists only in the official layout"):
        load_encoder(diffusers_folder)


def test_official_files_win_when_both_layouts_are_present(tmp_path, tiny_weights, diffusers_models):
    import shutil

    shutil.copytree(tiny_weights, tmp_path, dirs_exist_ok=True)
    diffusers_models[1].save_pretrained(tmp_path / "vqgan")
    codec = Codec.from_pretrained(tmp_path, device="cpu")
    assert codec.components["stage_a"].layout == "official" and codec.stage_a.scale_factor == 0.43
    r = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "vqgan/ (fp32)" in r.output and "Würstchen v2" in r.output
    assert "Stage A ← stage_a.safetensors" in r.output


def test_missing_everything_mentions_both_layouts(tmp_path):
    with pytest.raises(W.WeightsError, match=r"(?s)stage_a\.safetensors.*diffusers layout works too.*vqgan/"):
        Codec.from_pretrained(tmp_path, device="cpu")


# --------------------------------------------------------------------------------------------- convert


def _tensors(folder, pattern="**/*.safetensors"):
    return {str(p.relative_to(folder)): load_file(str(p)) for p in sorted(folder.glob(pattern))}


def test_convert_round_trip_is_bit_identical(tiny_weights, tmp_path):
    from codec.layouts.convert import convert

    convert(tiny_weights, tmp_path / "d", "diffusers", progress=False, log=lambda s: None)
    convert(tmp_path / "d", tmp_path / "o", "official", progress=False, log=lambda s: None)
    before, after = _tensors(tiny_weights, "*.safetensors"), _tensors(tmp_path / "o", "*.safetensors")
    assert set(before) == set(after) and "stage_b_lite.safetensors" in after
    for name, tensors in before.items():
        assert tensors.keys() == after[name].keys(), name
        for k, v in tensors.items():
            assert after[name][k].dtype == v.dtype and torch.equal(after[name][k], v), (name, k)
    assert not list((tmp_path / "o").rglob("*.partial"))


def test_converted_folder_loads_in_diffusers(tiny_weights, tmp_path):
    from codec.layouts.convert import convert

    StableCascadeUNet, PaellaVQModel = diffusers_layout.diffusers_class("stage_b"), diffusers_layout.diffusers_class("stage_a")

    convert(tiny_weights, tmp_path, "diffusers", progress=False, log=lambda s: None)
    unet = StableCascadeUNet.from_pretrained(tmp_path, subfolder="decoder_lite")
    vqgan = PaellaVQModel.from_pretrained(tmp_path, subfolder="vqgan")
    prior = StableCascadeUNet.from_pretrained(tmp_path / "prior_lite")
    assert vqgan.config.scale_factor == 0.43
    _assert_same_tensors(prior, diffusers_layout.state_dict_to_diffusers(
        load_file(str(tiny_weights / W.STAGE_C_FILES["lite"]["fp32"])), "stage_c"))
    ours_b = load_file(str(tiny_weights / "stage_b_lite.safetensors"))
    _assert_same_tensors(unet, diffusers_layout.state_dict_to_diffusers(ours_b, "stage_b"))
    _assert_same_tensors(vqgan, diffusers_layout.state_dict_to_diffusers(load_file(str(tiny_weights / "stage_a.safetensors")),
                                                                "stage_a"))
    codec = Codec.from_pretrained(tmp_path, device="cpu")  # effnet was copied along, so this one encodes
    assert codec.encode(torch.rand(1, 3, 64, 64)).shape == (1, 16, 1, 1)


def test_convert_dtype_names_and_resume(diffusers_folder, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(diffusers_folder), str(tmp_path), "--to", "official",
                                  "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert "converted 2 model file(s)" in r.output and "Würstchen v2" in r.output
    b = load_file(str(tmp_path / "stage_b_lite_bf16.safetensors"))
    assert {v.dtype for v in b.values()} == {torch.bfloat16}
    assert not (tmp_path / "stage_b_lite.safetensors").exists()
    a = W.read_header(tmp_path / "stage_a.safetensors")
    assert a.config["scale_factor"] == 0.3764 and a.dtypes() == {torch.float32, torch.int64}  # Stage A stays fp32
    assert (tmp_path / "text_encoder").is_dir() and (tmp_path / "tokenizer").is_dir()
    assert not (tmp_path / W.EFFNET_FILE).exists()  # the diffusers source had no EfficientNet encoder to copy
    r = CliRunner().invoke(main, ["convert", str(diffusers_folder), str(tmp_path), "--to", "official",
                                  "--dtype", "bf16"])
    assert r.exit_code == 0 and "converted 0 model file(s)" in r.output and "2 already there" in r.output


def test_convert_keep_writes_every_variant(diffusers_folder, tmp_path):
    from codec.layouts.convert import convert

    summary = convert(diffusers_folder, tmp_path, "official", progress=False, log=lambda s: None)
    assert len(summary.written) == 3
    fp32, bf16 = (load_file(str(tmp_path / n)) for n in ("stage_b_lite.safetensors", "stage_b_lite_bf16.safetensors"))
    assert all(torch.equal(fp32[k].bfloat16(), bf16[k]) for k in fp32)


def test_convert_streams_in_small_chunks(tiny_weights, tmp_path, monkeypatch):
    """Chunk boundaries inside tensors (and inside q/k/v parts) change nothing."""
    from codec.layouts.convert import convert

    monkeypatch.setattr("codec.weights.checkpoint._CHUNK_BYTES", 40)
    convert(tiny_weights, tmp_path / "d", "diffusers", progress=False, log=lambda s: None)
    monkeypatch.setattr("codec.weights.checkpoint._CHUNK_BYTES", 1 << 24)
    ref = diffusers_layout.state_dict_to_diffusers(load_file(str(tiny_weights / "stage_b_lite.safetensors")), "stage_b")
    got = load_file(str(tmp_path / "d" / "decoder_lite" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_nothing_to_convert_is_a_sentence(tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tmp_path), str(tmp_path / "out"), "--to", "diffusers"])
    assert r.exit_code == 1 and "holds no Stage A, B or C weights" in r.output and "Traceback" not in r.output


_RSS_SCRIPT = r"""
import re, sys, torch
from codec import weights as W
from codec.layouts import diffusers as diffusers_layout
from codec.layouts import locate as layouts
from codec.layouts import official

def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

torch.randn(1 << 20).to(torch.bfloat16)  # load the conversion kernels' code pages before measuring
ckpt = W.Checkpoint.open(sys.argv[1])
plan = diffusers_layout.plan_to_diffusers(ckpt.shapes(), "stage_b")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
    f.write("5")
base = status("VmRSS")
W.write_checkpoint(ckpt.remap(plan), sys.argv[2], torch.bfloat16)
print(status("VmHWM") - base)
"""


@pytest.mark.slow  # converts a large file in a subprocess
def test_convert_memory_stays_below_one_tensor(tmp_path):
    """Converting a 235 MB file (q/k/v split, cast to bf16) grows peak RSS by less than its largest tensor (67 MB)."""
    from safetensors.torch import save_file

    c = 2048
    state = {f"down_blocks.{i}.0.attention.attn.in_proj_weight": torch.ones(3 * c, c) * i for i in range(2)}
    state.update({f"down_blocks.{i}.0.channelwise.0.weight": torch.ones(4 * c, c) for i in range(2)})
    save_file(state, str(tmp_path / "big.safetensors"))
    largest = max(v.numel() * 4 for v in state.values())
    del state
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big.safetensors"),
                          str(tmp_path / "out.safetensors")], capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[0])
    assert grown < largest, f"peak RSS grew by {grown / 1e6:.0f} MB; the largest tensor is {largest / 1e6:.0f} MB"
    assert grown < 48 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB; 16 MiB read + 8 MiB cast buffers expected"
    header = W.read_header(tmp_path / "out.safetensors")
    assert header.tensors["down_blocks.1.0.attention.to_v.weight"].shape == (c, c)
    assert header.dtypes() == {torch.bfloat16}
