"""``dtype="auto"``: bf16 for Stage B and Stage C on CUDA and on CPUs with native bf16, fp32 elsewhere; the encoder
and Stage A stay fp32; bf16 stays close to fp32 on the same weights."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from codec import Codec
from codec import weights as W
from codec.cli import main
from codec.devices import auto_dtype, cpu_flags, cpu_native_bf16


def _dtypes(codec: Codec) -> dict[str, torch.dtype]:
    return {name: next(getattr(codec, name).parameters()).dtype for name in ("effnet", "stage_a", "stage_b")}


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = cpu_flags()  # the real probe: bound at import, before conftest's autouse fixture replaces it
    assert isinstance(flags, frozenset)
    if platform.machine() == "x86_64":
        assert "sse2" in flags


def test_native_bf16_is_read_from_the_cpu_flags(cpu_with_native_bf16):
    assert cpu_native_bf16() == "AVX512_BF16"  # the (mocked) flags of this machine
    assert cpu_native_bf16({"avx2", "avx512f", "avx512_bf16"}) == "AVX512_BF16"
    assert cpu_native_bf16({"avx512_bf16", "amx_bf16", "amx_tile"}) == "AMX-BF16"
    assert cpu_native_bf16({"avx2", "avx512f", "avx512_vnni"}) is None
    assert cpu_native_bf16(set()) is None


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_with_native_bf16):
    assert auto_dtype("cpu") == (torch.bfloat16, "bf16: CPU has AVX512_BF16")
    assert W.resolve_dtype("auto", "cpu") == W.resolve_dtype(None, "cpu") == auto_dtype("cpu")
    assert W.default_dtype("cpu") == torch.bfloat16


def test_auto_is_fp32_on_a_cpu_without_native_bf16():
    assert auto_dtype("cpu") == (torch.float32, "fp32: CPU has no native bf16 (AVX512_BF16 or AMX-BF16)")
    assert W.default_dtype("cpu") == torch.float32


@pytest.mark.parametrize("native", [False, True])
def test_cuda_and_other_devices_do_not_depend_on_the_cpu(native, request):
    if native:
        request.getfixturevalue("cpu_with_native_bf16")
    assert auto_dtype("cuda") == (torch.bfloat16, "bf16: CUDA (the released precision)")
    assert auto_dtype("cuda:1")[0] == torch.bfloat16
    assert auto_dtype("mps") == (torch.float32, "fp32: default on mps")


def test_explicit_choices_are_kept(cpu_with_native_bf16):
    assert W.resolve_dtype("fp32", "cpu") == (torch.float32, "fp32: requested")
    assert W.resolve_dtype(torch.float16, "cpu") == (torch.float16, "fp16: requested")
    assert W.parse_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'; use auto, bf16"):
        W.parse_dtype("int8", "cpu")


def test_codec_auto_runs_stage_b_in_bf16_and_the_rest_in_fp32(tiny_weights, cpu_with_native_bf16):
    codec = Codec.from_pretrained(tiny_weights, device="cpu")
    assert _dtypes(codec) == {"effnet": torch.float32, "stage_a": torch.float32, "stage_b": torch.bfloat16}
    assert codec.info()["precision"] == "bf16: CPU has AVX512_BF16"
    assert codec.info()["stage_b_dtype"] == "bfloat16"
    explicit = Codec.from_pretrained(tiny_weights, device="cpu", dtype=torch.float32)
    assert _dtypes(explicit)["stage_b"] == torch.float32 and explicit.dtype_reason == "fp32: requested"


def test_codec_auto_is_fp32_everywhere_without_native_bf16(tiny_weights):
    codec = Codec.from_pretrained(tiny_weights, device="cpu")
    assert set(_dtypes(codec).values()) == {torch.float32}
    assert codec.info()["precision"].startswith("fp32: CPU has no native bf16")


def test_generation_auto_runs_stage_c_in_bf16(tiny_weights, cpu_with_native_bf16):
    from codec.generation.pipeline import TextToImage

    pipe = TextToImage.from_pretrained(tiny_weights, device="cpu")
    assert (pipe.dtype, pipe.dtype_reason) == (torch.bfloat16, "bf16: CPU has AVX512_BF16")
    assert next(pipe._stage_c().parameters()).dtype == torch.bfloat16
    assert TextToImage.from_pretrained(tiny_weights, device="cpu", dtype="fp32").dtype == torch.float32


def test_generation_auto_is_fp32_without_native_bf16(tiny_weights):
    from codec.generation.pipeline import TextToImage

    pipe = TextToImage.from_pretrained(tiny_weights, device="cpu")
    assert pipe.dtype == torch.float32 and pipe.dtype_reason.startswith("fp32: CPU has no native bf16")


@pytest.mark.parametrize("native", [False, True])
def test_cascade_info_says_which_precision_auto_runs_and_why(tiny_weights, native, request):
    if native:
        request.getfixturevalue("cpu_with_native_bf16")
    r = CliRunner().invoke(main, ["info", str(tiny_weights)])
    assert r.exit_code == 0, r.output
    expected = "bf16: CPU has AVX512_BF16" if native else "fp32: CPU has no native bf16"
    assert f"precision with --dtype auto on cpu: {expected}" in r.output


# bf16 keeps 8 significant bits: each rounding of a weight or an activation errs by at most 2^-9 ≈ 0.2 %
# relative, and the errors of a network's many roundings add up like a random walk (measured on these tiny random
# weights: ~1.1 % for one denoiser evaluation, ~2.7 % for a 10-step CFG decode through Stage A). The tolerances
# leave ~3× / ~2× room for other CPUs' kernels and stay far below what a broken bf16 path gives (a wrong weight or
# a missing autocast errs by tens of %; decoding with another seed differs by ~85 %, also asserted).
DENOISER_TOLERANCE = 0.03
DECODE_TOLERANCE = 0.06


@pytest.fixture(scope="module")
def codecs_fp32_bf16(tiny_weights):
    return (Codec.from_pretrained(tiny_weights, device="cpu", dtype="fp32"),
            Codec.from_pretrained(tiny_weights, device="cpu", dtype="bf16"))


def test_bf16_stage_b_denoiser_is_close_to_fp32(codecs_fp32_bf16):
    fp32, bf16 = codecs_fp32_bf16
    g = torch.Generator().manual_seed(0)
    c = fp32.stage_b.config
    x, eff = torch.randn(2, c.c_in, 32, 32, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    clip, r = torch.randn(2, 1, c.c_clip, generator=g), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        ref, out = fp32.stage_b(x, r, eff, clip), bf16.stage_b(x, r, eff, clip)
    assert out.dtype == torch.bfloat16  # computed under autocast, not silently in fp32
    assert _rel_l2(out, ref) < DENOISER_TOLERANCE


def test_bf16_decode_is_close_to_fp32(codecs_fp32_bf16):
    fp32, bf16 = codecs_fp32_bf16
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = fp32.decode(latent, height=64, width=64, seed=0, output="tensor")
    out = bf16.decode(latent, height=64, width=64, seed=0, output="tensor")
    other_seed = fp32.decode(latent, height=64, width=64, seed=1, output="tensor")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel_l2(out, ref) < DECODE_TOLERANCE < _rel_l2(other_seed, ref) / 10


def test_auto_bf16_generation_runs_end_to_end_close_to_fp32(tiny_weights, cpu_with_native_bf16):
    """Text encoder, Stage C and Stage B in bf16 (as on CUDA), Stage A in fp32: a whole generation runs and stays
    near the fp32 one (measured ~2.3 % relative L2, within the decode tolerance; another seed differs by ~80 %)."""
    from codec.generation.pipeline import TextToImage

    kwargs = {"height": 256, "width": 256, "steps_c": 2, "steps_b": 2, "seed": 0, "output": "tensor"}
    out = TextToImage.from_pretrained(tiny_weights, device="cpu").generate("a red cube", **kwargs).images
    ref = TextToImage.from_pretrained(tiny_weights, device="cpu", dtype="fp32").generate("a red cube", **kwargs).images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel_l2(out, ref) < DECODE_TOLERANCE
