"""Resume after kill -9, and a 2-process torchrun write, compared bitwise with clean single runs."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datasets_tools import LatentDataset, LatentStore
from test_dataset_helpers import make_folder



def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def _args(src, out, weights):
    return [str(src), str(out), "-w", str(weights), "--size", "64", "--batch-size", "2", "--workers", "1",
            "--shard-size", "3", "--no-progress"]


def _contents(out):
    ds = LatentDataset(out)
    return {ds.ids[i]: (ds[i]["latent"].numpy(), ds[i]["caption"], ds[i]["crop_box"]) for i in range(len(ds))}


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][0].tobytes() == b[k][0].tobytes(), k  # bitwise
        assert a[k][1:] == b[k][1:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("resume")
    make_folder(root / "src", 30)
    (root / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    clean = root / "clean.zarr"
    subprocess.run([sys.executable, "-m", "codec.cli", "encode-dataset", *_args(root / "src", clean, tiny_weights)],
                   env=_env(), check=True, capture_output=True)
    return root, clean


@pytest.mark.parametrize("delay", [0.0, 0.7])
def test_kill9_then_resume_equals_clean_run(corpus, tiny_weights, tmp_path, delay):
    root, clean = corpus
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "codec.cli", "encode-dataset", *_args(root / "src", out, tiny_weights)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "commits" / "unit_000000.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = LatentStore.open(out)
    n_units = len(store.read_plan())
    done = store.committed_units()
    assert 1 <= len(done) < n_units, "the job finished before it was killed; the test proved nothing"
    assert not store.attrs["complete"]
    # Readers see only committed units, never half-written rows.
    partial = _contents(out)
    assert len(partial) == sum(r["counts"].get("b64x64", 0) for r in store.commit_records().values())
    r = subprocess.run([sys.executable, "-m", "codec.cli", "encode-dataset", *_args(root / "src", out, tiny_weights)], env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same(_contents(out), _contents(clean))
    assert LatentStore.open(out).table("errors") == LatentStore.open(clean).table("errors")
    r = subprocess.run([sys.executable, "-m", "codec.cli", "encode-dataset", *_args(root / "src", out, tiny_weights)], env=_env(),
                       capture_output=True, text=True)
    assert "encoded 0, skipped 0" in r.stdout


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_two_processes_equal_one(corpus, tiny_weights, tmp_path):
    root, clean = corpus
    out = tmp_path / "dist.zarr"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "codec.cli", "encode-dataset",
                        *_args(root / "src", out, tiny_weights)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = {rec["rank"] for rec in LatentStore.open(out).commit_records().values()}
    assert ranks == {0, 1}
    _assert_same(_contents(out), _contents(clean))
    assert LatentStore.open(out).attrs["complete"]
