"""Fake (meta) implementations of every splinet_cuda op, so torch.compile and
torch.library.opcheck can trace them without running a kernel. The schemas are defined
in csrc/splinet_ops.cpp."""
from __future__ import annotations

import torch


@torch.library.register_fake("splinet_cuda::basis_table")
def _basis_table_fake(t: torch.Tensor, knots: int, degree: int):
    torch._check(t.dim() == 1, lambda: f"basis_table: t must be 1-D, got {t.dim()}-D")
    return t.new_empty(t.shape, dtype=torch.int64), t.new_empty((t.shape[0], degree + 1))
