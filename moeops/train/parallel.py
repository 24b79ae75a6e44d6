"""Distribution applied to a built model (the model files know nothing of it): DeepSpeed's engine
for data parallelism and ZeRO, expert parallelism for the routed experts, activation
checkpointing, and the layout-independent (full, unsharded) view of weights and optimizer
state that checkpoints are written in.

Layout: world_size processes = pp_size pipeline stages x dp data-parallel ranks (dp =
world_size / pp_size). Every data-parallel rank reads its own slice of the global batch. The
routed experts are sharded over groups of ep_size consecutive data-parallel ranks (DeepSpeed's
expert-parallel groups); the ranks holding the same experts form the expert-data-parallel group
that averages their gradients.

Legend: M expert-sorted rows, D model dim, E routed experts, L = E / ep local experts,
R ranks in the expert-parallel group.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups, safe_get_full_optimizer_state, safe_set_full_optimizer_state
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.grouped_mlp import grouped_swiglu
from moeops.config import PretrainParams
from moeops.model.moe import MoE
from moeops.model.transformer import Transformer
from moeops.train.launch import free_port

ADAM_STATE = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Layout:
    world_size: int
    rank: int
    pp_size: int
    ep_size: int

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pp_size

    @property
    def dp_rank(self) -> int:  # DeepSpeed's pipe-major grid: rank = stage * dp + dp_rank
        return self.rank % self.dp_size

    @property
    def ep_rank(self) -> int:  # DeepSpeed's expert-parallel groups are consecutive dp ranks
        return self.dp_rank % self.ep_size


def init_distributed(p: PretrainParams) -> Layout:
    """Join the job started by the launcher (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
    environment), or form a one-process group when run directly. Gloo on CPU, NCCL on GPU."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        # Not launched: a group of one, without touching os.environ (child processes must not
        # take it for a launcher's).
        alone = {} if "RANK" in os.environ else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0,
                                                  "world_size": 1, "auto_mpi_discovery": False}
        if alone:
            os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False,
                                   **alone)
    world = dist.get_world_size()
    if world != p.world_size:
        raise RuntimeError(f"launched with {world} processes, pretrain.world_size is {p.world_size}")
    return Layout(world, dist.get_rank(), p.pp_size, p.ep_size)


# ---------------------------------------------------------------- expert parallelism


# Bytes this process has sent to other ranks by expert-parallel all-to-all (forward, backward and
# activation-checkpointing recomputation), for the logs and the benchmarks.
all_to_all_bytes = [0]


def _all_to_all(x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x_MD.new_empty(sum(out_splits), *x_MD.shape[1:])
    dist.all_to_all_single(out, x_MD.contiguous(), out_splits, in_splits, group=group)
    me = dist.get_rank(group=group)
    all_to_all_bytes[0] += (sum(in_splits) - in_splits[me]) * x_MD[0:1].numel() * x_MD.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x_MD, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return _all_to_all(x_MD, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        back_out, back_in = ctx.splits
        return _all_to_all(grad_out, back_out, back_in, ctx.group), None, None, None


class ExpertParallel(DeepSpeedMoE):
    """This rank's L = E / ep_size routed experts, called like `Experts` with all E experts'
    expert-sorted rows: rows travel to the rank owning their expert by all-to-all (counts first,
    so nothing is dropped), run through the local experts, and come back in the same order.

    A DeepSpeed MoE layer to the engine (hence the base class; its gate and dispatch are not
    used): the engine creates the expert-parallel groups, reduces these parameters' gradients
    over the expert-data-parallel group only, and ZeRO partitions them in their own group."""

    def __init__(self, gate_up_EXD: torch.Tensor, down_EDF: torch.Tensor, ep_size: int, ep_rank: int):
        nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: that builds DeepSpeed's own gate
        E = gate_up_EXD.shape[0]
        L = E // ep_size
        self.num_experts, self.ep_size, self.ep_rank, self.num_local_experts = E, ep_size, ep_rank, L
        self.expert_group_name = f"ep_size_{ep_size}"
        local = slice(ep_rank * L, (ep_rank + 1) * L)
        self.gate_up_proj = nn.Parameter(gate_up_EXD.detach()[local].clone())
        self.down_proj = nn.Parameter(down_EDF.detach()[local].clone())
        for param in (self.gate_up_proj, self.down_proj):
            param.allreduce, param.group_name = False, self.expert_group_name  # DeepSpeed's MoE markers
        self.group = None

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size,
                                                    use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.group = groups._get_expert_parallel_group(self.expert_group_name)
        if dist.get_rank(group=self.group) != self.ep_rank:
            raise RuntimeError(f"expert-parallel rank {dist.get_rank(group=self.group)} != {self.ep_rank}")

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        R, L = self.ep_size, self.num_local_experts
        send_RL = counts_E.view(R, L)  # rows for each rank's local experts
        recv_RL = torch.empty_like(send_RL)  # rows each rank sends to my experts
        dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=self.group)
        send, recv = send_RL.sum(1).tolist(), recv_RL.sum(1).tolist()
        x_recv = _AllToAll.apply(x_MD, recv, send, self.group)  # grouped by source rank, then expert
        # Source-major (rank, expert) blocks -> expert-major, so each expert reads one slice.
        blocks = recv_RL.flatten().tolist()
        order = [r * L + e for e in range(L) for r in range(R)]
        pieces = torch.split(x_recv, blocks)
        y_sorted = grouped_swiglu(torch.cat([pieces[i] for i in order]), recv_RL.sum(0), self.gate_up_proj,
                                  self.down_proj)
        y_pieces = torch.split(y_sorted, [blocks[i] for i in order])
        back = [None] * len(order)
        for j, i in enumerate(order):
            back[i] = y_pieces[j]
        return _AllToAll.apply(torch.cat(back), send, recv, self.group)


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


# ---------------------------------------------------------------- activation checkpointing


@contextlib.contextmanager
def _recomputing(block: nn.Module):
    """Routing statistics count each forward once: not again when the backward recomputes it."""
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    if moe is not None:
        moe.count_stats = False
    try:
        yield
    finally:
        if moe is not None:
            moe.count_stats = True


def _checkpointed_forward(block: nn.Module, forward, *args):
    if not torch.is_grad_enabled():
        return forward(*args)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _recomputing(block)))


