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
* ``decode`` — the whole decode of an EfficientNet latent 16×s×s (s = ceil(size/42.67), 24 for 1024²) to an
  image: 10 Stage B steps with CFG 1.1 (batch 2 per step), then Stage A. *ours* = :class:`codec.Codec` made of a
  Stage B lite and a Stage A with the same random weights, ``Codec.decode(steps=10, cfg=1.1, sampler="ddpm",
  seed=…)`` — the official sampler, CFG rescaled with cfg_rho 0.7 — at the codec's default precision
  (``dtype="auto"``: bf16 on CUDA and on CPUs with AVX512_BF16/AMX-BF16, else fp32). *diffusers* =
  ``StableCascadeDecoderPipeline(decoder=StableCascadeUNet (decoder-lite config), vqgan=PaellaVQModel
  (scale 0.43), scheduler=DDPMWuerstchenScheduler(), tokenizer=None, text_encoder=None)`` with the same weights,
  called with ``image_embeddings``, ``prompt_embeds`` (zeros, only its batch size is read),
  ``prompt_embeds_pooled`` and ``negative_prompt_embeds_pooled`` (the same vector ours uses as the empty
  caption's pooled CLIP embedding), ``num_inference_steps=10, guidance_scale=1.1, output_type="pt"``, at
  diffusers' default precision (fp32: the pipeline runs in the dtype its models were made in) and in bf16
  (``torch_dtype=torch.bfloat16``, as diffusers' docs load the decoder: equal precision). diffusers' own
  defaults differ from the official ones: ``guidance_scale=0.0`` (no CFG: one model call per step instead of
  two), ``num_inference_steps=10`` (its docstring says 12; the combined pipeline's default is 12), plain
  ``lerp`` CFG without the official rescale, the first step conditioned on r = 1.0 instead of the official
  0.99358 and no noise added at the last step; this benchmark passes the official 10 steps and CFG 1.1 to
  both. Before timing, one *check run* per implementation at ``--decode-check-size`` (default 256²) decodes
  the same latent with the same seed; both draw their noise from one CPU generator in the same order (initial
  noise, then one draw per step), so with ours' CFG rescale off and diffusers' first r set to the official
  value for that run, ours in fp32 and diffusers in fp32 compute the same decode up to the last step (ours
  returns that step's x0 prediction, diffusers its posterior mean, ~1e-2 apart): their rel L2 must be within
  ``--decode-tolerance``. The timed decodes at ``--decode-size`` then use the settings above (ours with the
  rescale, diffusers as it ships); each is the first decode at that size in its process, as a fresh ``cascade
  decode`` runs it.

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

``--device cuda`` (or ``auto`` on a machine with a GPU) runs every worker's models and inputs on the GPU,
synchronises before each clock reading, reports ``torch.cuda.max_memory_allocated`` as peak memory and measures
the GEMM peak on the GPU. ``--compile`` adds a row *ours + torch.compile* to each case (:func:`codec.codec.compile_model`
on the same call; for ``decode``, ``Codec(compile=True)``): its warm-up is the first call, compiled from a fresh
inductor cache, and is reported with the warm speed-up over eager ours.
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

from .environment import device_arg, environment_record
from .peak import gemm_peak_gflops, model_flops
from .rss import current_rss_bytes, peak_rss_bytes

ALL_TASKS = ("effnet", "stage_a", "stage_b", "stage_c", "decode")
DEFAULT_TASKS = ("effnet", "stage_a", "stage_b", "stage_c")  # decode takes ~20 min on 2 CPU cores: asked for by name
DECODE_CFG = 1.1  # the official Stage B guidance (codec.codec.OFFICIAL_SAMPLING)
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
    ("decode", "ours"): "ours Codec.decode",
    ("decode", "diffusers"): "diffusers DecoderPipeline",
}


def impl_label(task: str, impl: str, dtype: str, compiled: bool = False, show_dtype: bool = False) -> str:
    """The implementation column of a row: its label, `` + compile`` for a compiled one, the row's dtype where a
    case mixes precisions."""
    return IMPL_LABELS[(task, impl)] + (" + compile" if compiled else "") + (f" {dtype}" if show_dtype else "")

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
    device: str = "cpu"
    compile: bool = False
    decode_steps: int = 10
    compile_cache: str | None = None  # a fresh inductor cache folder, so that the first call compiles from scratch


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a clock reading after it includes it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
    if task == "decode":
        return {"latent": torch.randn(batch, 16, stage_c_side(size), stage_c_side(size), generator=g),
                "clip": decode_clip(seed)}
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


def decode_clip(seed: int) -> torch.Tensor:
    """The pooled CLIP vector ``(1,1,1280)`` both implementations of ``decode`` get as the empty caption's (ours'
    ``Codec.empty_clip``; diffusers' ``prompt_embeds_pooled`` and ``negative_prompt_embeds_pooled``)."""
    return torch.randn(1, 1, 1280, generator=torch.Generator().manual_seed(seed + 2000))


def decode_sides(size: int) -> tuple[int, int, int]:
    """``(EfficientNet latent side, our Stage A latent side, diffusers' Stage A latent side)`` of a decode to
    ``size``²: ceil(size/42.67); ours ``stage_a_latent_size`` (ceil(size/4), even, ≥16); diffusers int(side·10.67)."""
    from codec.codec import stage_a_latent_size

    side = stage_c_side(size)
    return side, stage_a_latent_size(size, size)[0], int(side * 10.67)


def official_first_r() -> float:
    """The noise condition of the official sampler's first step, t = 1 (0.99358: the schedule's clamp maps it
    back); diffusers conditions that step on 1.0."""
    from codec.diffusion import CosineSchedule, noise_condition

    return float(noise_condition(CosineSchedule()(torch.tensor([1.0])))[0])


Runner = Callable[..., torch.Tensor]


def _compiled(spec: WorkerSpec, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` as ours runs it: eager, or with ``--compile`` through :func:`codec.codec.compile_model`."""
    if not spec.compile:
        return fn
    from codec.codec import compile_model

    return compile_model(fn)


def build_runner(spec: WorkerSpec) -> Runner:
    """Build the model of ``spec`` on its device and return ``run(inputs) -> output`` (the timed call; inputs are on
    the device already). ``decode``'s runner also takes ``check=True`` for the check run (see the module doc)."""
    dtype = None if spec.dtype == "auto" else _dtype(spec.dtype)
    device = torch.device(spec.device)
    if spec.task == "effnet":
        from codec.effnet import EfficientNetEncoder

        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            model = EfficientNetEncoder().eval()
        model = model.to(device)
        if spec.impl == "ours":
            model = model.to(memory_format=torch.channels_last)
            encode = _compiled(spec, model.encode)

            def run(inp):  # as Codec._encode_batch
                x = inp["images"].contiguous(memory_format=torch.channels_last)
                return encode(x).float().contiguous()
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
            model.eval().to(device)
            decode = _compiled(spec, model.decode)

            def run(inp):
                return decode(inp["latent"].to(dtype))
        elif spec.impl == "diffusers":
            from codec.layouts import diffusers as diffusers_layout

            with torch.device("meta"):
                model = diffusers_layout.diffusers_model("stage_a", meta.config)
            model.load_state_dict(diffusers_layout.state_dict_to_diffusers(sd, "stage_a"), strict=True, assign=True)
            model.eval().to(device)
            scale = model.config.scale_factor

            def run(inp):  # as the diffusers decoder pipeline calls it
                return model.decode(inp["latent"].to(dtype) * scale, force_not_quantize=True).sample
        else:
            raise ValueError(spec.impl)
        del sd
        return run

    if spec.task in ("stage_b", "stage_c"):
        return _denoiser_runner(spec, dtype, device)
    if spec.task == "decode":
        return _decode_runner(spec, device)
    raise ValueError(spec.task)


def _denoiser_runner(spec: WorkerSpec, dtype: torch.dtype, device: torch.device) -> Runner:
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
        model.eval().to(device)
        conds = ("effnet", "clip") if kind == "stage_b" else ("clip_text", "clip_text_pooled", "clip_img")
        call = _compiled(spec, model)

        def run(inp):  # as codec.diffusion.sample calls it: fp32 inputs, autocast inside for bf16
            return call(inp["x"], inp["r"], *(inp[c] for c in conds))
    elif spec.impl == "diffusers":
        with torch.device("meta"):
            model = diffusers_layout.diffusers_model(kind, asdict(meta.config))
        model.load_state_dict(diffusers_layout.state_dict_to_diffusers(sd, kind), strict=True, assign=True)
        model.eval().to(device)
        names = {"effnet": "effnet", "clip": "clip_text_pooled"} if kind == "stage_b" else \
            {"clip_text": "clip_text", "clip_text_pooled": "clip_text_pooled", "clip_img": "clip_img"}

        def run(inp):  # inputs in the model dtype, as diffusers' decoder / prior pipelines pass them
            return model(sample=inp["x"].to(dtype), timestep_ratio=inp["r"].to(dtype),
                         **{theirs: inp[ours].to(dtype) for ours, theirs in names.items()}, return_dict=False)[0]
    else:
        raise ValueError(spec.impl)
    del sd
    return run


def _decode_runner(spec: WorkerSpec, device: torch.device) -> Runner:
    """The whole decode (module doc): ours ``Codec.decode`` or diffusers' ``StableCascadeDecoderPipeline``, Stage B
    lite and Stage A with the same random weights. ``spec.dtype`` ``"auto"`` is the codec's own choice."""
    from codec.devices import auto_dtype
    from codec.layouts import diffusers as diffusers_layout
    from codec.stage_a import StageA

    dtype = auto_dtype(device)[0] if spec.dtype == "auto" else _dtype(spec.dtype)
    with torch.device("meta"):
        meta_b = create_model("stage_b_lite")
        meta_a = StageA(scale_factor=STAGE_A_SCALE)
    sd_b = random_state_dict(meta_b, spec.seed, dtype)
    if spec.impl == "ours":
        from codec.codec import Codec

        meta_b.load_state_dict(sd_b, strict=True, assign=True)
        meta_a.load_state_dict(random_state_dict(meta_a, spec.seed, torch.float32), strict=True, assign=True)
        del sd_b
        codec = Codec(meta_a.eval().to(device), None, meta_b.eval().to(device), empty_clip=decode_clip(spec.seed),
                      device=device, dtype=dtype, compile=spec.compile)

        def run(inp, check: bool = False):  # the check run has the CFG rescale off, as diffusers' CFG
            size = inp["size"]
            return codec.decode(inp["latent"], height=size, width=size, steps=spec.decode_steps, cfg=DECODE_CFG,
                                sampler="ddpm", seed=spec.seed, cfg_rho=0.0 if check else 0.7, output="tensor")
        return run
    if spec.impl != "diffusers":
        raise ValueError(spec.impl)
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline

    with torch.device("meta"):
        unet = diffusers_layout.diffusers_model("stage_b", asdict(meta_b.config))
        vqgan = diffusers_layout.diffusers_model("stage_a", meta_a.config)
    unet.load_state_dict(diffusers_layout.state_dict_to_diffusers(sd_b, "stage_b"), strict=True, assign=True)
    del sd_b
    sd_a = random_state_dict(meta_a, spec.seed, dtype)  # the pipeline runs all its models in one dtype
    vqgan.load_state_dict(diffusers_layout.state_dict_to_diffusers(sd_a, "stage_a"), strict=True, assign=True)
    pipe = StableCascadeDecoderPipeline(decoder=unet.eval(), tokenizer=None, text_encoder=None,
                                        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan.eval()).to(device)
    pipe.set_progress_bar_config(disable=True)
    first_r = official_first_r()

    def official_first_step(_module, args, kwargs):  # check run only: r = 0.99358 where diffusers passes 1.0
        r = kwargs["timestep_ratio"]
        kwargs["timestep_ratio"] = torch.where(r == 1, torch.full_like(r, first_r), r)
        return args, kwargs

    def run(inp, check: bool = False):
        n = inp["latent"].shape[0]
        pooled = inp["clip"].to(dtype).expand(n, -1, -1)
        hook = pipe.decoder.register_forward_pre_hook(official_first_step, with_kwargs=True) if check else None
        try:
            return pipe(image_embeddings=inp["latent"].to(dtype), prompt_embeds=torch.zeros(n, 77, 1280, dtype=dtype,
                                                                                          device=device),
                        prompt_embeds_pooled=pooled, negative_prompt_embeds_pooled=pooled,
                        num_inference_steps=spec.decode_steps, guidance_scale=DECODE_CFG,
                        generator=torch.Generator().manual_seed(spec.seed), output_type="pt").images
        finally:
            if hook is not None:
                hook.remove()
    return run


def worker_main(conn, spec_dict: dict) -> None:
    """Spawned process: build one implementation, then serve ``run``/``finish`` requests."""
    try:
        spec = WorkerSpec(**spec_dict)
        if spec.compile_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec.compile_cache
            os.environ["TRITON_CACHE_DIR"] = os.path.join(spec.compile_cache, "triton")
        _set_threads(spec.threads)
        device = torch.device(spec.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            run = build_runner(spec)
        synchronize(device)
        conn.send({"ok": True, "build_s": time.perf_counter() - t0, "rss_after_build": current_rss_bytes()})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})
        return
    while True:
        msg = conn.recv()
        if msg["cmd"] == "finish":
            conn.send({"ok": True, "maxrss": peak_rss_bytes(),
                       "max_device_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None})
            return
        try:
            inp: dict[str, Any] = {k: v.to(device) for k, v in make_inputs(spec.task, msg["size"], msg["batch"],
                                                                           spec.seed).items()}
            kwargs = {}
            if spec.task == "decode":
                inp["size"], kwargs["check"] = msg["size"], bool(msg.get("check"))
            with torch.inference_mode():
                synchronize(device)
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                out = run(inp, **kwargs)
                synchronize(device)
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
class Impl:
    """One row of a case: an implementation in one precision, eager or compiled."""

    key: str  # its name in the report: ours, diffusers, reference, diffusers_bf16, ours_compiled, ours_fp32
    impl: str  # ours | reference | diffusers
    dtype: str  # fp32 | bf16 | auto (decode's ours: the codec's own choice on the device)
    compile: bool = False
    timed: bool = True  # False: the check run only (decode's fp32 ours, the reference for the parity check)


@dataclass
class Case:
    task: str
    dtype: str
    size: int
    batch: int
    impls: list[Impl]  # ours first, then the baseline, then further rows
    repeats: int
    make_reference_for: list[tuple[int, int]] = field(default_factory=list)  # (size, batch) extra fp32 runs
    check_size: int | None = None  # decode: the check run's size (default: the case's, the check run is the warm-up)
    warmup: bool = True  # decode with a check_size: also one untimed call per row at the case's size first
    steps: int = 10  # decode: Stage B steps

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
        if self.task == "decode":
            side = decode_sides(self.size)[0]
            return f"{self.batch}×16×{side}² → {self.size}², {self.steps} steps, CFG {DECODE_CFG}"
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


def resolved_dtype(dtype: str, device: str) -> str:
    """``fp32``/``bf16`` as given; ``auto``: what the codec picks on ``device`` (:func:`codec.devices.auto_dtype`)."""
    if dtype != "auto":
        return dtype
    from codec.devices import auto_dtype

    return dtype_name(auto_dtype(device)[0])


def case_parity(case: Case, outs: dict[str, torch.Tensor], args, refs: dict[tuple[str, int, int], Path]) -> dict:
    """The check-run outputs of a case compared: ours against the baseline (fp32: within ``--tolerance``; bf16:
    each against the fp32 output of the same weights; decode: ours in fp32 against diffusers in fp32 within
    ``--decode-tolerance``, and each bf16 row against its fp32 counterpart), and a compiled row against eager ours.
    ``pass`` is False when our own code is off; a baseline's drift is only reported."""
    ours, baseline = case.impls[0], case.impls[1]
    dtypes = {im.key: resolved_dtype(im.dtype, getattr(args, "device", "cpu")) for im in case.impls}
    if case.task == "decode":
        ours32 = "ours_fp32" if "ours_fp32" in outs else ours.key
        parity: dict[str, Any] = {"vs": baseline.key, "ours": ours32, **rel_errors(outs[ours32], outs[baseline.key]),
                                  "tolerance_rel_l2": args.decode_tolerance}
        parity["pass"] = parity["finite"] and parity["rel_l2"] <= args.decode_tolerance
        vs: dict[str, Any] = {}
        if ours32 != ours.key:
            vs[ours.key] = rel_errors(outs[ours.key], outs[ours32])
        for im in case.impls:
            if im.impl == "diffusers" and im.key != baseline.key and not im.compile:
                vs[im.key] = rel_errors(outs[im.key], outs[baseline.key])
        for e in vs.values():
            e["ok"] = e["finite"] and e["rel_l2"] <= args.bf16_tolerance
        if vs:
            parity["vs_fp32"], parity["bf16_tolerance_rel_l2"] = vs, args.bf16_tolerance
            parity["pass"] = parity["pass"] and vs.get(ours.key, {"ok": True})["ok"]
    else:
        parity = {"vs": baseline.key, **rel_errors(outs[ours.key], outs[baseline.key])}
        if case.dtype == "fp32":
            parity["tolerance_rel_max"] = args.tolerance
            parity["pass"] = parity["finite"] and parity["rel_max"] <= args.tolerance
        else:  # bf16: each implementation against the fp32 output of the same weights
            parity["pass"] = parity["finite"]
            ref_path = refs.get((case.task, case.size, case.batch))
            if ref_path is not None:
                ref = torch.load(ref_path)
                parity["vs_fp32"] = {im.key: rel_errors(outs[im.key], ref) for im in case.impls if not im.compile}
                parity["bf16_tolerance_rel_l2"] = args.bf16_tolerance
                for e in parity["vs_fp32"].values():
                    e["ok"] = e["finite"] and e["rel_l2"] <= args.bf16_tolerance
                # Only our own implementation can fail the run; the baseline's drift is reported.
                parity["pass"] = parity["vs_fp32"][ours.key]["ok"]
    for im in case.impls:
        if im.compile:  # compiled against eager ours, same precision: rounding only
            e = rel_errors(outs[im.key], outs[ours.key])
            tol = args.compile_tolerance if dtypes[im.key] == "fp32" else args.bf16_tolerance
            e["ok"], e["tolerance_rel_l2"] = e["finite"] and e["rel_l2"] <= tol, tol
            parity.setdefault("compiled_vs_eager", {})[im.key] = e
            parity["pass"] = parity["pass"] and e["ok"]
    return parity


def run_case(case: Case, args, tmpdir: Path, refs: dict[tuple[str, int, int], Path]) -> dict:
    ctx = mp.get_context("spawn")
    device = getattr(args, "device", "cpu")
    check_size = case.check_size or case.size
    result: dict[str, Any] = {
        "task": case.task, "dtype": case.dtype, "size": case.size, "batch": case.batch,
        "input": case.shape_text(), "impls": {}, "parity": None, "status": "ok",
        "loadavg_at_start": os.getloadavg(), "device": device,
    }
    if check_size != case.size:
        result["check_size"] = check_size
    if case.task == "decode":
        result["steps"] = case.steps
    ours, baseline = case.impls[0].key, case.impls[1].key
    workers: dict[str, Worker] = {}
    try:
        for im in case.impls:
            t0 = time.perf_counter()
            log(f"[{case.key}] building {im.key} ...")
            cache = str(tmpdir / f"inductor_{case.key}_{im.key}") if im.compile else None
            w = Worker(ctx, WorkerSpec(case.task, im.impl, im.dtype, args.seed, args.threads, device, im.compile,
                                       case.steps, cache))
            if not w.setup.get("ok"):
                raise RuntimeError(f"{im.key} failed to build:\n{w.setup.get('error')}")
            workers[im.key] = w
            dtype = resolved_dtype(im.dtype, device)
            result["impls"][im.key] = {
                "label": impl_label(case.task, im.impl, dtype, im.compile, show_dtype=case.task == "decode"),
                "dtype": dtype, "compiled": im.compile, "timed": im.timed,
                "build_s": w.setup["build_s"],
                "rss_after_build": w.setup["rss_after_build"], "times_s": [], "cpu_times_s": [], "sys_times_s": [],
                "minor_faults": [], "warmup_s": None,
            }
            log(f"[{case.key}] {im.key} built in {time.perf_counter() - t0:.1f}s")

        # Check run (the warm-up, at the case's own size, except decode's): outputs saved and compared first.
        outs = {}
        for key, w in workers.items():
            path = tmpdir / f"{case.key}_{key}.pt"
            res = w.call(cmd="run", size=check_size, batch=case.batch, save=str(path), check=True)
            if not res.get("ok"):
                raise RuntimeError(f"{key} failed:\n{res.get('error')}")
            result["impls"][key]["warmup_s" if check_size == case.size else "check_s"] = res["seconds"]
            outs[key] = torch.load(path)
            log(f"[{case.key}] {'warm-up' if check_size == case.size else f'check run at {check_size}²'} {key}: "
                f"{res['seconds']:.2f}s")
        parity = result["parity"] = case_parity(case, outs, args, refs)
        log(f"[{case.key}] parity {parity.get('ours', ours)} vs {baseline}: rel_max={parity['rel_max']:.2e} "
            f"rel_l2={parity['rel_l2']:.2e} -> {'PASS' if parity['pass'] else 'FAIL'}")
        if not parity["pass"]:
            result["status"] = "parity-failed"
            return result
        for im in case.impls:  # check-only rows give their memory back before the timed runs
            if not im.timed:
                result["impls"][im.key].update(_finish(workers.pop(im.key)))
        if check_size != case.size and case.warmup:
            for key, w in workers.items():
                res = w.call(cmd="run", size=case.size, batch=case.batch, save=None)
                if not res.get("ok"):
                    raise RuntimeError(f"{key} failed:\n{res.get('error')}")
                result["impls"][key]["warmup_s"] = res["seconds"]
                log(f"[{case.key}] warm-up {key}: {res['seconds']:.2f}s")
        for im in case.impls:  # after a cold compile the next calls can still be slow (lazily loaded kernels); a
            if im.compile and im.key in workers and case.task != "decode":  # decode's 10 steps are such calls
                for _ in range(getattr(args, "compile_warmups", 0)):
                    res = workers[im.key].call(cmd="run", size=case.size, batch=case.batch, save=None)
                    if not res.get("ok"):
                        raise RuntimeError(f"{im.key} failed:\n{res.get('error')}")
                    result["impls"][im.key].setdefault("more_warmups_s", []).append(res["seconds"])
                    log(f"[{case.key}] extra warm-up {im.key}: {res['seconds']:.2f}s")

        # Timed runs, interleaved A, B, A, B, ...
        for i in range(case.repeats):
            for key, w in workers.items():
                res = w.call(cmd="run", size=case.size, batch=case.batch, save=None)
                if not res.get("ok"):
                    raise RuntimeError(f"{key} failed:\n{res.get('error')}")
                result["impls"][key]["times_s"].append(res["seconds"])
                result["impls"][key]["cpu_times_s"].append(res["cpu_seconds"])
                result["impls"][key]["sys_times_s"].append(res["sys_seconds"])
                result["impls"][key]["minor_faults"].append(res["minor_faults"])
                log(f"[{case.key}] run {i + 1}/{case.repeats} {key}: {res['seconds']:.2f}s "
                    f"(cpu {res['cpu_seconds']:.2f}s)")

        # Extra fp32 outputs of ours to check the bf16 cases against (not timed).
        for size, batch in case.make_reference_for:
            path = tmpdir / f"ref_{case.task}_{size}_{batch}.pt"
            res = workers[ours].call(cmd="run", size=size, batch=batch, save=str(path))
            if res.get("ok"):
                refs[(case.task, size, batch)] = path
                log(f"[{case.key}] fp32 reference output at {size}² saved for the bf16 check")
    except Exception as e:  # noqa: BLE001 - reported in the table and JSON
        result["status"] = "error"
        result["error"] = str(e)
        log(f"[{case.key}] ERROR: {e}")
    finally:
        for key, w in workers.items():
            result["impls"][key].update(_finish(w))
    for r in result["impls"].values():
        ts = r["times_s"]
        r["median_s"] = statistics.median(ts) if ts else None
        r["min_s"] = min(ts) if ts else None
        r["max_s"] = max(ts) if ts else None
        r["median_cpu_s"] = statistics.median(r["cpu_times_s"]) if r["cpu_times_s"] else None
    try:
        result["flops"] = model_flops(case.task, case.size, case.batch, steps=case.steps)
    except Exception as e:  # noqa: BLE001 - the rate columns stay empty, the timing stands
        log(f"[{case.key}] FLOPs not counted: {e}")
        result["flops"] = None
    peaks = getattr(args, "peak_gflops", None) or {}
    for r in result["impls"].values():
        if result["flops"] and r.get("median_s"):
            r["gflops"] = result["flops"] / r["median_s"] / 1e9
            peak = peaks.get(r["dtype"])
            r["fraction_of_peak"] = r["gflops"] / peak if peak else None
    o = result["impls"].get(ours, {})
    for key, r in result["impls"].items():
        if key == ours or not (o.get("median_s") and r.get("median_s")):
            continue
        result.setdefault("ratios", {})[key] = o["median_s"] / r["median_s"]
        if key == baseline:
            result[f"ratio_ours_over_{baseline}"] = o["median_s"] / r["median_s"]
            result[f"cpu_ratio_ours_over_{baseline}"] = o["median_cpu_s"] / r["median_cpu_s"]
            if o.get("peak_rss") and r.get("peak_rss"):
                result[f"rss_ratio_ours_over_{baseline}"] = o["peak_rss"] / r["peak_rss"]
        if r.get("compiled"):
            result.setdefault("compile", {})[key] = {
                "first_call_s": r.get("warmup_s"), "eager_first_call_s": o.get("warmup_s"),
                "more_warmups": len(r.get("more_warmups_s", [])),
                "warm_median_s": r["median_s"], "eager_warm_median_s": o["median_s"],
                "warm_speedup": o["median_s"] / r["median_s"]}
    return result


def _finish(w: Worker) -> dict[str, Any]:
    fin = w.finish()
    return {"peak_rss": fin.get("maxrss"), "peak_device_memory": fin.get("max_device_memory")}


# --------------------------------------------------------------------------------------------
# Environment and report
# --------------------------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict[str, Any]:
    """The report's environment record, with this benchmark's threads, device and transparent-huge-page settings."""
    extra: dict[str, Any] = {"threads": args.threads, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                             "device": getattr(args, "device", "cpu")}
    try:
        extra["transparent_hugepage"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    env = environment_record(packages=("diffusers",), dirty_paths=("codec",), **extra)
    if torch.device(extra["device"]).type == "cuda":
        from codec.devices import auto_dtype

        env["device_name"] = torch.cuda.get_device_name(extra["device"])
        env["device_auto_precision"] = auto_dtype(extra["device"])[1]
    return env


def _gb(b: int | None) -> str:
    return f"{b / 2**30:.2f} GB" if b else "-"


def _sec(s: float | None) -> str:
    return f"{s:.3f}" if s is not None else "-"


def parity_text(r: dict) -> str:
    """The parity column of a case (its first row)."""
    p = r.get("parity") or {}
    if not p:
        return r.get("status", "")
    if r["task"] == "decode":
        ptxt = f"fp32 rel_l2 {p['rel_l2']:.1e} {'PASS' if p['pass'] else 'FAIL'}"
        vs = p.get("vs_fp32") or {}
        if vs:
            ptxt += "; bf16 vs fp32 " + ", ".join(f"{k} {v['rel_l2']:.1e} {'ok' if v['ok'] else 'HIGH'}"
                                                  for k, v in vs.items())
    elif r["dtype"] == "fp32":
        ptxt = f"rel_max {p['rel_max']:.1e} {'PASS' if p['pass'] else 'FAIL'}"
    else:
        vs = p.get("vs_fp32") or {}
        ptxt = "vs fp32 rel_l2 " + ", ".join(f"{k} {v['rel_l2']:.1e} {'ok' if v['ok'] else 'HIGH'}"
                                             for k, v in vs.items()) if vs \
            else f"vs {p['vs']} rel_l2 {p['rel_l2']:.1e}"
    for v in (p.get("compiled_vs_eager") or {}).values():
        ptxt += f"; compiled rel_l2 {v['rel_l2']:.1e} {'ok' if v['ok'] else 'HIGH'}"
    return ptxt


def format_table(results: list[dict], env: dict) -> str:
    cpu = env["cpu"]
    device = env.get("device", "cpu")
    on_gpu = torch.device(device).type == "cuda"
    where = (f"{env.get('device_name', device)} ({device}; the codec's dtype=auto there: "
             f"{env.get('device_auto_precision')}), host CPU {cpu['model']}" if on_gpu else
             f"{cpu['model']} ({cpu['torch_cpu_capability']}), {env['threads']} threads; the codec's dtype=auto "
             f"here: {cpu.get('auto_precision')}")
    gemm = "4096² or 8192²" if on_gpu else "1024² or 2048²"
    lines = [
        f"cascade-codec speed benchmark — torch {env['torch']}, diffusers {env.get('diffusers')}, {where}",
        "median wall seconds of the timed runs after 1 warm-up; ratio = ours / baseline median (<1: ours is "
        "faster; on a third row: ours / that row); cpu s = median process CPU seconds (less sensitive to other "
        "load); " + ("peak GPU = torch.cuda.max_memory_allocated per process" if on_gpu else "peak RSS per process"),
        "GFLOP/s = the model's FLOPs (torch.utils.flop_counter, counted once from the architecture) / median s; "
        "% peak = of this machine's best "
        + ", ".join(f"{k} {v:,.0f}" for k, v in (env.get("peak_gflops") or {}).items())
        + f" GFLOP/s (best {gemm} GEMM, same threads, measured in this run)",
        "",
    ]
    rows = [(r, k, d) for r in results for k, d in r["impls"].items() if d.get("timed", True)]
    width = max([28] + [len(d["label"]) for _, _, d in rows])
    mem_head = "peak GPU" if on_gpu else "peak RSS"
    head = f"{'task':<8} {'dtype':<5} {'input':<42} {'implementation':<{width}} {'median s':>9} {'min–max s':>15} " \
           f"{'ratio':>6} {'cpu s':>8} {'GFLOP/s':>8} {'% peak':>6} {mem_head:>9}  parity"
    lines += [head, "-" * len(head)]
    for r in results:
        impls = [(k, d) for k, d in r["impls"].items() if d.get("timed", True)]
        ratio = next((v for k, v in r.items() if k.startswith("ratio_ours_over_")), None)
        ptxt = parity_text(r)
        if r.get("status") not in ("ok", None):
            ptxt += f" [{r['status']}]"
        for i, (impl, d) in enumerate(impls):
            rng = f"{d['min_s']:.3f}–{d['max_s']:.3f}" if d.get("min_s") is not None else "-"
            rate = f"{d['gflops']:.0f}" if d.get("gflops") else "-"
            share = f"{100 * d['fraction_of_peak']:.0f}%" if d.get("fraction_of_peak") else "-"
            row_ratio = ratio if i == 0 else (r.get("ratios") or {}).get(impl) if i >= 2 else None
            mem = d.get("peak_device_memory") if on_gpu else d.get("peak_rss")
            lines.append(
                f"{r['task'] if i == 0 else '':<8} {r['dtype'] if i == 0 else '':<5} "
                f"{r['input'] if i == 0 else '':<42} {d['label']:<{width}} {_sec(d.get('median_s')):>9} {rng:>15} "
                f"{(f'{row_ratio:.2f}' if row_ratio else ''):>6} {_sec(d.get('median_cpu_s')):>8} "
                f"{rate:>8} {share:>6} "
                f"{_gb(mem):>9}  "
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
    for r in results:
        if r["task"] != "decode":
            continue
        dec = [f"{d['label']} {d['median_s']:.1f} s = {r['batch'] / d['median_s']:.4f} images/s"
               for d in r["impls"].values() if d.get("timed", True) and d.get("median_s")]
        notes.append(f"* decode {r['size']}²: seconds per decode of {r['batch']} image(s), official settings for "
                     f"both ({r.get('steps', 10)} DDPM steps, CFG {DECODE_CFG}; diffusers' own defaults are "
                     "guidance_scale=0.0, i.e. no "
                     "CFG, and 10 steps); ours = the codec's default precision (dtype=auto), diffusers = its default "
                     "(fp32) and bf16 (torch_dtype=torch.bfloat16). " + "; ".join(dec) + ".")
        p = r.get("parity") or {}
        if p:
            notes.append(f"* decode check run at {r.get('check_size', r['size'])}² (same latent, seed and noise "
                         f"stream; ours' CFG rescale off and diffusers' first r set to the official 0.99358 for "
                         f"this run only): {p.get('ours')} vs {p['vs']} rel L2 {p['rel_l2']:.2e} (tolerance "
                         f"{p['tolerance_rel_l2']:g}; what remains is the last step: ours returns its x0 "
                         "prediction, diffusers the posterior mean). Timed decodes: " + (
                             "after the check run, which was at the same size." if "check_size" not in r else
                             "after one untimed decode at their size." if any(
                                 d.get("warmup_s") for d in r["impls"].values()) else
                             "the first at their size in each process, as in a fresh `cascade decode`."))
    for r in results:
        for c in (r.get("compile") or {}).values():
            first = f"{c['first_call_s']:.1f} s" if c.get("first_call_s") else "-"
            eager_first = f"{c['eager_first_call_s']:.1f} s" if c.get("eager_first_call_s") else "-"
            notes.append(f"* {r['task']} {r['dtype']} torch.compile: first call {first} (eager first call "
                         f"{eager_first}; compiled from an empty inductor cache; then {c.get('more_warmups', 0)} "
                         f"untimed calls), warm {c['warm_median_s']:.3f} s vs "
                         f"eager {c['eager_warm_median_s']:.3f} s = {c['warm_speedup']:.2f}× "
                         f"({'at least' if c['warm_speedup'] >= 1.2 else 'below'} the 1.2× that would make it "
                         "worth its first-call cost).")
    notes.append(f"* THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE')} in both implementations' workers "
                 f"(kernel transparent_hugepage: {env.get('transparent_hugepage', '?')}).")
    busy = [r for r in results if r.get("loadavg_at_start", (0,))[0] > env["threads"] + 1]
    if busy and not on_gpu:
        notes.append(f"* load average was above {env['threads'] + 1} at the start of {len(busy)} case(s): other "
                     "processes were competing for the CPU; compare the cpu s column.")
    if any(r["dtype"] == "bf16" for r in results):
        if on_gpu:
            why = "bf16 is the released precision on GPUs and what dtype=auto runs there"
        else:
            why = ("this CPU has native bf16, so the codec's dtype=auto runs Stages B and C in bf16 here; "
                   "python -m benchmarks.precision times fp32 against bf16" if cpu["native_bf16"] else
                   "this CPU has no AVX512-BF16/AMX, bf16 is emulated and 10–100× slower than fp32, so dtype=auto "
                   "runs fp32 here; the rows are a correctness check")
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

decode (not in the default tasks): --tasks decode --repeats 1 took 821 s (14 min) on the 2-core
AVX512_BF16 VM when quiet: building the four workers (ours, its fp32 twin for the check, diffusers
fp32 and bf16) 3–6 s each, the 256² check runs 10–22 s each, then one timed 1024² decode each: ours
bf16 172 s, diffusers fp32 358 s, diffusers bf16 190 s; peak RSS 3.5–5.8 GB per worker. With other
jobs running (load average 3–5) the same run took 2238 s. --compile adds a compiled ours row to every
case; its first call compiles (minutes on a CPU) and, for decode, one untimed decode at full size
runs per row first.

quick run (~1–2 min):
  python -m benchmarks.speed --tasks effnet,stage_b --effnet-batches 1 --stage-b-size 256 --repeats 1
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description="Time cascade-codec against diffusers (Stage A, Stage B, Stage C, the whole decode) and the plain "
                    "NCHW reference (EfficientNet encoder) on the same random weights; report median seconds, "
                    "ratios, peak memory and an output-parity check per case.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated subset of {','.join(ALL_TASKS)}, or all (default: "
                        f"{','.join(DEFAULT_TASKS)}; decode takes ~20 min on 2 CPU cores)")
    p.add_argument("--device", default="auto",
                   help="where every worker runs its models and inputs: cpu, cuda, cuda:N or auto (a GPU when there "
                        "is one, else the CPU; default: auto)")
    p.add_argument("--compile", action="store_true",
                   help="add a row 'ours + compile' to every case: the same call through torch.compile (decode: "
                        "Codec(compile=True)); the table notes its first-call cost and warm speed-up")
    p.add_argument("--compile-warmups", type=int, default=2,
                   help="untimed calls of a compiled row after its first (compiling) one: after a cold compile the "
                        "next calls are still slow (default: 2)")
    p.add_argument("--compile-tolerance", type=float, default=1e-3,
                   help="fp32: largest rel L2 of the compiled output against eager ours (bf16: --bf16-tolerance) "
                        "(default: 1e-3)")
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
    p.add_argument("--decode-size", type=int, default=1024,
                   help="decode: output side in px; EfficientNet latent side = ceil(size/42.67) (default: 1024 → 24)")
    p.add_argument("--decode-check-size", type=int, default=256,
                   help="decode: output side of the check run that compares the outputs before timing (default: 256)")
    p.add_argument("--decode-steps", type=int, default=10, help="decode: Stage B steps (default: 10, official)")
    p.add_argument("--decode-tolerance", type=float, default=2e-2,
                   help="decode check: largest rel L2 of ours in fp32 against diffusers in fp32 (default: 2e-2)")
    p.add_argument("--decode-warmup", action="store_true",
                   help="decode: one untimed decode at --decode-size per row before the timed ones (implied by "
                        "--compile; default: the timed decode is the first at that size, as in a fresh process)")
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
    if tasks == ["all"]:
        tasks = list(ALL_TASKS)
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
    for name in ("decode_size", "decode_check_size"):
        size = getattr(args, name)
        if not 64 <= size <= 4096:
            p.error(f"--{name.replace('_', '-')} must be within 64–4096 px")
        side, ours, theirs = decode_sides(size)
        if ours != theirs:
            p.error(f"--{name.replace('_', '-')} {size}: ours decodes a {side}² latent at Stage A side {ours}, diffusers "
                    f"at int({side}·10.67) = {theirs}; pick a size where they agree (a multiple of 128 does)")
    if args.decode_steps < 1:
        p.error("--decode-steps must be >= 1")
    args.device = device_arg(p, args.device)
    return args


def build_cases(args) -> list[Case]:
    def rows(baseline: str, dtype: str) -> list[Impl]:
        found = [Impl("ours", "ours", dtype), Impl(baseline, baseline, dtype)]
        return found + ([Impl("ours_compiled", "ours", dtype, compile=True)] if args.compile else [])

    cases: list[Case] = []
    if "effnet" in args.tasks:
        for b in args.effnet_batches:
            cases.append(Case("effnet", "fp32", args.effnet_size, b, rows("reference", "fp32"), args.repeats))
    for task, size in (("stage_a", args.stage_a_size), ("stage_b", args.stage_b_size),
                       ("stage_c", args.stage_c_size)):
        if task in args.tasks:
            case = Case(task, "fp32", size, 1, rows("diffusers", "fp32"), args.repeats)
            if args.bf16:
                case.make_reference_for.append((args.bf16_size, 1))
            cases.append(case)
    if args.bf16:
        for task in ("stage_a", "stage_b", "stage_c"):
            if task in args.tasks:
                cases.append(Case(task, "bf16", args.bf16_size, 1, rows("diffusers", "bf16"), args.bf16_repeats))
    if "decode" in args.tasks:
        cases.append(decode_case(args))
    return cases


def decode_case(args) -> Case:
    """The whole decode: ours at the codec's default precision, diffusers at its default (fp32) and in bf16, a
    compiled ours with --compile, and ours in fp32 for the check run only where ours' default is not fp32."""
    auto = resolved_dtype("auto", args.device)
    impls = [Impl("ours", "ours", "auto"), Impl("diffusers", "diffusers", "fp32"),
             Impl("diffusers_bf16", "diffusers", "bf16")]
    if args.compile:
        impls.append(Impl("ours_compiled", "ours", "auto", compile=True))
    if auto != "fp32":
        impls.append(Impl("ours_fp32", "ours", "fp32", timed=False))
    return Case("decode", auto, args.decode_size, 1, impls, args.repeats, check_size=args.decode_check_size,
                warmup=args.decode_warmup or args.compile, steps=args.decode_steps)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.thp_alloc:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # inherited by the spawned workers
    env = environment(args)
    cases = build_cases(args)
    torch.set_num_threads(args.threads)
    dtypes = sorted({resolved_dtype(im.dtype, args.device) for c in cases for im in c.impls})
    env["peak_gflops"] = args.peak_gflops = {d: gemm_peak_gflops(_dtype(d), device=args.device) for d in dtypes}
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
