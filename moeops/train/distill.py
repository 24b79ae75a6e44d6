"""Knowledge distillation: the loss, and the objective that runs the teacher on the fly.

    loss = α·T²·KL(p_teacher^T ‖ p_student^T) + (1 − α)·CE(student, targets)

p^T = softmax(logits / T). The T² keeps the soft-target gradients on the scale of the CE's as T
grows (Hinton et al. 2015). `kl="reverse"` uses KL(p_student^T ‖ p_teacher^T) instead: mode-seeking,
the student is not pushed to cover every token the teacher gives some mass to (MiniLLM).

The teacher's logits are computed under no_grad for every batch: nothing is cached, so a step
costs one teacher forward on top of the student's forward and backward.

Legend: N tokens (B·S flattened), V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeops.cli import UserError
from moeops.compress import student as student_mod
from moeops.config import DistillParams, ModelArgs
from moeops.io import sha256_file
from moeops.model.io import load_model_dir
from moeops.model.transformer import Transformer, param_counts
from moeops.train.loop import TrainResult, pretrain, source_digest


class _DistillLoss(torch.autograd.Function):
    """CE and KL from shared log-softmaxes, with the gradient written out: at V = 8192 every pass
    over the N×V logits is memory-bound and costly on CPU, and autograd of the formula makes more of
    them and keeps more N×V temporaries (tests/test_distill.py holds that formula as the reference).
    With p = softmax(s/T), q = softmax(t/T), n the one-hot targets:
      forward KL: d(α·T²·KL)/ds = α·T·(p − q)
      reverse KL: d(α·T²·KL)/ds = α·T·p·(log p − log q − KL_row)
      CE:         d((1−α)·CE)/ds = (1−α)·(softmax(s) − n)
    each divided by N (means over tokens)."""

    @staticmethod
    def forward(ctx, s_NV, t_NV, y_N, T: float, alpha: float, reverse: bool):
        N = s_NV.shape[0]
        ls1_NV = F.log_softmax(s_NV, dim=-1)
        ce = F.nll_loss(ls1_NV, y_N)
        lsT_NV = ls1_NV if T == 1 else F.log_softmax(s_NV / T, dim=-1)
        ltT_NV = F.log_softmax(t_NV / T, dim=-1)
        if reverse:
            psT_NV = lsT_NV.exp()
            d_NV = lsT_NV - ltT_NV
            kl_N = (psT_NV * d_NV).sum(-1)
            ctx.save_for_backward(ls1_NV, y_N, psT_NV, d_NV.sub_(kl_N[:, None]))
        else:
            qT_NV = ltT_NV.exp()
            kl_N = (qT_NV * (ltT_NV - lsT_NV)).sum(-1)
            ctx.save_for_backward(ls1_NV, y_N, lsT_NV, qT_NV)
        ctx.T, ctx.alpha, ctx.reverse, ctx.N = T, alpha, reverse, N
        loss = alpha * T * T * kl_N.sum() / N + (1 - alpha) * ce
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        ls1_NV, y_N, a_NV, b_NV = ctx.saved_tensors
        T, alpha = ctx.T, ctx.alpha
        g_NV = ls1_NV.exp()
        if not ctx.reverse and T == 1:  # p − α·q − (1−α)·n: one pass fewer (softmax(s) is p)
            g_NV.sub_(b_NV, alpha=alpha)
        else:
            g_NV.mul_(1 - alpha)
            if ctx.reverse:  # a = p, b = log p − log q − KL_row
                g_NV.addcmul_(a_NV, b_NV, value=alpha * T)
            else:  # a = log p, b = q
                g_NV.add_(a_NV.exp().sub_(b_NV), alpha=alpha * T)
        g_NV.scatter_add_(1, y_N[:, None], g_NV.new_full((len(y_N), 1), alpha - 1))
        return g_NV.mul_(grad_loss / ctx.N), None, None, None, None, None


def distill_loss(student_NV: torch.Tensor, teacher_NV: torch.Tensor, targets_N: torch.Tensor, temperature: float,
                 alpha: float, kl: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, ce): the distillation loss and the student's plain cross-entropy (T = 1),
    both means over the N tokens. Differentiable in the student's logits only."""
    if kl not in ("forward", "reverse"):
        raise ValueError(f"kl: must be 'forward' or 'reverse', got {kl!r}")
    student_NV = student_NV.float()
    if alpha == 0:  # no soft targets: skip the teacher's softmax
        ce = F.cross_entropy(student_NV, targets_N)
        return ce, ce.detach()
    return _DistillLoss.apply(student_NV, teacher_NV.float().detach(), targets_N, float(temperature), float(alpha),
                              kl == "reverse")


def freeze_teacher(teacher: Transformer) -> Transformer:
    """Inference mode, no gradients, no routing statistics (its balancing bias stays as trained)."""
    teacher.eval().requires_grad_(False)
    for moe in teacher.moe_layers():
        moe.count_stats = False
    return teacher


