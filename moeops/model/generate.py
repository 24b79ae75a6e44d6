"""Text generation over any incremental-decoding step function: greedy or temperature + top-p
(nucleus) sampling with a seed. The same loop drives PyTorch (`torch_step`) and ONNX Runtime
(moeops.export.onnx.OnnxLM.step), so both decode identically given identical logits.

A step is `step(input_ids_BS, attention_mask_BT, past) -> (logits_BSV, present)` on numpy arrays;
`past=None` means an empty cache. Prompts of different lengths are left-padded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moeops.sampling import left_pad, sample_next  # noqa: F401 (re-exported)

Step = Callable[[np.ndarray, np.ndarray, object], tuple[np.ndarray, object]]


def generate(step: Step, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """New tokens per prompt (a finished row stops at eos_id, which it includes)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    rng = np.random.default_rng(seed)
    ids_BS, mask_BT = left_pad(prompts)
    logits_BSV, past = step(ids_BS, mask_BT, None)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    for i in range(max_new_tokens):
        next_B = sample_next(logits_BSV[:, -1], temperature, top_p, rng)
        for b, t in enumerate(next_B):
            if not done[b]:
                out[b].append(int(t))
                done[b] = eos_id is not None and t == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        mask_BT = np.concatenate([mask_BT, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        logits_BSV, past = step(next_B[:, None].astype(np.int64), mask_BT, past)
    return out


def torch_step(model) -> Step:
    """A Step over a moeops Transformer (PyTorch eager, fp32, KV cache)."""

    @torch.inference_mode()
    def step(ids_BS, mask_BT, past):
        if past is None:
            past = model.empty_cache(ids_BS.shape[0])
        logits_BSV, present = model.forward_cached(torch.from_numpy(ids_BS), torch.from_numpy(mask_BT), past)
        return logits_BSV.float().numpy(), present

    return step
