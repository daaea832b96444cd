"""The distance to the hardware's limit: this machine's matrix-multiply peak, measured, and each benchmarked model's
floating-point operations, counted once from the architecture.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` over one call of the model built on the meta
device (shapes only: no weights, no arithmetic, about a second for a full-size Stage B), so they count what the
architecture asks for — convolutions, matrix products, attention — the same for every implementation of it. The
peak is the best of a few large square GEMMs in the given dtype with the benchmark's thread count: what this CPU
(or GPU) reaches on the most favourable dense work, the ceiling a model's achieved rate is read against.
"""

from __future__ import annotations

import time

import torch


def gemm_peak_gflops(dtype: torch.dtype, sizes: tuple[int, ...] | None = None, repeats: int = 5,
                     device: str | torch.device = "cpu") -> float:
    """Best GFLOP/s over ``repeats`` ``n×n @ n×n`` products in ``dtype`` for each ``n`` of ``sizes`` (after one
    warm-up each), 2·n³ operations per product, on ``device`` (synchronised around each product on a GPU).
    ``sizes`` default: 1024 and 2048 on the CPU, 4096 and 8192 on a GPU (smaller ones leave it idle part of the
    time). The best, not the median: other load only ever lowers it."""
    device = str(device)
    if sizes is None:
        sizes = (1024, 2048) if torch.device(device).type == "cpu" else (4096, 8192)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.mm(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def model_flops(task: str, size: int, batch: int, steps: int = 10) -> float:
    """Floating-point operations of one timed call of ``task`` (``effnet`` encode, ``stage_a`` decode, one
    ``stage_b``/``stage_c`` lite evaluation, a whole ``decode`` of ``steps`` CFG steps) at image side ``size`` and
    ``batch``, as :mod:`benchmarks.speed` runs them."""
    from torch.utils.flop_counter import FlopCounterMode

    from codec.presets import create_model

    from .speed import STAGE_A_SCALE, decode_sides, make_inputs

    if task == "decode":  # steps × Stage B at twice the batch (CFG), then Stage A; the sampler's own maths is tiny
        side, a_side, _ = decode_sides(size)
        with torch.device("meta"):
            stage_b = create_model("stage_b_lite").eval()
            from codec.stage_a import StageA

            stage_a = StageA(scale_factor=STAGE_A_SCALE).eval()
            x = torch.empty(2 * batch, 4, a_side, a_side)
            r, eff, clip = torch.empty(2 * batch), torch.empty(2 * batch, 16, side, side), torch.empty(2 * batch, 1, 1280)
            with torch.no_grad(), FlopCounterMode(display=False) as b_count:
                stage_b(x, r, eff, clip)
            with torch.no_grad(), FlopCounterMode(display=False) as a_count:
                stage_a.decode(x[:batch])
        return float(steps * b_count.get_total_flops() + a_count.get_total_flops())

    inputs = {k: v.to("meta") for k, v in make_inputs(task, size, batch, 0).items()}
    with torch.device("meta"):
        if task == "effnet":
            from codec.effnet import EfficientNetEncoder

            model = EfficientNetEncoder().eval()
            call = lambda: model.encode(inputs["images"])  # noqa: E731
        elif task == "stage_a":
            from codec.stage_a import StageA

            model = StageA(scale_factor=STAGE_A_SCALE).eval()
            call = lambda: model.decode(inputs["latent"])  # noqa: E731
        elif task in ("stage_b", "stage_c"):
            model = create_model(f"{task}_lite").eval()
            conds = ("effnet", "clip") if task == "stage_b" else ("clip_text", "clip_text_pooled", "clip_img")
            call = lambda: model(inputs["x"], inputs["r"], *(inputs[c] for c in conds))  # noqa: E731
        else:
            raise ValueError(task)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
    return float(counter.get_total_flops())