class DistillObjective:
    """The training objective of `moeops.train.loop.pretrain` for a student:
    `objective(x_BS, y_BS, student_logits_BSV) -> (loss, ce)`."""

    def __init__(self, teacher: Transformer, temperature: float, alpha: float, kl: str = "forward",
                 bf16: bool = False):
        self.teacher = freeze_teacher(teacher)
        self.temperature, self.alpha, self.kl, self.bf16 = temperature, alpha, kl, bf16

    @torch.no_grad()
    def teacher_logits(self, x_BS: torch.Tensor) -> torch.Tensor:
        self.teacher.to(x_BS.device)  # the student's device (a no-op after the first step)
        with torch.autocast(x_BS.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.teacher(x_BS).float()

    def __call__(self, x_BS: torch.Tensor, y_BS: torch.Tensor,
                 logits_BSV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_BSV = self.teacher_logits(x_BS) if self.alpha > 0 else logits_BSV
        return distill_loss(logits_BSV.flatten(0, 1), teacher_BSV.flatten(0, 1), y_BS.flatten(), self.temperature,
                            self.alpha, self.kl)


# ---------------------------------------------------------------- the student's run


@dataclass
class StudentPlan:
    teacher: Transformer | None
    teacher_sha256: str  # of model.safetensors: a new teacher never resumes an old student
    args: ModelArgs
    init_state: dict[str, torch.Tensor] | None  # None: random init (init: scratch)
    teacher_layers: list[int]  # resolved (init: teacher), else []


def plan_student(p: DistillParams, teacher_dir: Path, prepared_dir: Path, vocab_size: int, n_train_tokens: int,
                 params_path: str = "params.yaml") -> StudentPlan:
    """Load the teacher and check everything before any work: the tokenizer the teacher was trained
    with is the prepared data's, the student fits (not larger than the teacher, a valid
    architecture), teacher-init shapes match. UserError (one line naming the file or key) otherwise."""
    teacher = load_model_dir(teacher_dir)
    t_tok, d_tok = Path(teacher_dir) / "tokenizer.json", Path(prepared_dir) / "tokenizer.json"
    for path in (t_tok, d_tok):
        if not path.is_file():
            raise UserError(f"{path}: missing")
    if sha256_file(t_tok) != sha256_file(d_tok) or teacher.args.vocab_size != vocab_size:
        raise UserError(f"{t_tok}: differs from {d_tok}: the teacher was trained on another tokenization "
                        "(re-run pretrain on this data)")
    if n_train_tokens < p.seq_len + 2:
        raise UserError(f"train split has {n_train_tokens} tokens, fewer than distill.seq_len+2={p.seq_len + 2}")
    try:
        args = student_mod.make_student_args(teacher.args, p.student, p.seq_len)
    except ValueError as e:
        raise UserError(f"{params_path}: distill.{e}") from None
    n_student, n_teacher = param_counts(args)["total"], param_counts(teacher.args)["total"]
    if n_student > n_teacher:
        raise UserError(f"{params_path}: distill.student: {n_student:,} parameters, more than the teacher's "
                        f"{n_teacher:,}")
    init_state, layers = None, []
    if p.init == "teacher":
        try:
            layers = list(p.teacher_layers) or student_mod.evenly_spaced(teacher.args.n_layers, args.n_layers)
            init_state = student_mod.init_from_teacher(teacher, args, layers, p.expert_init)
        except ValueError as e:
            raise UserError(f"{params_path}: distill.{e}") from None
    return StudentPlan(teacher, sha256_file(Path(teacher_dir) / "model.safetensors"), args, init_state, layers)


def _student_code() -> str:
    return source_digest(Path(student_mod.__file__))


def train_student(p: DistillParams, plan: StudentPlan, tokens: np.ndarray, meta: dict, ckpt_dir: Path,
                  live_dir: Path | None = None, loss_hook=None) -> TrainResult:
    """Distil plan.teacher into plan.args with the pretraining loop (DeepSpeed engine, checkpoints,
    resume, dvclive). The checkpoints' run id includes the teacher's hash and the loss params."""
    objective = DistillObjective(plan.teacher, p.temperature, p.alpha, p.kl, p.bf16)
    extra = {"role": "student", "student": dataclasses.asdict(plan.args), "teacher_sha256": plan.teacher_sha256,
             "loss": {"temperature": p.temperature, "alpha": p.alpha, "kl": p.kl}, "init": p.init}
    if p.init == "teacher":
        extra |= {"teacher_layers": plan.teacher_layers, "expert_init": p.expert_init, "init_code": _student_code()}
    return pretrain(p.training(), tokens, plan.args.vocab_size, meta, ckpt_dir, live_dir, loss_hook, args=plan.args,
                    init_state=plan.init_state, objective=objective, run_extra=extra, name="distill")


def train_baseline(p: DistillParams, args: ModelArgs, tokens: np.ndarray, meta: dict, ckpt_dir: Path,
                   live_dir: Path | None = None, loss_hook=None) -> TrainResult:
    """The same student architecture from scratch on cross-entropy only, same steps and batches:
    what distillation is measured against. Independent of the teacher's weights."""
    extra = {"role": "baseline", "student": dataclasses.asdict(args)}
    return pretrain(p.training(), tokens, args.vocab_size, meta, ckpt_dir, live_dir, loss_hook, args=args,
                    run_extra=extra, name="distill baseline")
