"""The training loop on tiny models: exact resume, configs, objectives, the Stage C / LoRA / Stage B tasks."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from codec.generation.training import TASKS as GENERATION_TASKS
from codec.generation.training.lora_task import LoraTask
from codec.generation.training.stage_c_task import StageCTask
from codec.presets import create_model, get_preset
from codec.training import TASKS, ConfigError, task_class, train
from codec.training.data import ListDataset
from codec.training.logs import read_log
from codec.training.objectives import AdaptiveLossWeight, pyramid_noise
from codec.training.stage_b_task import StageBTask

ALL_TASKS = {**TASKS, **GENERATION_TASKS}  # what `cascade train` offers


def stage_c_items(n=8, side=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"latent": torch.randn(16, side, side, generator=g), "caption": f"c{i}",
             "clip_text": torch.randn(77, 24, generator=g), "clip_text_pooled": torch.randn(1, 24, generator=g)}
            for i in range(n)]


def stored_dataset(**kw):
    ds = ListDataset(stage_c_items(**kw))
    ds.empty_text_embedding = (torch.zeros(1, 77, 24), torch.zeros(1, 1, 24))
    return ds


def config(out, **over):
    cfg = {"output_dir": str(out), "data": {"store": "unused"}, "batch_size": 4, "grad_accum_steps": 2,
           "max_steps": 6, "model": {"preset": "tiny"}, "log": {"every": 1}, "checkpoint": {"save_every": 3}}
    cfg.update(over)
    return cfg


class Kill(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """Dropout on, adaptive weights, EMA and accumulation: a run killed after update 3 (last checkpoint at 2)
    and started again ends bit-identical to an uninterrupted run."""
    ds = stored_dataset()
    over = {"loss_weight": "adaptive", "ema": {"start": 1, "every": 1}, "max_steps": 4,
            "checkpoint": {"save_every": 2}}
    train(StageCTask, config(tmp_path / "a", **over), dataset=ds, echo=None)

    def kill(step):
        if step == 3:
            raise Kill

    with pytest.raises(Kill):
        train(StageCTask, config(tmp_path / "b", **over), dataset=ds, hook=kill, echo=None)
    assert json.loads((tmp_path / "b/checkpoint/state.json").read_text())["step"] == 2
    train(StageCTask, config(tmp_path / "b", **over), dataset=ds, echo=None)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "a/checkpoint" / name), load_file(tmp_path / "b/checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    la, lb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in lb] == list(range(1, 5))  # the killed run's step 3 was dropped from the log
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # the first update runs at lr 0 (official warm-up of 1), so step 1 changes nothing but the optimiser
    assert la[0]["lr"] == 1e-4 and la[0]["loss"] > 0


def test_changed_config_is_refused_on_resume(tmp_path):
    ds = stored_dataset()
    train(StageCTask, config(tmp_path, max_steps=3), dataset=ds, echo=None)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.0001 → 0.001"):
        train(StageCTask, config(tmp_path, max_steps=4, optim={"lr": 1e-3}), dataset=ds, echo=None)
    train(StageCTask, config(tmp_path, max_steps=4), dataset=ds, echo=None)  # max_steps may grow
    assert read_log(tmp_path)[-1]["step"] == 4
    # a checkpoint written before a config field existed (here `prediction`, and `data.cache` a level down)
    # resumes under its default …
    state_file = tmp_path / "checkpoint/state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["prediction"]
    del state["config"]["data"]["cache"]
    state_file.write_text(json.dumps(state))
    train(StageCTask, config(tmp_path, max_steps=5), dataset=ds, echo=None)
    assert read_log(tmp_path)[-1]["step"] == 5
    # … and not under another value
    state = json.loads(state_file.read_text())
    del state["config"]["prediction"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"prediction: 'epsilon' → 'v'"):
        train(StageCTask, config(tmp_path, max_steps=6, prediction="v"), dataset=ds, echo=None)


def test_task_section_is_recorded_and_checked_on_resume(tmp_path, text_weights):
    """The task's own section (here lora.rank) is part of the recorded config: changing it is refused on resume,
    and an optimiser state that does not fit (another version, another model) is a one-sentence error."""
    items = [{"latent": it["latent"], "caption": "a photo"} for it in stage_c_items()]
    cfg = config(tmp_path, max_steps=2, weights=str(text_weights), lora={"rank": 2})
    train(LoraTask, cfg, dataset=ListDataset(items), echo=None)
    assert json.loads((tmp_path / "config.json").read_text())["lora"]["rank"] == 2
    with pytest.raises(ConfigError, match=r"lora.rank: 2 → 3"):
        train(LoraTask, {**cfg, "max_steps": 3, "lora": {"rank": 3}}, dataset=ListDataset(items), echo=None)
    trainer_file = tmp_path / "checkpoint/trainer.pt"
    trainer = torch.load(trainer_file, weights_only=True)
    trainer["optimizer"]["param_groups"][0]["params"].append(10_000)  # one parameter more than this run has
    torch.save(trainer, trainer_file)
    with pytest.raises(ConfigError, match=r"optimiser state .* does not fit the parameters this run trains"):
        train(LoraTask, {**cfg, "max_steps": 3}, dataset=ListDataset(items), echo=None)


@pytest.mark.parametrize("bad, message", [
    ({"optim": {"lrr": 1}}, "unknown key 'optim.lrr' (did you mean 'lr'?)"),
    ({"batch_size": "many"}, "batch_size: Input should be a valid integer"),
    ({"max_steps": None, "loss_weight": "p3"}, "loss_weight: Input should be 'p2' or 'adaptive'"),
    ({"batch_size": 3}, "batch_size 3 must be a multiple of grad_accum_steps 2"),
    ({"lora": {"rank": 4}}, "unknown key 'lora'"),
])
def test_config_errors_name_the_key(tmp_path, bad, message):
    with pytest.raises(ConfigError) as e:
        train(StageCTask, config(tmp_path, **bad), dataset=stored_dataset(), echo=None)
    assert message in str(e.value)


def test_cli_reports_config_errors(tmp_path):
    from codec.cli import main
    from codec.cli.train import TRAIN_TASKS

    assert set(TRAIN_TASKS) == set(ALL_TASKS)
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\ndata: {store: s}\nbatch_size: 2\nmax_steps: 1\nlora: {rank: [\n")
    r = CliRunner().invoke(main, ["train", "lora", str(path)])
    assert r.exit_code == 1 and "invalid YAML" in r.output and "Traceback" not in r.output
    path.write_text("output_dir: x\ndata: {store: s}\nbatch_size: 2\nmax_steps: 1\nmodel: {dropout: 2}\n")
    r = CliRunner().invoke(main, ["train", "stage-c", str(path)])
    assert r.exit_code == 1 and "model.dropout: Input should be less than or equal to 1" in r.output
    path.write_text(f"output_dir: {tmp_path / 'x'}\ndata: {{store: s}}\nbatch_size: 2\nmax_steps: 1\n")
    r = CliRunner().invoke(main, ["train", "controlnet", str(path)])
    assert r.exit_code == 1 and "set data.images" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "resumes" in r.output


def test_pyramid_noise_levels_and_norm():
    """official.md §13.4: for 256² latents levels i = 4…8 are used, norm 1.10270."""
    levels = [0.75 ** i for i in range(4, 9)]
    assert abs((1 + sum(m * m for m in levels)) ** 0.5 - 1.10270) < 1e-5
    zero = torch.zeros(1, 1, 256, 256)
    g = torch.Generator().manual_seed(0)
    out = pyramid_noise(zero, generator=g)
    # only the coarse levels contribute; the finest used level (16×16) makes 16×16-pixel constant blocks
    assert out.std() > 0 and torch.equal(out[..., :16, :16], out[..., :1, :1].expand(1, 1, 16, 16))
    noise = torch.randn(64, 4, 256, 256, generator=torch.Generator().manual_seed(1))
    assert abs(pyramid_noise(noise, generator=g).std().item() - 1) < 0.02


def test_adaptive_weight_follows_bucket_losses():
    w = AdaptiveLossWeight()
    logsnr = torch.tensor([0.0, 0.0, 5.0])
    assert torch.equal(w(logsnr), torch.ones(3))
    w.update(logsnr, torch.tensor([2.0, 4.0, 1.0]))
    # duplicate bucket in one batch: the last sample wins (official vectorised assignment)
    assert torch.allclose(w.bucket_losses[w._index(torch.tensor([0.0]))], torch.tensor([0.99 + 0.04]))
    assert torch.allclose(w(torch.tensor([0.0])), 1 / torch.tensor([1.03]))


def test_stage_c_checkpoint_is_a_release_file(tmp_path):
    from codec.stage_c import StageC
    from codec.weights import load_configured

    train(StageCTask, config(tmp_path, max_steps=2), dataset=stored_dataset(), echo=None)
    model, header = load_configured(StageC, tmp_path / "checkpoint/model.safetensors", None, torch.float32, "cpu")
    assert header.config["c_cond"] == 64 and sum(p.numel() for p in model.parameters()) > 0


def lora_targets_weights(model):
    """The weights a default LoRA adapts (``.attn`` filter): shape ``(out, in)`` → LoRA ``2·rank·…`` numbers."""
    from codec.generation.lora import lora_targets

    return [model.get_parameter(t) for t in lora_targets(model)]


@pytest.fixture(scope="module")
def text_weights(tiny_weights):
    return tiny_weights  # tiny weights include the CLIP text encoder (text_encoder/, tokenizer/)


def test_lora_with_a_new_token_trains_and_loads_back(tmp_path, text_weights):
    from codec.generation.lora import read_lora
    from codec.generation.tokens import add_train_tokens, load_token_state
    from codec.text import TextEncoder
    from codec.weights import save_module

    torch.manual_seed(0)
    base = create_model("stage_c_tiny")
    base.init_weights()
    with torch.no_grad():
        base.clf[1].weight.normal_(0, 0.1)  # a trained Stage C's output layer is not zero: gradients reach the LoRA
    save_module(base, tmp_path / "stage_c.safetensors", get_preset("stage_c_tiny").kwargs())
    items = [{"latent": it["latent"], "caption": "a photo of [sks]"} for it in stage_c_items()]
    cfg = config(tmp_path / "run", max_steps=3, weights=str(text_weights), optim={"lr": 1e-2},
                 model={"checkpoint": str(tmp_path / "stage_c.safetensors")}, preview={"every": 3, "n": 2, "steps": 2},
                 lora={"rank": 2, "train_tokens": [["[sks]", "^a</w>$"]], "export_kohya": True})
    said = []
    train(LoraTask, cfg, dataset=ListDataset(items), echo=said.append)
    lora_numel = sum(2 * (w.shape[0] + w.shape[1]) for w in lora_targets_weights(base)) + 24  # rank 2, 24-d token
    assert f"task lora, {lora_numel:,} trained parameters" in said[0]  # not Stage C's
    path = tmp_path / "run/checkpoint/model.safetensors"
    assert (tmp_path / "run/checkpoint/model.kohya.safetensors").exists()
    assert (tmp_path / "run/previews/step_0000003.png").exists()
    net, info, token_state = read_lora(path, base)
    assert info.rank == 2 and info.tokens == [["[sks]", "^a</w>$"]] and info.pool_at == "eos"
    assert token_state["embeddings.embeddings"].abs().sum() > 0  # the token delta was trained
    assert any(w.lora_down.abs().sum() > 0 for w in net.weights)
    enc, plain = TextEncoder.from_pretrained(text_weights), TextEncoder.from_pretrained(text_weights)
    add_train_tokens(plain, info.tokens)
    load_token_state(enc, token_state, info.tokens)
    assert not torch.equal(enc.encode(["a photo of [sks]"]).hidden, plain.encode(["a photo of [sks]"]).hidden)
    assert torch.equal(enc.encode(["a cat"]).hidden, plain.encode(["a cat"]).hidden)


@pytest.mark.parametrize("policy, expected", [("official", [True, False, False]), ("on", [True] * 3),
                                               ("off", [False] * 3)])
def test_lora_stage_c_dropout_follows_the_official_script(policy, expected):
    """Official LoRA training samples after micro-batch 1 and leaves Stage C in eval mode: dropout only once."""
    from codec.training.config import load_config
    from codec.training.data import collate
    from codec.training.distributed import setup
    from codec.training.rng import BatchRandom

    ds = stored_dataset()
    cfg, section = load_config(config("unused", lora={"stage_c_dropout": policy}), "lora", LoraTask.section_model,
                               "test")
    task = LoraTask(cfg, section, setup("cpu"))
    model = task.build(ds).train()
    with torch.no_grad():
        model.stage_c.clf[1].weight.normal_()  # the official init zeroes the output layer
    batch = collate([ds[i] for i in range(2)])
    for micro, dropout in enumerate(expected):
        x0, inputs = task.inputs(batch, BatchRandom(0, micro, range(2)))
        assert model.stage_c.training is dropout and model.training
        r = torch.full((2,), 0.5)
        with torch.no_grad():
            same = torch.equal(model(x0, r, **inputs), model(x0, r, **inputs))
        assert same is not dropout  # dropout on: two forward passes differ


@pytest.mark.parametrize("effnet_from", ["stored", "pixels"])
def test_stage_b_recipe_runs(tmp_path, text_weights, effnet_from):
    g = torch.Generator().manual_seed(0)
    items = [{"stage_a": torch.randn(4, 16, 16, generator=g), "latent": torch.randn(16, 2, 2, generator=g),
              "caption": "x"} for _ in range(4)]
    cfg = config(tmp_path, max_steps=2, grad_accum_steps=1, batch_size=2, weights=str(text_weights),
                 stage_b={"effnet_from": effnet_from}, preview={"every": 2, "n": 2, "steps": 2})
    train(StageBTask, cfg, dataset=ListDataset(items), echo=None)
    assert len(read_log(tmp_path)) == 2 and (tmp_path / "previews/step_0000002.png").exists()


@pytest.mark.parametrize("task", ["stage-c", "lora", "stage-b", "controlnet"])
def test_example_configs_are_valid(task):
    """The annotated example configs next to each task's code (codec.training's, codec.generation's) load."""
    from pathlib import Path

    import codec.generation.training
    import codec.training
    from codec.training.config import load_config, read_yaml

    name = "controlnet_canny" if task == "controlnet" else task.replace("-", "_")
    package = codec.training if task in TASKS else codec.generation.training
    path = Path(package.__file__).parent / "examples" / f"{name}.yaml"
    cls = task_class(task, ALL_TASKS)
    cfg, section = load_config(read_yaml(path), cls.section, cls.section_model, str(path))
    assert cfg.max_steps == 10000 and (section is None) == (cls.section is None)


