"""ONNX export of the decoder with its MLA KV cache (the runner, torch-free, is moeops.ort).

Graph IO (L layers, C kv_lora_rank, R qk_rope_head_dim, V vocab; batch, seq, past dynamic):
  inputs   input_ids [B, S] int64, attention_mask [B, P+S] int64 (0 = left padding),
           past_latent.{i} [B, P, C], past_rope.{i} [B, P, R] float32
  outputs  logits [B, S, V], present_latent.{i} [B, P+S, C], present_rope.{i} [B, P+S, R]

The routed experts stay sparse: each MoE layer becomes one com.microsoft `MoE` node (ONNX Runtime's
CPU/CUDA kernel), which runs only the k experts each token picked. DeepSeek-V3 routing (sigmoid
scores + balancing bias + group limit) selects differently from the op's own softmax top-k, so the
graph routes itself and hands the op `log(weight)` for the chosen experts and -1e9 elsewhere: the
op's softmax top-k then picks exactly those experts with weights w / Σw, and the output is scaled
back by Σw (which also carries norm_topk_prob and routed_scaling_factor).
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from torch import nn

from kernels.routing import route
from moeops.io import atomic_write_bytes
from moeops.model.moe import MoE
from moeops.model.transformer import Transformer
from moeops.ort import OnnxLM, first_line, io_names, make_session, ort_errors  # noqa: F401 (re-exported)

NOT_CHOSEN = -1e9  # router "log-probability" of an expert the token did not pick

# ----------------------------------------------------------------- the experts as one sparse op


@torch.library.custom_op("moeops::moe_experts", mutates_args=())
def moe_experts(x_TD: torch.Tensor, router_TE: torch.Tensor, fc1_EXD: torch.Tensor, fc2_EDF: torch.Tensor,
                k: int) -> torch.Tensor:
    """com.microsoft MoE semantics (swiglu, interleaved gate/up rows, normalized routing weights):
    top-k of router_TE, softmax over the chosen k, Σ weight · expert(x)."""
    top_TK, ids_TK = router_TE.topk(k, dim=-1)
    w_TK = top_TK.softmax(-1)
    out_TD = torch.zeros_like(x_TD)
    for e in range(fc1_EXD.shape[0]):
        rows_T, slot_T = (ids_TK == e).nonzero(as_tuple=True)
        if rows_T.numel():
            h_TX = F.linear(x_TD[rows_T], fc1_EXD[e])
            y_TD = F.linear(F.silu(h_TX[:, 0::2]) * h_TX[:, 1::2], fc2_EDF[e])
            out_TD.index_add_(0, rows_T, y_TD * w_TK[rows_T, slot_T, None])
    return out_TD


@moe_experts.register_fake
def _(x_TD, router_TE, fc1_EXD, fc2_EDF, k):
    return torch.empty_like(x_TD)


def _moe_schema() -> onnx.defs.OpSchema:
    """The part of ORT's com.microsoft MoE schema this export uses (onnx ships no contrib schemas,
    and the exporter's tracer needs one to bind inputs and attributes)."""
    S = onnx.defs.OpSchema
    P = S.FormalParameterOption
    names = ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights")
    inputs = [S.FormalParameter(n, "T", param_option=P.Optional if n.endswith("bias") else P.Single) for n in names]
    attrs = [S.Attribute(name, kind, "") for name, kind in [
        ("k", S.AttrType.INT), ("activation_type", S.AttrType.STRING), ("swiglu_fusion", S.AttrType.INT),
        ("normalize_routing_weights", S.AttrType.INT), ("activation_alpha", S.AttrType.FLOAT),
        ("activation_beta", S.AttrType.FLOAT)]]
    return S("MoE", "com.microsoft", 1, inputs=inputs, outputs=[S.FormalParameter("output", "T")],
             type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")], attributes=attrs)


_MOE = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", _moe_schema())


def _moe_experts_onnx(x_TD, router_TE, fc1_EXD, fc2_EDF, k: int):
    return _MOE(x_TD, router_TE, fc1_EXD, None, fc2_EDF, k=k, activation_type="swiglu", swiglu_fusion=1,
                     normalize_routing_weights=1, activation_alpha=1.0, activation_beta=0.0)


class SparseMoE(nn.Module):
    """Export form of a moeops MoE layer: same routing, experts through `moe_experts`."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.args, self.gate, self.shared_experts = moe.args, moe.gate, moe.shared_experts
        gate_up_EXD = moe.experts.gate_up_proj.detach()  # [gate rows | up rows]
        E, X, D = gate_up_EXD.shape
        # The op's CPU kernel reads gate/up interleaved row by row: [g0, u0, g1, u1, ...].
        self.register_buffer("fc1_EXD", gate_up_EXD.view(E, 2, X // 2, D).transpose(1, 2).reshape(E, X, D).clone())
        self.register_buffer("fc2_EDF", moe.experts.down_proj.detach().clone())

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        a = self.args
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        logits_TE = F.linear(x_TD, self.gate.weight)
        _, ids_TK, w_TK = route(logits_TE, self.gate.e_score_correction_bias, a.top_k, a.n_group, a.topk_group,
                                a.score_func, a.norm_topk_prob, a.routed_scaling_factor)
        router_TE = torch.full_like(logits_TE, NOT_CHOSEN).scatter(1, ids_TK, w_TK.clamp_min(1e-30).log())
        out_TD = moe_experts(x_TD, router_TE, self.fc1_EXD, self.fc2_EDF, a.top_k) * w_TK.sum(-1, keepdim=True)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD.view(B, S, D)


class CachedDecoder(nn.Module):
    """forward(input_ids, attention_mask, *past) -> (logits, *present) with flat per-layer caches."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        for layer in self.model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp = SparseMoE(layer.mlp)

    def forward(self, input_ids, attention_mask, *past):
        pairs = list(zip(past[0::2], past[1::2]))
        logits, present = self.model.forward_cached(input_ids, attention_mask, pairs)
        return (logits, *[t for pair in present for t in pair])


def export_onnx(model: Transformer, path: str | Path) -> None:
    """Export with the torch.onnx dynamo exporter; onnx.checker-clean; written atomically."""
    a = model.args
    decoder = CachedDecoder(model).eval()
    B, S, P = 2, 3, 4  # sample sizes > 1 so that no dimension is specialised to a constant
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.ones(B, P + S, dtype=torch.long)
    past = []
    for _ in range(a.n_layers):
        past += [torch.zeros(B, P, a.kv_lora_rank), torch.zeros(B, P, a.qk_rope_head_dim)]
    batch, seq, total, past_len = (torch.export.Dim.DYNAMIC,) * 4
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 1: past_len} for _ in past))
    inputs, outputs = io_names(a.n_layers)
    with torch.no_grad():
        program = torch.onnx.export(decoder, (ids, mask, *past), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=inputs, output_names=outputs, optimize=True, verbose=False,
                                    custom_translation_table={torch.ops.moeops.moe_experts.default: _moe_experts_onnx})
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())
