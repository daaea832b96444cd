"""torchrun with 2 gloo CPU processes gives the loss curve and weights of 1 process with the same global batch."""

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from codec.generation.finetune.logs import read_log

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_weights):
    from datasets_tools import encode_dataset
    from test_dataset_helpers import make_folder

    root = tmp_path_factory.mktemp("ddp")
    weights = tiny_weights  # with the tiny CLIP text encoder
    make_folder(root / "src", 8)
    encode_dataset(root / "src", root / "store.zarr", weights, size=64, batch_size=4, workers=0, shard_size=4,
                   progress=False, log=lambda s: None)
    return root, weights


def run(root, weights, name, nproc, strategy):
    out = root / name
    cfg = root / f"{name}.yaml"
    cfg.write_text(f"""output_dir: {out}
weights: {weights}
data: {{store: {root / 'store.zarr'}}}
model: {{preset: tiny, dropout: 0.0}}   # dropout draws per-process random numbers
batch_size: 4
grad_accum_steps: 2
max_steps: 4
loss_weight: adaptive
log: {{every: 1}}
distributed: {{strategy: {strategy}}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29500 + hash(name) % 1000)] if nproc > 1 else [sys.executable]
    r = subprocess.run([*launcher, "-m", "codec.cli", "train", "stage-c", str(cfg)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return read_log(out), load_file(out / "checkpoint/model.safetensors")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, strategy):
    root, weights = setup
    one_log, one = run(root, weights, f"one_{strategy}", 1, strategy)
    two_log, two = run(root, weights, f"two_{strategy}", 2, strategy)
    print(f"\n{strategy} loss 1 process :", [round(r["loss"], 6) for r in one_log])
    print(f"{strategy} loss 2 processes:", [round(r["loss"], 6) for r in two_log])
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{strategy} max |weight difference| after 4 updates: {diff:.3g}")
    assert [r["step"] for r in one_log] == [r["step"] for r in two_log] == [1, 2, 3, 4]
    for a, b in zip(one_log, two_log):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert one.keys() == two.keys()
    assert diff < 1e-5
    assert (one["clf.1.weight"] != 0).any()  # it trained (the head starts at zero)
