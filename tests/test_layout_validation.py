"""Published training runs at their published layouts (tests/fixtures/published_runs.yaml): the
visible rows stay within the goals (issue 10: median |error| ≤ 10%, each row ≤ 20%), every
published layout that ran fits, and the published out-of-memory cases do
not. The table itself is benchmarks/published_runs.py's, written up in docs/validation.md."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from benchmark_scripts import load_benchmark

if TYPE_CHECKING:
    from archplan.hardware import FlashImpl
    from archplan.planning.pricing import Precision

pytestmark = pytest.mark.xdist_group("test_layout_validation")

DEFAULT_TOLERANCE = 0.20
MEDIAN_GOAL = 0.10


@pytest.fixture(scope="module")
def rows() -> list[tuple[dict[str, Any], Any]]:
    bench = load_benchmark("published_runs")
    runs = bench.load()["runs"]
    found = bench.rows(with_search=False)
    assert [r.name for r in found] == [run["name"] for run in runs]
    return list(zip(runs, found))


def test_visible_rows_within_the_goals(rows: list[tuple[dict[str, Any], Any]]) -> None:
    visible = [row for _, row in rows if not row.holdout and row.error is not None]
    assert len(visible) >= 15
    for row in visible:
        assert abs(row.error) <= DEFAULT_TOLERANCE, (row.name, row.error)
    assert statistics.median(abs(row.error) for row in visible) <= MEDIAN_GOAL


def test_the_search_agrees_with_the_visible_runs_or_names_their_constraint() -> None:
    """Issue 10 part 5 on the visible runs: the search, given only GPUs, GPU, sequence and batch
    (and the run's constraint where it has one), ranks a layout predicted at most SEARCH_GOAL faster
    than the published one, or the row names what bound the run. 17 of the 21 are within it; the
    four that are not (Narayanan's 3.6B, 18.4B and 39.1B, Korthikanti's 22B at full recompute) are
    Megatron-LM runs of 2021-2022 held to full recompute without sequence parallelism. The 3.6B
    left the goal when the pipeline's steady-state receives began to run with its sends
    (2026-12-06): the search's TP1 PP8×v2 DP8 gained, the published TP2 DP32 has no pipeline
    (+7.9% → +12.2%)."""
    bench = load_benchmark("published_runs")
    data = bench.load()
    found = [bench.evaluate_run(run, data["models"], data["gpt_sizes"], True)
             for run in data["runs"] if not run.get("holdout")]
    searched = [row for row in found if row.search_gap is not None]
    assert bench.search_summary(found, False) == {"n": len(searched), "within_goal": 17} and len(searched) == 21
    for row in searched:
        assert row.search_gap <= bench.SEARCH_GOAL or (row.constraint and row.constraint_reason), row.name


# the runs of the issue's data set (the visible rows and the held-out rows from the same sources);
# the rows this project added from elsewhere (MosaicML, torchtitan) are held out and unconstrained
ISSUE_SOURCES = ("Narayanan", "Korthikanti", "Llama 3", "BLOOM", "OPT", "DeepSeek")
# the rack-scale and Blackwell Ultra rows, each system held by its own test
LATER_SYSTEMS = ("GB200", "GB300", "B300")


def test_every_run_of_the_issue_data_set_within_the_worst_goal(rows: list[tuple[dict[str, Any], Any]]) -> None:
    listed = [row for _, row in rows if row.name.startswith(ISSUE_SOURCES) and row.error is not None]
    assert len(listed) == 35
    for row in listed:
        assert abs(row.error) <= DEFAULT_TOLERANCE, (row.name, row.error)


# 26.04.01 (PP8×v2 EP32), 25.09 on 1,024 H100, 26.04, 26.02.01, 26.02, 25.09 and 25.11 on 256 B200
DEEPSEEK_DGX_ERRORS = [-0.15, -0.02, 0.13, 0.14, 0.18, 0.33, 0.4]


def test_nvidia_dgx_rows_within_the_goals(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The 26 held-out fp8 rows of NeMo 24.07 and Megatron-Bridge, 20 on DGX-H100 and 6 on DGX-B200
    (docs/validation.md, "The DGX-H100 round"), the 8 rows of dense models and DeepSeek-V3 from
    the archive's newer containers ("The archive's newer containers") and 25.11's DeepSeek-V3 on
    B200 (added 2026-12-06), all fit. The 28 of dense models: each within ±20% (GPT3-20B since the
    Hopper family's rings drive their members' NICs; 25.11's Llama 3.1 405B on 128 B200, +20.0% once
    its fp8 parameter gathers halved, at +16.9% since B200's GEMMs run at its measured matmul rate:
    "Blackwell's GEMMs at their measured matmul rate", +15.0% since the pipeline's steady-state
    receives run with its sends), median within ±10%. The 7 DeepSeek-V3 rows, all of which trained
    with the multi-token-prediction layer ("DeepSeek-V3's rows on B200 and H100 ran MTP"), are judged
    with the other MoE runs (`accuracy.HELD_OUT_MOE`): 25.09 on 1,024 H100, 26.04.01's PP8×v2
    EP32 and the PP16 EP8 rows at GBS 4,096 within ±20% (26.02's since the pipeline's paired sends and receives and Hopper's GEMM efficiency refitted, 0.62 → 0.59 (2026-12-06)),
    the PP16 EP8 rows at GBS 2,048 (25.09 and 25.11, 128 micro-batches) priced too fast, where the
    bubble explains 1.06× of the 1.19× to 1.32× the releases measured apart."""
    nvidia = [(run, row) for run, row in rows if row.name.startswith(("NeMo", "Megatron-Bridge"))
              and "Qwen3" not in row.name and not row.name.endswith(LATER_SYSTEMS) and not row.name.startswith(NEMO_OWN)]
    assert len(nvidia) == 35 and all(row.holdout and row.fits for _, row in nvidia)
    deepseek = [(run["model"], row) for run, row in nvidia if "DeepSeek" in row.name]
    assert len(deepseek) == 7 and all(" none " in row.layout and model == "deepseek-v3-mtp" for model, row in deepseek)
    assert sorted(round(row.error, 2) for _, row in deepseek) == DEEPSEEK_DGX_ERRORS
    nvidia = [row for _, row in nvidia]
    dense = [row for row in nvidia if "DeepSeek" not in row.name]
    assert len(dense) == 28
    assert all(abs(row.error) <= DEFAULT_TOLERANCE for row in dense)
    assert statistics.median(abs(row.error) for row in dense) <= MEDIAN_GOAL


# NeMo's own tables, held out on 2026-12-07 (docs/validation.md, "NeMo's own tables of 24.03.01, 25.02 and 25.04")
NEMO_OWN = ("NeMo 24.03.01 ", "NeMo 25.02 ", "NeMo 25.04 ")


def test_nemos_own_tables_are_held_out_as_first_evaluated(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The 21 rows of NeMo's own tables, evaluated once before they entered: all fit; the nine
    long-context Llama 2 7B runs on 4 to 1,024 H100 (CP 1 to 32, 4K to 1M tokens) within −5.1% …
    −0.5%; four outside ±20%: NeMo 25.02's Llama 3 8B, 70B and 3.1 405B on B200 (+21.4% … +26.9%,
    the same runs measured more in Megatron-Bridge 25.09) and 25.04's Mixtral on GB200 (−26.4%)."""
    nemo = {row.name: row for _, row in rows if row.name.startswith(NEMO_OWN)}
    assert len(nemo) == 21 and all(row.holdout and row.fits for row in nemo.values())
    long_context = [row for name, row in nemo.items() if name.startswith("NeMo 24.03.01 ")]
    assert len(long_context) == 9 and all(-0.06 < row.error < 0 for row in long_context)
    assert sorted(name for name, row in nemo.items() if abs(row.error) > DEFAULT_TOLERANCE) == [
        "NeMo 25.02 Llama 3 70B, 64 B200", "NeMo 25.02 Llama 3 8B, 8 B200", "NeMo 25.02 Llama 3.1 405B, 128 B200",
        "NeMo 25.04 Mixtral 8x7B, 64 GB200"]


def test_qwen3_moe_rows_are_held_out_at_their_recipes_recompute(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The 12 Qwen3 MoE rows the same archive's rules added with the Qwen3 presets (docs/validation.md,
    "The Qwen3 MoE rows"), the 3 DGX-H100 ones once parallel folding could express their EP32 over
    TP2·DP16, the one run of Megatron-Bridge's MoE guide ("A Qwen3 run outside the archive"), the
    11 of the archive's newer containers and the 3 HybridEP runs of its docs ("The archive's newer
    containers"), and the 5 of Megatron-Core's MoE team ("Megatron-Core's own Qwen3-235B runs"):
    held out, every one at the recompute its recipe states (none, but the ModelZoo's FSDP run's
    full), and every one predicted to fit (7 did not until the routed copies were weighted inside
    the experts, as Megatron-Core does: docs/validation.md, "Megatron-Core's MoE layer weights routed
    copies inside the experts"). The archive's runs are not held to the goals (the model
    prices Qwen3-235B up to 2x faster than they measured, and the releases NVIDIA filed as a
    regression measured Qwen3-30B up to 3.0x slower); the guide's run, within them when first
    evaluated (-11.0%), is, so that a change moving it shows here."""
    qwen = {row.name: row for _, row in rows if "Qwen3" in row.name and not row.name.endswith(LATER_SYSTEMS)}
    fsdp = "Megatron-MoE-ModelZoo 2025-05 Qwen3-235B-A22B BF16, 256 H100 (EP8, FSDP)"
    assert len(qwen) == 32 and all(row.holdout for row in qwen.values())
    assert all(" none " in row.layout for name, row in qwen.items() if name != fsdp)
    assert " full " in qwen[fsdp].layout
    assert all(row.fits for row in qwen.values())
    assert qwen["Megatron-Bridge 26.02 Qwen3-235B-A22B, 256 H100"].layout.startswith("TP2 PP8×v4 DP16 EP32")
    guide = qwen["Megatron-Bridge 2026-05 Qwen3-30B-A3B BF16, 16 H100 (all-to-all dispatcher)"]
    assert guide.layout == "TP1 PP1 DP16 EP16 ZeRO-1 none mb1" and abs(guide.error) <= DEFAULT_TOLERANCE


def test_gb200_rows_are_held_out_at_their_recipes(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The 35 DGX-GB200 rows of Megatron-Bridge's docs (docs/validation.md, "The archive's DGX-GB200
    rows"), evaluated once at their recipes: held out, no recompute, the MoE all-to-all overlapped
    from 26.06 on. As first evaluated: the 21 MoE rows within ±22% (DeepSeek-V3 −12.8% … +2.8%,
    Qwen3-235B-A22B −14.1% … +4.5%, Qwen3-30B-A3B −14.8% … +21.8%); the 14 dense rows all priced
    fast, +10.9% … +28.1%, as B200's are, GB200 being priced with Hopper's fractions of its peak.
    The five Llama 3.1 405B FP8-CS rows then did not fit by 2.0 GiB; they keep their GEMM weights in
    fp8 (`fp8_params`, one byte each on Blackwell) and fit since "FP8 primary weights". Since GB200's
    GEMMs run at its measured matmul rate, 0.908 of Hopper's fraction ("Blackwell's GEMMs at their
    measured matmul rate"), every row is within ±20%: the dense ones +2.2% … +19.0%, the MoE ones
    −18.6% … +17.9%. Since FP8-CS's current scaling is priced ("Transformer Engine's current
    scaling") the five FP8-CS rows run 3.1-3.3 points slower, −0.9% … +8.0%, and since cuDNN's norm
    is priced where their recipe keeps it ("MXFP8's casts and cuDNN's norm") −2.1% … +6.7%."""
    gb200 = {row.name: row for _, row in rows if "GB200" in row.name and row.name.startswith("Megatron-Bridge")}
    assert len(gb200) == 35 and all(row.holdout and row.fits and " none " in row.layout for row in gb200.values())
    dense = [row for name, row in gb200.items() if "Llama" in name]
    moe = [row for name, row in gb200.items() if "Llama" not in name]
    assert len(dense) == 14 and all(abs(row.error) <= DEFAULT_TOLERANCE for row in dense)
    assert all(row.error > 0 for name, row in gb200.items() if "Llama" in name and "FP8-CS" not in name)
    assert len(moe) == 21 and all(abs(row.error) <= DEFAULT_TOLERANCE for row in moe)
    fp8_cs = [row for name, row in gb200.items() if "FP8-CS" in name]
    assert len(fp8_cs) == 5 and all(165 < row.memory_gib < 173.2 for row in fp8_cs)


def test_uncalibrated_gemms_run_at_their_measured_matmul_rate() -> None:
    """An uncalibrated GPU with a row in the one-tool matmul table (`MATMUL_ACHIEVED_BF16`) keeps
    Hopper's GEMM fraction scaled by its measured matmul efficiency over H100's: B200 reaches 77.6% of
    its 2.25 PFLOPS where H100 reaches 80.3% of 989 TFLOPS, GB200 72.9% of 2.5 PFLOPS, so GB200's
    GEMMs price 4.4% faster than B200's, not the datasheets' 11%. A GPU without a row keeps Hopper's
    fraction; the output names the scale."""
    from archplan.hardware import KERNEL_EFFICIENCY, accelerator, kernel_efficiency, matmul_ratio

    hopper = KERNEL_EFFICIENCY["hopper"].gemm
    b200, gb200, l4 = (kernel_efficiency(accelerator(key))[0] for key in ("b200", "gb200", "l4"))
    assert matmul_ratio(accelerator("b200")) == pytest.approx((1745.0 / 2250) / (794.5 / 989.4))
    assert b200.gemm == pytest.approx(hopper * 0.966, abs=5e-4)
    assert gb200.gemm == pytest.approx(hopper * 0.908, abs=5e-4)
    assert gb200.gemm * 2.5 / (b200.gemm * 2.25) == pytest.approx(1822.0 / 1745.0)
    assert l4.gemm == hopper and matmul_ratio(accelerator("l4")) is None
    # B300 measured 78.6% of the same 2.25 PFLOPS; GB300 has no row and keeps Hopper's fraction
    assert kernel_efficiency(accelerator("b300"))[0].gemm == pytest.approx(hopper * 0.979, abs=5e-4)
    assert kernel_efficiency(accelerator("gb300"))[0].gemm == hopper
    assert "GEMMs × 0.908" in gb200.family and "GEMMs" not in l4.family
    assert matmul_ratio(accelerator("h100")) == 1.0


def test_device_names_map_only_to_the_part_they_name() -> None:
    """Substrings mapped an L40 to the L4, an H100 NVL to the H100 SXM (989 TF against its 835) and
    an H800 PCIe to the H800 SXM: bench would report MFU against another part's datasheet. Whole
    words now, and a variant the table lacks maps to none (bench calibrates the peak instead)."""
    from archplan.hardware import match_device_name

    named = {"NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA L4": "l4",
             "NVIDIA L40S": "l40s", "NVIDIA A100-SXM4-40GB": "a100-40gb", "NVIDIA A100 80GB PCIe": "a100-pcie-80gb",
             "NVIDIA A100-PCIE-40GB": "a100-pcie-40gb", "NVIDIA A100-SXM4-80GB": "a100-80gb",
             "NVIDIA GeForce RTX 4090": "rtx4090", "AMD Instinct MI300X": "mi300x", "NVIDIA GB200": "gb200",
             "Tesla V100-SXM2-32GB": "v100"}
    for name, key in named.items():
        gpu = match_device_name(name)
        assert gpu is not None and gpu.key == key, name
    for name in ("NVIDIA L40", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA H800 PCIe",
                 "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce RTX 4090 D", "Tesla V100-PCIE-32GB",
                 "Tesla V100-SXM2-16GB"):
        assert match_device_name(name) is None, name


def test_a_family_member_of_a_lower_peak_runs_attention_in_proportion() -> None:
    """The Hopper attention rates were measured on H100 SXM5 (989 TF): H100 PCIe (756 TF, 114 SMs)
    ran them at their absolute 335/290 TFLOP/s, 44% of its peak against the SXM5's 34%. H200 and
    H800 share the SXM5's peak, so theirs stand."""
    from archplan.hardware import accelerator, kernel_efficiency

    sxm, _ = kernel_efficiency(accelerator("h100-sxm"))
    pcie, calibrated = kernel_efficiency(accelerator("h100-pcie"))
    scale = 756 / 989.4
    assert calibrated and pcie.attention_fwd == pytest.approx(sxm.attention_fwd * scale)
    assert pcie.attention_bwd == pytest.approx(sxm.attention_bwd * scale) and pcie.gemm == sxm.gemm
    assert "attention × 0.764 by the bf16 peak" in pcie.family
    assert all(kernel_efficiency(accelerator(key))[0] == sxm for key in ("h200", "h800"))


def test_gpu_memory_is_what_cuda_sees() -> None:
    """Blackwell's nameplates mix units ("180GB" is 179.1 GiB on a B200, "288GB" 268.6 GiB on a B300
    and 277.5 on a GB300), and ECC keeps 6% of the L4's and L40S's GDDR6 from CUDA, so those parts
    carry nvidia-smi's total; the binary nameplates of A100, H100 and H200 are within 0.5% of
    theirs (docs/plan.md, "fits if")."""
    from archplan.hardware import accelerator

    mib = 1 << 20
    for key, smi_total_mib in (("b200", 183_359), ("gb200", 189_471), ("b300", 275_040), ("gb300", 284_208),
                               ("l4", 23_034), ("l40s", 46_068)):
        assert accelerator(key).memory_bytes == smi_total_mib * mib
    for key, smi_total_mib in (("a100-80gb", 81_920), ("h100-sxm", 81_559)):
        assert abs(accelerator(key).memory_bytes / (smi_total_mib * mib) - 1) < 0.005


def test_blackwell_ultra_gpus_are_b200_and_gb200_with_800g_nics() -> None:
    """B300 and GB300 (NVIDIA's datasheets: the peaks of B200 and GB200, 288 GB at 8 TB/s, 160 SMs):
    B300 in 8-GPU HGX nodes, GB300 one 72-GPU NVLink domain a rack, both with one ConnectX-8 of 800
    Gb/s a GPU, twice the ConnectX-7's 400; torch's device names map to them, not to B200/GB200."""
    from archplan.hardware import accelerator, match_device_name
    from archplan.planning.parallel import interconnect

    for new, old, per_node in (("b300", "b200", 8), ("gb300", "gb200", 72)):
        gpu, was = accelerator(new), accelerator(old)
        assert gpu.peak("bf16") == was.peak("bf16") and gpu.peak("fp8") == was.peak("fp8")
        assert gpu.hbm_bytes_per_s == 8.0e12 and gpu.sms == 160
        net, old_net = interconnect(gpu), interconnect(was)
        assert net.gpus_per_node == per_node and net.intra_node == old_net.intra_node
        assert net.inter_node == 2 * old_net.inter_node
        assert match_device_name(f"NVIDIA {new.upper()}") is gpu


def test_gb300_and_b300_rows_are_held_out_at_their_recipes(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The 50 DGX-GB300 and DGX-B300 rows of the same docs (docs/validation.md, "The archive's
    DGX-GB300 and DGX-B300 rows"), evaluated once at their recipes, with no recompute but the MLA
    up-projection where DeepSeek-V3's recipe states it (priced since "Megatron-Core's MLA
    up-projection recompute": as first evaluated the four 26.02 … 26.04.01 GB300 DeepSeek-V3 rows
    did not fit, 295.4 GiB of 268.2). The 14 dense rows within ±8% but 26.02.01's Llama 3 70B MXFP8,
    whose printed layout matches no recipe (−25.3%, and does not fit); since FP8-CS's current
    scaling is priced the five Llama 3.1 405B FP8-CS rows on GB300 lie −5.1% … −10.6%, and since
    cuDNN's norm is priced where their recipe keeps it ("MXFP8's casts and cuDNN's norm") −6.4% …
    −11.8%, so the dense rows within ±12%; the MoE rows of 26.06 on, on
    GB300, 21% to 27% slow as first evaluated (fused grouped MLP, full-iteration CUDA graphs and fp8
    attention, not priced), 17.5% to 25% since the fused grouped MLP is priced; B300's Qwen3-235B of 26.02 and 26.02.01, at the NCCL all-to-all, priced 2.1-2.2x their
    measurement, which the same GPUs beat by 1.8-2.2x from 26.04 on. Since the pipeline's paired sends and receives and Hopper's GEMM efficiency refitted, 0.62 → 0.59 (2026-12-06) the
    dense rows lie within ±16% and the 26.06-on MoE rows on GB300 19.7% to 26.1% slow."""
    later = {row.name: row for _, row in rows if row.name.endswith(("GB300", "B300"))}
    assert len(later) == 50 and all(row.holdout for row in later.values())
    odd = "Megatron-Bridge 26.02.01 Llama 3 70B MXFP8, 64 GB300"
    dense = [row for name, row in later.items() if "Llama" in name and name != odd]
    assert len(dense) == 13 and all(abs(row.error) <= 0.16 and row.fits for row in dense)
    assert not later[odd].fits and later[odd].error < -0.2
    up_proj = ([later[f"Megatron-Bridge {r} DeepSeek-V3, 256 GB300"]
                for r in ("26.02", "26.02.01", "26.04", "26.04.01")]
               + [later[f"Megatron-Bridge {r} DeepSeek-V3, 256 B300"]
                  for r in ("26.02", "26.02.01", "26.04", "26.04.01", "26.06")])
    assert all(row.fits for row in up_proj)
    graphed = [row for name, row in later.items() if "GB300" in name and "Llama" not in name
               and any(f"Bridge {r} " in name for r in ("26.06", "26.06.01", "26.08"))]
    assert len(graphed) == 10 and all(-0.27 < row.error < -0.19 for row in graphed)
    nccl = [later[f"Megatron-Bridge {r} Qwen3-235B-A22B, 256 B300"] for r in ("26.02", "26.02.01")]
    assert all(1.0 < row.error < 1.25 for row in nccl)


FUSED_RELEASES = ("26.06", "26.06.01", "26.08")


def test_fused_grouped_mlp_is_stated_where_the_recipes_set_it(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The rows that state Transformer Engine's fused grouped MLP are the Blackwell MXFP8 MoE rows
    whose release's recipe sets it (docs/validation.md, "Transformer Engine's fused grouped MLP"):
    every DeepSeek-V3, Qwen3-30B-A3B and Qwen3-235B-A22B row of 26.06, 26.06.01 and 26.08 on GB200,
    GB300 and B300, but 26.06's DeepSeek-V3 on B300, whose v0.5.0 configs leave it off. Priced, it
    brings the three Qwen3-30B-A3B rows on 8 GB300 inside ±20% (−22.7% … −21.5% before) and moves
    every stated row 1.6 to 4.1 points, none of them further from its measurement (GB200's
    DeepSeek-V3 rows at −10.4% … −9.4% since multi-token prediction and its split are priced).
    Since the pipeline's paired sends and receives and Hopper's GEMM efficiency refitted, 0.62 → 0.59 (2026-12-06) the stated rows lie −26.1% … −11.8%, and 26.06's Qwen3-30B-A3B on 8
    GB300 is outside ±20% again (−21.0%)."""
    stated = {run["name"]: row for run, row in rows if run.get("fused_grouped_mlp")}
    expected = {f"Megatron-Bridge {r} {model}, {n} {gpu}"
                for r in FUSED_RELEASES for gpu in ("GB200", "GB300")
                for model, n in (("DeepSeek-V3", 256), ("Qwen3-30B-A3B", 8), ("Qwen3-235B-A22B", 256))}
    expected |= {"Megatron-Bridge 26.06 DeepSeek-V3 (GBS 15360), 256 GB300",
                 "Megatron-Bridge 26.06 Qwen3-30B-A3B, 8 B300"}
    assert set(stated) == expected
    assert all(-0.27 < row.error < -0.11 for row in stated.values())
    assert [abs(stated[f"Megatron-Bridge {r} Qwen3-30B-A3B, 8 GB300"].error) <= DEFAULT_TOLERANCE
            for r in FUSED_RELEASES] == [False, True, True]


def test_fp8_attention_is_stated_where_the_recipes_set_it_and_a_rate_is_measured(
        rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The rows that state fp8 attention are those whose release's recipe sets
    `fp8_dot_product_attention` on a GPU with a measured MXFP8 attention rate (GB200, GB300:
    docs/validation.md, "cuDNN's MXFP8 attention on GB200 and GB300"): every Qwen3 row of 26.06 on
    there, and DeepSeek-V3's on GB300 (its GB200 recipes leave it off). 26.06's Qwen3-30B-A3B on B300
    sets it too, and stays unpriced: B300 has no measurement. Priced, DeepSeek-V3's head dim of 192
    gains (its rows 3.4 points nearer their measurements); at Qwen3's 128 the faster forward and the
    slower backward at 4,096 tokens all but cancel (0.0 to 0.4 points further)."""
    stated = {run["name"]: row for run, row in rows if run.get("fp8_attention")}
    expected = {f"Megatron-Bridge {r} {model}, {n} {gpu}"
                for r in FUSED_RELEASES for gpu in ("GB200", "GB300")
                for model, n in (("Qwen3-30B-A3B", 8), ("Qwen3-235B-A22B", 256))}
    expected |= {f"Megatron-Bridge {r} DeepSeek-V3, 256 GB300" for r in FUSED_RELEASES}
    expected |= {"Megatron-Bridge 26.06 DeepSeek-V3 (GBS 15360), 256 GB300"}
    assert set(stated) == expected
    deepseek = [row for name, row in stated.items() if "DeepSeek" in name]
    assert len(deepseek) == 4 and all(-0.23 < row.error < -0.18 for row in deepseek)


def test_fp8_lm_head_is_stated_where_the_recipes_set_it(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The rows that run the LM head in MXFP8 are DeepSeek-V3's MXFP8 rows of 26.06 on on GB200 and
    GB300, whose recipes set `fp8_output_proj` (docs/validation.md, "Megatron-Core's MXFP8 LM head").
    Priced, they move 1.4 (GB300) to 2.9 (GB200) points towards their measurements, and three of
    GB300's four come inside ±20%; the fourth (GBS 15,360) since multi-token prediction and its
    split are priced (−20.2% → −19.8%). Since the pipeline's paired sends and receives and Hopper's GEMM efficiency refitted, 0.62 → 0.59 (2026-12-06) the four on GB300 are −20.9% …
    −22.2%, outside again; the three on GB200 inside (−12.8% … −11.8%)."""
    stated = {run["name"]: row for run, row in rows if run.get("fp8_lm_head")}
    expected = {f"Megatron-Bridge {r} DeepSeek-V3, 256 {gpu}" for r in FUSED_RELEASES for gpu in ("GB200", "GB300")}
    expected |= {"Megatron-Bridge 26.06 DeepSeek-V3 (GBS 15360), 256 GB300"}
    assert set(stated) == expected
    assert sum(abs(row.error) <= DEFAULT_TOLERANCE for row in stated.values()) == 3


def test_current_scaling_is_stated_where_the_recipes_run_it(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """The rows priced under per-tensor current scaling are the Megatron-Bridge rows in per-tensor fp8
    (those that keep their weights in fp8, `fp8_params`) but 25.09's, which ran delayed scaling: the
    performance scripts of 26.02 on map "fp8_cs" to `bf16_with_fp8_current_scaling_mixed` and the
    archive labels 25.11's per-tensor rows FP8-CS (docs/validation.md, "Transformer Engine's current
    scaling"); its B200 Qwen3 rows it labels FP8-MX, and they are MXFP8 rows (below). NeMo 25.02's
    B200 rows ran delayed scaling (NeMo v2.2.0's recipes), and NeMo 25.04's GB200 rows current
    scaling (its page says so), the one under Megatron FSDP without fp8 weights (docs/validation.md,
    "NeMo's own tables of 24.03.01, 25.02 and 25.04").
    Priced, the Hopper Llama 3.1 405B rows move 5.8-6.2 points slower (to −0.7% … +8.6%), the Llama 3
    70B rows 4.3-4.4 (to −9.7% … −7.3%), the Qwen3-30B-A3B rows on 16 H100 5.4-9.7; no row crosses
    ±20% either way. Since the pipeline's paired sends and receives and Hopper's GEMM efficiency refitted, 0.62 → 0.59 (2026-12-06) the 405B rows read −4.3% … +5.1% and the 70B rows
    −12.7% … −10.4%."""
    stated = {run["name"]: row for run, row in rows if run.get("fp8_scaling") == "current"}
    nemo_fsdp = "NeMo 25.04 Llama 3 70B (Megatron FSDP), 64 GB200"
    expected = {run["name"] for run, _ in rows if run.get("fp8_params") and " 25.09 " not in run["name"]
                and not run["name"].startswith("NeMo 25.02 ")} | {nemo_fsdp}
    assert set(stated) == expected and len(stated) == 39
    assert all(run.get("fp8_scaling", "delayed") == "delayed" for run, _ in rows if " 25.09 " in run["name"])
    llama = [row for name, row in stated.items() if "Llama" in name and "H100" in name]
    assert len(llama) == 10 and all(-0.13 < row.error < 0.06 for row in llama)


def test_mxfp8_and_cudnn_norm_are_stated_where_the_recipes_run_them(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """Every Blackwell fp8 row that does not keep per-tensor fp8 weights ran MXFP8 (the archive labels
    them so from 26.02 on, and 25.11's B200 Qwen3 rows FP8-MX: docs/validation.md, "25.11's B200 Qwen3
    rows ran MXFP8"; but NeMo 25.04's per-tensor Megatron FSDP row): 88 rows state `fp8_scaling: mxfp8`. cuDNN's norm
    (NVTE_NORM_FWD_USE_CUDNN=1) is stated where Megatron-Bridge's scripts keep it for the row's
    recipe (`perf_plugins.py`, v0.2.0 … v0.5.1; v0.6.0's DeepSeek-V3 perf recipes): DeepSeek-V3's
    MXFP8 rows on GB200 and GB300, the Llama 3.1 405B FP8-CS rows there, and 25.11's Llama 3 8B FP8-CS
    on H100; 26 rows (docs/validation.md, "MXFP8's casts and cuDNN's norm"). Priced, the GB200 dense
    MXFP8 rows move 2.4-2.8 points nearer (+7.5% … +16.4%) and no row crosses ±20%; +3.7% …
    +12.2% since the pipeline's paired sends and receives and Hopper's GEMM efficiency refitted, 0.62 → 0.59 (2026-12-06)."""
    blackwell = ("b200", "gb200", "b300", "gb300")
    mxfp8 = {run["name"] for run, _ in rows if run.get("fp8_scaling") == "mxfp8"}
    expected = {run["name"] for run, _ in rows if run.get("precision") == "fp8" and run["gpu"] in blackwell
                and not run.get("fp8_params")} - {"NeMo 25.04 Llama 3 70B (Megatron FSDP), 64 GB200"}
    assert mxfp8 == expected and len(mxfp8) == 88
    cudnn = {run["name"] for run, _ in rows if run.get("cudnn_norm")}
    expected = ({run["name"] for run, _ in rows if run["name"] in mxfp8 and "DeepSeek-V3" in run["name"]
                 and run["gpu"] in ("gb200", "gb300")}
                | {run["name"] for run, _ in rows if "Llama 3.1 405B FP8-CS" in run["name"]}
                | {"Megatron-Bridge 25.11 Llama 3 8B, 8 H100"})
    assert cudnn == expected and len(cudnn) == 26
    gb200_mx = [row for run, row in rows if run["name"] in mxfp8 and "Llama" in run["name"] and run["gpu"] == "gb200"]
    assert len(gb200_mx) == 9 and all(0.03 < row.error < 0.13 for row in gb200_mx)


@pytest.mark.parametrize("family", ["ampere", "hopper"])
def test_gemm_efficiency_is_the_documented_calibration(family: str) -> None:
    """Each family's GEMM efficiency is still what docs/validation.md's procedure gives on the
    current model: the two-decimal value whose visible rows' median error is nearest zero (the
    Hopper value had drifted from 0.68 to a stale 0.66 as the model changed)."""
    import archplan.hardware as hardware

    bench = load_benchmark("published_runs")
    data = bench.load()
    visible = [run for run in data["runs"] if not run.get("holdout")
               and hardware.FAMILY_OF[hardware.accelerator(run["gpu"]).key] == family]
    current = hardware.KERNEL_EFFICIENCY[family]

    def median_error(gemm: float) -> float:
        hardware.KERNEL_EFFICIENCY[family] = replace(current, gemm=gemm)
        try:
            found = [bench.evaluate_run(run, data["models"], data["gpt_sizes"], False) for run in visible]
        finally:
            hardware.KERNEL_EFFICIENCY[family] = current
        return statistics.median(row.error for row in found if row.error is not None)

    here = abs(median_error(current.gemm))
    assert here <= abs(median_error(round(current.gemm - 0.01, 2)))
    assert here <= abs(median_error(round(current.gemm + 0.01, 2)))


def test_published_layouts_fit_and_published_ooms_do_not(rows: list[tuple[dict[str, Any], Any]]) -> None:
    """Every published layout that ran is predicted to fit, and the published out-of-memory cases
    are predicted not to, but one: 26.02.01's Llama 3 70B MXFP8 on 64 GB300, whose printed layout
    (MBS 2, PP4 without VP, no recompute) matches no recipe of its release (MBS 1, PP4×v5) and is
    priced at 375.9 GiB, where the recipe's layout takes 250.3 (docs/validation.md, "The archive's
    DGX-GB300 and DGX-B300 rows")."""
    assert [row.name for _, row in rows if row.fits != row.expected_fit] == [
        "Megatron-Bridge 26.02.01 Llama 3 70B MXFP8, 64 GB300"]
    assert sum(not row.expected_fit for _, row in rows) >= 3


def test_holdouts_are_marked_and_converted(rows: list[tuple[dict[str, Any], Any]]) -> None:
    holdouts = [row for _, row in rows if row.holdout]
    names = " ".join(row.name for row in holdouts)
    assert "BLOOM" in names and "OPT" in names and "Narayanan T2" in names
    assert all(row.published and row.published > 0 for row in holdouts)


def test_published_figures_use_the_sources_conventions() -> None:
    """Narayanan's 137 TF/s for the 1.7B model is 3.53 s/iter (its Table 1 arithmetic); Llama 3's
    41% BF16 MFU of 989 TF/s with 6N + 12·L·H·Q·T."""
    bench = load_benchmark("published_runs")
    data = bench.load()
    by_name = {run["name"]: run for run in data["runs"]}
    run = by_name["Narayanan T1 1.7B"]
    plan = bench.plan_for(run["model"], data["models"], data["gpt_sizes"])
    tokens = bench.published_tokens(run, plan)
    assert 512 * 2048 / (tokens * 32) == pytest.approx(3.53, abs=0.01)
    llama = by_name["Llama 3 405B 8K, 16,384 GPUs"]
    plan = bench.plan_for(llama["model"], data["models"], data["gpt_sizes"])
    assert bench.published_tokens(llama, plan) == pytest.approx(400e12 / (6 * 405.85e9 + 12 * 126 * 128 * 128 * 8192), rel=1e-3)


def test_interleaved_round_of_n_microbatches_follows_megatron() -> None:
    """The interleaved schedule's warm-up, 2(p − r − 1) + (v − 1)·N chunk forwards (Megatron-LM
    `get_pp_rank_microbatches`), + the first steady-state forward, taken round by round (N
    micro-batches through chunk 0, then chunk 1, …: `get_schedule_table`)."""
    from archplan.planning.cluster import in_flight
    from archplan.planning.layout import Layout, group_problem

    depth_first = Layout(pp=16, vpp=4, dp=64)
    assert in_flight(depth_first, 32, 1) == (29, 16, 16, 16)  # 2·14 + 3·16 + 1 = 77
    assert in_flight(Layout(pp=16, vpp=4, group=16, dp=64), 32, 1) == (29, 16, 16, 16)
    assert in_flight(Layout(pp=16, vpp=4, group=32, dp=64), 32, 1) == (32, 32, 32, 29)  # 28 + 96 + 1
    assert in_flight(Layout(pp=16, vpp=4, group=20, dp=64), 36, 0) == (31, 20, 20, 20)  # 30 + 60 + 1
    assert group_problem(Layout(pp=16, vpp=4, group=20), 32) is not None  # last round 12 < 16
    assert group_problem(Layout(pp=16, vpp=4, group=8), 32) is not None  # N < pp
    assert group_problem(Layout(pp=16, vpp=4, group=20), 36) is None  # last round 16


def test_a_given_round_that_cannot_run_is_a_one_line_error() -> None:
    from archplan.errors import ArchplanError
    from archplan.hardware import accelerator
    from archplan.loader import load_spec
    from archplan.planning.layout import parse_layout
    from archplan.planning.parallel import interconnect, search
    from archplan.resolve import resolve

    plan, gpu = resolve(load_spec("llama-3.1-405b")), accelerator("h100")
    fixed = parse_layout("tp=8,cp=1,pp=16,vpp=4,group=20,dp=64,ep=1,zero=1,recompute=none,mb=1")
    with pytest.raises(ArchplanError, match="last round"):
        search(plan, gpu, 8192, seq=8192, global_batch_tokens=2048 * 8192, net=interconnect(gpu),
               fixed=fixed, headroom=0.0)


def test_no_round_length_lets_llama_3_interleave_at_8192_gpus() -> None:
    """Llama 3 405B at 8,192 GPUs (m = 32 micro-batches of 8K): every round N that Megatron admits
    (16 or 32) holds at least the depth-first warm-up, so interleaving does not fit in 80 GB under
    this model (docs/validation.md); v = 1 does."""
    from archplan.hardware import accelerator
    from archplan.loader import load_spec
    from archplan.planning.layout import parse_layout
    from archplan.planning.parallel import interconnect, search
    from archplan.resolve import resolve

    plan, gpu = resolve(load_spec("llama-3.1-405b")), accelerator("h100")
    base = "tp=8,cp=1,pp=16,dp=64,ep=1,zero=1,recompute=none,mb=1"
    for vpp, group in ((1, 0), (4, 16), (4, 32), (2, 16), (2, 32)):
        fixed = parse_layout(f"{base},vpp={vpp}" + (f",group={group}" if group else ""))
        result = search(plan, gpu, 8192, seq=8192, global_batch_tokens=2048 * 8192,
                        net=interconnect(gpu), fixed=fixed, headroom=0.0, keep_unfit=True)
        assert result.ranked[0].fits == (vpp == 1), (vpp, group)


def test_fewer_microbatches_than_stages_wait_on_their_own_chunks() -> None:
    """With m ≥ p the bubble is (p − 1)/v slots; with m < p a micro-batch's trip through all p·v
    chunks is the critical path: p + (m − 1)/v slots in all, m + p − 1 at v = 1 (1F1B)."""
    from archplan.planning.pricing import bubble_slots

    assert bubble_slots(32, 16, 4) == pytest.approx(15 / 4)
    assert bubble_slots(16, 16, 4) == pytest.approx(15 / 4)  # the two forms meet at m = p
    assert 1 + bubble_slots(1, 2, 8) == pytest.approx(2.0)  # one micro-batch: p slots, whatever v
    assert 4 + bubble_slots(4, 8, 1) == pytest.approx(4 + 8 - 1)
    assert 4 + bubble_slots(4, 8, 2) == pytest.approx(8 + 3 / 2)


def test_node_limited_routing_bounds_the_ib_copies_of_a_token() -> None:
    """DeepSeek-V3 §2.1.2 / §3.2.2: 8 expert groups, each token in its best 4; over 8 nodes (one
    group per node) a token crosses IB to ≤ 4 nodes, 4·7/8 remote copies on average instead of
    8·63/64, and NVLink forwards its 8 copies inside the nodes at the same time. FP8 dispatch
    (§3.3.3): the to-expert half of the calls in 1 B + a 4 B scale per 128 elements."""
    from archplan.hardware import accelerator, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.layout import Layout
    from archplan.planning.parallel import interconnect
    from archplan.planning.pricing import (Network, ep_all_to_all_time, nodes_per_token, nodes_reached,
                                           uniform_moe)
    from archplan.planning.records import Collective
    from archplan.resolve import resolve

    moe = uniform_moe(resolve(load_spec("deepseek-v3")))
    assert moe is not None and (moe.n_group, moe.topk_group, moe.top_k) == (8, 4, 8)
    assert [nodes_per_token(moe, n) for n in (2, 8, 16)] == [2, 4, 8]
    assert nodes_per_token(replace(moe, n_group=None, topk_group=None), 8) is None
    assert nodes_per_token(moe, 3) is None  # groups straddle nodes: no bound claimed
    # on average: one group per node reaches the bound; two per node 4·(1 − C(6, 4)/C(8, 4))
    assert nodes_reached(moe, 8) == pytest.approx(4.0)
    assert nodes_reached(moe, 4) == pytest.approx(4 * (1 - 15 / 70)) and nodes_per_token(moe, 4) == 4
    assert nodes_reached(moe, 16) == 8  # a group spans two nodes: the bound

    gpu = accelerator("h800")
    eff, _ = kernel_efficiency(gpu)
    net = interconnect(gpu)
    network = Network(net.intra_node, net.inter_node, net.gpus_per_node)
    layout = Layout(pp=16, dp=128, ep=64)
    per_copy = 2 * 4096 * 7168  # one bf16 copy of a micro-batch's tokens
    record = Collective("all_to_all", "ep", 64, 8 * per_copy, 2, "dispatch + combine")
    ib = 8 * per_copy / 8 * 4 * 7 / 8 / (net.inter_node * eff.inter_link)
    nvlink = 8 * per_copy * 7 / 8 / (net.intra_node * eff.intra_link)
    limited = ep_all_to_all_time(record, layout, network, eff, moe, False)
    assert limited == pytest.approx(2 * (max(ib, nvlink) + eff.latency))
    unlimited = ep_all_to_all_time(record, layout, network, eff, None, False)
    assert unlimited == pytest.approx(2 * (record.wire_bytes / (net.inter_node * eff.inter_link) + eff.latency))
    fp8 = ep_all_to_all_time(record, layout, network, eff, moe, True)
    assert fp8 - 2 * eff.latency == pytest.approx((1 + 4 / 128 + 2) / 4 * (limited - 2 * eff.latency))


def test_hierarchical_dispatch_sends_a_token_once_per_remote_node() -> None:
    """HybridEP / DeepEP (`--dispatcher hierarchical`): Qwen3-30B-A3B's 128 experts over two nodes, top
    8, reach 2·(1 − C(64, 8)/C(128, 8)) nodes per token on average, half of them remote, so IB carries
    ~1 copy of 8 where NCCL's ring sends every remote copy; NVLink forwards the 8 copies beside it.
    `auto` is NCCL's for a router without a node limit and the hierarchy for DeepSeek-V3's."""
    import math

    from archplan.hardware import accelerator, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.layout import Layout
    from archplan.planning.parallel import interconnect
    from archplan.planning.pricing import Network, ep_all_to_all_time, nodes_reached, uniform_moe
    from archplan.planning.records import Collective
    from archplan.resolve import resolve

    moe = uniform_moe(resolve(load_spec("qwen3-30b-a3b")))
    assert moe is not None and (moe.n_experts, moe.top_k, moe.n_group) == (128, 8, None)
    reach = 2 * (1 - math.comb(64, 8) / math.comb(128, 8))
    assert nodes_reached(moe, 2) == pytest.approx(reach) and 1.99 < reach < 2
    assert nodes_reached(moe, 1) == pytest.approx(1.0)

    gpu = accelerator("h100")
    eff, _ = kernel_efficiency(gpu)
    net = interconnect(gpu)
    network = Network(net.intra_node, net.inter_node, net.gpus_per_node)
    layout = Layout(dp=16, ep=16)
    per_copy = 2 * 4096 * 2048
    record = Collective("all_to_all", "ep", 16, 8 * per_copy, 2, "dispatch + combine")
    ib = 8 * per_copy / 8 * reach * 1 / 2 / (net.inter_node * eff.inter_link)
    nvlink = 8 * per_copy * 7 / 8 / (net.intra_node * eff.intra_link)
    hierarchical = ep_all_to_all_time(record, layout, network, eff, moe, False, "hierarchical")
    assert hierarchical == pytest.approx(2 * (max(ib, nvlink) + eff.latency))
    ring = 2 * (record.wire_bytes / (net.inter_node * eff.inter_link) + eff.latency)
    assert ep_all_to_all_time(record, layout, network, eff, moe, False, "nccl") == pytest.approx(ring)
    assert ep_all_to_all_time(record, layout, network, eff, moe, False, "auto") == pytest.approx(ring)
    assert hierarchical < ring / 3
    inside = Layout(dp=8, ep=8)  # one node: every dispatcher is the in-node ring
    one_node = Collective("all_to_all", "ep", 8, 8 * per_copy, 2, "dispatch + combine")
    assert len({ep_all_to_all_time(one_node, inside, network, eff, moe, False, d)
                for d in ("auto", "nccl", "hierarchical")}) == 1

    deepseek = uniform_moe(resolve(load_spec("deepseek-v3")))
    wide = Layout(pp=16, dp=128, ep=64)
    big = Collective("all_to_all", "ep", 64, 8 * 2 * 4096 * 7168, 2, "dispatch + combine")
    auto = ep_all_to_all_time(big, wide, network, eff, deepseek, False, "auto")
    assert auto == ep_all_to_all_time(big, wide, network, eff, deepseek, False, "hierarchical")
    assert auto < ep_all_to_all_time(big, wide, network, eff, deepseek, False, "nccl")



def test_gb200_nvl72_is_one_nvlink_domain_of_72_gpus() -> None:
    """GB200 NVL72 (NVIDIA's datasheet per GPU: 2.5 PFLOPS bf16 dense, 186 GB): its 72 GPUs share one
    NVLink domain, so EP64 stays on NVLink (no IB leg) where on 8-GPU B200 nodes it crosses eight
    nodes; a torch device named "NVIDIA GB200" is the GB200 entry, not B200; and it is priced
    uncalibrated, with Hopper's fractions, like B200, its GEMMs at its own measured matmul rate."""
    from archplan.hardware import accelerator, kernel_efficiency, match_device_name
    from archplan.loader import load_spec
    from archplan.planning.layout import Layout
    from archplan.planning.parallel import interconnect
    from archplan.planning.pricing import Network, ep_all_to_all_time, uniform_moe
    from archplan.planning.records import Collective
    from archplan.resolve import resolve

    gb200, b200 = accelerator("gb200"), accelerator("b200")
    assert gb200.peak("bf16") == 2.5e15
    assert match_device_name("NVIDIA GB200") is gb200 and match_device_name("NVIDIA B200") is b200
    eff, calibrated = kernel_efficiency(gb200)
    assert not calibrated and eff.gemm < kernel_efficiency(b200)[0].gemm
    net = interconnect(gb200)
    assert net.gpus_per_node == 72 and net.intra_node == interconnect(b200).intra_node
    moe = uniform_moe(resolve(load_spec("deepseek-v3")))
    record = Collective("all_to_all", "ep", 64, 8 * 2 * 4096 * 7168, 2, "dispatch + combine")
    layout = Layout(dp=64, ep=64)
    rack = ep_all_to_all_time(record, layout, Network(net.intra_node, net.inter_node, 72), eff, moe,
                              False, "hierarchical")
    nvlink_only = 2 * (record.wire_bytes / (net.intra_node * eff.intra_link) + eff.latency)
    assert rack == pytest.approx(nvlink_only)
    b200_net = interconnect(b200)
    nodes = ep_all_to_all_time(record, layout, Network(b200_net.intra_node, b200_net.inter_node, 8), eff,
                               moe, False, "hierarchical")
    assert nodes > 2 * rack

# DeepEP's own table of its internode normal kernels on H800 (README of 2025-04-22, now docs/legacy.md):
# nodes -> (dispatch, combine) GB/s of "RDMA" bandwidth, 4,096 tokens of hidden 7,168 per rank, top 8
# of 256 experts in one group per node, min(nodes, 4) groups a token. Its test counts every node a
# token reaches, its own included (`num_rdma_token_sent`), over the kernel's time.
DEEPEP_H800_INTERNODE_GBS = {2: (43, 43), 4: (58, 57), 8: (51, 50)}


@pytest.mark.parametrize("nodes", sorted(DEEPEP_H800_INTERNODE_GBS))
def test_hierarchical_dispatch_prices_deepeps_measured_internode_bandwidth(nodes: int) -> None:
    """The hierarchical pricing, unfitted, against DeepEP's measured table: within 6% at EP16, 32
    and 64. EP16 is NVLink-bound on H800 (each GPU forwards 7 of a token's 8 copies at ~160 GB/s
    while its NIC carries one); EP32 and EP64 are bound by the NIC at 0.9 of 50 GB/s. The table's
    GB/s count the node a token starts on too, so they read nodes/(nodes − 1) times the NIC's."""
    from archplan.hardware import accelerator, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.layout import Layout
    from archplan.planning.parallel import interconnect
    from archplan.planning.pricing import Network, ep_all_to_all_time, nodes_reached, uniform_moe
    from archplan.planning.records import Collective
    from archplan.resolve import resolve

    deepseek = uniform_moe(resolve(load_spec("deepseek-v3")))
    assert deepseek is not None
    moe = replace(deepseek, n_group=nodes, topk_group=min(nodes, 4))
    gpu = accelerator("h800")
    eff, _ = kernel_efficiency(gpu)
    net = interconnect(gpu)
    network = Network(net.intra_node, net.inter_node, net.gpus_per_node)
    ep = 8 * nodes
    per_copy = 2 * 4096 * 7168  # one bf16 copy of the rank's tokens
    record = Collective("all_to_all", "ep", ep, 8 * per_copy, 2, "dispatch + combine")
    one_way = ep_all_to_all_time(record, Layout(dp=ep, ep=ep), network, eff, moe, False, "hierarchical") / 2
    priced = nodes_reached(moe, nodes) * per_copy / one_way / 1e9
    for measured in DEEPEP_H800_INTERNODE_GBS[nodes]:
        assert priced == pytest.approx(measured, rel=0.06)
    remote = nodes_reached(moe, nodes) * (nodes - 1) / nodes  # copies a token sends over IB
    nvlink_bound = 8 * 7 / 8 / (net.intra_node * eff.intra_link) > remote / (net.inter_node * eff.inter_link)
    assert nvlink_bound == (nodes == 2)


def _megatron_moe_run(model: str, gpu_key: str, gpus: int, global_batch: int, layout_text: str,
                      precision: Precision, *, fp8_experts: bool = False, fp8_dispatch: bool = False,
                      gpus_per_node: int | None = None) -> Any:
    """The evaluated layout of a Megatron-Bridge MoE recipe (Megatron-Core states, dp/tp/pp overlap,
    bf16 gradient reduction, seq 4,096) at `layout_text`, with the run's MoE fp8 kernels."""
    from archplan.hardware import accelerator
    from archplan.loader import load_spec
    from archplan.planning.cluster import STATES
    from archplan.planning.layout import parse_layout
    from archplan.planning.parallel import Settings, interconnect, search
    from archplan.resolve import resolve

    gpu = accelerator(gpu_key)
    net = interconnect(gpu)
    if gpus_per_node is not None:
        net = replace(net, gpus_per_node=gpus_per_node)
    settings = Settings(states=STATES["megatron"], overlap=frozenset({"dp", "tp", "pp"}), precision=precision,
                        grad_reduce=2, fp8_experts=fp8_experts, fp8_dispatch=fp8_dispatch)
    result = search(resolve(load_spec(model)), gpu, gpus, seq=4096, global_batch_tokens=global_batch * 4096,
                    net=net, headroom=0.0, settings=settings, fixed=parse_layout(layout_text), keep_unfit=True)
    return (result.ranked or (result.tightest,))[0]


def test_transformer_engine_experts_keep_the_bf16_rate_as_the_gb300_pair_measured() -> None:
    """Megatron-Bridge 25.11, DGX-GB300 (Blackwell), DeepSeek-V3 without MTP at TP1 PP2 VP4 EP32, GBS
    4,096, seq 4,096: 3,848 tokens/s per GPU in BF16, 4,357 in MXFP8 (1.13×). Priced on B200 at that
    layout in NVLink domains of 64 GPUs (the 64 of each 72-GPU rack a 256-GPU job runs on; at 72 an
    EP32 group straddles two racks, which the run's did not), with Megatron-Core's bf16 dispatch: 1.08× with the routed
    experts at the bf16 rate (the default, Transformer Engine's grouped GEMMs), 1.31× had they run
    at the fp8 rate (`--fp8-experts`; 1.33× since the pipeline's paired sends and receives and Hopper's GEMM efficiency refitted, 0.62 → 0.59 (2026-12-06)). The pair sits nearer the
    first."""
    from archplan.planning.parallel import Settings

    assert not Settings().fp8_experts
    layout = "tp=1,pp=2,cp=1,dp=128,ep=32,zero=1,mb=1,vpp=4,recompute=none,sp=off"
    rate = {(precision, fp8_experts): _megatron_moe_run("deepseek-v3", "b200", 256, 4096, layout, precision,
                                                        fp8_experts=fp8_experts, gpus_per_node=64
                                                        ).tokens_per_s_per_gpu
            for precision, fp8_experts in (("bf16", False), ("fp8", False), ("fp8", True))}
    measured = 4357 / 3848
    assert rate["fp8", False] / rate["bf16", False] == pytest.approx(1.08, abs=0.01)
    assert rate["fp8", True] / rate["bf16", False] == pytest.approx(1.33, abs=0.01)
    assert (abs(rate["fp8", False] / rate["bf16", False] - measured)
            < abs(rate["fp8", True] / rate["bf16", False] - measured) / 3)


def test_qwen3_235b_fp8_on_b200_is_no_faster_than_bf16_as_pr_1760_measured() -> None:
    """Megatron-Bridge PR 1760 (commit a6e92de5f): Qwen3-235B-A22B on 64 B200 (TP1 PP8 EP8, GBS 1,024,
    MBS 1, seq 4,096, the all-to-all not overlapped) at 16.0 s per step in BF16 (VP 4) and 16.9 s in
    MXFP8 (no VP): 1.06×. With Transformer Engine's experts at the bf16 rate and Megatron-Core's bf16
    dispatch the model prices 1.02× (1.03× until the pipeline's steady-state receives ran with its
    sends, 2026-12-06); with DeepSeek's fp8 experts and dispatch 0.80× (0.81× before)
    (docs/validation.md, "The MoE dispatch's dtype, by framework")."""
    step = {(precision, fp8_moe): _megatron_moe_run(
                "qwen3-235b-a22b", "b200", 64, 1024,
                f"tp=1,pp=8,cp=1,dp=8,ep=8,zero=1,mb=1,vpp={vpp},recompute=none,sp=off", precision,
                fp8_experts=fp8_moe, fp8_dispatch=fp8_moe).time.total
            for precision, vpp, fp8_moe in (("bf16", 4, False), ("fp8", 1, False), ("fp8", 1, True))}
    measured = 16.9 / 16.0
    ratio = step["fp8", False] / step["bf16", False]
    assert ratio == pytest.approx(1.02, abs=0.01) and abs(ratio - measured) < 0.05
    assert step["fp8", True] / step["bf16", False] == pytest.approx(0.80, abs=0.01)


def test_fp8_experts_switch_only_the_routed_experts_grouped_gemms() -> None:
    """On H100 too the routed experts' GEMMs keep the bf16 rate under fp8 unless `fp8_experts` says
    the run's grouped GEMMs gain (DeepGEMM's); the dense GEMMs run in fp8 either way, and a dense
    model is priced alike with or without it."""
    from archplan.hardware import accelerator, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.cluster import model_data
    from archplan.planning.layout import parse_layout
    from archplan.planning.pricing import rates_for, tensor_gemm
    from archplan.resolve import resolve

    gpu = accelerator("h100")
    eff = kernel_efficiency(gpu)[0]
    layout = parse_layout("tp=1,pp=1,cp=1,dp=16,ep=16,zero=1,mb=1,vpp=1,recompute=none,sp=off").complete()
    assert layout is not None
    for name, experts in (("qwen3-30b-a3b", True), ("llama-3-8b", False)):
        data = model_data(resolve(load_spec(name)), 4096)
        layer = data.plan.layers[0]
        timed = {}
        for precision, fp8_experts in (("bf16", False), ("fp8", False), ("fp8", True)):
            rates = rates_for(gpu, eff, None, precision, fp8_experts=fp8_experts)
            timed[precision, fp8_experts] = {
                t.name: tensor_gemm(data, layer, t, layout, rates)[0] for t in data.layer_tensors[0]}
        routed = [t.name for t in data.layer_tensors[0] if t.expert]
        dense = [t.name for t in data.layer_tensors[0]
                 if not t.expert and timed["bf16", False][t.name] and not t.name.endswith("router.weight")]
        assert bool(routed) is experts and dense
        for n in routed:
            assert timed["fp8", False][n] == timed["bf16", False][n]
            assert timed["fp8", True][n] < 0.6 * timed["bf16", False][n]
        for n in dense:
            assert timed["fp8", False][n] == timed["fp8", True][n] < 0.6 * timed["bf16", False][n]


def test_ep_overlap_hides_the_traced_share_and_dualpipe_all_it_can() -> None:
    """Megatron-Core's EP overlap ("ep") hides the share of the all-to-all Megatron-Bridge's Nsight
    trace measured (36.55%), at most the compute beside it; DualPipe ("dualpipe") all of it that the
    compute covers; without either nothing is hidden."""
    from archplan.planning.pricing import EP_OVERLAP_SHARE, ep_exposed

    assert EP_OVERLAP_SHARE == 0.3655
    assert ep_exposed(10.0, 100.0, frozenset({"dp", "ep"})) == pytest.approx(10.0 - 3.655)
    assert ep_exposed(10.0, 2.0, frozenset({"ep"})) == pytest.approx(8.0)  # the compute bounds it
    assert ep_exposed(10.0, 100.0, frozenset({"dualpipe"})) == 0.0
    assert ep_exposed(10.0, 4.0, frozenset({"dualpipe"})) == pytest.approx(6.0)
    assert ep_exposed(10.0, 100.0, frozenset({"dp", "tp", "pp"})) == 10.0


def _llama_3_8b_layer(gpu_key: str, impl: FlashImpl, kernel: str) -> Any:
    """The priced first layer of Llama 3 8B at 4,096 tokens, one micro-batch, bf16, under one
    FlashAttention implementation and attention kernel."""
    from archplan.hardware import accelerator, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.cluster import model_data
    from archplan.planning.layout import Layout
    from archplan.planning.pricing import Pricer, rates_for
    from archplan.resolve import resolve

    gpu = accelerator(gpu_key)
    eff, _ = kernel_efficiency(gpu)
    data = model_data(resolve(load_spec("llama-3-8b")), 4096)
    return Pricer(data, rates_for(gpu, eff, None, "bf16", impl)).layers(Layout(mb=1), kernel)[0]


def test_cudnn_attention_runs_at_its_measured_ratio_to_fa2() -> None:
    """Shah et al. 2024 Fig. 5-6, H100 SXM5 at 16K tokens: cuDNN's fused attention at 539/335 of
    FlashAttention-2's forward and 516/322 of its backward at head dim 128, 413/324 and 433/291 at
    64; `--flash-impl cudnn` changes the attention core's time only, by those ratios and each
    kernel's own short-sequence law. cuDNN takes head dims in multiples of 8, FA2 pads to 32."""
    from archplan.hardware import flash_head_dim, flash_length_factor, flash_speed

    assert flash_speed("cudnn", 128) == (539 / 335, 516 / 322)
    assert flash_speed("cudnn", 64) == (413 / 324, 433 / 291)
    assert flash_speed("cudnn", 192) == flash_speed("cudnn", 128)
    assert (flash_head_dim(72, "cudnn"), flash_head_dim(72, "fa2")) == (72, 96)
    fa2, cudnn = _llama_3_8b_layer("h100", "fa2", "flash"), _llama_3_8b_layer("h100", "cudnn", "flash")
    lengths = flash_length_factor(4096, "cudnn", 128) / flash_length_factor(4096, "fa2", 128)
    assert cudnn.attn_fwd == pytest.approx(fa2.attn_fwd * 335 / 539 / lengths)
    assert cudnn.attn_bwd == pytest.approx(fa2.attn_bwd * 322 / 516 / lengths)
    assert (cudnn.gemm_fwd, cudnn.elem_fwd) == (fa2.gemm_fwd, fa2.elem_fwd)


def test_ring_cp_exchange_runs_beside_the_attention() -> None:
    """Both ring implementations send the next K/V block before computing over the current one, and
    a step's send and receive are one batched exchange: the ring's sends are exposed only past the
    attention beside them. Llama 3 8B at 131,072 tokens over CP8 on one H100 node: the ring's
    exchange hides entirely, the all-gather's does not."""
    from archplan.hardware import accelerator
    from archplan.loader import load_spec
    from archplan.planning.layout import parse_layout
    from archplan.planning.parallel import Settings, interconnect, search
    from archplan.planning.pricing import ring_cp_exposed
    from archplan.resolve import resolve

    assert ring_cp_exposed(3.0, 5.0) == 0.0 and ring_cp_exposed(5.0, 3.0) == 2.0
    plan, gpu = resolve(load_spec("llama-3-8b")), accelerator("h100")
    cp = {}
    for comm in ("ring", "all_gather"):
        found = search(plan, gpu, 8, seq=131072, global_batch_tokens=8 * 131072, net=interconnect(gpu),
                       headroom=0.0, settings=Settings(cp_comm=comm),
                       fixed=parse_layout("tp=1,cp=8,pp=1,dp=1,ep=1,zero=1,recompute=full,mb=1,sp=off"),
                       keep_unfit=True)
        cp[comm] = (found.ranked or (found.tightest,))[0].time.cp
    assert cp["ring"] == 0.0 < cp["all_gather"]


def test_cudnn_attention_on_b200_near_nvidias_measurement() -> None:
    """A check outside the calibration: cudnn-frontend's training SDPA benchmark
    (benchmark/sdpa_benchmark_training, cuDNN 9.10.2 on B200; causal, 128 query and 8 KV heads of
    128) measures cuDNN's attention at 1,332 / 1,075 TFLOP/s forward / backward at 16K tokens. B200
    is priced with Hopper's FlashAttention-2 rates at its own peak × the H100 ratio of cuDNN to FA2:
    8% and 2% under that. (FlashAttention-2 itself measures 425 / 337 there.)"""
    from archplan.hardware import accelerator, flash_speed, kernel_efficiency

    eff, calibrated = kernel_efficiency(accelerator("b200"))
    fwd, bwd = flash_speed("cudnn", 128)
    assert not calibrated
    assert eff.attention_fwd * fwd / 1e12 == pytest.approx(1332, rel=0.10)
    assert eff.attention_bwd * bwd / 1e12 == pytest.approx(1075, rel=0.03)


def test_transformer_engine_runs_state_cudnn_attention() -> None:
    """Every NeMo, Megatron-Bridge and Megatron-Core run of the fixtures (Transformer Engine's
    `DotProductAttention`, which prefers cuDNN's fused attention on Hopper and newer, and whose
    context parallelism is a ring unless told otherwise) is priced with cuDNN's kernel and the ring;
    no other run is."""
    bench = load_benchmark("published_runs")
    for run in bench.load()["runs"]:
        te = run["name"].startswith(("NeMo", "Megatron-Bridge", "Megatron-MoE-ModelZoo"))
        # NeMo 24.03.01 shipped Transformer Engine 1.4, before 1.7 gave cuDNN's kernel preference on Hopper
        cudnn = te and not run["name"].startswith("NeMo 24.03.01 ")
        assert (run.get("flash_impl", "fa2") == "cudnn") == cudnn, run["name"]
        assert (run.get("cp_comm", "all_gather") == "ring") == te, run["name"]
    for run in load_benchmark("blind_checks").load()["runs"]:
        # NeMo Automodel's Qwen3 and DeepSeek-V3 run Transformer Engine's attention (no CP)
        te = run["source"] == "moe-modelzoo-h100"
        cudnn = te or (run["source"] == "automodel-h100" and "Llama" not in run["name"])
        assert (run.get("flash_impl", "fa2") == "cudnn") == cudnn and (run.get("cp_comm", "all_gather") == "ring") == te


def test_triton_flash_attention_runs_at_dao_2023_ratio_to_fa2() -> None:
    """Dao 2023 §4.1: FlashAttention-2 is ~1.3-1.5× faster than FlashAttention in Triton forward
    and ~2× backward; `--flash-impl triton` changes the attention core's time only."""
    from archplan.hardware import flash_length_factor

    fa2, triton = (_llama_3_8b_layer("a100-80gb", impl, "flash") for impl in ("fa2", "triton"))
    # each kernel also at its own short-sequence law (`test_short_sequences_price_...` below)
    lengths = flash_length_factor(4096, "fa2", 128) / flash_length_factor(4096, "triton", 128)
    assert triton.attn_fwd == pytest.approx(1.4 * fa2.attn_fwd * lengths)
    assert triton.attn_bwd == pytest.approx(2.0 * fa2.attn_bwd * lengths)
    assert (triton.gemm_fwd, triton.elem_fwd) == (fa2.gemm_fwd, fa2.elem_fwd)
    assert _llama_3_8b_layer("a100-80gb", "triton", "eager") == _llama_3_8b_layer("a100-80gb", "fa2", "eager")


# Forward + backward TFLOP/s of causal attention, 16K tokens a batch, at 512 ... 16,384 tokens: the
# FlashAttention repository's README benchmark figures (flash2_a100_fwd_bwd_benchmark.png,
# flash2_h100_fwd_bwd_benchmark.png), panels (c) and (d)
FLASH_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
FLASH_BARS = {
    ("fa2", "A100 hd64"): (88, 119, 140, 156, 165, 171),
    ("fa2", "A100 hd128"): (99, 133, 155, 173, 182, 189),
    ("fa2", "H100 hd64"): (141, 192, 232, 257, 273, 284),
    ("fa2", "H100 hd128"): (163, 221, 265, 294, 308, 328),
    ("triton", "A100 hd64"): (59, 75, 79, 76, 79, 80),
    ("triton", "A100 hd128"): (50, 61, 68, 74, 78, 80),
    # cuDNN's fused attention, H100 SXM5, Shah et al. 2024 (FlashAttention-3) Fig. 5 (forward, causal,
    # head dim 128) and Fig. 6 (backward, head dims 64 and 128); the head-dim-64 forward bars are
    # non-causal, without the masked tiles the law prices, and are left out
    ("cudnn", "H100 fwd hd128"): (315, 410, 484, 518, 529, 539),
    ("cudnn", "H100 bwd hd128"): (305, 408, 465, 499, 518, 516),
    ("cudnn", "H100 bwd hd64"): (266, 348, 395, 417, 432, 433),
}


@pytest.mark.parametrize(("impl", "head_dims", "within"),
                         [("fa2", (64, 128), 0.031), ("triton", (64,), 0.06), ("triton", (128,), 0.025),
                          ("cudnn", (64,), 0.028), ("cudnn", (128,), 0.029)])
def test_flash_length_law_follows_the_kernels_benchmark_figures(impl: FlashImpl, head_dims: tuple[int, ...],
                                                                within: float) -> None:
    """L/(L + half) relative to 16,384 tokens reproduces every bar of the implementation's curves at
    those head dims, and its half-length is their least-squares fit to the nearest 10 tokens (one
    for both of FlashAttention-2's head dims, one per head dim for the Triton kernel's and cuDNN's)."""
    from archplan.hardware import FLASH_HALF_LENGTH, flash_length_factor

    curves = [bars for (name, label), bars in FLASH_BARS.items()
              if name == impl and int(label.split("hd")[1]) in head_dims]
    for head_dim in head_dims:
        for bars in curves:
            for length, bar in zip(FLASH_LENGTHS, bars):
                assert flash_length_factor(length, impl, head_dim) == pytest.approx(bar / bars[-1], abs=within)

    def squares(half: int) -> float:
        law = [length / (length + half) * (16384 + half) / 16384 for length in FLASH_LENGTHS]
        return sum((f - bar / bars[-1]) ** 2 for bars in curves for f, bar in zip(law, bars))

    fit = min(range(10, 2000, 10), key=squares)
    assert all(FLASH_HALF_LENGTH[impl, head_dim] == fit for head_dim in head_dims)
    assert flash_length_factor(131072, impl, head_dims[0]) == 1.0


def test_short_sequences_price_flash_attention_at_the_length_law(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 2,048 tokens a layer's attention core takes 1/flash_length_factor(2,048) of what the family's
    long-sequence rates give; nothing else in the layer moves."""
    import archplan.hardware as hardware
    from archplan.hardware import accelerator, flash_length_factor, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.cluster import model_data
    from archplan.planning.layout import Layout
    from archplan.planning.pricing import Pricer, rates_for
    from archplan.resolve import resolve

    gpu = accelerator("h100")
    eff, _ = kernel_efficiency(gpu)
    data = model_data(resolve(load_spec("llama-3-8b")), 2048)

    def layer() -> Any:
        return Pricer(data, rates_for(gpu, eff, None, "bf16", "fa2")).layers(Layout(mb=1), "flash")[0]

    short, factor = layer(), flash_length_factor(2048, "fa2", 128)
    monkeypatch.setitem(hardware.FLASH_HALF_LENGTH, ("fa2", 128), 0)
    long_rate = layer()
    assert 0.8 < factor < 0.85
    assert short.attn_fwd == pytest.approx(long_rate.attn_fwd / factor)
    assert short.attn_bwd == pytest.approx(long_rate.attn_bwd / factor)
    assert (short.gemm_fwd, short.elem_fwd) == (long_rate.gemm_fwd, long_rate.elem_fwd)


def test_a_sliding_window_prices_flash_attention_at_its_width() -> None:
    """Mistral 7B's queries reach at most 4,096 keys, so on 32,768 tokens its layers run at the law's
    4,096-token fraction, which `plan` quotes; under eager attention there is none to quote."""
    from archplan.hardware import accelerator, flash_length_factor, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.layout import parse_layout
    from archplan.planning.parallel import Settings, interconnect, search
    from archplan.planning.pricing import flash_fractions
    from archplan.resolve import resolve

    plan = resolve(load_spec("mistral-7b"))
    eff = kernel_efficiency(accelerator("h100"))[0]
    window = flash_length_factor(4096, "fa2", 128)
    assert flash_fractions(plan, 32768, "fa2", eff) == ((window, window),)
    short = flash_length_factor(2048, "triton", 128)
    assert flash_fractions(plan, 2048, "triton", eff) == ((short, short),)
    fixed = parse_layout("tp=1,pp=1,cp=1,dp=8,ep=1,zero=3,recompute=full,mb=1")
    for kernel, expected in (("flash", ((window, window),)), ("eager", ())):
        gpu = accelerator("h100")
        found = search(plan, gpu, 8, seq=32768, global_batch_tokens=1 << 22, net=interconnect(gpu),
                       fixed=fixed, settings=Settings(attention_kernel=kernel))
        assert found.flash_fractions == expected


@pytest.mark.parametrize("impl", ["fa2", "cudnn"])
def test_the_quoted_attention_fraction_is_what_a_layer_is_priced_at(impl: str) -> None:
    """The rates `plan` quotes are the long-sequence head-dim-128 ones; the fractions beside them
    are what each layer runs at: GPT-2's head dim 64 takes the family's head-dim-64 share and the
    kernel's head-dim-64 speed beside the length law (the header quoted the length law alone, 68%
    where 54% was priced under fa2), forward and backward apart."""
    from archplan.analytic.attention import attended_pairs
    from archplan.hardware import accelerator, flash_speed, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.cluster import model_data
    from archplan.planning.layout import Layout
    from archplan.planning.pricing import Pricer, flash_fractions, rates_for
    from archplan.resolve import resolve

    gpu = accelerator("h100")
    eff, _ = kernel_efficiency(gpu)
    plan = resolve(load_spec("gpt2"))
    seq = 1024
    [(fwd, bwd)] = flash_fractions(plan, seq, impl, eff)
    layer = Pricer(model_data(plan, seq), rates_for(gpu, eff, None, "bf16", impl)).layers(Layout(mb=1), "flash")[0]
    flops = 2 * attended_pairs(seq, None) * 12 * (64 + 64)
    quoted_fwd, quoted_bwd = (rate * speed for rate, speed in zip((eff.attention_fwd, eff.attention_bwd),
                                                                   flash_speed(impl, 128)))
    assert layer.attn_fwd == pytest.approx(flops / (quoted_fwd * fwd))
    assert layer.attn_bwd == pytest.approx(2.5 * flops / (quoted_bwd * bwd))
    assert fwd < 0.6


def test_flash_attention_pays_for_its_padded_head_dim() -> None:
    """FA2 rounds a head up to a multiple of 32 (256 past 192), the Triton kernel to a power of two:
    a head of 80 runs as 96 / 128, and its attention time is that of the padded head."""
    from archplan.hardware import accelerator, flash_head_dim, kernel_efficiency
    from archplan.loader import load_spec
    from archplan.planning.cluster import model_data
    from archplan.planning.layout import Layout
    from archplan.planning.pricing import Pricer, rates_for
    from archplan.resolve import resolve

    assert [flash_head_dim(d, "fa2") for d in (64, 80, 96, 112, 128, 192, 200)] == [64, 96, 96, 128, 128, 192, 256]
    assert [flash_head_dim(d, "triton") for d in (8, 64, 80, 112, 128, 192)] == [16, 64, 128, 128, 128, 256]
    gpu = accelerator("h100")
    eff, _ = kernel_efficiency(gpu)
    base = load_spec("llama-3-8b")
    times = {}
    for head_dim in (80, 128):
        spec = base.model_copy(update={"attention": base.attention.model_copy(update={"head_dim": head_dim})})
        data = model_data(resolve(spec), 4096)
        for impl in ("fa2", "triton"):
            layer = Pricer(data, rates_for(gpu, eff, None, "bf16", impl)).layers(Layout(mb=1), "flash")[0]
            times[head_dim, impl] = layer.attn_fwd
    assert times[80, "fa2"] == pytest.approx(96 / 128 * times[128, "fa2"])
    assert times[80, "triton"] == pytest.approx(times[128, "triton"])


def test_plan_flash_impl_option_reaches_the_model(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from test_plan import run

    args = ("plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--seq", "8192", "--global-batch-tokens", "1M",
            "--layout", "tp=1,pp=1,dp=8,cp=1,ep=1,zero=3,recompute=full,mb=1", "--json")
    found = {}
    for impl in ("fa2", "triton", "cudnn"):
        code, out, _ = run(capsys, monkeypatch, *args, "--flash-impl", impl)
        data = json.loads(out)
        assert code == 0 and data["flash_impl"] == impl
        found[impl] = data["layouts"][0]["tokens_per_s_per_gpu"]
    assert found["triton"] < found["fa2"] < found["cudnn"]
    assert ("539/465 TFLOP/s fwd/bwd (flash, cudnn, long sequences, head dim 128; 98% of that for this model "
            "at 8,192 tokens)" in data["efficiency"]["description"])
    from archplan.hardware import flash_length_factor

    length = pytest.approx(flash_length_factor(8192, "cudnn", 128))
    assert data["efficiency"]["flash_fractions"] == [length] and data["efficiency"]["flash_fractions_backward"] == [length]
    assert not any("cudnn" in note for note in data["notes"])
    # on A100 the cuDNN ratio is H100's, and Transformer Engine would run FlashAttention: refused
    code, _, err = run(capsys, monkeypatch, *args[:5], "a100", *args[6:], "--flash-impl", "cudnn")
    assert code == 2 and "Transformer Engine runs FlashAttention before Hopper" in err
