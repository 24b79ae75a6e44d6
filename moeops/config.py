"""ModelArgs, the named model flavors, and the params.yaml schema.

Every stage validates its own params.yaml section here before doing any work:
an unknown key, a wrong type or an impossible combination becomes one line naming
the key and the rule (see `load_section`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeops.cli import UserError


@dataclass
class ModelArgs:
    """The DeepSeek-V3 architecture in miniature. Names follow DeepSeek's reference code;
    `moeops.model.hf` maps them onto transformers' DeepseekV3Config."""

    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    inter_dim: int = 768  # dense SwiGLU hidden size (first_k_dense_replace layers)
    moe_inter_dim: int = 128  # hidden size of each routed / shared expert
    first_k_dense_replace: int = 1
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    top_k: int = 4
    n_group: int = 1  # expert groups for group-limited routing (1 = off)
    topk_group: int = 1  # groups kept per token
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    q_lora_rank: int = 0  # 0 = full-rank query projection
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    capacity_factor: float = 0.0  # 0 = dropless
    seq_aux_alpha: float = 0.0  # sequence-wise balance loss weight (0 = off)
    z_loss_alpha: float = 0.0  # router z-loss weight (0 = off)
    init_std: float = 0.02


FLAVORS: dict[str, dict[str, Any]] = {
    # A training step in well under a second: unit tests and the end-to-end test.
    "debug": dict(dim=64, n_layers=2, n_heads=2, inter_dim=128, moe_inter_dim=32, n_routed_experts=8,
                  top_k=2, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, max_seq_len=64, vocab_size=512),
    "tiny": dict(dim=128, n_layers=3, n_heads=4, inter_dim=384, moe_inter_dim=64, n_routed_experts=8,
                 top_k=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                 max_seq_len=128),
    # The default of `make pipeline`: sized to train within the 20-minute budget on 2 cores.
    "small": dict(dim=256, n_layers=4, n_heads=4, inter_dim=768, moe_inter_dim=128, n_routed_experts=16,
                  top_k=4, n_group=4, topk_group=2, kv_lora_rank=64, q_lora_rank=128, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, max_seq_len=256),
}
# `small` without experts, with the same active parameters per token: every layer a dense SwiGLU whose
# hidden size matches the MoE layers' active hidden size (1 shared + top-4 routed experts of 128 = 640,
# plus the first dense layer's 768: 4 × 672 ≈ 768 + 3 × 640). The peer of bench/dense_vs_moe.py.
FLAVORS["dense"] = FLAVORS["small"] | dict(first_k_dense_replace=4, inter_dim=672)


def check_model_args(a: ModelArgs) -> None:
    """Raise ValueError naming the field and the rule for an impossible architecture."""
    positive = ["vocab_size", "dim", "n_layers", "n_heads", "inter_dim", "moe_inter_dim", "n_routed_experts",
                "top_k", "n_group", "topk_group", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "max_seq_len"]
    for name in positive:
        if getattr(a, name) <= 0:
            raise ValueError(f"{name}: must be > 0, got {getattr(a, name)}")
    for name in ["q_lora_rank", "n_shared_experts", "first_k_dense_replace", "capacity_factor", "seq_aux_alpha",
                 "z_loss_alpha"]:
        if getattr(a, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(a, name)}")
    if a.top_k > a.n_routed_experts:
        raise ValueError(f"top_k: {a.top_k} > n_routed_experts={a.n_routed_experts}")
    if a.n_routed_experts % a.n_group:
        raise ValueError(f"n_group: {a.n_group} does not divide n_routed_experts={a.n_routed_experts}")
    if a.topk_group > a.n_group:
        raise ValueError(f"topk_group: {a.topk_group} > n_group={a.n_group}")
    if a.n_group > 1 and a.n_routed_experts // a.n_group < 2:
        raise ValueError(f"n_group: {a.n_group} leaves fewer than 2 experts per group (group score = top-2 sum)")
    if a.top_k > a.topk_group * (a.n_routed_experts // a.n_group):
        raise ValueError(f"top_k: {a.top_k} > experts in the {a.topk_group} kept groups")
    if a.qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim: must be even, got {a.qk_rope_head_dim}")
    if a.first_k_dense_replace > a.n_layers:
        raise ValueError(f"first_k_dense_replace: {a.first_k_dense_replace} > n_layers={a.n_layers}")
    if a.score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func: must be 'sigmoid' or 'softmax', got {a.score_func!r}")


def make_model_args(flavor: str, overrides: dict[str, Any] | None = None) -> ModelArgs:
    if flavor not in FLAVORS:
        raise ValueError(f"flavor: unknown {flavor!r}, expected one of {sorted(FLAVORS)}")
    fields = {f.name: f for f in dataclasses.fields(ModelArgs)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"model.{key}: unknown model field")
        kind = type(ModelArgs.__dataclass_fields__[key].default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"model.{key}: expected {kind.__name__}, got {value!r}")
    args = ModelArgs(**{**FLAVORS[flavor], **(overrides or {})})
    try:
        check_model_args(args)
    except ValueError as e:
        raise ValueError(f"model.{e}") from None
    return args


def save_model_args(args: ModelArgs) -> str:
    return json.dumps(dataclasses.asdict(args), indent=2, sort_keys=True)


def load_model_args(path: str | Path) -> ModelArgs:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        args = ModelArgs(**data)
        check_model_args(args)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a valid model config ({e})") from None
    return args


# ---------------------------------------------------------------- params.yaml schema


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CorpusParams(Section):
    # "stdlib" (the .py files of this interpreter's standard library, tests excluded), a directory,
    # a glob, a .jsonl file with a "text" field, or a list of any of these.
    source: str | list[str] = "stdlib"
    # Suffixes taken from a directory source: ".py" (or "py"), "" for files without one (LICENSE),
    # "*" for every file (decoding and binary detection in prepare decide what is text).
    extensions: list[str] = [".py"]

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, v):
        import re

        if not v:
            raise ValueError('empty list: name suffixes (".txt"), "" (files without one) or "*" (every file)')
        for e in v:
            if e not in ("", "*") and not re.fullmatch(r"\.?[^./\\*?\[\]\s]+", e):
                raise ValueError(f'{e!r} is not a file suffix: use ".txt" or "txt", "" (files without one) '
                                 'or "*" (every file)')
        return v


