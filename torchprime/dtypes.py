"""The dtypes a config may name, as a closed choice the config loader enforces."""

from __future__ import annotations

from enum import StrEnum

import torch


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)
