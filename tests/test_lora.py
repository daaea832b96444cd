"""LoRA with the official semantics, its file formats, merging, and new-token deltas (tiny models)."""

import pytest
import torch
from safetensors.torch import save_file

from codec.generation.lora import LoraNetwork, lora_targets, read_lora, save_lora, to_kohya
from codec.stage_c import StageC
from codec.weights import WeightsError, read_header
from codec.presets import create_model, get_preset


def tiny_stage_c(seed=0):
    torch.manual_seed(seed)
    return create_model("stage_c_tiny").eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, 24, generator=g),
            torch.randn(2, 1, 24, generator=g), torch.zeros(2, 1, 16))


def trained_network(model, seed=0):
    net = LoraNetwork.create(model, rank=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lora in net.weights:
            lora.lora_down.copy_(torch.randn(lora.lora_down.shape, generator=g) * 0.1)
    return net


def test_targets_and_order_match_the_official_file():
    with torch.device("meta"):
        large = create_model("stage_c_large")
    targets = lora_targets(large)
    # 64 AttnBlocks × (out_proj, in_proj), out_proj first; blocks: down L0, down L1, up L1, up L0
    assert len(targets) == 128
    assert targets[:2] == ["down_blocks.0.2.attention.attn.out_proj.weight",
                           "down_blocks.0.2.attention.attn.in_proj_weight"]
    assert targets[-1].startswith("up_blocks.1.") and "kv_mapper" not in " ".join(targets)
    net = LoraNetwork.create(large, rank=4)
    shapes = [tuple(v.shape) for v in net.lora_state_dict().values()][:4]
    assert shapes == [(4, 2048), (2048, 4), (4, 2048), (6144, 4)]
    assert net.weights[0].scale == 0.25


def test_fresh_lora_is_identity_and_merge_equals_attached():
    model, args = tiny_stage_c(), inputs()
    base = model(*args)
    fresh = LoraNetwork.create(model, rank=4, seed=0).attach(model)
    assert torch.equal(model(*args), base)  # lora_down starts at 0
    fresh.detach()
    net = trained_network(model).attach(model)
    live = model(*args)
    assert (live - base).abs().max() > 1e-3
    net.detach()
    assert torch.equal(model(*args), base)
    net.merge(model)
    torch.testing.assert_close(model(*args), live, rtol=1e-5, atol=1e-5)
    net.unmerge(model)
    torch.testing.assert_close(model(*args), base, rtol=1e-5, atol=1e-5)
    plain = model(*args)
    net.set_multiplier(0.0)
    net.attach(model)
    assert torch.equal(model(*args), plain)


def test_an_attached_network_holds_only_the_lora_tensors():
    """Attaching must not make the model a submodule of the network: requires_grad_(True) on the network
    (as training does) would then make the whole Stage C trainable."""
    model = tiny_stage_c().requires_grad_(False)
    net = LoraNetwork.create(model, rank=4, seed=0).attach(model)
    net.requires_grad_(True)
    lora_ids = {id(p) for lora in net.weights for p in lora.parameters()}
    assert {id(p) for p in net.parameters()} == lora_ids
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".parametrizations." in n and n.endswith(("lora_down", "lora_up")) for n in trainable)
    assert set(net.state_dict()) == {k for k in net.state_dict() if k.startswith("weights.")}


def test_official_file_round_trip(tmp_path):
    model, args = tiny_stage_c(), inputs()
    net = trained_network(model).attach(model)
    live = model(*args)
    net.detach()
    path = save_lora(net, tmp_path / "lora.safetensors")
    tensors = read_header(path).tensors
    assert set(tensors) == {f"weights.{i}.{part}" for i in range(20) for part in ("lora_down", "lora_up")}
    # index i is the i-th target in official order: out_proj (64×64) then in_proj (192×64) per attention
    assert [tensors[f"weights.{i}.lora_up"].shape for i in range(2)] == [(64, 4), (192, 4)]
    loaded, info, tokens = read_lora(path, model)
    assert info.format == "official" and info.rank == 4 and info.alpha == 1.0 and tokens == {}
    loaded.attach(model)
    assert torch.equal(model(*args), live)


@pytest.mark.parametrize("naming", ["kohya", "diffusers-peft", "onetrainer-diffusers"])
def test_other_namings_load_exactly(tmp_path, naming):
    model, args = tiny_stage_c(), inputs()
    net = trained_network(model).attach(model)
    live = model(*args)
    net.detach()
    kohya = to_kohya(net)
    if naming == "kohya":
        state = kohya
    else:
        state = {}
        for key, value in kohya.items():
            name, kind = key.split(".", 1)
            path = name[len("lora_prior_unet_"):]
            dotted = next(t for t in _dotted_names(model) if t.replace(".", "_") == path)
            if naming == "diffusers-peft":  # diffusers module names, PEFT A/B, alpha folded into B
                dotted = dotted.replace("attention.attn.to_", "attention.to_").replace("attention.attn.out_proj",
                                                                                      "attention.to_out.0")
                if kind == "alpha":
                    continue
                scale = kohya[f"{name}.alpha"] / kohya[f"{name}.lora_down.weight"].shape[0]
                ab = "lora_A" if kind.startswith("lora_down") else "lora_B"
                state[f"prior.{dotted}.{ab}.weight"] = value * (scale if ab == "lora_B" else 1)
            else:
                state[f"lora_prior_unet.{dotted}.{kind}"] = value
    save_file(state, str(tmp_path / "other.safetensors"))
    loaded, info, _ = read_lora(tmp_path / "other.safetensors", model)
    assert info.format == "kohya/diffusers" and loaded.targets == net.targets
    loaded.attach(model)
    torch.testing.assert_close(model(*args), live, rtol=1e-5, atol=1e-6)


def _dotted_names(model):
    names = []
    for name, _ in model.named_modules():
        names.append(name)
        if name.endswith("attention.attn"):
            names += [f"{name}.to_q", f"{name}.to_k", f"{name}.to_v"]
    return names


def test_unreadable_files_say_why(tmp_path):
    model = tiny_stage_c()
    save_file({"lora_prior_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 24),
               "lora_prior_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(48, 4)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(WeightsError, match="text encoder"):
        read_lora(tmp_path / "te.safetensors", model)
    save_file({"something.lora_down.weight": torch.zeros(4, 3), "something.lora_up.weight": torch.zeros(3, 4)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="match no weight"):
        read_lora(tmp_path / "bad.safetensors", model)
    net = trained_network(model)
    path = save_lora(net, tmp_path / "l.safetensors")
    other = StageC(**{**get_preset("stage_c_tiny").kwargs(), "blocks": [[1, 3], [3, 2]]})
    with pytest.raises(WeightsError, match="LoRA weights"):
        read_lora(path, other)