class PrepareParams(Section):
    vocab_size: int = Field(8192, ge=260, le=65535 * 16)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    min_doc_bytes: int = Field(1, ge=1)
    max_doc_bytes: int = Field(1_000_000, ge=1)
    # A document over max_doc_bytes: split into chunks of whole lines (each <= max_doc_bytes, all in
    # the document's split) or drop it (skipped as "oversized").
    oversized: Literal["split", "drop"] = "split"
    dedup: bool = True
    # GX suite thresholds
    val_fraction_tolerance: float = Field(0.03, gt=0, lt=1)
    max_skipped_fraction: float = Field(0.05, ge=0, le=1)  # of non-empty documents (empty files are counted apart)
    max_skipped_bytes_fraction: float = Field(0.05, ge=0, le=1)  # of the corpus's bytes
    min_bytes_per_token: float = Field(1.5, gt=0)
    max_bytes_per_token: float = Field(8.0, gt=0)
    # The largest val document's share of the val tokens the evaluation scores (each document capped at
    # evaluate.max_tokens_per_doc): above it, one file would dominate the headline bits-per-byte.
    max_val_doc_share: float = Field(0.15, gt=0, le=1)

    @model_validator(mode="after")
    def _ranges(self):
        if self.min_doc_bytes > self.max_doc_bytes:
            raise ValueError(f"min_doc_bytes: {self.min_doc_bytes} > max_doc_bytes {self.max_doc_bytes}")
        if self.min_bytes_per_token >= self.max_bytes_per_token:
            raise ValueError("min_bytes_per_token: must be < max_bytes_per_token")
        return self


