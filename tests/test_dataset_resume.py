"""Resume after kill -9 (after a commit, between writing a unit and committing it, and at named phases of planning
and finalising; each kill lands exactly there through the store's hook), and 2-process torchrun writes, compared
bitwise with clean single runs."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datasets_tools import LatentDataset, LatentStore
from test_dataset_helpers import make_folder

# Every case runs 3–4 encoding jobs in subprocesses (25–100 s each here); test_dataset_buckets.py resumes a
# half-created bucket in the fast run.
pytestmark = pytest.mark.slow

FIELDS = ("latent", "clip_text_pooled", "clip_text", "stage_a")
TORCHRUN = Path(sys.executable).parent / "torchrun"
WORKER = Path(__file__).resolve().parent / "encode_killed_worker.py"


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).parents[1]), **extra}


def _args(src, out, weights, extras=()):
    return [str(src), str(out), "-w", str(weights), "--size", "64", "--batch-size", "2", "--workers", "1",
            "--shard-size", "3", "--no-progress", *map(str, extras)]


def _command(*args):
    return [sys.executable, "-m", "codec.cli", "encode-dataset", *_args(*args)]


def _contents(out, fields=("latent",)):
    ds = LatentDataset(out, fields=fields)
    return {ds.ids[i]: ([ds[i][f].numpy() for f in fields], ds[i]["caption"], ds[i]["crop_box"])
            for i in range(len(ds))}


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert [x.tobytes() for x in a[k][0]] == [x.tobytes() for x in b[k][0]], k  # bitwise, every field
        assert a[k][1:] == b[k][1:]


def _assert_store_equals_clean(out, clean, fields=("latent",)):
    _assert_same(_contents(out, fields), _contents(clean, fields))
    done, ref = LatentStore.open(out), LatentStore.open(clean)
    assert done.table("errors") == ref.table("errors") and done.table("warnings") == ref.table("warnings")
    assert done.attrs["complete"] and done.attrs["count"] == ref.attrs["count"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_weights, tiny_text_encoder):
    """The source folder and a function giving the store of a clean, uninterrupted run (made once per option set)."""
    root = tmp_path_factory.mktemp("resume")
    make_folder(root / "src", 30)
    (root / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "src" / "img_004.txt").unlink()  # no caption: the empty-caption embedding
    cleans = {}

    def clean(extras=()):
        if extras not in cleans:
            out = root / f"clean{len(cleans)}.zarr"
            subprocess.run(_command(root / "src", out, tiny_weights, extras), env=_env(), check=True,
                           capture_output=True)
            cleans[extras] = out
        return cleans[extras]

    return root / "src", clean


def _extras(name, tiny_text_encoder):
    return ("--text-encoder", tiny_text_encoder, "--stage-a") if name == "extras" else ()


def _kill_at(point, src, out, weights, flags=()):
    """Run the encoding job until its store reaches ``point`` (it blocks there, see encode_killed_worker.py), then
    kill -9 it: the kill lands at that point on any machine, however slow."""
    command = [sys.executable, str(WORKER), point, str(src), str(out), str(weights), *map(str, flags)]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # ends when the job exits without pausing
            lines.append(line)
            if line.strip() == f"paused at {point}":
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
        proc.wait()
        pytest.fail(f"the job never reached {point!r} (exit status {proc.returncode}): {''.join(lines)[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# Killed after unit 4's rows were written but before its commit (readers must not see them, the resumed job rewrites
# them); right after the first commit; and with the optional arrays.
@pytest.mark.parametrize("point,extras", [("write unit 4", "none"), ("commit unit 0", "none"),
                                          ("commit unit 2", "extras")])
def test_kill9_then_resume_equals_clean_run(corpus, tiny_weights, tiny_text_encoder, tmp_path, point, extras):
    src, clean = corpus
    flags = _extras(extras, tiny_text_encoder)
    fields = FIELDS if flags else ("latent",)
    out = tmp_path / "out.zarr"
    _kill_at(point, src, out, tiny_weights, flags)
    store = LatentStore.open(out)
    n_units = len(store.read_plan())
    unit = int(point.split()[-1])
    # units are written and committed in plan order by one process
    assert store.committed_units() == set(range(unit + 1 if point.startswith("commit") else unit))
    assert n_units == 11 and not store.attrs["complete"]
    if point.startswith("write"):  # the uncommitted unit's rows are in the arrays …
        assert any(store.strings("b64x64", "id", range(unit * 3, (unit + 1) * 3)))
    # … but readers see only committed units, never half-written rows.
    partial = _contents(out, fields)
    records = store.commit_records()
    assert len(partial) == sum(r["counts"].get("b64x64", 0) for r in records.values())
    skipped = {e[0] for r in records.values() for e in r["errors"]}
    assert set(partial) == {s.id for k in records for s in store.read_plan()[k]} - skipped
    r = subprocess.run(_command(src, out, tiny_weights, flags), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_store_equals_clean(out, clean(flags), fields)
    r = subprocess.run(_command(src, out, tiny_weights, flags), env=_env(), capture_output=True, text=True)
    assert "encoded 0, skipped 0" in r.stdout


@pytest.mark.parametrize("phase", ["plan unit 4", "capacity", "finalise index", "finalise tables"])
def test_kill9_while_planning_or_finalising(corpus, tiny_weights, tmp_path, phase):
    src, clean = corpus
    out = tmp_path / "out.zarr"
    _kill_at(phase, src, out, tiny_weights)
    store = LatentStore.open(out)
    assert not store.attrs["complete"]
    if phase.startswith("plan"):
        assert len(store.read_plan()) == 5 and store.attrs["n_units"] == 0 and not store.bucket_names()
    elif phase == "capacity":
        assert len(store.read_plan()) == 11 and store.attrs["n_units"] == 0  # arrays sized, attributes not yet
        assert store.group["b64x64"]["latents"].shape[0] == 33 and not store.committed_units()
    else:
        assert store.committed_units() == set(range(11))
        _assert_same(_contents(out), _contents(clean()))  # before finalising, readers use the commit records
    r = subprocess.run(_command(src, out, tiny_weights), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ("encoded 0," in r.stdout) == phase.startswith("finalise")
    _assert_store_equals_clean(out, clean())


@pytest.mark.skipif(shutil.which("torchrun", path=str(TORCHRUN.parent)) is None, reason="no torchrun")
@pytest.mark.parametrize("policy", [(), ("--keep-aspect",)])
def test_torchrun_two_processes_equal_one(corpus, tiny_weights, tmp_path, policy):
    src, clean = corpus
    out = tmp_path / "dist.zarr"
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "codec.cli", "encode-dataset",
                        *_args(src, out, tiny_weights, policy)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = {rec["rank"] for rec in LatentStore.open(out).commit_records().values()}
    assert ranks == {0, 1}
    if policy:  # keep-aspect: buckets are created by the ranks themselves, both meeting every size first thing
        assert sorted(LatentStore.open(out).bucket_names()) == ["b64x64", "b64x96", "b96x64"]
    _assert_store_equals_clean(out, clean(policy))
