"""Where a training step's time goes: torch.profiler over 3 steps of the small flavor
(batch 8 × 256, 1 thread, after 2 warm-up steps), top ops by self CPU time.

    python -m bench.profile_step
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from bench.train_step import make_step
from moeops.config import PretrainParams, make_model_args
from moeops.model.transformer import build_model
from moeops.train.loop import make_optimizer


def main() -> None:
    torch.set_num_threads(1)
    args = make_model_args("small")
    model = build_model(args).train()
    x_BS = torch.randint(0, args.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
    step = make_step(model, make_optimizer(model, PretrainParams()), x_BS, args.vocab_size)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