def checkpoint_blocks(model: Transformer) -> None:
    """Keep only each block's input during the forward and recompute the block in the backward
    (parameter names unchanged)."""
    for block in model.model.layers:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)


def step_peak_rss_gb(run_step) -> float:
    """Peak resident memory (GB) while `run_step()` runs: resets the kernel's high-water mark
    (/proc/self/clear_refs), runs it, reads VmHWM."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run_step()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---------------------------------------------------------------- the engine


def parallelize(model: Transformer, layout: Layout) -> Transformer:
    """Shard the routed experts over the expert-parallel group, in place. Call before
    `deepspeed.initialize` (and `pipeline`); `checkpoint_blocks` adds activation checkpointing."""
    if layout.ep_size > 1:
        # Every rank creates the groups (a collective), also a pipeline stage without MoE layers.
        if f"ep_size_{layout.ep_size}" not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(layout.ep_size, pp_size=layout.pp_size)
        for moe in model.moe_layers():
            moe.experts = ExpertParallel(moe.experts.gate_up_proj, moe.experts.down_proj, layout.ep_size,
                                         layout.ep_rank)
    return model


# ---------------------------------------------------------------- pipeline parallelism


class _Embed(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.embed_tokens, self.prefixes = model.model.embed_tokens, ["model.embed_tokens"]

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens_BS)


class _PipeBlock(nn.Module):
    def __init__(self, model: Transformer, i: int):
        super().__init__()
        self.block, self.prefixes = model.model.layers[i], [f"model.layers.{i}"]
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        S = x_BSD.shape[1]
        return self.block(x_BSD, self.rope_cos[:S], self.rope_sin[:S])


class _Head(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.norm, self.lm_head, self.prefixes = model.model.norm, model.lm_head, ["model.norm", "lm_head"]

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x_BSD))


def _cross_entropy(logits_BSV: torch.Tensor, y_BS: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten())


def pipeline(model: Transformer, layout: Layout):
    """The model as DeepSpeed pipeline stages (embedding, blocks balanced over the stages, head)
    sharing `model`'s modules; each rank keeps its stage. Returns (PipelineModule, owns) where
    owns(name) says whether a parameter or buffer name of `model` lives on this rank's stage."""
    from deepspeed.pipe import PipelineModule

    layers = [_Embed(model), *(_PipeBlock(model, i) for i in range(model.args.n_layers)), _Head(model)]
    pipe = PipelineModule(layers, num_stages=layout.pp_size, loss_fn=_cross_entropy, partition_method="type:_PipeBlock")
    stage = pipe.stage_id
    prefixes = tuple(f"{prefix}." for layer in layers[pipe.parts[stage]:pipe.parts[stage + 1]]
                     for prefix in layer.prefixes)
    return pipe, lambda name: name.startswith(prefixes)


def ds_config(p: PretrainParams, layout: Layout) -> dict:
    micro = p.batch_size // layout.dp_size
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": micro * p.grad_accum * layout.dp_size,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Never 0 (= off): the step computes the norm only when it clips, and a non-finite norm stops
        # the run. Without ZeRO the norm is moeops' exact one (see `exact_clipping`).
        "gradient_clipping": p.grad_clip or 1e30,
        # Buckets of 5e8 elements (the default) cost a 2 GB allocation per step on CPU.
        "zero_optimization": {"stage": p.zero_stage, "reduce_bucket_size": 2**22, "allgather_bucket_size": 2**22},
    }
    if p.grad_compression in ("fp16", "bf16"):
        config["communication_data_type"] = p.grad_compression
    return config


