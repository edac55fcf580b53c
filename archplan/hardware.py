"""Accelerator datasheet figures: DENSE peak FLOP/s per dtype (never the 2:4-sparse figures the
datasheets print first), HBM bandwidth and memory. Shared by size (GPU-hours), plan and bench.

Sources: NVIDIA A100 datasheet (2021), H100 datasheet (SXM5 / PCIe columns, sparse figures halved),
H200 product brief (2024), H800 (the H100 SXM5 die with NVLink cut to 400 GB/s; DeepSeek-AI 2024
§3.1), DGX/HGX B200 and DGX B300 datasheets (per-GPU, sparse halved), GB200 and GB300 NVL72
datasheets (rack figures / 72), NVIDIA's Blackwell Ultra technical blog (2025), L4 and L40S
datasheets, Ada "AD102" whitepaper App. A (RTX 4090, FP32-accumulate tensor figures), AMD Instinct
MI300X datasheet, NVIDIA V100 datasheet. SM counts: the architecture whitepapers and blog (GA100
108; GH100 132 SXM5, 114 PCIe; B200 148; Blackwell Ultra 160; AD104 L4 58, AD102 L40S 142 and RTX
4090 128; GV100 80; CDNA 3 MI300X 304 compute units). Measured matmul rates
(`MATMUL_ACHIEVED_BF16`): Bekman, "Machine Learning Engineering Open Book", maximum achievable
matmul FLOPS table (2026-08).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from typing_extensions import assert_never

from archplan.errors import ArchplanError

TERA = 1e12
# the lowest fraction of peak `--efficiency` and size's `--mfu` take, and the lowest link speed
# `--nvlink-gbs` / `--ib-gbs` take: no training run sits below 1% of its GPU's peak or on a link
# under 0.1 GB/s, and a subnormal fraction or speed made step times overflow to infinity
MIN_FRACTION_OF_PEAK = 0.01
MIN_LINK_GBS = 0.1


@dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: int
    aliases: tuple[str, ...] = field(default=())
    sms: int = 0  # streaming multiprocessors (AMD: compute units); 0 = not on record

    @property
    def vendor(self) -> str:
        """'NVIDIA' or 'AMD', the first word of the name."""
        return self.name.split()[0]

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            have = ", ".join(sorted(self.peak_flops))
            why = (": its tensor cores predate bf16, and `size --gpu` and `plan` price bf16 training (bench "
                   "--dtype fp16 runs on it)" if dtype == "bf16" else "")
            raise ArchplanError(f"{self.name} has no {dtype} peak on record (has: {have}){why}") from None


MiB = 1 << 20
GiB = 1 << 30


def _tf(**peaks: float) -> dict[str, float]:
    return {dtype: value * TERA for dtype, value in peaks.items()}


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("a100-40gb", "NVIDIA A100 SXM 40GB",
                _tf(fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624), 1555e9, 40 * GiB, sms=108),
    Accelerator("a100-80gb", "NVIDIA A100 SXM 80GB",
                _tf(fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624), 2039e9, 80 * GiB, ("a100",), sms=108),
    # the PCIe cards: the SXM parts' peaks (the datasheet's one column of tensor figures) and memory,
    # their own HBM bandwidth (1,555 and 1,935 GB/s) and no NVSwitch (`INTERCONNECTS`)
    Accelerator("a100-pcie-40gb", "NVIDIA A100 PCIe 40GB",
                _tf(fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624), 1555e9, 40 * GiB, sms=108),
    Accelerator("a100-pcie-80gb", "NVIDIA A100 PCIe 80GB",
                _tf(fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624), 1935e9, 80 * GiB, ("a100-pcie",), sms=108),
    Accelerator("h100-sxm", "NVIDIA H100 SXM5 80GB",
                _tf(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
                3.35e12, 80 * GiB, ("h100", "h100-80gb"), sms=132),
    Accelerator("h800", "NVIDIA H800 SXM5 80GB",
                _tf(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
                3.35e12, 80 * GiB, ("h800-sxm",), sms=132),
    Accelerator("h100-pcie", "NVIDIA H100 PCIe 80GB",
                _tf(fp32=51.2, tf32=378, bf16=756, fp16=756, fp8=1513, int8=1513), 2.0e12, 80 * GiB, sms=114),
    # "141GB" counts binary gigabytes, as the H100's "80GB" does (80 GiB here): an H200 shows CUDA
    # about 140 GiB, where 141·10⁹ B would be 131.3 GiB
    Accelerator("h200", "NVIDIA H200 SXM 141GB",
                _tf(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
                4.8e12, 141 * GiB, ("h200-sxm",), sms=132),
    # Blackwell's nameplates mix units ("180GB" is 179 GiB to CUDA, "288GB" 268.6 GiB on B300 and
    # 277.5 GiB on GB300), so these four carry the total nvidia-smi reports (MiB) on each part:
    # 183,359 (B200), 189,471 (GB200), 275,040 (B300), 284,208 (GB300). The older parts' binary
    # nameplates are within 0.5% of theirs (H100 SXM: 81,559 MiB of 80 GiB).
    Accelerator("b200", "NVIDIA B200 (HGX) 180GB",
                _tf(fp32=75, tf32=1100, bf16=2250, fp16=2250, fp8=4500, int8=4500),
                7.7e12, 183_359 * MiB, sms=148),
    # a GB200 NVL72 rack's figures per GPU (NVIDIA's GB200 NVL72 datasheet: 360 PFLOPS bf16 and 720
    # fp8 with sparsity over 72 GPUs, i.e. 2.5 and 5 PFLOPS dense; 13.4 TB of HBM3e at 576 TB/s)
    Accelerator("gb200", "NVIDIA GB200 (NVL72) 186GB",
                _tf(fp32=80, tf32=1250, bf16=2500, fp16=2500, fp8=5000, int8=5000),
                8.0e12, 189_471 * MiB, ("gb200-nvl72",), sms=148),
    # Blackwell Ultra (NVIDIA's technical blog "Inside NVIDIA Blackwell Ultra", 2025: 160 SMs, 288 GB of
    # HBM3e at 8 TB/s a GPU). HGX/DGX B300: the DGX B300 datasheet's 72 PFLOPS fp8 with sparsity over
    # 8 GPUs, i.e. 4.5 fp8 and 2.25 bf16 dense a GPU, as B200. GB300 NVL72: its datasheet's 720 PFLOPS
    # fp8 and 360 bf16 with sparsity over 72 GPUs, i.e. 5 and 2.5 dense, as GB200.
    Accelerator("b300", "NVIDIA B300 (HGX) 288GB",
                _tf(fp32=75, tf32=1100, bf16=2250, fp16=2250, fp8=4500),
                8.0e12, 275_040 * MiB, sms=160),
    Accelerator("gb300", "NVIDIA GB300 (NVL72) 288GB",
                _tf(fp32=80, tf32=1250, bf16=2500, fp16=2500, fp8=5000),
                8.0e12, 284_208 * MiB, ("gb300-nvl72",), sms=160),
    # GDDR6 with ECC on by default (the data-center parts' setting) keeps part of the nameplate from
    # CUDA: nvidia-smi's totals, 23,034 MiB of the L4's 24 GiB and 46,068 MiB of the L40S's 48 GiB
    Accelerator("l4", "NVIDIA L4 24GB",
                _tf(fp32=30.3, tf32=60, bf16=121, fp16=121, fp8=242.5, int8=242.5), 300e9, 23_034 * MiB, sms=58),
    Accelerator("l40s", "NVIDIA L40S 48GB",
                _tf(fp32=91.6, tf32=183, bf16=362.05, fp16=362.05, fp8=733, int8=733), 864e9, 46_068 * MiB,
                sms=142),
    Accelerator("rtx4090", "NVIDIA GeForce RTX 4090 24GB",
                _tf(fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, fp8=330.3, int8=660.6),
                1008e9, 24 * GiB, ("4090",), sms=128),
    Accelerator("mi300x", "AMD Instinct MI300X 192GB",
                _tf(fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9, int8=2614.9),
                5.3e12, 192 * GiB, sms=304),
    Accelerator("v100", "NVIDIA V100 SXM2 32GB",
                _tf(fp32=15.7, fp16=125), 900e9, 32 * GiB, sms=80),
)

_BY_KEY = {a.key: a for a in ACCELERATORS} | {alias: a for a in ACCELERATORS for alias in a.aliases}


def accelerator(key: str) -> Accelerator:
    """Look up by key or alias (case-insensitive): h100, h100-sxm, a100-80gb, b200, ..."""
    found = _BY_KEY.get(key.lower().replace("_", "-"))
    if found is None:
        # each with the short names `--help` uses (h100, a100): h100-sxm (h100, h100-sxm5)
        known = ", ".join(a.key + (f" ({', '.join(a.aliases)})" if a.aliases else "") for a in ACCELERATORS)
        raise ArchplanError(f"unknown GPU '{key}'; known: {known}")
    return found


# Device-name words (torch.cuda.get_device_name, split at spaces, hyphens and underscores) -> the
# entry, and the words of variants the table does not hold, which must not borrow a neighbour's
# datasheet: H100 NVL (835 TF dense) and H200 NVL are not the SXM parts, an H800 PCIe is H100
# PCIe-class, a V100 PCIe (112 TF) or 16 GB part is not the SXM2 32 GB, an RTX 4090 D (114 SMs) or
# Laptop GPU is another chip, and "L40" is not "L4". An A100 is SXM unless its name says PCIe, 80GB
# where its name says so.
_NAME_WORDS: tuple[tuple[str, str], ...] = (
    ("h200", "h200"), ("h100", "h100-sxm"), ("h800", "h800"), ("gb200", "gb200"), ("b200", "b200"),
    ("gb300", "gb300"), ("b300", "b300"), ("l40s", "l40s"), ("l4", "l4"), ("4090", "rtx4090"),
    ("mi300x", "mi300x"), ("v100", "v100"),
)
_UNLISTED_VARIANTS: dict[str, frozenset[str]] = {
    "h100-sxm": frozenset({"nvl"}), "h200": frozenset({"nvl"}), "h800": frozenset({"pcie"}),
    "rtx4090": frozenset({"laptop", "d"}), "v100": frozenset({"pcie", "16gb"}),
}


def match_device_name(name: str) -> Accelerator | None:
    """Map a torch device name ('NVIDIA H200', 'NVIDIA A100-SXM4-80GB') to a table entry, if any:
    whole words, so that no variant the table lacks borrows another part's figures (None: bench
    calibrates the peak in the run instead)."""
    words = set(re.split(r"[\s\-_]+", name.lower()))
    if "a100" in words:
        form = "a100-pcie" if "pcie" in words else "a100"
        return _BY_KEY[f"{form}-80gb" if any(w.startswith("80g") for w in words) else f"{form}-40gb"]
    if "h100" in words and "pcie" in words:
        return _BY_KEY["h100-pcie"]
    for word, key in _NAME_WORDS:
        if word in words:
            return None if words & _UNLISTED_VARIANTS.get(key, frozenset()) else _BY_KEY[key]
    return None


# ------------------------------------------------------------------------ achieved efficiencies
@dataclass(frozen=True)
class KernelEfficiency:
    """What the kernels of one GPU family achieve, for `plan`'s per-kernel-class step-time model
    (docs/plan.md "Compute model"). Calibrated once per family, never per run.

    gemm: fraction of the dense peak large GEMMs reach; a GEMM whose smallest dimension is x runs at
      gemm · x/(x + GEMM_HALF_DIM) of it, and never faster than its operands stream from HBM.
    attention_fwd / attention_bwd: FlashAttention-2 FLOP/s at head dim 128, causal, long sequences
      (the backward at FlashAttention's 2.5 × forward FLOPs convention); head dim 64 runs at
      `attention_hd64` of that.
    hbm: fraction of the HBM bandwidth elementwise kernels (norms, activations, rotary, softmax,
      the optimizer step) reach.
    intra_link / inter_link: NCCL bus bandwidth over the one-direction link figure (nccl-tests).
    latency: seconds per collective call (NCCL's small-message latency).
    fp8_split_acc: how much longer an fp8 GEMM of the backward (dgrad, wgrad) takes than one of the
      forward. On Hopper, Transformer Engine runs the forward's fp8 GEMMs with the tensor cores'
      fast accumulation and the backward's with the split accumulator (`_2X_ACC_FPROP = False`,
      `_2X_ACC_DGRAD = _2X_ACC_WGRAD = True`: partial sums promoted to fp32 periodically), and fast
      accumulation measures 1.1-1.2× faster (pytorch/ao issue 2377, H100; torchao makes the same
      choice); 1.15, the range's middle. 1.0 where the GPU has no such mode (Blackwell's sm100
      accumulates in full precision either way) or no fp8.
    ring_nics: how many NICs a data-parallel (or context-parallel) ring that leaves the node moves
      one rank's bytes over. "members": as many as the group has members on a node, since NCCL runs
      one ring per NIC and splits the bytes between them (NCCL's maintainers measure 192 GB/s of
      all-reduce bus bandwidth across DGX A100 nodes with eight 200 Gb/s NICs, NVIDIA/nccl issue
      812, against 24 GB/s with one, issue 412); "one": one NIC per GPU whatever the group. The
      default is the source's; a family keeps "one" only where its runs in the issue's data set
      require it (docs/validation.md, "The ring's NICs per GPU family").
    """

    family: str
    gemm: float
    attention_fwd: float
    attention_bwd: float
    attention_hd64: float
    hbm: float
    intra_link: float
    inter_link: float
    latency: float
    source: str
    fp8_split_acc: float = 1.0
    ring_nics: RingNics = "members"

    def attention_share(self, head_dim: int) -> float:
        """The fraction of the head-dim-128 FlashAttention rates a head of `head_dim` (as the kernel
        computes it) reaches: `attention_hd64` in the head-dim-64 bucket, else all of them."""
        return self.attention_hd64 if head_dim_bucket(head_dim) == 64 else 1.0


# FlashAttention implementations: the FA2 kernel the family rates above describe, or another kernel
# a run's framework picks instead, at its measured speed relative to FA2, forward and backward, per
# head-dim bucket (64, or 128 for every wider head):
# - "triton", the Triton FlashAttention (e.g. llm-foundry's `attn_impl: triton`): Dao 2023
#   (FlashAttention-2) §4.1 measures FlashAttention-2 "around 1.3-1.5× faster than FlashAttention in
#   Triton in the forward pass and around 2× faster in the backward pass" (A100, causal and not, head
#   dim 64 and 128); 1/1.4 (the range's middle) and 1/2 on every family (the only published ratio).
# - "cudnn", cuDNN's fused attention, which Transformer Engine's `DotProductAttention` runs on Hopper
#   and newer whenever both it and FlashAttention could ("Disabling FlashAttention to give
#   FusedAttention preference on Hopper+ for performance reasons": `get_attention_backend`, sm90 since
#   Transformer Engine 1.7 of 2024-05, sm90 and up since 2.0), so every Megatron-Core run with
#   Transformer Engine on H100 or B200. Shah et al. 2024 (FlashAttention-3) Fig. 5-6 measure it beside
#   FlashAttention-2 on H100 SXM5 at 16K tokens: head dim 128, forward (causal) 539 against 335
#   TFLOP/s, backward 516 against 322; head dim 64, forward 413 against 324 (the figure's only
#   head-dim-64 forward bars are non-causal), backward 433 against 291. The ratios apply to every
#   family's FA2 rates (the only published ones; not fitted).
FlashImpl = Literal["fa2", "triton", "cudnn"]
RingNics = Literal["one", "members"]
FLASH_IMPL_SPEED: dict[tuple[FlashImpl, int], tuple[float, float]] = {
    ("fa2", 64): (1.0, 1.0), ("fa2", 128): (1.0, 1.0),
    ("triton", 64): (1 / 1.4, 1 / 2), ("triton", 128): (1 / 1.4, 1 / 2),
    ("cudnn", 64): (413 / 324, 433 / 291), ("cudnn", 128): (539 / 335, 516 / 322),
}


def head_dim_bucket(head_dim: int) -> int:
    """The head dim whose measurements stand for `head_dim`: 64, or 128 for every wider head."""
    return 64 if head_dim <= 64 else 128


def flash_speed(impl: FlashImpl, head_dim: int) -> tuple[float, float]:
    """The forward and backward speed of `impl` relative to FlashAttention-2 at head dim `head_dim`
    as the kernel computes it (`FLASH_IMPL_SPEED`)."""
    return FLASH_IMPL_SPEED[impl, head_dim_bucket(head_dim)]


# A causal FlashAttention kernel is slower on short sequences: its diagonal tiles are half masked and
# each query block's fixed work is spread over fewer key blocks. A sequence of L tokens runs at
# L/(L + half) of the long-sequence rate, relative to the 16,384 tokens at which the rates above are
# read (`flash_length_factor`). `half` is the least-squares fit to the forward + backward bars of the
# FlashAttention repository's README benchmark figures (causal, 512 to 16,384 tokens, 16K tokens a
# batch), per implementation and head dim (64, or 128 for every wider head). FlashAttention-2, A100
# 80GB and H100 SXM5: its four curves fit 490-560 apart and 530 together, every bar within 3.1
# points, so one value serves both head dims. The Triton FlashAttention (A100, same figure) differs
# by head dim: 150 at 64 (within 6 points), 350 at 128 (within 3); one value for both, 230, would
# miss by 11 (docs/validation.md, "FlashAttention on short sequences"). cuDNN's, from the bars of
# Shah et al. 2024 Fig. 5-6 above (512 to 16K tokens): 340 at head dim 128 (its causal forward and
# its backward, every bar within 2.9 points), 300 at 64 (its backward alone, within 2.8: the
# head-dim-64 forward bars are non-causal, without the masked tiles this factor prices).
FLASH_HALF_LENGTH: dict[tuple[FlashImpl, int], int] = {
    ("fa2", 64): 530, ("fa2", 128): 530, ("triton", 64): 150, ("triton", 128): 350,
    ("cudnn", 64): 300, ("cudnn", 128): 340,
}
FLASH_RATE_LENGTH = 16_384


def flash_length_factor(length: int, impl: FlashImpl, head_dim: int) -> float:
    """The fraction of the family's FlashAttention rate a causal sequence of `length` tokens reaches
    at head dim `head_dim` as the kernel computes it (`FLASH_HALF_LENGTH`); 1 from 16,384 tokens on,
    the longest the figures measured."""
    half = FLASH_HALF_LENGTH[impl, head_dim_bucket(head_dim)]
    return min(1.0, length / (length + half) * (FLASH_RATE_LENGTH + half) / FLASH_RATE_LENGTH)


# cuDNN's MXFP8 training attention against its BF16 one on the same GPU, measured by NVIDIA's
# cudnn-frontend repository (benchmark/sdpa_benchmark_training/results, 2026-04-24: cuDNN 9.22,
# frontend 1.21.1; causal ("top_left"), batch 2, non-deterministic backward). Two shapes: Llama 3.1
# 405B's heads (64 query, 8 KV, head dim 128) and DeepSeek-V3's (128 and 128, head dims 192 for
# Q·K and 128 for V). Per sequence length: BF16 forward, BF16 backward, MXFP8 forward, MXFP8
# backward, TFLOP/s. Transformer Engine runs its fp8 dot-product attention in MXFP8 under an MXFP8
# recipe (`dot_product_attention/backends.py`: `qkv_type == "mxfp8"`); `fp8_attention_speed` gives
# the ratios, which the layout model applies to its own BF16 rates. Only GB200 and GB300 are on
# record: the repository's other results (H200, cuDNN 9.19) are per-tensor fp8 and time forward and
# backward together.
FP8_ATTENTION_RATES: dict[tuple[str, int], tuple[tuple[int, float, float, float, float], ...]] = {
    ("gb200", 128): ((2048, 1097, 885, 1330, 745), (4096, 1408, 1148, 1685, 1054),
                     (8192, 1574, 1332, 1902, 1287), (16384, 1708, 1328, 1999, 1436),
                     (32768, 1622, 1226, 2046, 1425)),
    ("gb200", 192): ((2048, 1072, 846, 1535, 1047), (4096, 1406, 1057, 1925, 1364),
                     (8192, 1585, 1193, 2219, 1494), (16384, 1678, 1134, 2355, 1552),
                     (32768, 1743, 1076, 2329, 1532)),
    ("gb300", 128): ((2048, 1373, 967, 1751, 811), (4096, 1703, 1248, 2272, 1143),
                     (8192, 1856, 1435, 2570, 1404), (16384, 1915, 1507, 2727, 1563),
                     (32768, 1953, 1490, 2785, 1590)),
    ("gb300", 192): ((2048, 1285, 914, 2069, 1158), (4096, 1590, 1143, 2517, 1522),
                     (8192, 1825, 1291, 2829, 1780), (16384, 1967, 1302, 2998, 1844),
                     (32768, 1991, 1289, 2959, 1863)),
}


def fp8_attention_gpus() -> tuple[str, ...]:
    """The GPUs with a measured fp8 attention rate (`FP8_ATTENTION_RATES`)."""
    return tuple(sorted({key for key, _ in FP8_ATTENTION_RATES}))


def fp8_attention_speed(gpu_key: str, head_dim: int, length: int) -> tuple[float, float]:
    """How much faster cuDNN's MXFP8 attention runs than its BF16 one on `gpu_key`, forward and
    backward, for a causal layer of Q·K head dim `head_dim` over `length` tokens: the measured shape
    nearest in head dim (128, or 192 for a wider one), linear in log2(length) between the measured
    lengths, the end's ratio beyond them (`FP8_ATTENTION_RATES`)."""
    points = FP8_ATTENTION_RATES[gpu_key, 192 if head_dim > 128 else 128]
    ratios = [(math.log2(n), f8 / f, b8 / b) for n, f, b, f8, b8 in points]
    x = math.log2(max(points[0][0], min(points[-1][0], length)))
    for (x0, f0, b0), (x1, f1, b1) in zip(ratios, ratios[1:]):
        if x <= x1:
            t = (x - x0) / (x1 - x0)
            return f0 + t * (f1 - f0), b0 + t * (b1 - b0)
    return ratios[-1][1], ratios[-1][2]


