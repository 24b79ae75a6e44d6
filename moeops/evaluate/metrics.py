"""What the evaluate stage reports beside the shared scoring (moeops/evaluate/scoring.py): a PyTorch
model's expert load on the val documents, its prefill speed, peak memory, the per-document table
(every variant and compressor in bits per byte, document by document), the issue's targets, and the
expert-load heat map."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moeops.data.prepare import EOS_ID
from moeops.evaluate.scoring import Document, LogitsFn, document_bytes
from moeops.model.transformer import Transformer, expert_loads, max_violation

# (name, numerator, denominator, target): value = numerator's / denominator's micro bits-per-byte,
# met when value <= target. "ppmd_o16" is the compressor on the concatenated scored bytes.
TARGETS = [("teacher_vs_ppmd", "teacher", "ppmd_o16", 0.85), ("student_vs_teacher", "student", "teacher", 1.10),
           ("int8_vs_fp32", "onnx_int8", "onnx_fp32", 1.01)]


def unpadded_logits(model: Transformer) -> LogitsFn:
    """score_documents' logits function for a PyTorch model that runs each group of equally long rows
    without its right padding: the same logits at every real position (causal attention), and the
    MoE layers' load counters see only real tokens. The padding is 0 = EOS (prepare's tokenizer),
    which an input row holds only at a document's start, so a row ends at its last nonzero token."""

    @torch.inference_mode()
    def logits(x_BS: np.ndarray) -> torch.Tensor:
        nonzero_BS = x_BS != EOS_ID
        n_B = np.where(nonzero_BS.any(1), x_BS.shape[1] - np.argmax(nonzero_BS[:, ::-1], axis=1), 1)
        out_BSV = torch.zeros(*x_BS.shape, model.args.vocab_size)
        for n in np.unique(n_B):
            rows = torch.from_numpy(np.flatnonzero(n_B == n))
            out_BSV[rows, :n] = model(torch.from_numpy(x_BS[rows.numpy(), :n]))
        return out_BSV

    return logits


def expert_stats(model: Transformer) -> dict[str, Any]:
    """Routed-token share per expert, MaxVio per MoE layer and the dropped fraction since the last
    reset_expert_stats."""
    loads = expert_loads(model)
    routed = sum(float(load.sum()) for load in loads)
    dropped = sum(m.dropped_tokens for m in model.moe_layers())
    return {"expert_share": [(load / load.sum()).tolist() if load.sum() > 0 else [] for load in loads],
            "maxvio_per_layer": [round(max_violation(load), 4) for load in loads],
            "dropped_fraction": round(dropped / routed, 6) if routed else 0.0}


@torch.no_grad()
def inference_speed(model: Transformer, vocab_size: int, seq_len: int, batch_size: int, n_tokens: int,
                    repeats: int = 3) -> float:
    """Forward (prefill) tokens/s on about n_tokens random tokens (whole sequences of seq_len):
    median of `repeats` timed runs after a warm-up."""
    batch = max(1, n_tokens // seq_len)
    x_BS = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    model(x_BS)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x_BS)
        times.append(time.perf_counter() - t)
    return x_BS.numel() / sorted(times)[len(times) // 2]


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the parent across fork + exec, so a freshly spawned worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def documents_table(docs: list[Document], teacher_tokens_D: np.ndarray, variant_bits: dict[str, np.ndarray],
                    compressor_bits_D: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per scored document: its bytes, the teacher's scored tokens, whether it is complete,
    then each variant's and each compressor's (the document compressed alone) bits per byte."""
    bytes_D = document_bytes(docs)
    table = pd.DataFrame({"document": [d.name for d in docs], "bytes": bytes_D, "tokens": teacher_tokens_D,
                          "complete": [d.complete for d in docs]})
    for name, bits_D in (variant_bits | compressor_bits_D).items():
        table[name] = np.round(np.asarray(bits_D) / np.maximum(bytes_D, 1), 6)
    return table


def targets(micro: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The issue's quality targets over {variant or compressor: micro bits-per-byte}; a target whose
    variants are absent is left out."""
    return {name: {"value": round(micro[a] / micro[b], 6), "target": target, "met": micro[a] / micro[b] <= target}
            for name, a, b, target in TARGETS if a in micro and b in micro}


def plot_expert_load(expert_share: list[list[float]], first_moe_layer: int, path: Path) -> None:
    """Heat map of each MoE layer's share of routed tokens per expert (uniform = 1/E)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    shares = np.array(expert_share) if expert_share and expert_share[0] else np.zeros((1, 1))
    fig, ax = plt.subplots(figsize=(max(4, shares.shape[1] * 0.4), 1 + shares.shape[0] * 0.5))
    im = ax.imshow(shares * shares.shape[1], cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(shares.shape[0]), [str(first_moe_layer + i) for i in range(shares.shape[0])])
    ax.set_title("routed-token share × n_experts (1 = uniform)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