def optimizer_groups(groups_: list[dict], layout: Layout) -> list[dict]:
    """Expert parameters in their own groups (DeepSpeed's MoE param groups) so ZeRO partitions
    them over the expert-data-parallel group."""
    if layout.ep_size == 1:
        return groups_
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups_)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, layout: Layout) -> torch.Tensor:
    """Exact global gradient norm after the data-parallel reduction (dense gradients are equal
    on every rank of a stage; expert gradients differ across the expert-parallel group; stages
    hold different layers), then clip. `model`: this rank's module (its stage's with a pipeline)."""
    dense, expert = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    params = [t for t in model.parameters() if t.grad is not None]
    for t in params:
        sq = t.grad.double().pow(2).sum()
        if is_expert_param(t):
            expert += sq
        else:
            dense += sq
    if layout.ep_size > 1:
        dist.all_reduce(expert, group=groups._get_expert_parallel_group(f"ep_size_{layout.ep_size}"))
    total = dense + expert
    if layout.pp_size > 1:  # each stage holds its own layers' gradients
        dist.all_reduce(total, group=groups.mpu.get_pipe_parallel_group())
    norm = total.sqrt().float()
    if torch.isfinite(norm):
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for t in params:
            t.grad.mul_(coef)
    return norm


def exact_clipping(engine, layout: Layout, max_norm: float, check) -> None:
    """Make a non-ZeRO engine clip with `clip_grad_norm_`: DeepSpeed's fp32 clipping averages the
    per-rank norms when experts are sharded. `check(norm)` runs before the optimizer step."""
    def clip():
        check(float(clip_grad_norm_(engine.module, max_norm, layout)))

    engine.clip_fp32_gradients = clip


@torch.no_grad()
def allreduce_expert_loads(model: Transformer, layout: Layout) -> None:
    """Sum every router's token counts over all ranks, so that each rank sees the global load and
    makes the same balancing-bias update. (A pipeline stage counts zero for the other stages'
    layers: the world sum is each layer's sum over its own stage's data-parallel ranks.)"""
    if layout.world_size == 1:
        return
    loads = [m.gate.tokens_per_expert for m in model.moe_layers()]
    if loads:
        flat = torch.cat(loads)
        dist.all_reduce(flat)
        for load, new in zip(loads, flat.split([len(x) for x in loads]), strict=True):
            load.copy_(new)


# ---------------------------------------------------------------- full (layout-independent) state


def _gather_experts(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    group = groups._get_expert_parallel_group(f"ep_size_{layout.ep_size}")
    parts = [torch.empty_like(t) for _ in range(layout.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _local_experts(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    L = t.shape[0] // layout.ep_size
    return t[layout.ep_rank * L:(layout.ep_rank + 1) * L]


def _link_zero_states(optimizer) -> None:
    """Point each parameter's ZeRO fragment at its slice of the Adam state. DeepSpeed links them once,
    after the first parameter group's step, when the other groups have no state yet; relink."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def full_state(model: nn.Module, optimizer, layout: Layout, zero: bool, owns=None) -> tuple[dict, dict]:
    """Unsharded weights (with the balancing-bias buffers) and AdamW moments by parameter name,
    the same whatever the layout. With pipeline stages, `owns(name)` picks this rank's names and
    the stages' parts are merged. Collective: every rank calls it."""
    owns = owns or (lambda name: True)
    weights, moments = {}, {}
    params = dict(model.named_parameters())
    if zero:
        _link_zero_states(optimizer)
    for name, t in model.state_dict().items():
        if owns(name):
            weights[name] = t.detach().clone()
            if name in params and is_expert_param(params[name]):
                weights[name] = _gather_experts(weights[name], layout)
    for name, param in params.items():
        for key in ADAM_STATE:
            if not owns(name):
                continue
            if zero:
                value = safe_get_full_optimizer_state(param, key)
            else:
                value = optimizer.state.get(param, {}).get(key)
            if value is None:  # before the first step
                continue
            moments[f"{name}.{key}"] = _gather_experts(value, layout) if is_expert_param(param) else value.clone()
    if layout.pp_size > 1:
        parts = [None] * layout.world_size
        dist.all_gather_object(parts, (weights, moments))
        weights, moments = {}, {}
        for w, m in parts:
            weights.update(w)
            moments.update(m)
        weights = {name: weights[name] for name in model.state_dict()}  # the model's order
    return weights, moments


def load_full_moments(model: nn.Module, optimizer, moments: dict, step: int, layout: Layout, zero: bool,
                      owns=None) -> None:
    """Set the AdamW moments (and step count) from unsharded tensors, after `deepspeed.initialize`."""
    if not moments:
        return
    owns = owns or (lambda name: True)
    base = optimizer.optimizer if zero else optimizer
    for group in base.param_groups:  # ZeRO creates Adam's state lazily, at the first step
        for flat in group["params"]:
            state = base.state[flat]
            state["step"] = torch.tensor(float(step))
            for key in ADAM_STATE:
                state.setdefault(key, torch.zeros_like(flat))
    if zero:
        _link_zero_states(optimizer)
    for name, param in model.named_parameters():
        if not owns(name):
            continue
        for key in ADAM_STATE:
            value = moments[f"{name}.{key}"]
            value = _local_experts(value, layout) if is_expert_param(param) else value
            if zero:
                safe_set_full_optimizer_state(param, value, key)
            else:
                base.state[param][key].copy_(value)