def flash_head_dim(head_dim: int, impl: FlashImpl) -> int:
    """The head dimension a FlashAttention kernel computes with: the tiles are padded, so a head of
    112 costs what one of 128 does. FA2 rounds up to a multiple of 32 up to 192, else to 256
    (`flash_api.cpp`: `head_size_rounded = head_size <= 192 ? round_multiple(head_size, 32) :
    256`); the Triton kernel to a power of two, at least 16 (`flash_attn_triton.py`:
    `BLOCK_HEADDIM = max(triton.next_power_of_2(d), 16)`); cuDNN's takes head dims that are
    multiples of 8 (Transformer Engine's `get_attention_backend` leaves FusedAttention for any other)
    and is priced at the head dim rounded up to one."""
    match impl:
        case "fa2":
            return -(-head_dim // 32) * 32 if head_dim <= 192 else 256
        case "triton":
            return max(1 << (head_dim - 1).bit_length(), 16)
        case "cudnn":
            return -(-head_dim // 8) * 8
        case _:
            assert_never(impl)

GEMM_HALF_DIM = 48  # one 128×128 tile's worth of M/N/K; cuBLAS tile quantisation (our estimate)

KERNEL_EFFICIENCY: dict[str, KernelEfficiency] = {
    "ampere": KernelEfficiency(
        "ampere (A100)", gemm=0.71, attention_fwd=190 * TERA, attention_bwd=160 * TERA,
        attention_hd64=0.85, hbm=0.80, intra_link=0.78, inter_link=0.90, latency=20e-6,
        source=("gemm: calibrated on Narayanan et al. 2021 Table 1 and Korthikanti et al. 2022 Table 5 "
                "(docs/validation.md); attention: Dao 2023 (FlashAttention-2) Fig. 4-5, A100 causal "
                "hd128 ~190 TF/s forward, ~160 backward; hbm: STREAM-class copies ~1.6 of 2.0 TB/s; "
                "links: nccl-tests all-reduce bus bandwidth ~235 of 300 GB/s NVLink 3, ~23 of 25 GB/s "
                "per HDR NIC; ring_nics: one, as DeepSpeed's ZeRO-3 rows of Narayanan et al. 2021 Table 2 "
                "require (docs/validation.md)"), ring_nics="one"),
    "hopper": KernelEfficiency(
        "hopper (H100/H800/H200)", gemm=0.59, attention_fwd=335 * TERA, attention_bwd=290 * TERA,
        attention_hd64=0.80, hbm=0.80, intra_link=0.80, inter_link=0.90, latency=20e-6,
        source=("gemm: calibrated on Llama 3 Table 4 (docs/validation.md); attention: Shah et al. 2024 "
                "(FlashAttention-3) Fig. 5-6, FlashAttention-2 on H100 causal hd128 ~335 TF/s forward, "
                "~290 backward; hbm and links: nccl-tests NVLink 4 ~360 of 450 GB/s, NDR ~45 of 50 GB/s; "
                "ring_nics: members (NCCL's multi-NIC rings; no run of the issue's data set says otherwise)"),
        fp8_split_acc=1.15),
}

# GPUs whose fp8 tensor cores take only the "TN" layout, so that Transformer Engine keeps a transposed
# copy of an fp8 tensor for the backward's GEMMs: its `is_non_tn_fp8_gemm_supported()` is true for
# compute capability 10.x and 13.0 on (Blackwell data-centre parts), false for Hopper (9.0) and Ada (8.9).
FP8_TN_ONLY: frozenset[str] = frozenset({"h100-sxm", "h100-pcie", "h200", "h800", "l4", "l40s", "rtx4090"})

# GPUs of compute capability 10.x (B200, GB200, B300, GB300): Transformer Engine's fused grouped MLP
# (`ops/fused/grouped_mlp.py`, `_GroupedMLP_CuTeGEMMBase.is_supported`) runs its CuTe DSL kernels
# only where the device's major compute capability is 10 (`pricing.Rates.fused_grouped_mlp`).
SM100_GPUS: frozenset[str] = frozenset({"b200", "gb200", "b300", "gb300"})

# Maximum achievable matmul FLOP/s ("MAMF"): the best mean bf16 `torch.matmul` rate over a
# brute-force search of shapes, every GPU measured with the same tool (Bekman, "Machine Learning
# Engineering Open Book", compute/accelerator, MAMF table as of 2026-08, `mamf-finder.py`): H100 SXM
# 794.5 TFLOP/s (H200 measures the same), B200 1,745.0, B300 1,769.0, GB200 1,822.0, MI300X 668.4
# (no GB300 row). An uncalibrated GPU keeps Hopper's GEMM fraction scaled by its matmul efficiency
# over H100's (`kernel_efficiency`): the table's one tool and method measure what the GPU's GEMMs
# reach of its own datasheet peak, which the Hopper calibration cannot know. The table's fp8 rows agree for Blackwell (B200 76.3% of peak
# against 77.6% in bf16; GB200 72.3% against 72.9%), so one ratio serves both precisions.
MATMUL_ACHIEVED_BF16: dict[str, float] = {
    "h100-sxm": 794.5 * TERA, "b200": 1745.0 * TERA, "b300": 1769.0 * TERA, "gb200": 1822.0 * TERA,
    "mi300x": 668.4 * TERA,
}


def matmul_ratio(gpu: Accelerator) -> float | None:
    """The GPU's measured bf16 matmul efficiency (of its own peak) over H100 SXM's
    (`MATMUL_ACHIEVED_BF16`); None where the table has no row for it."""
    achieved = MATMUL_ACHIEVED_BF16.get(gpu.key)
    if achieved is None:
        return None
    h100 = ACCELERATORS_BY_KEY["h100-sxm"]
    return (achieved / gpu.peak("bf16")) / (MATMUL_ACHIEVED_BF16[h100.key] / h100.peak("bf16"))


# NVIDIA GPUs before Hopper (compute capability below 9.0: Volta, Ampere, Ada), on which Transformer
# Engine runs FlashAttention rather than cuDNN's fused attention (`get_attention_backend` prefers
# cuDNN's kernel from sm90 on)
PRE_HOPPER_NVIDIA: frozenset[str] = frozenset({"v100", "a100-40gb", "a100-80gb", "a100-pcie-40gb", "a100-pcie-80gb",
                                               "l4", "l40s", "rtx4090"})

# Families without a calibration fall back to the Hopper fractions (stated in the output), their GEMM
# fraction scaled by `matmul_ratio` where it is known.
FAMILY_OF: dict[str, str] = {
    "a100-40gb": "ampere", "a100-80gb": "ampere", "a100-pcie-40gb": "ampere", "a100-pcie-80gb": "ampere",
    "h100-sxm": "hopper", "h100-pcie": "hopper", "h200": "hopper", "h800": "hopper",
}
# The part each family's FlashAttention rates were measured on (Dao 2023 on A100 SXM, Shah et al.
# 2024 on H100 SXM5): a member with a lower peak (H100 PCIe: 114 SMs, 756 TF) runs them in proportion
FAMILY_REFERENCE: dict[str, str] = {"ampere": "a100-80gb", "hopper": "h100-sxm"}


def kernel_efficiency(gpu: Accelerator) -> tuple[KernelEfficiency, bool]:
    """The GPU's family constants and whether they were calibrated on that family."""
    family = FAMILY_OF.get(gpu.key)
    if family is None:
        hopper = KERNEL_EFFICIENCY["hopper"]
        scale = gpu.peak("bf16") / ACCELERATORS_BY_KEY["h100-sxm"].peak("bf16")
        ratio = matmul_ratio(gpu)
        gemm_note = "" if ratio is None else f", GEMMs × {ratio:.3f} by measured matmul rate"
        return KernelEfficiency(f"uncalibrated ({gpu.name}, Hopper fractions{gemm_note})",
                                hopper.gemm * (1.0 if ratio is None else ratio),
                                hopper.attention_fwd * scale, hopper.attention_bwd * scale,
                                hopper.attention_hd64, hopper.hbm, hopper.intra_link,
                                hopper.inter_link, hopper.latency, hopper.source,
                                ring_nics=hopper.ring_nics), False
    constants = KERNEL_EFFICIENCY[family]
    scale = gpu.peak("bf16") / ACCELERATORS_BY_KEY[FAMILY_REFERENCE[family]].peak("bf16")
    if scale == 1.0:
        return constants, True
    # "hopper (H100/H800/H200)" -> "hopper (H100/H800/H200; attention × 0.764 by the bf16 peak)"
    family_name = f"{constants.family.removesuffix(')')}; attention × {scale:.3f} by the bf16 peak)"
    return replace(constants, family=family_name,
                   attention_fwd=constants.attention_fwd * scale,
                   attention_bwd=constants.attention_bwd * scale), True


ACCELERATORS_BY_KEY = {a.key: a for a in ACCELERATORS}
