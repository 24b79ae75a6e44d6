"""Pretraining on DeepSpeed, in one process or many (moeops/train/parallel.py): AdamW, warmup +
cosine, clipping, optional bf16 autocast, aux-loss-free bias updates from the global expert
loads, compressed gradients, dvclive logging, atomic layout-independent checkpoints and resume.

Expert balance: each MoE layer's global routed-token counts (summed over the ranks, as the bias
update sees them) are accumulated over every logging window (dvclive
`expert_load/busiest_over_uniform_layer{i}`) and over the run's last min(BALANCE_STEPS, steps) steps
(`TrainResult.busiest_over_uniform`). The last-steps counts are in the checkpoint, so a run resumed
inside that window reports the same figure as an uninterrupted one; a logging window cut by a resume
covers only its steps after the resume.

The same params on the same machine give bitwise-identical weights, with or without
interruptions: the global batch is a function of (seed, step) that each data-parallel rank
slices, the LR a function of step, and every piece of mutable state is in the checkpoint.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import groups
from tqdm import tqdm

from moeops.cli import UserError
from moeops.config import ModelArgs, PretrainParams
from moeops.model.transformer import (
    Transformer,
    build_model,
    expert_loads,
    max_violation,
    reset_expert_stats,
    update_router_bias,
)
from moeops.train import parallel
from moeops.train.checkpoint import RUNS, arrange_runs, list_checkpoints, load_checkpoint, prune_runs, save_checkpoint
from moeops.train.compress import Int8GradAllReduce, ring_allreduce_bytes
from moeops.train.data import get_batch
from moeops.train.parallel import (
    ADAM_STATE,
    Layout,
    allreduce_expert_loads,
    checkpoint_blocks,
    ds_config,
    exact_clipping,
    full_state,
    init_distributed,
    is_expert_param,
    load_full_moments,
    optimizer_groups,
    parallelize,
    pipeline,
    step_peak_rss_gb,
)


class TrainingDiverged(UserError):
    exit_code = 1


BALANCE_STEPS = 100  # the run's last steps over which the expert balance is reported (issue 14 §4)


def busiest_over_uniform(load_E: torch.Tensor) -> float:
    """The busiest expert's routed tokens over the mean (uniform) share: 1 = perfectly balanced."""
    mean = load_E.double().mean()
    return float(load_E.max() / mean) if mean > 0 else 0.0


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, p: PretrainParams, layout: Layout | None = None) -> torch.optim.AdamW:
    """Weight decay on matrices and expert tensors only; norms get none (the balancing bias
    is a buffer, never seen by the optimizer)."""
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    groups = [{"name": "decay", "params": decay, "weight_decay": p.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if layout is not None:
        groups = optimizer_groups(groups, layout)
    return torch.optim.AdamW(groups, lr=p.lr, betas=(p.beta1, p.beta2), fused=True)


def matmul_gflops(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """This machine's matmul throughput in `dtype` (best of `repeats` n×n products)."""
    gen = torch.Generator().manual_seed(0)  # not the global generator: the run's draws stay the same
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def resolve_bf16(bf16: bool | str) -> tuple[bool, dict[str, float]]:
    """`bf16: auto` picks bf16 autocast only where it pays: where this CPU's bf16 matmul peak is at
    least 1.3x its fp32 peak (AMX does 2-3x; AVX-512 BF16 without AMX, or AVX2 alone, is slower than
    fp32). Returns the choice and the two peaks in GFLOP/s (empty unless measured). About 0.1 s where
    bf16 is emulated (1.3 GFLOP/s on AVX2)."""
    if bf16 != "auto":
        return bool(bf16), {}
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    return peaks["bf16"] >= 1.3 * peaks["fp32"], {k: round(v, 1) for k, v in peaks.items()}


def setup_determinism(seed: int, threads: int) -> int:
    """0 threads = this machine's cores shared by the processes the launcher started here."""
    threads = threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return threads


# Keys that change how a run is logged, checkpointed or laid out over processes, not the model it
# trains: a checkpoint resumes under any of their values (checkpoints are layout-independent).
NOT_WEIGHT_KEYS = {"log_every", "checkpoint_every", "keep_checkpoints", "keep_runs", "threads", "world_size", "ep_size",
                   "pp_size", "zero_stage", "activation_checkpointing", "memory_limit_gb", "max_restarts", "hostfile"}
CODE = [Path(__file__).resolve().parents[2] / d for d in ("kernels", "moeops/model", "moeops/train",
                                                           "moeops/config.py")]


def source_digest(path: Path) -> str:
    """sha256 of a Python file's syntax tree without docstrings (comments are not in it): an edit
    to either keeps the run id, so the run resumes; any change to the code changes it. A file that
    does not parse is hashed as bytes."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return hashlib.sha256(source).hexdigest()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def code_fingerprint(roots: list[Path] = CODE) -> str:
    h = hashlib.sha256()
    for root in roots:
        for f in sorted([root] if root.is_file() else root.rglob("*.py")):
            h.update(f"{f.relative_to(root.parent)}\0{source_digest(f)}\n".encode())
    return h.hexdigest()


def run_id(p: PretrainParams, data_meta: dict, extra: dict | None = None) -> str:
    """Checkpoints are only resumed by a run with the same weight-affecting params, data and code
    (and `extra`: what else decides the weights, e.g. the architecture and the teacher of a student)."""
    params = {k: v for k, v in p.model_dump().items() if k not in NOT_WEIGHT_KEYS}
    run = {"params": params, "data": data_meta, "code": code_fingerprint()}
    if extra is not None:
        run["extra"] = extra
    blob = json.dumps(run, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_resume(ckpt_dir: Path, rid: str, layout: Layout, name: str = "pretrain") -> Path | None:
    """The newest checkpoint of this run. Rank 0 first parks the checkpoints of other runs (other
    params, data or code) in ckpt_dir/runs/<run id>/ and brings back this run's if it had been
    parked (moeops/train/checkpoint.py); nothing is deleted before this run has a checkpoint."""
    if layout.rank == 0:
        for other in arrange_runs(ckpt_dir, rid):
            print(f"{name}: parked the checkpoints of run {other} (other params, data or code) in "
                  f"{ckpt_dir / RUNS / other}; this is run {rid}")
    dist.barrier()
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


@dataclass
class TrainResult:
    model: Transformer | None  # the unsharded model on rank 0, None elsewhere
    steps_run: int
    resumed_from: int
    tokens_per_s: float
    final_loss: float
    seconds: float
    maxvio: list[float] = field(default_factory=list)
    balance_steps: int = 0  # the last min(BALANCE_STEPS, steps) steps ...
    busiest_over_uniform: list[float] = field(default_factory=list)  # ... per MoE layer over them
    grad_bytes_per_step: int = 0  # data-parallel gradient bytes a rank sends per step (the busiest)
    all_to_all_bytes_per_step: int = 0  # expert-parallel token bytes a rank sends per step (the busiest)
    peak_rss_gb: float = 0.0  # this process (rank 0)
    activation_checkpointing: bool = False
    step_peak_rss_gb: float = 0.0  # measured when activation_checkpointing is "auto"
    bf16: bool = False  # autocast used (bf16: auto resolved)
    matmul_peaks_gflops: dict[str, float] = field(default_factory=dict)  # what bf16: auto measured


def _global_mean(value: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The mean over data-parallel ranks: the loss of the whole global batch."""
    if layout.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=groups._get_data_parallel_group())
        value /= layout.dp_size
    return value


def _choose_checkpointing(p: PretrainParams, model: Transformer, batch, layout: Layout) -> tuple[bool, float]:
    """"auto": one forward+backward without checkpointing; on if its peak RSS (the largest over the
    ranks) exceeds memory_limit_gb."""
    if p.activation_checkpointing != "auto":
        return p.activation_checkpointing == "on", 0.0
    x_BS, y_BS = batch

    def step():
        F.cross_entropy(model(x_BS).flatten(0, 1), y_BS.flatten()).backward()

    peak = torch.tensor(step_peak_rss_gb(step))
    model.zero_grad(set_to_none=True)
    reset_expert_stats(model)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak) > p.memory_limit_gb, float(peak)


def check_train_tokens(p: PretrainParams, train_tokens: np.ndarray) -> None:
    if len(train_tokens) < p.seq_len + 2:
        raise UserError(f"train split has {len(train_tokens)} tokens, fewer than pretrain.seq_len+2={p.seq_len + 2}")


def pretrain(p: PretrainParams, train_tokens: np.ndarray, vocab_size: int, data_meta: dict, ckpt_dir: Path,
             live_dir: Path | None = None, loss_hook=None, *, args: ModelArgs | None = None,
             init_state: dict[str, torch.Tensor] | None = None, objective=None, run_extra: dict | None = None,
             name: str = "pretrain") -> TrainResult:
    """Train (or resume) to p.steps on this process's share of the layout in `p`, logging to dvclive
    in `live_dir` from rank 0 (None: no logging). `loss_hook(step, loss)` lets tests inject faults.

    A student (moeops/train/distill.py) is trained by the same loop: `args` replaces the architecture
    of p's flavor, `init_state` the random init, `objective(x_BS, y_BS, logits_BSV) -> (loss, ce)` the
    cross-entropy (with pipeline stages there is no whole-model logits tensor: refused), and
    `run_extra` (e.g. the teacher's hash) joins the checkpoints' run id."""
    check_train_tokens(p, train_tokens)
    if objective is not None and p.pp_size > 1:
        raise ValueError("pretrain: a custom objective needs pp_size 1")
    layout = init_distributed(p)
    rank0 = layout.rank == 0
    threads = setup_determinism(p.seed, p.threads)
    bf16, peaks = resolve_bf16(p.bf16)
    if layout.world_size > 1:  # every rank trains in the same precision: bf16 only if all chose it
        choice = torch.tensor([int(bf16)])
        dist.all_reduce(choice, op=dist.ReduceOp.MIN)
        bf16 = bool(choice.item())
    p = p.model_copy(update={"bf16": bf16})  # the run id names the precision used, not "auto"
    args = args or p.model_args(vocab_size)
    model = build_model(args, seed=p.seed).train()
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    rid = run_id(p, data_meta, run_extra)
    ckpt = find_resume(ckpt_dir, rid, layout, name)
    state, moments = {}, {}
    if ckpt is not None:
        def load(weights, moments_, state_):
            model.load_state_dict(weights, strict=True)
            for name, param in model.named_parameters():  # checked here: a bad file is one line
                for key in ADAM_STATE:
                    if moments_.get(f"{name}.{key}", torch.empty(0)).shape != param.shape:
                        raise ValueError(f"optimizer.safetensors: {name}.{key} missing or misshapen")
            moments.update(moments_)
        state = load_checkpoint(ckpt, load)
        if rank0:
            print(f"{name}: resumed from {ckpt} (step {state['step']})")
    start = state.get("step", 0)
    micro = p.batch_size // layout.dp_size
    rows = slice(layout.dp_rank * micro, (layout.dp_rank + 1) * micro)

    def batch(step: int, m: int):  # this rank's rows of the global batch (the same for any layout)
        x_BS, y_BS = get_batch(train_tokens, p.seed, step, m, p.batch_size, p.seq_len)
        return x_BS[rows], y_BS[rows]

    parallelize(model, layout)
    use_ckpt, peak_gb = _choose_checkpointing(p, model, batch(start, 0), layout)
    if use_ckpt:
        checkpoint_blocks(model)
    zero = p.zero_stage > 0
    module, owns = pipeline(model, layout) if layout.pp_size > 1 else (model, None)
    engine, *_ = deepspeed.initialize(model=module, optimizer=make_optimizer(module, p, layout),
                                      config=ds_config(p, layout))
    load_full_moments(model, engine.optimizer, moments, start, layout, zero, owns)
    grad_norm, at = float("nan"), {"step": start}

    def check_grad_norm(norm: float) -> None:
        nonlocal grad_norm
        grad_norm = norm
        if not math.isfinite(norm):  # never let a NaN/inf gradient reach the weights
            raise TrainingDiverged(f"pretrain: gradient norm is {norm} at step {at['step']}; stopped "
                                   f"({last_good(ckpt_dir)})")

    if not zero:
        exact_clipping(engine, layout, p.grad_clip, check_grad_norm)
    compress = None
    if p.grad_compression == "int8" and layout.dp_size > 1:
        engine.enable_backward_allreduce = False  # moeops reduces the gradients itself
        compress = int8_reducers(model, layout, p.compression_block)
    grad_bytes = grad_bytes_per_step(module, layout, p.grad_compression)

    # Running totals live in the checkpoint so that a resumed run reports the whole run.
    seconds_before, losses = state.get("train_seconds", 0.0), state.get("recent_losses", [])
    maxvio = state.get("maxvio", [])
    balance_from = max(0, p.steps - BALANCE_STEPS)
    window_loads = [torch.zeros_like(load, dtype=torch.float64) for load in expert_loads(model)]
    last_loads = [torch.tensor(c, dtype=torch.float64) for c in state.get("expert_load_last_steps", [])] \
        or [torch.zeros_like(load) for load in window_loads]
    live = None
    if live_dir is not None and rank0:
        from dvclive import Live

        # dvcyaml=None: dvc.yaml declares the plots itself; a stage must not rewrite it.
        live = Live(dir=str(live_dir), resume=start > 0, save_dvc_exp=False, dvcyaml=None)

    tokens_per_step = p.batch_size * p.seq_len * p.grad_accum
    autocast = torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=p.steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not rank0)
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    a2a_start = parallel.all_to_all_bytes[0]
    try:
        for step in range(start, p.steps):
            lr = lr_at(step, p.steps, p.lr, p.min_lr, p.warmup_steps)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            at["step"] = step
            if layout.pp_size > 1:  # the pipeline runs all micro-batches, reduces and steps
                step_loss = float(engine.train_batch(iter([batch(step, m) for m in range(p.grad_accum)])))
                step_aux = 0.0  # refused with pipelines (see moeops.config.check_layout)
                step_objective = step_loss
                if not math.isfinite(step_loss):
                    raise TrainingDiverged(f"pretrain: loss is {step_loss} at step {step}; stopped "
                                           f"({last_good(ckpt_dir)})")
            else:
                step_loss, step_aux, step_objective = _data_parallel_step(
                    engine, model, batch, step, p, layout, autocast, compress, loss_hook, ckpt_dir, objective)
            if zero:  # ZeRO clips inside its step, so a NaN gradient is caught one step late
                check_grad_norm(float(engine.get_global_grad_norm()))
            allreduce_expert_loads(model, layout)
            loads = expert_loads(model)
            maxvio = [max_violation(load) for load in loads]
            for window, last, load in zip(window_loads, last_loads, loads, strict=True):
                window += load
                if step >= balance_from:
                    last += load
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
                    live.log_metric("train/grad_norm", grad_norm)
                    live.log_metric("train/tokens_per_s", tok_s)
                    live.log_metric("train/balance_loss", step_aux)
                    if objective is not None:
                        live.log_metric("train/objective", step_objective)
                    for i, (v, window) in enumerate(zip(maxvio, window_loads)):
                        live.log_metric(f"expert_load/maxvio_layer{i + args.first_k_dense_replace}", v)
                        live.log_metric(f"expert_load/busiest_over_uniform_layer{i + args.first_k_dense_replace}",
                                        busiest_over_uniform(window))
                for window in window_loads:
                    window.zero_()
            if done % p.checkpoint_every == 0 or done == p.steps:
                weights, moments = full_state(model, engine.optimizer, layout, zero, owns)
                if rank0:
                    save_checkpoint(ckpt_dir, done, weights, moments,
                                    {"run_id": rid, "threads": threads, "world_size": layout.world_size,
                                     "tokens_seen": done * tokens_per_step,
                                     "train_seconds": seconds_before + time.perf_counter() - t_start,
                                     "recent_losses": losses[-10:], "maxvio": maxvio,
                                     "expert_load_last_steps": [last.long().tolist() for last in last_loads]},
                                    p.keep_checkpoints)
                    for run in prune_runs(ckpt_dir, p.keep_runs):  # only now that this run has one
                        print(f"{name}: deleted {run} (keep_runs={p.keep_runs})")
                dist.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet
            bar.update(1)
    finally:  # also on divergence or Ctrl-C: flush the logs, close the bar
        bar.close()
        if live is not None:
            live.end()
    seconds = seconds_before + time.perf_counter() - t_start
    if state.get("step") == p.steps:  # the run had finished: report what the checkpoint recorded
        seconds = state.get("train_seconds", seconds)
    steps_run = max(1, p.steps - start)
    if compress:
        grad_bytes = sum(r.bytes_sent for r in compress) // steps_run
    # The busiest rank's traffic (with a pipeline, rank 0's stage may hold no MoE layer).
    traffic = torch.tensor([grad_bytes, (parallel.all_to_all_bytes[0] - a2a_start) // steps_run])
    dist.all_reduce(traffic, op=dist.ReduceOp.MAX)
    grad_bytes, a2a_bytes = traffic.tolist()
    weights, _ = full_state(model, engine.optimizer, layout, zero, owns)
    final = None
    if rank0:
        final = build_model(args, seed=p.seed)
        final.load_state_dict(weights, strict=True)
        final.eval()
    return TrainResult(
        model=final, steps_run=p.steps - start, resumed_from=start,
        tokens_per_s=p.steps * tokens_per_step / seconds if seconds else 0.0,
        final_loss=float(np.mean(losses[-10:])), seconds=seconds, maxvio=maxvio,
        balance_steps=p.steps - balance_from, busiest_over_uniform=[busiest_over_uniform(x) for x in last_loads],
        grad_bytes_per_step=grad_bytes, activation_checkpointing=use_ckpt, step_peak_rss_gb=peak_gb,
        all_to_all_bytes_per_step=a2a_bytes, bf16=bf16, matmul_peaks_gflops=peaks,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def _data_parallel_step(engine, model, batch, step: int, p: PretrainParams, layout: Layout, autocast, compress,
                        loss_hook, ckpt_dir: Path, objective=None) -> tuple[float, float, float]:
    """Forward and backward over the micro-batches, then the optimizer step. Returns the global
    batch's cross-entropy, balance loss and objective (the loss minimized, before the balance loss)."""
    step_loss, step_aux, step_objective = 0.0, 0.0, 0.0
    for m in range(p.grad_accum):
        x_BS, y_BS = (t.to(engine.device) for t in batch(step, m))
        if objective is None:  # the fused lm_head + cross-entropy: no [B·S, V] logits
            with autocast:
                ce = main = engine(x_BS, y_BS)
        else:
            with autocast:
                logits_BSV = engine(x_BS)
            main, ce = objective(x_BS, y_BS, logits_BSV)
        aux = model.aux_loss()
        loss = main + aux
        if loss_hook is not None:
            loss = loss_hook(step, loss)
        # One all-reduce for the global batch's loss, cross-entropy and balance loss.
        global_loss, global_ce, global_aux, global_main = _global_mean(
            torch.stack([loss.detach(), ce.detach(), torch.as_tensor(aux).detach().float(), main.detach()]),
            layout).tolist()
        if not math.isfinite(global_loss):
            raise TrainingDiverged(f"pretrain: loss is {global_loss} at step {step}; stopped ({last_good(ckpt_dir)})")
        engine.backward(loss)
        if m == p.grad_accum - 1:
            for reduce in compress or []:  # int8 all-reduce in place of DeepSpeed's
                reduce()
        engine.step()  # clips (exact_clipping) and steps after the last micro-batch
        step_loss += global_ce / p.grad_accum
        step_aux += global_aux / p.grad_accum
        step_objective += global_main / p.grad_accum
    return step_loss, step_aux, step_objective


def last_good(ckpt_dir: Path) -> str:
    good = list_checkpoints(ckpt_dir)
    return f"last good checkpoint: {good[-1]}" if good else "no checkpoint written yet"


def int8_reducers(model: torch.nn.Module, layout: Layout, block: int) -> list[Int8GradAllReduce]:
    """Dense gradients over all data-parallel ranks, expert gradients over the ranks holding the same
    experts; both divided by the data-parallel size, as DeepSpeed does."""
    dense = [t for t in model.parameters() if not is_expert_param(t)]
    expert = [t for t in model.parameters() if is_expert_param(t)]
    reducers = [Int8GradAllReduce(dense, groups._get_data_parallel_group(), block, layout.dp_size)]
    if expert:
        edp = groups._get_expert_data_parallel_group(f"ep_size_{layout.ep_size}")
        reducers.append(Int8GradAllReduce(expert, edp, block, layout.dp_size))
    return reducers


def grad_bytes_per_step(model: torch.nn.Module, layout: Layout, compression: str) -> int:
    """Bytes of gradient traffic this rank sends per step under a ring all-reduce (int8: counted by
    Int8GradAllReduce instead, see TrainResult)."""
    itemsize = {"fp16": 2, "bf16": 2}.get(compression, 4)
    dense = sum(t.numel() for t in model.parameters() if not is_expert_param(t))
    expert = sum(t.numel() for t in model.parameters() if is_expert_param(t))
    return (ring_allreduce_bytes(dense, itemsize, layout.dp_size)
            + ring_allreduce_bytes(expert, itemsize, layout.dp_size // layout.ep_size))
