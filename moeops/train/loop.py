"""Single-process pretraining: AdamW, warmup + cosine, clipping, optional bf16 autocast,
aux-loss-free bias updates, dvclive logging, atomic checkpoints and exact resume.

The same params on the same machine (and thread count) give bitwise-identical weights,
with or without interruptions: batches are a function of (seed, step), the LR a function
of step, and every piece of mutable state is in the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moeops.cli import UserError
from moeops.config import PretrainParams
from moeops.model.transformer import Transformer, build_model, expert_loads, max_violation, update_router_bias
from moeops.train.checkpoint import clean_partial, list_checkpoints, load_checkpoint, read_state, save_checkpoint
from moeops.train.data import get_batch


class TrainingDiverged(UserError):
    exit_code = 1


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, p: PretrainParams) -> torch.optim.AdamW:
    """Weight decay on matrices and expert tensors only; norms get none (the balancing bias
    is a buffer, never seen by the optimizer)."""
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=p.lr, betas=(p.beta1, p.beta2), fused=True)


def setup_determinism(seed: int, threads: int) -> int:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return threads


# Keys that change how a run is logged or checkpointed, not the weights it produces.
NOT_WEIGHT_KEYS = {"log_every", "checkpoint_every", "keep_checkpoints", "threads"}
CODE = [Path(__file__).resolve().parents[2] / d for d in ("kernels", "moeops/model", "moeops/train",
                                                           "moeops/config.py")]


def code_fingerprint() -> str:
    h = hashlib.sha256()
    for root in CODE:
        for f in sorted([root] if root.is_file() else root.rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()


def run_id(p: PretrainParams, data_meta: dict, threads: int) -> str:
    """Checkpoints are only resumed by a run with the same weight-affecting params, data, code and
    thread count (CPU reductions split by thread: another count gives other bits)."""
    params = {k: v for k, v in p.model_dump().items() if k not in NOT_WEIGHT_KEYS}
    blob = json.dumps({"params": params, "data": data_meta, "threads": threads, "code": code_fingerprint()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resume(ckpt_dir: Path, rid: str, model: Transformer, optimizer: torch.optim.Optimizer) -> dict:
    """Load the newest checkpoint of this run; delete those of other runs (other params, data or
    code), so that rotation never mixes runs. Returns the checkpoint's state ({} = fresh start)."""
    clean_partial(ckpt_dir)
    for ckpt in list_checkpoints(ckpt_dir):
        if read_state(ckpt).get("run_id") != rid:
            print(f"pretrain: discarding {ckpt} (other params, data or code)")
            shutil.rmtree(ckpt)
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return {}
    state = load_checkpoint(ckpts[-1], model, optimizer)
    print(f"pretrain: resumed from {ckpts[-1]} (step {state['step']})")
    return state


@dataclass
class TrainResult:
    model: Transformer
    steps_run: int
    resumed_from: int
    tokens_per_s: float
    final_loss: float
    seconds: float
    maxvio: list[float] = field(default_factory=list)


