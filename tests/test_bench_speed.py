"""benchmarks.speed and benchmarks.throughput: their options, the rows a run is made of, the parity verdicts and the
table; the whole-decode check of ours against diffusers' decoder pipeline (slow). Correctness only, never timings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import speed, throughput
from benchmarks.peak import model_flops


def keys(case):
    return [im.key for im in case.impls]


def test_decode_is_asked_for_by_name_and_the_device_is_resolved():
    args = speed.parse_args([])
    assert args.tasks == list(speed.DEFAULT_TASKS) and "decode" not in args.tasks
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    assert speed.parse_args(["--tasks", "all"]).tasks == list(speed.ALL_TASKS)
    assert speed.parse_args(["--device", "cpu", "--tasks", "decode"]).device == "cpu"


def test_options_that_cannot_work_are_refused(capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "gpu"])
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            speed.parse_args(["--device", "cuda"])
    # 300 px: a 8² latent, which ours decodes at Stage A side 76 and diffusers at int(8·10.67) = 85
    with pytest.raises(SystemExit):
        speed.parse_args(["--tasks", "decode", "--decode-size", "300"])
    assert "pick a size where they agree" in capsys.readouterr().err
    assert speed.decode_sides(1024) == (24, 256, 256) and speed.decode_sides(512) == (12, 128, 128)


def test_a_run_is_made_of_the_rows_asked_for():
    cases = speed.build_cases(speed.parse_args(["--device", "cpu", "--tasks", "stage_b,decode", "--compile"]))
    stage_b, decode = cases
    assert keys(stage_b) == ["ours", "diffusers", "ours_compiled"]
    assert [im.compile for im in stage_b.impls] == [False, False, True]
    auto = speed.resolved_dtype("auto", "cpu")
    assert decode.dtype == auto and decode.size == 1024 and decode.check_size == 256 and decode.warmup  # --compile
    assert keys(decode)[:4] == ["ours", "diffusers", "diffusers_bf16", "ours_compiled"]
    assert [(im.dtype, im.timed) for im in decode.impls[:3]] == [("auto", True), ("fp32", True), ("bf16", True)]
    # where ours' default is not fp32, an fp32 twin of ours is the reference of the check run, untimed
    assert (keys(decode)[4:] == ["ours_fp32"]) == (auto != "fp32")
    plain = speed.build_cases(speed.parse_args(["--device", "cpu", "--tasks", "decode"]))[0]
    assert "ours_compiled" not in keys(plain) and not plain.warmup


def test_decode_flops_are_its_steps_of_cfg_stage_b_plus_stage_a():
    assert model_flops("decode", 512, 1, steps=3) == 3 * model_flops("stage_b", 512, 2) + model_flops("stage_a", 512, 1)


def outputs(**noise):
    base = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {k: base + v * torch.randn(base.shape, generator=torch.Generator().manual_seed(i))
            for i, (k, v) in enumerate(noise.items())}


def test_decode_parity_checks_ours_in_fp32_and_our_bf16_but_only_reports_diffusers_bf16():
    args = speed.parse_args(["--device", "cpu", "--tasks", "decode", "--compile"])
    case = speed.decode_case(args)
    impls = [im.key for im in case.impls]
    good = outputs(ours=0.01, diffusers=0.0, diffusers_bf16=0.5, ours_compiled=0.01, ours_fp32=0.0)
    good = {k: v for k, v in good.items() if k in impls}
    good["ours_compiled"] = good["ours"].clone()
    p = speed.case_parity(case, good, args, {})
    assert p["pass"], p
    assert p["rel_l2"] < 1e-6 or p["ours"] == "ours"  # ours_fp32 (or ours itself when fp32) vs diffusers fp32
    if "ours_fp32" in impls:
        assert not p["vs_fp32"]["diffusers_bf16"]["ok"] and p["vs_fp32"]["ours"]["ok"]
    bad = dict(good, diffusers=good["diffusers"] + 0.2)
    assert not speed.case_parity(case, bad, args, {})["pass"]
    off = dict(good, ours_compiled=good["ours"] + 0.5)  # a compiled graph that computes something else
    p = speed.case_parity(case, off, args, {})
    assert not p["pass"] and not p["compiled_vs_eager"]["ours_compiled"]["ok"]


def fake_result(task="decode", device="cpu"):
    impl = {"timed": True, "median_s": 10.0, "min_s": 9.0, "max_s": 11.0, "median_cpu_s": 19.0, "gflops": 5.0,
            "fraction_of_peak": 0.1, "peak_rss": 3 * 2**30, "peak_device_memory": 2**30, "warmup_s": 12.0}
    return {
        "task": task, "dtype": "bf16", "size": 1024, "batch": 1, "input": "1×16×24² → 1024², 10 steps, CFG 1.1",
        "status": "ok", "loadavg_at_start": (0.5, 0.5, 0.5), "check_size": 256, "steps": 10, "device": device,
        "impls": {"ours": {**impl, "label": "ours Codec.decode bf16"},
                  "diffusers": {**impl, "label": "diffusers DecoderPipeline fp32", "median_s": 20.0},
                  "diffusers_bf16": {**impl, "label": "diffusers DecoderPipeline bf16", "median_s": 15.0},
                  "ours_compiled": {**impl, "label": "ours Codec.decode + compile bf16", "median_s": 5.0},
                  "ours_fp32": {"label": "ours Codec.decode fp32", "timed": False, "times_s": []}},
        "ratio_ours_over_diffusers": 0.5, "ratios": {"diffusers": 0.5, "diffusers_bf16": 10 / 15, "ours_compiled": 2.0},
        "parity": {"vs": "diffusers", "ours": "ours_fp32", "rel_l2": 1e-4, "rel_max": 1e-3, "pass": True,
                   "tolerance_rel_l2": 0.02,
                   "vs_fp32": {"ours": {"rel_l2": 1e-2, "ok": True}, "diffusers_bf16": {"rel_l2": 0.4, "ok": False}},
                   "compiled_vs_eager": {"ours_compiled": {"rel_l2": 1e-3, "ok": True}}},
        "compile": {"ours_compiled": {"first_call_s": 300.0, "eager_first_call_s": 12.0, "more_warmups": 0,
                                      "warm_median_s": 5.0, "eager_warm_median_s": 10.0, "warm_speedup": 2.0}},
    }


def fake_env(device="cpu"):
    return {"torch": "2.x", "diffusers": "0.x", "threads": 2, "device": device, "device_name": "A GPU",
            "device_auto_precision": "bf16: CUDA", "peak_gflops": {"bf16": 200.0, "fp32": 80.0},
            "cpu": {"model": "A CPU", "torch_cpu_capability": "AVX512", "auto_precision": "bf16: CPU has AVX512_BF16",
                    "native_bf16": True}}


def test_the_table_shows_every_timed_row_with_its_ratio_and_notes_the_decode_and_compile_figures():
    text = speed.format_table([fake_result()], fake_env())
    rows = [line for line in text.splitlines() if ("DecoderPipeline" in line or "Codec.decode" in line)
            and not line.startswith("*")]
    assert len(rows) == 4  # the check-only fp32 twin is not a table row
    assert " 0.67 " in rows[2]  # ours / diffusers bf16 on the third row
    assert "fp32 rel_l2 1.0e-04 PASS" in text and "diffusers_bf16 4.0e-01 HIGH" in text
    assert "0.1000 images/s" in text and "0.0500 images/s" in text  # 1 image / 10 s and / 20 s
    assert "guidance_scale=0.0" in text  # diffusers' own default, next to the official settings used
    assert "first call 300.0 s" in text and "2.00×" in text and "peak RSS" in text
    assert "at least the 1.2×" in text
    gpu = speed.format_table([fake_result(device="cuda")], fake_env("cuda"))
    assert "peak GPU" in gpu and "A GPU" in gpu and "1.00 GB" in gpu


def test_throughput_options_and_table():
    args = throughput.parse_args(["--models", "mini", "--device", "cpu", "--decode-batches", "1,4"])
    assert args.models == ["mini"] and args.decode_batches == [1, 4] and args.device == "cpu"
    with pytest.raises(SystemExit):
        throughput.parse_args(["--models", "huge"])
    rows = [{"model": "mini", "command": "encode-dataset", "compile": False, "size": 256, "encoder_input": 192,
             "batch": 8, "images": 4, "seconds": 2.0, "images_per_s": 2.0},
            {"model": "mini", "command": "decode-dataset", "compile": True, "size": 256, "batch": 4, "images": 2,
             "seconds": 4.0, "images_per_s": 0.5, "load_s": 0.3, "precision": "bf16: CPU has AVX512_BF16",
             "sampler": "1 ddim step(s), no CFG"}]
    env = {"torch": "2.x", "threads": 2, "device": "cpu", "cpu": fake_env()["cpu"]}
    text = throughput.format_table(rows, env)
    assert "fp32 (only; auto = fp32)" in text and "bf16 +compile" in text and "0.500" in text


def test_throughput_runs_the_commands_on_the_mini_codec(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    out = tmp_path / "t.json"
    assert throughput.main(["--models", "mini", "--images", str(photos), "--n", "2", "--decode-n", "1",
                            "--decode-batches", "1", "--workers", "0", "--device", "cpu", "-o", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["command"], r["images"]) for r in rows] == [("encode-dataset", 2), ("decode-dataset", 1)]


@pytest.mark.slow
def test_whole_decode_of_ours_and_diffusers_pipeline_agree_in_fp32_on_the_check_run():
    # both full-size lite models in this process (~6 GB); a 128² decode of 2 steps
    spec = dict(task="decode", dtype="fp32", seed=0, threads=2, decode_steps=2)
    inp = speed.make_inputs("decode", 128, 1, 0)
    inp["size"] = 128
    with torch.inference_mode():
        ours = speed.build_runner(speed.WorkerSpec(impl="ours", **spec))(inp, check=True)
        theirs = speed.build_runner(speed.WorkerSpec(impl="diffusers", **spec))(inp, check=True)
    assert ours.shape == theirs.shape == (1, 3, 128, 128)
    assert speed.rel_errors(ours, theirs)["rel_l2"] < 1e-3
