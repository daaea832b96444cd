"""Speed and memory of cascade-codec next to 🤗 diffusers / the plain reference, same random weights.

Run ``python -m benchmarks.speed --help`` for the options. What is timed:

* ``effnet``  — EfficientNetV2-S encoder on 768² RGB, batch 1 and 8. *ours* = the module as
  ``Codec._encode_batch`` runs it (channels_last model and input, fp32); *reference* = the
  same module in default NCHW eager fp32, as the official code runs it. diffusers has no
  EfficientNet encoder, so there is no diffusers column.
* ``stage_a`` — Stage A decode of a 4×256×256 latent to 1024². *ours* = ``StageA().decode`` as
  the codec ships it (fp32; NCHW in and out, channels_last inside); *diffusers* = ``PaellaVQModel(scale_factor=0.43)`` with our
  weights under diffusers' key names, called as its pipeline does:
  ``decode(latents * scale_factor, force_not_quantize=True)``.
* ``stage_b`` — one Stage B lite denoiser evaluation at 1024² output (latent 4×256×256,
  effnet 16×24×24, pooled CLIP 1×1×1280, batch 1). *ours* = ``create_model('stage_b_lite')``;
  *diffusers* = ``StableCascadeUNet`` with the decoder-lite config (the one diffusers'
  ``scripts/convert_stable_cascade_lite.py`` writes) and our weights under diffusers' key
  names, both from :mod:`codec.layouts` (whose mapping the tests check against diffusers).
* ``stage_c`` — one Stage C lite denoiser evaluation at 1024² output (latent 16×24×24, CLIP
  text 77×1280, pooled 1×1280, CLIP image 1×768, batch 1). *ours* =
  ``create_model('stage_c_lite')``; *diffusers* = ``StableCascadeUNet`` with the
  prior-lite config and our weights under diffusers' key names, as for Stage B.

Each (case, implementation) runs in its own spawned process, so its peak RSS
(``VmHWM`` of that process, :func:`benchmarks.rss.peak_rss_bytes`) is its own: ``ru_maxrss``
would carry the parent's peak over across fork+exec. Both processes of a case stay alive and
the parent drives them alternately (warm-up A, warm-up B, run A, run B, ...), so machine
noise hits both. The warm-up outputs are compared before anything is timed; a case whose
outputs differ beyond ``--tolerance`` is not timed (the key mapping would be wrong) and the
run exits with status 1. With ``--bf16``, Stages A, B and C also run in bf16 and each
implementation's output is compared with the fp32 output of the same weights.

Weights are random but identical for both implementations: every tensor is drawn, in
state-dict order, from one seeded generator (PyTorch-default-like scales; the parameters
that are zero-initialised by default — GRN gamma/beta, Stage A gammas, biases — get small
random values so the comparison exercises them). The EfficientNet is built with
torchvision's own initialisation under a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from codec.layouts.official import OFFICIAL_STAGE_A_SCALE
from codec.presets import create_model

from .environment import environment_record
from .peak import gemm_peak_gflops, model_flops
from .rss import current_rss_bytes, peak_rss_bytes

ALL_TASKS = ("effnet", "stage_a", "stage_b", "stage_c")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "speed.json"

IMPL_LABELS = {
    ("effnet", "ours"): "ours (channels_last)",
    ("effnet", "reference"): "reference (NCHW eager)",
    ("stage_a", "ours"): "ours StageA.decode",
    ("stage_a", "diffusers"): "diffusers PaellaVQModel",
    ("stage_b", "ours"): "ours StageB lite",
    ("stage_b", "diffusers"): "diffusers StableCascadeUNet",
    ("stage_c", "ours"): "ours StageC lite",
    ("stage_c", "diffusers"): "diffusers StableCascadeUNet",
}

STAGE_A_SCALE = OFFICIAL_STAGE_A_SCALE  # diffusers' vqgan config has 0.3764 (the Würstchen v2 VQGAN)


# --------------------------------------------------------------------------------------------
# Random weights, identical for every implementation
# --------------------------------------------------------------------------------------------
def random_state_dict(meta_module: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Draw every entry of ``meta_module``'s state dict from one generator seeded with ``seed``.

    Values are drawn in fp32 and then cast, so a bf16 model holds the fp32 weights rounded.
    Matrices/kernels: U(±1/sqrt(fan_in)) (PyTorch's default scale); BatchNorm running_var:
    U(0.5, 1.5); everything else (biases, GRN gamma/beta, Stage A gammas, running_mean):
    N(0, 0.05²).
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, ref in meta_module.state_dict().items():
        if not ref.is_floating_point():
            out[name] = torch.zeros(ref.shape, dtype=ref.dtype)
            continue
        v = torch.empty(ref.shape, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            v.uniform_(0.5, 1.5, generator=g)
        elif ref.ndim >= 2 and leaf not in ("gamma", "beta"):
            fan_in = ref.shape[1] * math.prod(ref.shape[2:])
            bound = 1.0 / math.sqrt(fan_in)
            v.uniform_(-bound, bound, generator=g)
        else:
            v.normal_(0.0, 0.05, generator=g)
        out[name] = v if dtype == torch.float32 else v.to(dtype)
    return out


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


# --------------------------------------------------------------------------------------------
# What a worker builds and runs
# --------------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    task: str
    impl: str
    dtype: str  # "fp32" | "bf16"
    seed: int
    threads: int


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def make_inputs(task: str, size: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic fp32 inputs. ``size`` is the image side (effnet input / decoded output).

    Stage B's and Stage C's noise ratio is 0.7, a value bf16 cannot hold exactly (what a real sampler meets).
    """
    g = torch.Generator().manual_seed(seed + 1000)
    if task == "effnet":
        return {"images": torch.rand(batch, 3, size, size, generator=g)}
    if task == "stage_a":
        return {"latent": torch.randn(batch, 4, size // 4, size // 4, generator=g)}
    if task == "stage_b":
        return {
            "x": torch.randn(batch, 4, size // 4, size // 4, generator=g),
            "r": torch.full((batch,), 0.7),
            "effnet": torch.randn(batch, 16, 24, 24, generator=g),
            "clip": torch.randn(batch, 1, 1280, generator=g),
        }
    if task == "stage_c":
        side = stage_c_side(size)
        return {
            "x": torch.randn(batch, 16, side, side, generator=g),
            "r": torch.full((batch,), 0.7),
            "clip_text": torch.randn(batch, 77, 1280, generator=g),
            "clip_text_pooled": torch.randn(batch, 1, 1280, generator=g),
            "clip_img": torch.randn(batch, 1, 768, generator=g),
        }
    raise ValueError(task)


def stage_c_side(size: int) -> int:
    """Stage C latent side for an output side, as the generation pipeline computes it (1024 → 24)."""
    from codec.generation.pipeline import stage_c_latent_size

    return stage_c_latent_size(size, size)[0]


def build_runner(spec: WorkerSpec) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Build the model of ``spec`` and return ``run(inputs) -> output`` (the timed call)."""
    dtype = _dtype(spec.dtype)
    if spec.task == "effnet":
        from codec.effnet import EfficientNetEncoder

        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            model = EfficientNetEncoder().eval()
        if spec.impl == "ours":
            model = model.to(memory_format=torch.channels_last)

            def run(inp):  # as Codec._encode_batch
                x = inp["images"].contiguous(memory_format=torch.channels_last)
                return model.encode(x).float().contiguous()
        elif spec.impl == "reference":
            def run(inp):
                return model.encode(inp["images"])
        else:
            raise ValueError(spec.impl)
        return run

    if spec.task == "stage_a":
        from codec.stage_a import StageA

        with torch.device("meta"):
            meta = StageA(scale_factor=STAGE_A_SCALE)
        sd = random_state_dict(meta, spec.seed, dtype)
        if spec.impl == "ours":
            model = meta
            model.load_state_dict(sd, strict=True, assign=True)
            model.eval()

            def run(inp):
                return model.decode(inp["latent"].to(dtype))
        elif spec.impl == "diffusers":
            from codec.layouts import diffusers as diffusers_layout

            with torch.device("meta"):
                model = diffusers_layout.diffusers_model("stage_a", meta.config)
            model.load_state_dict(diffusers_layout.state_dict_to_diffusers(sd, "stage_a"), strict=True, assign=True)
            model.eval()
            scale = model.config.scale_factor

            def run(inp):  # as the diffusers decoder pipeline calls it
                return model.decode(inp["latent"].to(dtype) * scale, force_not_quantize=True).sample
        else:
            raise ValueError(spec.impl)
        del sd
        return run

    if spec.task in ("stage_b", "stage_c"):
        return _denoiser_runner(spec, dtype)
    raise ValueError(spec.task)


def _denoiser_runner(spec: WorkerSpec, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """One evaluation of the lite Stage B or Stage C denoiser: ours, or diffusers' ``StableCascadeUNet`` with the
    same weights under its key names (:mod:`codec.layouts`)."""
    from codec.layouts import diffusers as diffusers_layout

    kind = spec.task
    with torch.device("meta"):
        meta = create_model(f"{kind}_lite")
    sd = random_state_dict(meta, spec.seed, dtype)
    if spec.impl == "ours":
        model = meta
        model.load_state_dict(sd, strict=True, assign=True)
        model.eval()
        conds = ("effnet", "clip") if kind == "stage_b" else ("clip_text", "clip_text_pooled", "clip_img")

        def run(inp):  # as codec.diffusion.sample calls it: fp32 inputs, autocast inside for bf16
            return model(inp["x"], inp["r"], *(inp[c] for c in conds))
    elif spec.impl == "diffusers":
        with torch.device("meta"):
            model = diffusers_layout.diffusers_model(kind, asdict(meta.config))
        model.load_state_dict(diffusers_layout.state_dict_to_diffusers(sd, kind), strict=True, assign=True)
        model.eval()
        names = {"effnet": "effnet", "clip": "clip_text_pooled"} if kind == "stage_b" else \
            {"clip_text": "clip_text", "clip_text_pooled": "clip_text_pooled", "clip_img": "clip_img"}

        def run(inp):  # inputs in the model dtype, as diffusers' decoder / prior pipelines pass them
            return model(sample=inp["x"].to(dtype), timestep_ratio=inp["r"].to(dtype),
                         **{theirs: inp[ours].to(dtype) for ours, theirs in names.items()}, return_dict=False)[0]
    else:
        raise ValueError(spec.impl)
    del sd
    return run


def worker_main(conn, spec_dict: dict) -> None:
    """Spawned process: build one implementation, then serve ``run``/``finish`` requests."""
    try:
        spec = WorkerSpec(**spec_dict)
        _set_threads(spec.threads)
        t0 = time.perf_counter()
        with torch.inference_mode():
            run = build_runner(spec)
        conn.send({"ok": True, "build_s": time.perf_counter() - t0, "rss_after_build": current_rss_bytes()})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})
        return
    while True:
        msg = conn.recv()
        if msg["cmd"] == "finish":
            conn.send({"ok": True, "maxrss": peak_rss_bytes()})
            return
        try:
            inp = make_inputs(spec.task, msg["size"], msg["batch"], spec.seed)
            with torch.inference_mode():
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                out = run(inp)
                dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            if msg.get("save"):
                torch.save(out.detach().float().cpu().clone(), msg["save"])
            del out
            user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
            conn.send({"ok": True, "seconds": dt, "cpu_seconds": user + sys_, "sys_seconds": sys_,
                       "minor_faults": r1.ru_minflt - r0.ru_minflt})
        except BaseException:
            conn.send({"ok": False, "error": traceback.format_exc()})


class Worker:
    def __init__(self, ctx, spec: WorkerSpec):
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, asdict(spec)), daemon=True)
        self.proc.start()
        child.close()
        self.setup = self._recv()

    def _recv(self) -> dict:
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            return {"ok": False, "error": f"worker died (exit code {self.proc.exitcode}; killed for memory?)"}

    def call(self, **msg) -> dict:
        if not self.proc.is_alive():
            return {"ok": False, "error": f"worker not running (exit code {self.proc.exitcode})"}
        self.conn.send(msg)
        return self._recv()

    def finish(self) -> dict:
        res = self.call(cmd="finish") if self.proc.is_alive() else {"ok": False}
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        return res


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    task: str
    dtype: str
    size: int
    batch: int
    impls: list[str]
    repeats: int
    make_reference_for: list[tuple[int, int]] = field(default_factory=list)  # (size, batch) extra fp32 runs
    compare_to: str | None = None  # path of an fp32 reference output (bf16 cases)

    @property
    def key(self) -> str:
        return f"{self.task}_{self.dtype}_{self.size}px_b{self.batch}"

    def shape_text(self) -> str:
        if self.task == "effnet":
            return f"{self.batch}×3×{self.size}² → 16×{self.size // 32}²"
        if self.task == "stage_a":
            return f"{self.batch}×4×{self.size // 4}² → {self.size}²"
        if self.task == "stage_c":
            return f"{self.batch}×16×{stage_c_side(self.size)}², text 77×1280, img 768 ({self.size}²)"
        return f"{self.batch}×4×{self.size // 4}², eff 16×24², clip 1280 ({self.size}²)"


def rel_errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """``max|a-b| / max|ref|`` and ``||a-b||₂ / ||ref||₂`` (fp64)."""
    a, b = out.double(), ref.double()
    diff = a - b
    return {
        "max_abs": diff.abs().max().item(),
        "rel_max": (diff.abs().max() / b.abs().max().clamp_min(1e-30)).item(),
        "rel_l2": (diff.norm() / b.norm().clamp_min(1e-30)).item(),
        "finite": bool(torch.isfinite(a).all()),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(case: Case, args, tmpdir: Path, refs: dict[tuple[str, int, int], Path]) -> dict:
    ctx = mp.get_context("spawn")
    result: dict[str, Any] = {
        "task": case.task, "dtype": case.dtype, "size": case.size, "batch": case.batch,
        "input": case.shape_text(), "impls": {}, "parity": None, "status": "ok",
        "loadavg_at_start": os.getloadavg(),
    }
    baseline = case.impls[1]
    workers: dict[str, Worker] = {}
    try:
        for impl in case.impls:
            t0 = time.perf_counter()
            log(f"[{case.key}] building {impl} ...")
            w = Worker(ctx, WorkerSpec(case.task, impl, case.dtype, args.seed, args.threads))
            if not w.setup.get("ok"):
                raise RuntimeError(f"{impl} failed to build:\n{w.setup.get('error')}")
            workers[impl] = w
            result["impls"][impl] = {
                "label": IMPL_LABELS[(case.task, impl)], "build_s": w.setup["build_s"],
                "rss_after_build": w.setup["rss_after_build"], "times_s": [], "cpu_times_s": [], "sys_times_s": [],
                "minor_faults": [], "warmup_s": None,
            }
            log(f"[{case.key}] {impl} built in {time.perf_counter() - t0:.1f}s")

        # Warm-up: one run each, outputs saved and compared before any timing.
        outs = {}
        for impl, w in workers.items():
            path = tmpdir / f"{case.key}_{impl}.pt"
            res = w.call(cmd="run", size=case.size, batch=case.batch, save=str(path))
            if not res.get("ok"):
                raise RuntimeError(f"{impl} failed:\n{res.get('error')}")
            result["impls"][impl]["warmup_s"] = res["seconds"]
            outs[impl] = torch.load(path)
            log(f"[{case.key}] warm-up {impl}: {res['seconds']:.2f}s")
        ours_out, base_out = outs[case.impls[0]], outs[baseline]
        parity = {"vs": baseline, **rel_errors(ours_out, base_out)}
        if case.dtype == "fp32":
            parity["tolerance_rel_max"] = args.tolerance
            parity["pass"] = parity["finite"] and parity["rel_max"] <= args.tolerance
        else:  # bf16: each implementation against the fp32 output of the same weights
            parity["pass"] = parity["finite"]
            ref_path = refs.get((case.task, case.size, case.batch))
            if ref_path is not None:
                ref = torch.load(ref_path)
                parity["vs_fp32"] = {impl: rel_errors(o, ref) for impl, o in outs.items()}
                parity["bf16_tolerance_rel_l2"] = args.bf16_tolerance
                for e in parity["vs_fp32"].values():
                    e["ok"] = e["finite"] and e["rel_l2"] <= args.bf16_tolerance
                # Only our own implementation can fail the run; the baseline's drift is reported.
                parity["pass"] = parity["vs_fp32"][case.impls[0]]["ok"]
        result["parity"] = parity
        log(f"[{case.key}] parity ours vs {baseline}: rel_max={parity['rel_max']:.2e} "
            f"rel_l2={parity['rel_l2']:.2e} -> {'PASS' if parity['pass'] else 'FAIL'}")
        if not parity["pass"]:
            result["status"] = "parity-failed"
            return result

        # Timed runs, interleaved A, B, A, B, ...
        for i in range(case.repeats):
            for impl, w in workers.items():
                res = w.call(cmd="run", size=case.size, batch=case.batch, save=None)
                if not res.get("ok"):
                    raise RuntimeError(f"{impl} failed:\n{res.get('error')}")
                result["impls"][impl]["times_s"].append(res["seconds"])
                result["impls"][impl]["cpu_times_s"].append(res["cpu_seconds"])
                result["impls"][impl]["sys_times_s"].append(res["sys_seconds"])
                result["impls"][impl]["minor_faults"].append(res["minor_faults"])
                log(f"[{case.key}] run {i + 1}/{case.repeats} {impl}: {res['seconds']:.2f}s "
                    f"(cpu {res['cpu_seconds']:.2f}s)")

        # Extra fp32 outputs of ours to check the bf16 cases against (not timed).
        for size, batch in case.make_reference_for:
            path = tmpdir / f"ref_{case.task}_{size}_{batch}.pt"
            res = workers[case.impls[0]].call(cmd="run", size=size, batch=batch, save=str(path))
            if res.get("ok"):
                refs[(case.task, size, batch)] = path
                log(f"[{case.key}] fp32 reference output at {size}² saved for the bf16 check")
    except Exception as e:  # noqa: BLE001 - reported in the table and JSON
        result["status"] = "error"
        result["error"] = str(e)
        log(f"[{case.key}] ERROR: {e}")
    finally:
        for impl, w in workers.items():
            fin = w.finish()
            result["impls"][impl]["peak_rss"] = fin.get("maxrss")
    for impl, r in result["impls"].items():
        ts = r["times_s"]
        r["median_s"] = statistics.median(ts) if ts else None
        r["min_s"] = min(ts) if ts else None
        r["max_s"] = max(ts) if ts else None
        r["median_cpu_s"] = statistics.median(r["cpu_times_s"]) if r["cpu_times_s"] else None
    try:
        result["flops"] = model_flops(case.task, case.size, case.batch)
    except Exception as e:  # noqa: BLE001 - the rate columns stay empty, the timing stands
        log(f"[{case.key}] FLOPs not counted: {e}")
        result["flops"] = None
    peak = (getattr(args, "peak_gflops", None) or {}).get(case.dtype)
    for r in result["impls"].values():
        if result["flops"] and r.get("median_s"):
            r["gflops"] = result["flops"] / r["median_s"] / 1e9
            r["fraction_of_peak"] = r["gflops"] / peak if peak else None
    ours, base = result["impls"].get(case.impls[0], {}), result["impls"].get(baseline, {})
    if ours.get("median_s") and base.get("median_s"):
        result[f"ratio_ours_over_{baseline}"] = ours["median_s"] / base["median_s"]
        result[f"cpu_ratio_ours_over_{baseline}"] = ours["median_cpu_s"] / base["median_cpu_s"]
    if ours.get("peak_rss") and base.get("peak_rss"):
        result[f"rss_ratio_ours_over_{baseline}"] = ours["peak_rss"] / base["peak_rss"]
    return result


# --------------------------------------------------------------------------------------------
# Environment and report
# --------------------------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict[str, Any]:
    """The report's environment record, with this benchmark's threads and transparent-huge-page settings."""
    extra: dict[str, Any] = {"threads": args.threads, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    try:
        extra["transparent_hugepage"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return environment_record(packages=("diffusers",), dirty_paths=("codec",), **extra)


def _gb(b: int | None) -> str:
    return f"{b / 2**30:.2f} GB" if b else "-"


def _sec(s: float | None) -> str:
    return f"{s:.3f}" if s is not None else "-"


def format_table(results: list[dict], env: dict) -> str:
    cpu = env["cpu"]
    lines = [
        f"cascade-codec speed benchmark — torch {env['torch']}, diffusers {env.get('diffusers')}, "
        f"{cpu['model']} ({cpu['torch_cpu_capability']}), {env['threads']} threads; the codec's dtype=auto "
        f"here: {cpu.get('auto_precision')}",
        "median wall seconds of the timed runs after 1 warm-up; ratio = ours / baseline median (<1: ours is "
        "faster); cpu s = median process CPU seconds (less sensitive to other load); peak RSS per process",
        "GFLOP/s = the model's FLOPs (torch.utils.flop_counter, counted once from the architecture) / median s; "
        "% peak = of this machine's best "
        + ", ".join(f"{k} {v:,.0f}" for k, v in (env.get("peak_gflops") or {}).items())
        + " GFLOP/s (best 1024² or 2048² GEMM, same threads, measured in this run)",
        "",
    ]
    head = f"{'task':<8} {'dtype':<5} {'input':<42} {'implementation':<28} {'median s':>9} {'min–max s':>15} " \
           f"{'ratio':>6} {'cpu s':>8} {'GFLOP/s':>8} {'% peak':>6} {'peak RSS':>9}  parity"
    lines += [head, "-" * len(head)]
    for r in results:
        impls = list(r["impls"].items())
        ratio = next((v for k, v in r.items() if k.startswith("ratio_ours_over_")), None)
        p = r.get("parity") or {}
        if r["dtype"] == "fp32" and p:
            ptxt = f"rel_max {p['rel_max']:.1e} {'PASS' if p['pass'] else 'FAIL'}"
        elif p:
            vs = p.get("vs_fp32") or {}
            ptxt = "vs fp32 rel_l2 " + ", ".join(f"{k} {v['rel_l2']:.1e} {'ok' if v['ok'] else 'HIGH'}"
                                                 for k, v in vs.items()) if vs \
                else f"vs {p['vs']} rel_l2 {p['rel_l2']:.1e}"
        else:
            ptxt = r.get("status", "")
        if r.get("status") not in ("ok", None):
            ptxt += f" [{r['status']}]"
        for i, (impl, d) in enumerate(impls):
            rng = f"{d['min_s']:.3f}–{d['max_s']:.3f}" if d.get("min_s") is not None else "-"
            rate = f"{d['gflops']:.0f}" if d.get("gflops") else "-"
            share = f"{100 * d['fraction_of_peak']:.0f}%" if d.get("fraction_of_peak") else "-"
            lines.append(
                f"{r['task'] if i == 0 else '':<8} {r['dtype'] if i == 0 else '':<5} "
                f"{r['input'] if i == 0 else '':<42} {d['label']:<28} {_sec(d.get('median_s')):>9} {rng:>15} "
                f"{(f'{ratio:.2f}' if (i == 0 and ratio) else ''):>6} {_sec(d.get('median_cpu_s')):>8} "
                f"{rate:>8} {share:>6} "
                f"{_gb(d.get('peak_rss')):>9}  "
                f"{ptxt if i == 0 else ''}")
    tasks = {r["task"] for r in results}
    notes = ["", "notes:"]
    if "effnet" in tasks:
        notes.append("* effnet: diffusers has no EfficientNet encoder (only a Würstchen-v2 research example); the "
                     "baseline is the same module in default NCHW eager fp32, as the official code runs it.")
    if "stage_a" in tasks:
        notes.append("* stage_a: diffusers time includes the `latents * scale_factor` its pipeline does before "
                     "decode.")
    if "stage_b" in tasks:
        notes.append("* stage_b: one denoiser evaluation (a 10-step CFG decode does 10 evaluations at batch 2).")
    if "stage_c" in tasks:
        notes.append("* stage_c: one denoiser evaluation (a 20-step CFG generation does 20 evaluations at batch 2).")
    notes.append(f"* THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE')} in both implementations' workers "
                 f"(kernel transparent_hugepage: {env.get('transparent_hugepage', '?')}).")
    busy = [r for r in results if r.get("loadavg_at_start", (0,))[0] > env["threads"] + 1]
    if busy:
        notes.append(f"* load average was above {env['threads'] + 1} at the start of {len(busy)} case(s): other "
                     "processes were competing for the CPU; compare the cpu s column.")
    if any(r["dtype"] == "bf16" for r in results):
        why = ("this CPU has native bf16, so the codec's dtype=auto runs Stages B and C in bf16 here; "
               "python -m benchmarks.precision times fp32 against bf16" if cpu["native_bf16"] else
               "this CPU has no AVX512-BF16/AMX, bf16 is emulated and 10–100× slower than fp32, so dtype=auto runs "
               "fp32 here; the rows are a correctness check")
        notes.append(f"* bf16 rows ({why}). Parity column: each implementation against the fp32 output of the same "
                     "weights. ours runs Stages B and C under autocast as the codec does; diffusers runs pure bf16 "
                     "with timestep_ratio in bf16.")
        drift = [r for r in results if r["dtype"] == "bf16" and r["task"] in ("stage_b", "stage_c")
                 and not ((r.get("parity") or {}).get("vs_fp32") or {}).get("diffusers", {}).get("ok", True)]
        if drift:
            notes.append("* diffusers' bf16 Stage B/C drifts because it rounds timestep_ratio to bf16 before the "
                         "sinusoidal embedding (r=0.7 becomes 0.69921875, then ×10000 in bf16): the high-frequency "
                         "features are garbled. For Stage B at r=0.8, which bf16 holds exactly, its error falls to "
                         "~1e-2.")
    return "\n".join(lines + notes)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
HELP_EPILOG = """\
expected runtime (2 threads, no GPU): effnet, stage_a and stage_b (--repeats 3) took 599 s
(10 min) on the project's 2-core VM when quiet, 714 s while other jobs shared it (measured
before stage_c existed; a default run now adds the stage_c case below). Per implementation
it is 1 warm-up + N timed runs, plus 5–15 s per worker to import
and build. The big items: Stage A 1024² (diffusers ~40 s, ours ~24 s per decode), Stage B
lite 1024² (~20–25 s per step each), EfficientNet batch 8 (reference ~18 s, ours ~9 s).
--tasks stage_c alone took 775 s with the machine's load average near 9 (building each Stage C lite
worker ~90 s, ~60–80 s per evaluation; each worker holds ~4.7 GB).
--repeats 2 saves ~2.5 min. --bf16 adds Stages A, B (and C) at 512² in bf16: a few seconds
per run with AVX512-BF16/AMX, roughly 45–55 s per run on an AVX2-only CPU. Peak memory: the
two Stage B lite workers are alive together (~3.6 + 4.0 GB).

quick run (~1–2 min):
  python -m benchmarks.speed --tasks effnet,stage_b --effnet-batches 1 --stage-b-size 256 --repeats 1
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description="Time cascade-codec against diffusers (Stage A, Stage B, Stage C) and the plain NCHW reference "
                    "(EfficientNet encoder) on the same random weights; report median seconds, ratios, peak RSS "
                    "and an output-parity check per case.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(ALL_TASKS),
                   help="comma-separated subset of effnet,stage_a,stage_b,stage_c (default: all)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per implementation after 1 warm-up; the median is reported (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker (default: 2)")
    p.add_argument("--effnet-size", type=int, default=768,
                   help="EfficientNet input side in px, multiple of 32 (default: 768 = what a 1024² image is "
                        "encoded at)")
    p.add_argument("--effnet-batches", default="1,8", help="comma-separated EfficientNet batch sizes (default: 1,8)")
    p.add_argument("--stage-a-size", type=int, default=1024,
                   help="Stage A output side in px, multiple of 4; latent side = size/4 (default: 1024)")
    p.add_argument("--stage-b-size", type=int, default=1024,
                   help="Stage B output side in px, multiple of 8; latent side = size/4 (default: 1024)")
    p.add_argument("--stage-c-size", type=int, default=1024,
                   help="Stage C output side in px; latent side = ceil(size/42.67) (default: 1024 → 24)")
    p.add_argument("--bf16", action="store_true",
                   help="also run Stages A, B and C in bf16 at --bf16-size, as a correctness check against "
                        "the fp32 output (and timed). Slow on CPUs without AVX512-BF16/AMX, where the codec's "
                        "dtype=auto runs fp32")
    p.add_argument("--bf16-size", type=int, default=512, help="output side in px for the bf16 cases (default: 512)")
    p.add_argument("--bf16-repeats", type=int, default=1, help="timed runs for the bf16 cases (default: 1)")
    p.add_argument("--bf16-tolerance", type=float, default=0.05,
                   help="bf16 check: largest ||out_bf16 - out_fp32|| / ||out_fp32|| accepted for ours; above it the "
                        "exit status is 1 (the baseline's value is only reported) (default: 0.05)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="fp32 parity threshold on max|ours-baseline| / max|baseline| (default: 1e-4); a case "
                        "above it is not timed and the exit status is 1")
    p.add_argument("--thp-alloc", action="store_true",
                   help="set THP_MEM_ALLOC_ENABLE=1 in every worker (both implementations): PyTorch then "
                        "allocates large CPU tensors 2 MB-aligned with madvise(MADV_HUGEPAGE), which removes most "
                        "page-fault time when the kernel's transparent_hugepage mode is 'madvise'. Default: the "
                        "variable is inherited from the environment unchanged")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                   help="JSON file for environment, options and all numbers (default: benchmarks/results/speed.json next to "
                        "this script)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ALL_TASKS]
    if bad or not tasks:
        p.error(f"--tasks: unknown {bad}; choose from {','.join(ALL_TASKS)}")
    args.tasks = tasks
    try:
        args.effnet_batches = [int(b) for b in args.effnet_batches.split(",") if b.strip()]
    except ValueError:
        p.error("--effnet-batches must be comma-separated integers")
    if args.repeats < 1 or args.bf16_repeats < 1 or args.threads < 1:
        p.error("--repeats, --bf16-repeats and --threads must be >= 1")
    if args.effnet_size % 32 or args.effnet_size <= 0:
        p.error("--effnet-size must be a positive multiple of 32")
    if args.stage_a_size % 4 or args.stage_a_size <= 0:
        p.error("--stage-a-size must be a positive multiple of 4")
    if not 256 <= args.stage_c_size <= 4096:
        p.error("--stage-c-size must be within 256–4096 px (what the generation pipeline accepts)")
    for name in ("stage_b_size", "bf16_size"):
        if getattr(args, name) % 8 or getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive multiple of 8")
    return args


