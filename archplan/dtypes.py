"""Bytes per element of the storage dtypes archplan prices (docs/formulas.md §4.1)."""

from __future__ import annotations

from enum import Enum


class DType(str, Enum):
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"
    int8 = "int8"
    int4 = "int4"


# tf32 is a compute format stored in fp32 registers; int4 packs two weights per byte.
BYTES: dict[DType, float] = {
    DType.fp32: 4, DType.tf32: 4, DType.bf16: 2, DType.fp16: 2,
    DType.fp8: 1, DType.int8: 1, DType.int4: 0.5,
}


def nbytes(dtype: DType | str) -> float:
    return BYTES[DType(dtype)]