class PretrainParams(Section):
    flavor: str = "small"
    model: dict[str, Any] = {}  # ModelArgs overrides on top of the flavor
    seed: int = 0
    steps: int = Field(500, ge=1)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=2)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    bias_update_speed: float = Field(0.01, ge=0)  # gamma of the aux-loss-free balancing; 0 = off
    # bf16 autocast: true | false | auto (bf16 where this machine's bf16 matmul peak beats fp32's,
    # measured at the start of the run; the choice is in metrics/pretrain.json)
    bf16: bool | Literal["auto"] = "auto"
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = all cores
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    keep_runs: int = Field(3, ge=1)  # runs (params, data, code) whose checkpoints are kept, this one included
    log_every: int = Field(10, ge=1)
    # Distribution (moeops/train/parallel.py): world_size processes = pp_size pipeline stages x
    # (world_size / pp_size) data-parallel ranks, the routed experts sharded over groups of ep_size
    # of those data-parallel ranks. Gloo on CPU, NCCL on GPU.
    world_size: int = Field(1, ge=1)
    ep_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)
    zero_stage: int = Field(0, ge=0, le=3)
    activation_checkpointing: Literal["off", "on", "auto"] = "off"
    memory_limit_gb: float = Field(16.0, gt=0)  # "auto" turns checkpointing on above this step peak RSS
    grad_compression: Literal["none", "fp16", "bf16", "int8"] = "none"  # data-parallel gradient traffic
    compression_block: int = Field(256, ge=8)  # int8: elements per scale
    max_restarts: int = Field(0, ge=0)  # relaunches after a crash, each resuming from the last checkpoint
    hostfile: str = ""  # DeepSpeed hostfile ("host slots=N" lines) for several nodes; "" = this machine

    @field_validator("flavor")
    @classmethod
    def _flavor(cls, v):
        if v not in FLAVORS:
            raise ValueError(f"unknown flavor {v!r}, expected one of {sorted(FLAVORS)}")
        return v

    @model_validator(mode="after")
    def _combos(self):
        if "vocab_size" in self.model:
            raise ValueError("model.vocab_size: set by the tokenizer; change prepare.vocab_size instead")
        args = make_model_args(self.flavor, self.model)  # raises ValueError("model.<key>: ...")
        if self.seq_len > args.max_seq_len:
            raise ValueError(f"seq_len: {self.seq_len} > model max_seq_len {args.max_seq_len}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr} > lr {self.lr}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} > steps {self.steps}")
        check_layout(self, args)
        return self

    def model_args(self, vocab_size: int) -> ModelArgs:
        """The trained model's architecture: the vocabulary is the tokenizer's, and the context is the
        training seq_len (evaluation never scores positions the model was not trained on)."""
        return make_model_args(self.flavor, {**self.model, "vocab_size": vocab_size, "max_seq_len": self.seq_len})


def check_layout(p: PretrainParams, args: ModelArgs) -> None:
    """Refuse a process layout that cannot work, before any process starts."""
    if p.world_size % p.pp_size:
        raise ValueError(f"world_size: {p.world_size} is not a multiple of pp_size={p.pp_size}")
    dp = p.world_size // p.pp_size
    if dp % p.ep_size:
        raise ValueError(f"ep_size: {p.ep_size} does not divide the {dp} data-parallel ranks "
                         f"(world_size / pp_size)")
    if args.n_routed_experts % p.ep_size:
        raise ValueError(f"ep_size: {p.ep_size} does not divide n_routed_experts={args.n_routed_experts}")
    if p.pp_size > args.n_layers:
        raise ValueError(f"pp_size: {p.pp_size} > n_layers={args.n_layers} (a stage needs a layer)")
    if p.batch_size % dp:
        raise ValueError(f"batch_size: {p.batch_size} is not a multiple of the {dp} data-parallel ranks")
    if p.zero_stage == 3:
        raise ValueError("zero_stage: 3 is not supported: DeepSpeed's ZeRO-3 does not partition MoE "
                         "expert parameters; use 1 or 2")
    if p.pp_size > 1 and p.zero_stage > 1:
        raise ValueError(f"zero_stage: {p.zero_stage} with pp_size > 1; DeepSpeed's pipeline engine "
                         "supports ZeRO stage 0 or 1")
    stage0_dense = args.first_k_dense_replace >= args.n_layers // p.pp_size
    if p.pp_size > 1 and p.ep_size > 1 and p.zero_stage > 0 and stage0_dense:
        # ZeRO's gradient-norm all-reduce over the stages runs once per parameter group, and a stage
        # without MoE layers has fewer groups: the stages would wait on each other forever.
        raise ValueError(f"zero_stage: {p.zero_stage} with pipeline and expert parallelism needs a MoE layer in "
                         f"every stage; first_k_dense_replace={args.first_k_dense_replace} leaves stage 0 dense "
                         "(use zero_stage 0)")
    if p.grad_compression == "int8" and (p.zero_stage > 0 or p.pp_size > 1):
        raise ValueError("grad_compression: int8 is a gradient hook for plain data parallelism; "
                         "it needs zero_stage 0 and pp_size 1 (use bf16/fp16 with ZeRO)")
    if p.pp_size > 1 and (args.seq_aux_alpha > 0 or args.z_loss_alpha > 0):
        raise ValueError("pp_size: the sequence aux loss and z-loss are not carried across pipeline "
                         "stages; set model.seq_aux_alpha and model.z_loss_alpha to 0")


