"""Ctrl-C stops `cascade encode-dataset` and `cascade train` at every moment, DataLoader worker start-up included,
with one sentence, no traceback and a non-zero status; the same command then resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from codec.interrupts import check_interrupted, handle_interrupts, ignore_interrupts, start_workers

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "interrupt_worker.py"
MESSAGE = "interrupted; run the same command again to continue where it stopped"
PROMPT_S = 20  # from the Ctrl-C to the exit; DataLoader workers take up to a few seconds to be shut down


class _WorkerSignals(torch.utils.data.Dataset):
    """Each item says how the worker process that made it treats SIGINT."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[bool, bool]:
        blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        return signal.getsignal(signal.SIGINT) == signal.SIG_IGN, blocked


def test_workers_ignore_ctrl_c_and_a_lost_interrupt_is_raised_again():
    loader = torch.utils.data.DataLoader(_WorkerSignals(), batch_size=None, num_workers=2,
                                         worker_init_fn=ignore_interrupts)
    before = signal.getsignal(signal.SIGINT)
    with handle_interrupts():
        assert [tuple(x) for x in start_workers(loader)] == [(True, False)] * 4  # ignored, not left blocked
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # this thread: unblocked again
        check_interrupted()  # no Ctrl-C yet: nothing happens
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        try:  # a KeyboardInterrupt that something swallowed …
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt):  # … is raised again at the next check
            check_interrupted()
    assert signal.getsignal(signal.SIGINT) is before
    check_interrupted()  # outside handle_interrupts: Python's own behaviour, nothing remembered


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}


def interrupted(args: list[str], moment: str | float) -> str:
    """Run ``cascade ARGS`` in its own process group, press Ctrl-C at ``moment`` (seconds after the start, or a
    point named in tests/interrupt_worker.py) and check how it ends; returns its output."""
    head = [sys.executable, "-m", "codec.cli"] if isinstance(moment, float) else [sys.executable, str(WORKER), moment]
    proc = subprocess.Popen([*head, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    if isinstance(moment, float):
        time.sleep(moment)
        pressed = time.time()
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ended = time.time()
    if not isinstance(moment, float):
        times = re.findall(r"ctrl-c at ([0-9.]+)", out)
        assert times, f"the Ctrl-C at {moment} never came: {out[-2000:]}"
        pressed = float(times[0])
    label = f"Ctrl-C at {moment}"
    assert proc.returncode != 0, f"{label}: the job went on to the end:\n{out[-3000:]}"
    # CPython itself ends the process by SIGINT after the message (status -2, 130 in a shell) when the Ctrl-C
    # landed in code run by exec() (dataclass creation while torch imports): non-zero either way.
    assert proc.returncode in (1, -signal.SIGINT), f"{label}: status {proc.returncode}:\n{out[-3000:]}"
    assert MESSAGE in out, f"{label}:\n{out[-3000:]}"
    assert "Traceback" not in out and "Exception ignored" not in out, f"{label}:\n{out[-3000:]}"
    assert ended - pressed < PROMPT_S, f"{label}: took {ended - pressed:.1f} s to stop"
    return out


def finished(args: list[str]) -> str:
    r = subprocess.run([sys.executable, "-m", "codec.cli", *args], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r.stdout + r.stderr


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


MOMENTS = [0.5, "worker-start", "swallowed-start", "swallowed-batch-1", "batch-3"]


@pytest.mark.slow
def test_ctrl_c_stops_encode_dataset_at_every_moment_and_it_resumes(tmp_path):
    src = _images(tmp_path / "src", 12)
    store = tmp_path / "s.zarr"
    args = ["encode-dataset", str(src), str(store), "--model", "mini", "--size", "64", "--workers", "2",
            "--batch-size", "2", "--shard-size", "2", "--no-progress"]
    for moment in MOMENTS:
        interrupted(args, moment)
    out = finished(args)
    assert "store: 12 samples" in out and "complete=True" in out, out
    encoded = int(re.search(r"encoded (\d+)", out).group(1))
    assert encoded < 12, out  # what the interrupted runs committed was not encoded again
    from datasets_tools import LatentStore

    assert LatentStore.open(store).attrs["complete"]


@pytest.mark.slow
def test_ctrl_c_stops_train_at_every_moment_and_it_resumes(tmp_path):
    images = _images(tmp_path / "images", 8)
    cfg = {"output_dir": str(tmp_path / "run"), "data": {"images": str(images), "image_size": 64, "num_workers": 2},
           "batch_size": 2, "max_steps": 6, "model": {"preset": "tiny"}, "mixed_precision": "no",
           "log": {"every": 1}, "optim": {"lr": 3e-3, "warmup_updates": 0}, "checkpoint": {"save_every": 2},
           "stage_a": {"crop": 32}}
    config = tmp_path / "stage_a.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["train", "stage-a", str(config)]
    for moment in MOMENTS:
        interrupted(args, moment)
    out = finished(args)
    assert "resuming at update 2" in out and "done: 6 updates" in out, out