class _PidDataset(torch.utils.data.Dataset):
    """Items that say which process loaded them (one bucket)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import os

        return {"i": i, "pid": os.getpid()}

    def bucket_indices(self):
        import numpy as np

        return {"all": np.arange(4)}


def test_one_loader_serves_every_epoch_and_resumes_mid_epoch():
    """The data stream crosses epochs with the same worker process (workers used to restart every epoch: with a
    small set at a large batch, every update), in the order of epoch_batches, from any (epoch, batch)."""
    from codec.training.data import epoch_batches, stream
    from codec.training.distributed import Dist

    d = Dist(0, 1, 0, torch.device("cpu"))
    got = []
    for epoch, index, last, batch in stream(_PidDataset(), 2, 0, True, 0, 0, d, num_workers=1):
        got.append((epoch, index, last, batch["i"], batch["pid"]))
        if len(got) == 7:
            break
    expected = [(e, i, i == 1, b) for e in range(4) for i, b in enumerate(epoch_batches(_PidDataset(), 2, 0, e))][:7]
    assert [g[:4] for g in got] == expected
    assert len({pid for g in got for pid in g[4]}) == 1  # one worker for all the epochs
    resumed = [(e, i, b["i"]) for (e, i, _, b), _ in zip(stream(_PidDataset(), 2, 0, True, 1, 1, d), range(3))]
    assert resumed == [(e, i, b) for e, i, _, b in expected[3:6]]
