"""torchrun with 2 gloo CPU processes: the loss curve and weights of 1 process with the same global batch
(Stage C under DDP and FSDP, ControlNet under DDP), and a 2-process run killed mid-way that resumes to the
weights of an uninterrupted one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from codec.training.logs import read_log

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_weights):
    from test_dataset_helpers import make_folder

    from datasets_tools import encode_dataset

    root = tmp_path_factory.mktemp("ddp")
    make_folder(root / "src", 8)
    encode_dataset(root / "src", root / "store.zarr", tiny_weights, size=64, batch_size=4, workers=0, shard_size=4,
                   progress=False, log=lambda s: None)
    return root / "store.zarr"


def stage_c_config(out: Path, weights: Path, store: Path, strategy: str, **over) -> dict:
    cfg = {"output_dir": str(out), "weights": str(weights), "data": {"store": str(store)},
           "model": {"preset": "tiny", "dropout": 0.0},  # dropout draws per-process random numbers
           "batch_size": 4, "grad_accum_steps": 2, "max_steps": 4, "loss_weight": "adaptive",
           "log": {"every": 1}, "distributed": {"strategy": strategy}}
    cfg.update(over)
    return cfg


def launch(task: str, cfg: dict, nproc: int, script: list[str] | None = None, check: bool = True
           ) -> subprocess.CompletedProcess:
    """Run ``cascade train TASK`` (or ``script[0] TASK CONFIG *script[1:]``) on ``cfg`` in ``nproc`` processes
    (``torchrun`` when more than one)."""
    path = Path(cfg["output_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    # --standalone: a c10d rendezvous on localhost whose port the OS picks (no fixed or guessed port to collide on)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(nproc)] if nproc > 1 else [sys.executable]
    args = [script[0], task, str(path), *script[1:]] if script else ["-m", "codec.cli", "train", task, str(path)]
    r = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def result(cfg: dict) -> tuple[list[dict], dict]:
    out = Path(cfg["output_dir"])
    return read_log(out), load_file(out / "checkpoint/model.safetensors")


def assert_same_run(one: tuple[list[dict], dict], two: tuple[list[dict], dict], label: str, steps: int) -> None:
    (one_log, a), (two_log, b) = one, two
    print(f"\n{label} loss 1 process :", [round(r["loss"], 6) for r in one_log])
    print(f"{label} loss 2 processes:", [round(r["loss"], 6) for r in two_log])
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{label} max |weight difference| after {steps} updates: {diff:.3g}")
    assert [r["step"] for r in one_log] == [r["step"] for r in two_log] == list(range(1, steps + 1))
    for x, y in zip(one_log, two_log):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"])
    assert a.keys() == b.keys()
    assert diff < 1e-5


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two(request, tmp_path_factory, tiny_weights, store) -> tuple[str, dict]:
    """An uninterrupted 2-process Stage C run (4 updates, checkpoints every 2) under each strategy."""
    strategy = request.param
    cfg = stage_c_config(tmp_path_factory.mktemp(f"two_{strategy}") / "run", tiny_weights, store, strategy,
                         checkpoint={"save_every": 2})
    launch("stage-c", cfg, 2)
    return strategy, cfg


def test_two_processes_match_one(tmp_path, tiny_weights, store, two):
    strategy, two_cfg = two
    one = stage_c_config(tmp_path / "one", tiny_weights, store, strategy, checkpoint={"save_every": 2})
    launch("stage-c", one, 1)
    assert_same_run(result(one), result(two_cfg), strategy, 4)
    assert (result(one)[1]["clf.1.weight"] != 0).any()  # it trained (the head starts at zero)


def test_killed_two_process_run_resumes_to_the_same_weights(tmp_path, two):
    """Rank 0 is SIGKILLed right after update 3 (last checkpoint: update 2); ``torchrun`` stops rank 1; the
    same command started again continues from update 2 and ends where an uninterrupted run ends."""
    strategy, whole = two
    killed = {**whole, "output_dir": str(tmp_path / "killed")}
    r = launch("stage-c", killed, 2, script=[str(TESTS / "train_killed_worker.py"), "3"], check=False)
    assert r.returncode != 0 and r.returncode != 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert [x["step"] for x in read_log(Path(killed["output_dir"]))] == [1, 2, 3], r.stderr[-3000:]
    assert load_file(Path(killed["output_dir"]) / "checkpoint/model.safetensors")  # the update-2 checkpoint
    launch("stage-c", killed, 2)
    (whole_log, a), (killed_log, b) = result(whole), result(killed)
    assert [x["step"] for x in killed_log] == [1, 2, 3, 4]  # the killed run's update 3 was replaced
    assert [x["loss"] for x in whole_log] == [x["loss"] for x in killed_log]
    assert a.keys() == b.keys()
    unequal = [k for k in a if not a[k].equal(b[k])]
    print(f"\n{strategy} killed at 3, resumed: losses {[round(x['loss'], 6) for x in killed_log]}; "
          f"tensors not bit-identical: {len(unequal)} of {len(a)}")
    assert not unequal


def test_controlnet_two_processes_match_one(tmp_path, cnet_run_files):
    """ControlNet training under DDP: latents, canny hints and CLIP features computed in each process from its
    share of the images; the same losses and weights as one process with the same global batch."""
    from test_controlnet_training import cnet_config

    over = {"batch_size": 4, "grad_accum_steps": 2, "max_steps": 3, "distributed": {"strategy": "ddp"},
            "conditions": {"caption_dropout": 0.0, "image_embed_p": 0.0}}
    # Stage C's dropout (on while training, the official quirk) draws per-process random numbers
    over["controlnet"] = {**cnet_config("", cnet_run_files)["controlnet"], "stage_c_dropout": False}
    one = cnet_config(tmp_path / "one", cnet_run_files, **over)
    two = cnet_config(tmp_path / "two", cnet_run_files, **over)
    launch("controlnet", one, 1)
    launch("controlnet", two, 2)
    assert_same_run(result(one), result(two), "controlnet ddp", 3)
