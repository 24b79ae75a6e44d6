"""Grouped SwiGLU expert MLP over expert-sorted rows.

Legend: M rows sorted by expert, D model dim, E experts, F expert hidden dim.
Weights use transformers' fused DeepseekV3 layout: gate_up_EXD with X = 2F ([gate; up]),
down_EDF.

CPU: one matmul pair per expert on its contiguous slice (torch._grouped_mm has no CPU
backward in torch 2.13). Empty experts are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu(x_MD: torch.Tensor, counts_E: torch.Tensor, gate_up_EXD: torch.Tensor,
                   down_EDF: torch.Tensor) -> torch.Tensor:
    outs = []
    for e, x_mD in enumerate(torch.split(x_MD, counts_E.tolist())):
        if x_mD.shape[0] == 0:
            continue
        gate_mF, up_mF = F.linear(x_mD, gate_up_EXD[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate_mF) * up_mF, down_EDF[e]))
    if not outs:
        return x_MD.new_zeros(0, down_EDF.shape[1])
    return torch.cat(outs)


def grouped_swiglu_reference(x_MD, counts_E, gate_up_EXD, down_EDF):
    """Row by row."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E)
    rows = []
    for m in range(x_MD.shape[0]):
        e = int(expert_of_row[m])
        gate, up = (gate_up_EXD[e] @ x_MD[m]).chunk(2)
        rows.append(down_EDF[e] @ (F.silu(gate) * up))
    return torch.stack(rows) if rows else x_MD.new_zeros(0, down_EDF.shape[1])