def build_cases(args) -> list[Case]:
    cases: list[Case] = []
    if "effnet" in args.tasks:
        for b in args.effnet_batches:
            cases.append(Case("effnet", "fp32", args.effnet_size, b, ["ours", "reference"], args.repeats))
    for task, size in (("stage_a", args.stage_a_size), ("stage_b", args.stage_b_size),
                       ("stage_c", args.stage_c_size)):
        if task in args.tasks:
            case = Case(task, "fp32", size, 1, ["ours", "diffusers"], args.repeats)
            if args.bf16:
                case.make_reference_for.append((args.bf16_size, 1))
            cases.append(case)
    if args.bf16:
        for task in ("stage_a", "stage_b", "stage_c"):
            if task in args.tasks:
                cases.append(Case(task, "bf16", args.bf16_size, 1, ["ours", "diffusers"], args.bf16_repeats))
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.thp_alloc:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # inherited by the spawned workers
    env = environment(args)
    cases = build_cases(args)
    torch.set_num_threads(args.threads)
    env["peak_gflops"] = args.peak_gflops = {d: gemm_peak_gflops(_dtype(d)) for d in sorted({c.dtype for c in cases})}
    log("GEMM peak (GFLOP/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in env["peak_gflops"].items()))
    t_start = time.perf_counter()
    results = []
    refs: dict[tuple[str, int, int], Path] = {}
    with tempfile.TemporaryDirectory(prefix="cascade_speed_") as tmp:
        for case in cases:
            results.append(run_case(case, args, Path(tmp), refs))
    total = time.perf_counter() - t_start
    report = {
        "environment": env,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_runtime_s": total,
        "cases": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(format_table(results, env))
    print(f"\ntotal runtime {total:.0f}s; JSON written to {args.output}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
