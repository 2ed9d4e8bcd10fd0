"""benchmarks.kernels: profiled kernels sorted into groups by name (the HALO and QLoRA diagnoses read these)."""

from benchmarks.diag.halo_step import KERNEL_GROUPS as HALO_GROUPS
from benchmarks.kernels import group_times, kernel_group
from benchmarks.qlora import KERNEL_GROUPS as QLORA_GROUPS


def test_first_matching_group_wins_and_the_rest_is_other():
    # an FP8 cuBLAS kernel also matches the bf16 GEMM fragments: HALO's list puts FP8 first
    assert kernel_group("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_coopA_algo2_TNT", HALO_GROUPS) == "gemm fp8"
    assert kernel_group("nvjet_sm90_qqsss_144x128_128x6_1x2_h_bz_coopA_algo2_TNN", HALO_GROUPS) == "gemm fp8"  # fp32 out
    assert kernel_group("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", HALO_GROUPS) == "gemm bf16"
    # bitsandbytes' dequantize kernels come before the GEMMs in QLoRA's list
    assert kernel_group("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(...)", QLORA_GROUPS) == "nf4 (bitsandbytes)"
    assert kernel_group("void at::native::vectorized_elementwise_kernel<4, ...>", QLORA_GROUPS) == "elementwise and other"


def test_group_times_sum_per_group_largest_first():
    by_name = {"triton_poi_fused_gelu_0": 1.0, "triton_red_fused_sum_1": 0.5, "nvjet_sm90_tst_a": 3.0, "memcpy_like": 0.25}
    totals = group_times(by_name, QLORA_GROUPS)
    assert totals == {"gemm": 3.0, "fused (Inductor)": 1.5, "elementwise and other": 0.25}
    assert list(totals) == ["gemm", "fused (Inductor)", "elementwise and other"]
