"""The student of a distillation: its architecture (the teacher's ModelArgs with overrides) and,
optionally, its initial weights taken from the teacher.

Init from the teacher keeps the teacher's widths (dim, attention ranks, expert hidden size) and
takes a subset of its layers; a MoE layer with fewer routed experts gets either an evenly spaced
subset of the teacher's experts, or each group of E_teacher / E_student consecutive experts merged
into one: the mean of their weights, of their router rows and of their balancing biases.

Legend: E experts (Et teacher, Es student), D model dim, F expert hidden dim, X = 2F.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from moeops.config import ModelArgs, check_model_args
from moeops.model.transformer import Transformer

# Routed-expert tensors: experts along dim 0.
EXPERT_KEYS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight",
               "mlp.gate.e_score_correction_bias")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def make_student_args(teacher: ModelArgs, overrides: dict[str, Any], seq_len: int) -> ModelArgs:
    """The teacher's architecture with `overrides`; the vocabulary is the teacher's and the context
    the training seq_len. ValueError("student.<field>: rule") for an impossible combination."""
    if "vocab_size" in overrides or "max_seq_len" in overrides:
        raise ValueError("student: vocab_size and max_seq_len are not overridable")
    if seq_len > teacher.max_seq_len:
        raise ValueError(f"seq_len: {seq_len} > the teacher's max_seq_len {teacher.max_seq_len}")
    args = dataclasses.replace(teacher, **overrides, max_seq_len=seq_len)
    try:
        check_model_args(args)
    except ValueError as e:
        raise ValueError(f"student.{e}") from None
    return args


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """n_student of range(n_teacher), first and last included (one student layer: the first)."""
    if n_student > n_teacher:
        raise ValueError(f"student.n_layers: {n_student} > the teacher's {n_teacher} layers (init: teacher takes "
                         "one teacher layer per student layer)")
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _experts(t_E: torch.Tensor, n_student: int, how: str, name: str) -> torch.Tensor:
    Et = t_E.shape[0]
    if n_student > Et:
        raise ValueError(f"student.n_routed_experts: {n_student} > the teacher's {Et} (init: teacher, {name})")
    if how == "subset":  # the first expert of each merge group
        return t_E[[i * Et // n_student for i in range(n_student)]].clone()
    if Et % n_student:
        raise ValueError(f"student.n_routed_experts: {n_student} does not divide the teacher's {Et} experts "
                         "(expert_init: merge averages equal groups)")
    return t_E.reshape(n_student, Et // n_student, *t_E.shape[1:]).mean(1)


def init_from_teacher(teacher: Transformer, args: ModelArgs, teacher_layers: list[int],
                      expert_init: str = "merge") -> dict[str, torch.Tensor]:
    """A full state dict for `Transformer(args)` from the teacher's weights: student layer i is
    teacher layer teacher_layers[i] ([] = evenly spaced), routed experts by `expert_init`
    ("subset" | "merge"); embedding, final norm and lm_head as they are. ValueError naming the
    key for anything that does not fit (a changed width, a dense layer onto a MoE one, ...)."""
    t_args = teacher.args
    layers = list(teacher_layers) or evenly_spaced(t_args.n_layers, args.n_layers)
    if len(layers) != args.n_layers:
        raise ValueError(f"teacher_layers: {len(layers)} layers listed, the student has n_layers={args.n_layers}")
    if max(layers) >= t_args.n_layers:
        raise ValueError(f"teacher_layers: {max(layers)} is not a layer of the teacher (n_layers={t_args.n_layers})")
    if expert_init not in ("subset", "merge"):
        raise ValueError(f"expert_init: must be 'subset' or 'merge', got {expert_init!r}")
    source = teacher.state_dict()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        m = _LAYER.match(name)
        t_name, where = name, "the teacher"
        if m:
            i, rest = int(m.group(1)), m.group(2)
            t_name = f"model.layers.{layers[i]}.{rest}"
            kind = "dense" if i < args.first_k_dense_replace else "MoE"
            t_kind = "dense" if layers[i] < t_args.first_k_dense_replace else "MoE"
            where = f"teacher layer {layers[i]}"
            if kind != t_kind:
                raise ValueError(f"teacher_layers: student layer {i} is {kind} but teacher layer {layers[i]} is "
                                 f"{t_kind} (check first_k_dense_replace and teacher_layers)")
        if t_name not in source:
            raise ValueError(f"init: teacher: {name} has no counterpart in {where}")
        t = source[t_name]
        if m and m.group(2) in EXPERT_KEYS:
            t = _experts(t, args.n_routed_experts, expert_init, name)
        if t.shape != shape:
            raise ValueError(f"init: teacher: {name} is {tuple(shape)} in the student but {tuple(t.shape)} in "
                             f"{where}; init: teacher keeps the teacher's widths (use init: scratch to change them)")
        state[name] = t.detach().clone().contiguous()
    return state
