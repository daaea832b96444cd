"""benchmarks.peak: the FLOPs counted from the architecture and the GEMM rate the speed benchmark reads them against."""

import torch

from benchmarks.peak import gemm_peak_gflops, model_flops


def test_stage_b_lite_evaluation_at_1024_counts_about_two_teraflops_from_the_meta_model():
    # one lite Stage B evaluation at 1024² is about 2.2 TFLOP (issue 16's estimate); twice the batch, twice the work
    one = model_flops("stage_b", 1024, 1)
    assert 2.0e12 < one < 2.5e12
    assert model_flops("stage_b", 1024, 2) == 2 * one


def test_every_benchmarked_model_has_a_positive_count_that_grows_with_the_image():
    for task in ("effnet", "stage_a", "stage_c"):
        small, big = model_flops(task, 256, 1), model_flops(task, 512, 1)
        assert 0 < small < big, task


def test_gemm_peak_is_a_positive_rate_in_each_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        assert gemm_peak_gflops(dtype, sizes=(128,), repeats=2) > 0