class DistillParams(Section):
    """Knowledge distillation of models/teacher into a smaller student (moeops/train/distill.py,
    moeops/compress/student.py), plus the same student trained from scratch on CE (`baseline`)."""

    student: dict[str, Any] = dict(dim=128, n_layers=2, inter_dim=384, moe_inter_dim=64, n_routed_experts=8,
                                   top_k=2, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=64)
    init: Literal["scratch", "teacher"] = "scratch"
    teacher_layers: list[int] = []  # init teacher: the teacher layer of each student layer; [] = evenly spaced
    expert_init: Literal["subset", "merge"] = "merge"  # init teacher: evenly spaced experts, or group means
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.8, ge=0, le=1)  # weight of T²·KL; 1 - alpha on the cross-entropy
    kl: Literal["forward", "reverse"] = "forward"  # KL(teacher‖student) or KL(student‖teacher)
    baseline: bool = True  # also train the student from scratch on CE only, same token budget
    seed: int = 0
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=2)
    lr: float = Field(4e-3, gt=0)
    min_lr: float = Field(4e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    bias_update_speed: float = Field(0.01, ge=0)
    bf16: bool = False
    threads: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    keep_runs: int = Field(3, ge=1)  # runs (params, data, code) whose checkpoints are kept, this one included
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _combos(self):
        fields = {f.name: f for f in dataclasses.fields(ModelArgs)}
        for key, value in self.student.items():
            if key not in fields:
                raise ValueError(f"student.{key}: unknown model field")
            if key == "vocab_size":
                raise ValueError("student.vocab_size: the teacher's tokenizer sets it")
            if key == "max_seq_len":
                raise ValueError("student.max_seq_len: set by distill.seq_len")
            kind = type(fields[key].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"student.{key}: expected {kind.__name__}, got {value!r}")
        if any(i < 0 for i in self.teacher_layers) or len(set(self.teacher_layers)) < len(self.teacher_layers):
            raise ValueError(f"teacher_layers: must be distinct layer indices >= 0, got {self.teacher_layers}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr} > lr {self.lr}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} > steps {self.steps}")
        return self

    def training(self) -> PretrainParams:
        """The training keys as the params of the pretraining loop (one process; the architecture
        and the objective are given to `pretrain` separately)."""
        keys = set(PretrainParams.model_fields) & set(type(self).model_fields)
        return PretrainParams.model_construct(**{k: getattr(self, k) for k in keys})


class EvaluateParams(Section):
    batch_size: int = Field(8, ge=1)
    # The shared val evaluation (moeops/evaluate/scoring.py; pretrain and gate use it too): every val
    # document, each capped at this many tokens, scored in windows of the model's context every `stride`.
    max_tokens_per_doc: int = Field(8192, ge=1)
    stride: int = Field(128, ge=1)  # a model with a shorter context uses its context (independent windows)
    speed_tokens: int = Field(4096, ge=1)  # tokens timed for inference tokens/s
    decode_prompt_len: int = Field(64, ge=1)  # every variant: prefill latency of this prompt ...
    decode_new_tokens: int = Field(32, ge=1)  # ... then decode tokens/s over this many cached steps
    threads: int = Field(0, ge=0)


class QuantizeParams(Section):
    # int8: weight-only int8 MatMul weights (block-wise, decoded to fp32 once at session load; activations
    # stay fp32, so a row's logits do not depend on its batch) + the routed experts as 8-bit QMoE.
    # int4: weight-only 4-bit MatMulNBits + the routed experts as 4-bit QMoE, both block-wise along K.
    int4_block_size: int = Field(32, ge=16)  # a power of two that divides every quantized input dimension
    int4_accuracy_level: int = Field(0, ge=0, le=4)  # MatMulNBits accuracy_level (4 = int8 activations)
    threads: int = Field(0, ge=0)

    @field_validator("int4_block_size")
    @classmethod
    def _pow2(cls, v):
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v


class ExportParams(Section):
    parity_atol: float = Field(1e-4, gt=0)  # ONNX Runtime vs PyTorch fp32 logits, prefill and decode
    parity_decode_steps: int = Field(20, ge=1)
    tensorrt: Literal["auto", "off"] = "auto"  # auto: build an engine when an NVIDIA GPU is present
    triton_variant: Literal["fp32", "int8", "int4"] = "int8"  # the ONNX model in the Triton repository
    triton_max_batch_size: int = Field(8, ge=1)
    triton_max_queue_delay_us: int = Field(2000, ge=0)
    threads: int = Field(0, ge=0)


class ParityBudgets(Section):
    """max |ONNX Runtime − PyTorch fp32 student| logit the gate allows for each variant, judged on the
    candidate's own figure (metrics/export.json parity.<variant>). fp32 is the same graph: exact up to
    float rounding. int8/int4 differ by design; these budgets catch a broken graph (wrong scales, a
    swapped tensor), not quantization noise. Set from the debug student (fp32 4e-7, int8 0.25, int4
    0.28): ~4x for int8 and ~10x for int4, as real models' wider logits carry larger absolute errors."""

    onnx_fp32: float = Field(1e-4, gt=0)
    onnx_int8: float = Field(1.0, gt=0)
    onnx_int4: float = Field(3.0, gt=0)


class GateParams(Section):
    candidate: Literal["onnx_fp32", "onnx_int8", "onnx_int4"] = "onnx_int8"  # a variant in exports/onnx
    max_bits_per_byte: float = Field(2.0, gt=0)  # the candidate's val bits-per-byte (per-document scoring)
    max_p95_latency_ms: float = Field(20.0, gt=0)  # one cached decode step at batch 1 (metrics/eval.json)
    max_file_mb: float = Field(16.0, gt=0)  # the candidate's model.onnx
    max_parity_error: ParityBudgets = Field(default_factory=ParityBudgets)  # per variant (metrics/export.json)
    max_regression: float = Field(0.01, ge=0)  # relative bits-per-byte increase over the champion ...
    confidence: float = Field(0.95, gt=0.5, lt=1)  # ... allowed at this one-sided bootstrap confidence
    bootstrap_samples: int = Field(2000, ge=100)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    threads: int = Field(0, ge=0)


class RegistryParams(Section):
    root: str = Field("registry", min_length=1)  # the filesystem store (a shared path for a team)
    name: str = Field("moeops", pattern=r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")  # also the GTO artifact name
    gto_tags: Literal["auto", "off"] = "auto"  # auto: GTO tags on promote/rollback inside a git repository


class FlowParams(Section):
    retries: int = Field(1, ge=0)
    retry_delay_s: float = Field(5.0, ge=0)
    stage_timeout_s: float = Field(3600.0, gt=0)
    retrain_cron: str = "0 3 * * 1"  # the `retrain` deployment's schedule (cron, in retrain_timezone)
    retrain_timezone: str = "UTC"

    @model_validator(mode="after")
    def _schedule(self):
        from prefect.client.schemas.schedules import CronSchedule  # only the flows read this section

        try:
            CronSchedule(cron=self.retrain_cron, timezone=self.retrain_timezone)
        except ValidationError as e:
            key = "retrain_timezone" if "timezone" in str(e) else "retrain_cron"
            raise ValueError(f"{key}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return self


class ServeParams(Section):
    """`moeops serve` (moeops/serve): the OpenAI-compatible ONNX Runtime server of the registry's champion."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    max_batch: int = Field(16, ge=1)  # sequences in one decode step (continuous batching)
    max_waiting: int = Field(64, ge=1)  # requests queued beyond the batch; more are answered 429 at once
    max_prompt_tokens: int = Field(0, ge=0)  # 0 = the model's context
    max_new_tokens: int = Field(256, ge=1)  # the most tokens one request may ask for
    request_timeout_s: float = Field(60.0, gt=0)  # queued + running; past it the request is cancelled (504)
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads; 0 = all cores
    cache_dir: str = ".cache/ort"  # optimized graphs, keyed by model sha256 + ORT version + provider; "" = off
    warmup: bool = True  # run the batch and length buckets once before ready
    watch_interval_s: float = Field(2.0, ge=0)  # poll the registry alias (hot reload); 0 = never
    drain_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: how long in-flight requests may take to finish
    scheduling: Literal["continuous", "static"] = "continuous"  # static: a batch runs to completion (benchmarks)
    tenants: str = ""  # tenants.yaml (API keys by sha256, weights, limits); "" = no tenants: an open API
    fairness: Literal["vtc", "fcfs"] = "vtc"  # admission order across tenants; fcfs: arrival order (the control)


class AnalysisParams(Section):
    interval_s: float = Field(30.0, gt=0)  # one measurement every interval_s, over the last interval_s
    count: int = Field(5, ge=1)  # measurements in this analysis


class RolloutStep(Section):
    """One step of the canary: exactly one of set_weight (percent of requests to the challenger),
    analyze, promote."""

    set_weight: int | None = Field(None, ge=0, le=100)
    analyze: AnalysisParams | None = None
    promote: bool | None = None

    @model_validator(mode="after")
    def _one(self):
        if sum(v is not None for v in (self.set_weight, self.analyze, self.promote)) != 1:
            raise ValueError("a step has exactly one of set_weight, analyze, promote")
        if self.promote is False:
            raise ValueError("promote: only `promote: true` is a step")
        return self


def _default_steps() -> list[RolloutStep]:
    return [RolloutStep(analyze=AnalysisParams()), RolloutStep(set_weight=50), RolloutStep(analyze=AnalysisParams()),
            RolloutStep(promote=True)]


class RolloutParams(Section):
    """Progressive delivery (flows/rollout.py): a gate-passing candidate becomes the challenger, takes
    traffic_ratio of live requests, and becomes champion only when every analysis passes."""

    canary: bool = True  # false: a passing gate promotes at once (no canary)
    traffic_ratio: float = Field(0.1, ge=0, le=1)  # the challenger's share when the gate registers it
    steps: list[RolloutStep] = Field(default_factory=_default_steps)  # after traffic_ratio; Argo Rollouts-style
    prometheus_url: str = "http://127.0.0.1:9090"  # scrapes the server(s); `make prometheus` starts one here
    pushgateway_url: str = "http://127.0.0.1:9091"  # the quality probe's result is pushed here, scraped from there
    server_url: str = "http://127.0.0.1:8000"  # the quality probe calls this server's /v1/completions
    max_error_rate: float = Field(0.05, ge=0, le=1)  # canary 5xx / requests over an interval
    max_latency_ratio: float = Field(1.5, gt=0)  # canary p95 TTFT and p95 inter-token latency over stable's
    min_requests: int = Field(5, ge=1)  # fewer canary requests in an interval: inconclusive, never a pass
    probe_documents: int = Field(16, ge=2)  # held-out val documents scored through both versions, paired
    probe_max_tokens: int = Field(128, ge=8)  # tokens of each probe document
    failure_limit: int = Field(0, ge=0)  # failed measurements tolerated in one analysis (Argo: failureLimit)
    consecutive_error_limit: int = Field(4, ge=0)  # measurements that could not be taken in a row (Argo: 4)


class SearchParams(Section):
    """The architecture search (`make search`, bench/arch_search.py): one `dvc exp run --queue` experiment
    per grid point, each the pretrain stage with `pretrain.model` = the point on top of `flavor`,
    `steps` steps; `dvc queue start -j workers`. Points should keep the active parameters fixed."""

    flavor: str = "tiny"
    steps: int = Field(200, ge=1)
    workers: int = Field(1, ge=1)  # queue workers; each trains with all cores / workers threads
    grid: list[dict[str, Any]] = Field(default_factory=list, min_length=1)

    @model_validator(mode="after")
    def _points(self):
        for i, point in enumerate(self.grid):
            try:
                make_model_args(self.flavor, point)
            except ValueError as e:
                raise ValueError(f"grid[{i}].{e}") from None
        return self


SECTIONS: dict[str, type[Section]] = {
    "corpus": CorpusParams,
    "prepare": PrepareParams,
    "pretrain": PretrainParams,
    "distill": DistillParams,
    "quantize": QuantizeParams,
    "export": ExportParams,
    "evaluate": EvaluateParams,
    "gate": GateParams,
    "registry": RegistryParams,
    "flow": FlowParams,
    "serve": ServeParams,
    "rollout": RolloutParams,
    "search": SearchParams,
}


def format_validation_error(section: str, err: ValidationError, path: str = "params.yaml") -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (section, *first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    if not first["loc"] and ": " in msg:  # cross-field rules name their key first: "key: rule"
        key, msg = msg.split(": ", 1)
        loc = f"{section}.{key}"
    return f"{path}: {loc}: {msg}"


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (true/false only): DVC writes params.yaml as YAML 1.2
    (`dvc exp run -S` drops the quotes around "off"), which YAML 1.1 would read back as false."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_section(section: str, path: str | Path = "params.yaml"):
    """Read and validate one section of params.yaml; UserError (one line) on any problem."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=Yaml12Loader) or {}  # noqa: S506 (a safe loader)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise UserError(f"{path}: {sorted(unknown)[0]}: unknown section, expected one of {sorted(SECTIONS)}")
    raw = data.get(section) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: {section}: must be a mapping")
    try:
        return SECTIONS[section].model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(section, e, str(path))) from None
