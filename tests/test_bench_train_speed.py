"""benchmarks.train_speed runs both cases through `cascade train`'s code on the CPU (tiny LoRA model, a few real
images for the codec recipe) and reports what the training log says."""

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two short training runs and an encoding job
def test_train_speed_reports_both_tasks_from_their_logs(tmp_path, capsys):
    from benchmarks.train_speed import main

    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(sorted((ROOT / "scripts" / "samples").glob("*.jpg"))):
        with Image.open(path) as im:
            im.convert("RGB").resize((320, 320)).save(images / f"{i}.png")
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--codec-batch", "2",
                 "--images", str(images), "--workers", "0", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"codec", "lora"}
    for r in report["results"].values():
        assert r["updates"] == 3 and r["samples_per_s"] == statistics.median(r["samples_per_s_all"][1:]) > 0
    assert report["environment"]["device"] == "cpu"
    assert "| codec | 2 |" in capsys.readouterr().out