def pretrain(p: PretrainParams, train_tokens: np.ndarray, vocab_size: int, data_meta: dict, ckpt_dir: Path,
             live_dir: Path | None = None, loss_hook=None) -> TrainResult:
    """Train (or resume) to p.steps, logging to dvclive in `live_dir` (None: no logging).
    `loss_hook(step, loss)` lets tests inject faults."""
    if len(train_tokens) < p.seq_len + 2:
        raise UserError(f"train split has {len(train_tokens)} tokens, fewer than pretrain.seq_len+2={p.seq_len + 2}")
    threads = setup_determinism(p.seed, p.threads)
    args = p.model_args(vocab_size)
    model = build_model(args, seed=p.seed).train()
    optimizer = make_optimizer(model, p)
    rid = run_id(p, data_meta, threads)
    state = resume(ckpt_dir, rid, model, optimizer)
    start = state.get("step", 0)
    # Running totals live in the checkpoint so that a resumed run reports the whole run.
    seconds_before, losses = state.get("train_seconds", 0.0), state.get("recent_losses", [])
    maxvio = state.get("maxvio", [])
    live = None
    if live_dir is not None:
        from dvclive import Live

        # dvcyaml=None: dvc.yaml declares the plots itself; a stage must not rewrite it.
        live = Live(dir=str(live_dir), resume=start > 0, save_dvc_exp=False, dvcyaml=None)

    tokens_per_step = p.batch_size * p.seq_len * p.grad_accum
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.bf16)
    bar = tqdm(total=p.steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    try:
        for step in range(start, p.steps):
            lr = lr_at(step, p.steps, p.lr, p.min_lr, p.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_aux = 0.0, 0.0
            for micro in range(p.grad_accum):
                x_BS, y_BS = get_batch(train_tokens, p.seed, step, micro, p.batch_size, p.seq_len)
                with autocast:
                    logits_BSV = model(x_BS)
                ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten())
                aux = model.aux_loss()
                loss = ce + aux
                if loss_hook is not None:
                    loss = loss_hook(step, loss)
                if not torch.isfinite(loss.detach()):
                    raise TrainingDiverged(f"pretrain: loss is {loss.item()} at step {step}; stopped "
                                           f"({last_good(ckpt_dir)})")
                (loss / p.grad_accum).backward()
                step_loss += ce.item() / p.grad_accum
                step_aux += float(aux.detach() if torch.is_tensor(aux) else aux) / p.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
            if not torch.isfinite(grad_norm):  # never let a NaN/inf gradient reach the weights
                raise TrainingDiverged(f"pretrain: gradient norm is {grad_norm.item()} at step {step}; stopped "
                                       f"({last_good(ckpt_dir)})")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            maxvio = [max_violation(load) for load in expert_loads(model)]
            update_router_bias(model, p.bias_update_speed)
            losses.append(step_loss)
            steps_since_log += 1
            done = step + 1

            if done % p.log_every == 0 or done == p.steps:
                now = time.perf_counter()
                tok_s = steps_since_log * tokens_per_step / (now - t_log)
                t_log, steps_since_log = now, 0
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", maxvio=f"{max(maxvio, default=0):.2f}")
                if live is not None:
                    live.step = done
                    live.log_metric("train/loss", step_loss)
                    live.log_metric("train/lr", lr)
                    live.log_metric("train/grad_norm", float(grad_norm))
                    live.log_metric("train/tokens_per_s", tok_s)
                    live.log_metric("train/balance_loss", step_aux)
                    for i, v in enumerate(maxvio):
                        live.log_metric(f"expert_load/maxvio_layer{i + args.first_k_dense_replace}", v)
            if done % p.checkpoint_every == 0 or done == p.steps:
                save_checkpoint(ckpt_dir, done, model, optimizer,
                                {"run_id": rid, "threads": threads, "tokens_seen": done * tokens_per_step,
                                 "train_seconds": seconds_before + time.perf_counter() - t_start,
                                 "recent_losses": losses[-10:], "maxvio": maxvio},
                                p.keep_checkpoints)
            bar.update(1)
    finally:  # also on divergence or Ctrl-C: flush the logs, close the bar
        bar.close()
        if live is not None:
            live.end()
    seconds = seconds_before + time.perf_counter() - t_start
    if state.get("step") == p.steps:  # the run had finished: report what the checkpoint recorded
        seconds = state.get("train_seconds", seconds)
    return TrainResult(
        model=model.eval(), steps_run=p.steps - start, resumed_from=start,
        tokens_per_s=p.steps * tokens_per_step / seconds if seconds else 0.0,
        final_loss=float(np.mean(losses[-10:])), seconds=seconds, maxvio=maxvio)


def last_good(ckpt_dir: Path) -> str:
    good = list_checkpoints(ckpt_dir)
    return f"last good checkpoint: {good[-1]}" if good else "no checkpoint written yet"
