"""Post-training quantization of the exported fp32 ONNX decoder into an int8 and an int4 variant.

int8  weight-only: every MatMul with a constant weight stores it as int8 codes + one fp32 scale per
      block along K (symmetric; block 0 = per MatMul the largest power of two <= 128 dividing K)
      decoded by Cast → Mul → Reshape, which ONNX Runtime's constant folding runs once at session
      load: the file holds int8, the MatMul runs in fp32 at fp32 speed; the token embedding →
      GatherBlockQuantized (uint8, 8 bits, one scale per row); every routed-expert `MoE` → `QMoE`
      with 8-bit per-channel experts. No activation is quantized, so a row's logits do not depend on
      the other rows of its batch (continuous batching must not change a request's tokens).
int4  weight-only, block-wise along K: MatMul → MatMulNBits (4 bits, asymmetric: a zero point per
      block, `block_size`, `accuracy_level`), embedding → GatherBlockQuantized (4 bits, symmetric),
      `MoE` → `QMoE` with 4-bit symmetric block-wise experts.

Why int8 MatMuls are not int8 kernels (measured on the real student, AMD EPYC AVX2 without VNNI,
ORT 1.32): dynamic int8 (`quantize_dynamic`: DynamicQuantizeLinear + MatMulInteger) quantizes the
activations per tensor, so a row's logits moved by up to 0.85 (logprobs 0.54) with its batch-mates
and greedy tokens changed. MatMulNBits bits=8 is row-independent, but with fp32 activations
(accuracy_level 0) it decodes its weights on every call (decode 3-6x slower at batch 1), and with
int8 activations (accuracy_level 4, quantized per row and block) prefill is 1.6-2.5x slower.
Decoding once at load is row-independent, as accurate as MatMulNBits with fp32 activations, and
then runs the fp32 graph's own MatMuls: single-threaded 12-46% slower than dynamic int8's u8×s8
kernels, at 2 threads within run-to-run noise of them. The price is fp32 dense weights in RAM
(+5 MB on the student; the routed experts and the embedding stay 8-bit in memory).

What stays fp32, on purpose: the router projections (the MatMuls whose output reaches a MoE node's
router input). They are tiny (D·E weights a layer) and a rounding error there changes which experts
a token visits rather than nudging a value. Norm weights, biases and the rest of the small
arithmetic stay fp32 too.

Expert weights use ONNX Runtime's QMoE storage contract: per expert, raw [N, K·bits/8] uint8 with
an implicit zero point 2^(bits-1) (symmetric), scales [E, N] (per channel) or [E, N, K/block]
(block-wise). The 8-bit experts are per-channel because ORT's CPU kernel runs block-wise 8-bit
experts with int8 activations only, which measured less accurate than per-channel with fp32
activations; the 4-bit experts are block-wise because per-channel 4 bits is too coarse.

Shape legend: E experts, N output features, K input features (the dimension blocks run along),
V vocabulary, D model dim.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moeops.cli import UserError
from moeops.io import atomic_write_bytes

MSFT = "com.microsoft"
BLOCK_PARAM = "quantize.int4_block_size"

# MoE input positions → QMoE input positions (ORT 1.32 schemas).
_MOE_IN = {"input": 0, "router_probs": 1, "fc1_w": 2, "fc1_b": 3, "fc2_w": 4, "fc2_b": 5, "fc3_w": 6, "fc3_b": 7}
_QMOE_IN = {"input": 0, "router_probs": 1, "fc1_w": 2, "fc1_s": 3, "fc1_b": 4, "fc2_w": 5, "fc2_s": 6, "fc2_b": 7,
            "fc3_w": 8, "fc3_s": 9, "fc3_b": 10}


# ----------------------------------------------------------------- public API


def quantize_int8(src: str | Path, dst: str | Path, block_size: int = 0) -> dict:
    """fp32 ONNX at `src` → weight-only int8 ONNX at `dst` (one file, written atomically).
    `block_size` 0: per MatMul the largest power of two <= 128 dividing its K; otherwise a power of
    two >= 16 dividing every quantized K (ValueError before anything is written). On the student,
    blocks of 16, 32 and the default scored the same val bits-per-byte (within 3e-5) and run at the
    same speed (decoded at load); the default is the smallest file. Returns
    {"bytes", "fp32_bytes", "size_ratio", "ops": {op_type: count}, "qmoe_bits": [...]}."""
    src, dst = Path(src), Path(dst)
    model = _load(src)
    _canonicalize(model)
    _int8_matmul_weights(model.graph, block_size)
    _quantize_embeddings(model.graph, bits=8, block_size=0)  # 8 bits: one scale per row (block = D)
    _replace_moe(model.graph, bits=8, block_size=0, accuracy_level=0)
    return _finish(model, src, dst)


def quantize_int4(src: str | Path, dst: str | Path, block_size: int, accuracy_level: int) -> dict:
    """fp32 ONNX at `src` → weight-only 4-bit ONNX at `dst`, block-wise along K with `block_size`
    (MatMulNBits `accuracy_level` 0/1: fp32 activations, 4: int8 activations). UserError, before
    anything is written, when `block_size` does not divide a quantized input dimension. Returns the
    same summary as `quantize_int8`."""
    MatMulNBitsQuantizer = _ort_quantization()
    src, dst = Path(src), Path(dst)
    model = _load(src)
    _canonicalize(model)
    check_block_size(model, block_size)
    routers = _router_matmuls(model.graph)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                             accuracy_level=accuracy_level or None, nodes_to_exclude=sorted(routers),
                             op_types_to_quantize=("MatMul",))
    with _quiet_ort_logs():
        q.process()
    model = q.model.model
    _quantize_embeddings(model.graph, bits=4, block_size=block_size)
    _replace_moe(model.graph, bits=4, block_size=block_size, accuracy_level=accuracy_level)
    return _finish(model, src, dst)


def check_block_size(model: onnx.ModelProto | str | Path | Mapping[str, Sequence[int]], block_size: int) -> None:
    """UserError naming `quantize.int4_block_size`, the tensor and the dimension when `block_size`
    is not a power of two >= 16 or does not divide the input dimension (K) of a weight that int4
    quantizes: a MatMul weight, the embedding's D, an expert's fc1/fc2/fc3. `model` is the fp32 ONNX
    model (or its path), or {name: shape} of PyTorch weights, whose last dimension is K ([out, in]
    Linear weights, the [V, D] embedding, [E, N, K] experts) — a check that needs no export."""
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"{BLOCK_PARAM}: must be a power of two >= 16, got {block_size}")
    if isinstance(model, Mapping):
        dims = [(name, "input dimension", shape[-1]) for name, shape in model.items() if len(shape) >= 2]
    else:
        if not isinstance(model, onnx.ModelProto):
            model = _load(Path(model))
            _canonicalize(model)
        dims = _quantized_dims(model.graph)
    for tensor, what, k in dims:
        if k % block_size:
            raise UserError(f"{BLOCK_PARAM}: {block_size} does not divide {what} = {k} of tensor {tensor!r}; "
                            f"use a power of two that divides it")


def summarize(path: str | Path) -> dict:
    """Size and op census of an ONNX file: {"bytes", "ops": {op_type: count}, "qmoe_bits": [..]}."""
    model = onnx.load(str(path), load_external_data=False)
    return _census(model) | {"bytes": Path(path).stat().st_size}


def _ort_quantization():
    """Import ORT's MatMulNBits quantizer without its import-time side effect: matmul_nbits_quantizer
    calls logging.basicConfig(level=INFO), which would turn on INFO logging for the whole process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return MatMulNBitsQuantizer


# ----------------------------------------------------------------- graph plumbing


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX model")
    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError / ValueError / OSError depending on the damage
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable ONNX model ({why})") from None


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _canonicalize(model: onnx.ModelProto) -> None:
    """Give every node a unique name (exclusion lists go by name), fold Transpose(initializer) into a
    transposed initializer and turn Gemm(x, W, transB) into MatMul(x, W.T) (+ Add for a bias), so that
    every constant projection is a MatMul with a plain [K, N] initializer, which both quantizers take."""
    g = model.graph
    used = collections.Counter(n.name for n in g.node)
    for i, n in enumerate(g.node):
        if not n.name or used[n.name] > 1:
            n.name = f"{n.op_type}_{i}_q"
    inits = _initializers(g)
    new_nodes, changed = [], False
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Transpose" and n.domain in ("", "ai.onnx") and n.input[0] in inits:
            arr = numpy_helper.to_array(inits[n.input[0]])
            t = numpy_helper.from_array(np.ascontiguousarray(arr.transpose(attrs.get("perm"))), n.output[0])
            g.initializer.append(t)
            inits[t.name] = t
            changed = True
        elif (n.op_type == "Gemm" and n.domain in ("", "ai.onnx") and n.input[1] in inits
              and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0
              and (len(n.input) < 3 or not n.input[2] or attrs.get("beta", 1.0) == 1.0)):
            # nn.Linear on a 2-D input exports as Gemm(x, W[N, K], transB=1): make it MatMul(x, W.T)
            w = n.input[1]
            if attrs.get("transB", 0):
                w = f"{n.input[1]}_T"
                if w not in inits:
                    arr = numpy_helper.to_array(inits[n.input[1]])
                    inits[w] = numpy_helper.from_array(np.ascontiguousarray(arr.T), w)
                    g.initializer.append(inits[w])
            if len(n.input) > 2 and n.input[2]:
                mm = f"{n.output[0]}_mm"
                new_nodes.append(helper.make_node("MatMul", [n.input[0], w], [mm], name=n.name))
                new_nodes.append(helper.make_node("Add", [mm, n.input[2]], list(n.output), name=f"{n.name}_bias"))
            else:
                new_nodes.append(helper.make_node("MatMul", [n.input[0], w], list(n.output), name=n.name))
            changed = True
        else:
            new_nodes.append(n)
    if changed:
        del g.node[:]
        g.node.extend(new_nodes)
        _drop_unused_initializers(g)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _router_matmuls(graph: onnx.GraphProto) -> set[str]:
    """Names of the MatMuls with a constant weight that compute a MoE node's router input: walk back
    from `router_probs`, stopping at MatMul/Gemm (the router projection) and at Shape/Size (they
    carry dimensions, not values)."""
    inits, prod = _initializers(graph), _producers(graph)
    found: set[str] = set()
    seen: set[str] = set()
    stack = [n.input[1] for n in graph.node if n.op_type in ("MoE", "QMoE") and len(n.input) > 1]
    while stack:
        name = stack.pop()
        if name in seen or name not in prod:
            continue
        seen.add(name)
        node = prod[name]
        if node.op_type in ("MatMul", "Gemm"):
            if len(node.input) > 1 and node.input[1] in inits:
                found.add(node.name)
            continue
        if node.op_type in ("Shape", "Size"):
            continue
        stack.extend(i for i in node.input if i)
    return found


def _embedding_gathers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Gather nodes whose data is a float [V, D] initializer gathered along axis 0."""
    inits = _initializers(graph)
    out = []
    for n in graph.node:
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or n.input[0] not in inits:
            continue
        t = inits[n.input[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and axis == 0:
            out.append(n)
    return out


def _quantized_dims(graph: onnx.GraphProto):
    """(tensor, dimension name, size) of every dimension that int4 quantizes block-wise."""
    inits = _initializers(graph)
    routers = _router_matmuls(graph)
    for n in graph.node:
        if n.op_type == "MatMul" and n.name not in routers and len(n.input) > 1 and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            if len(dims) >= 2 and all(d == 1 for d in dims[:-2]):
                yield n.input[1], "K (input dimension)", dims[-2]
        elif n.op_type == "MoE" and n.domain == MSFT:
            for key in ("fc1_w", "fc2_w", "fc3_w"):
                i = _MOE_IN[key]
                if len(n.input) > i and n.input[i] in inits:
                    yield n.input[i], "K (expert input dimension)", inits[n.input[i]].dims[-1]
    for n in _embedding_gathers(graph):
        yield n.input[0], "D (embedding dimension)", inits[n.input[0]].dims[1]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:  # names read by subgraphs (If/Loop bodies) count as used
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                used |= {i for m in sub.node for i in m.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


# ----------------------------------------------------------------- weight encodings


def quantize_symmetric(w_NK: np.ndarray, bits: int, block_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest along the last axis, per block of `block_size` (0 = the whole row).
    Returns (uint8 codes [..., N, K·bits/8] with zero point 2^(bits-1), low nibble first for 4 bits;
    float32 scales [..., N] or [..., N, K/block_size]). Each block's largest-magnitude weight maps
    exactly to -2^(bits-1) (its scale carries the sign), so the full code range is used without
    clipping anything but ties of the opposite sign to the +2^(bits-1)-1 end."""
    *lead, n, k = w_NK.shape
    b = block_size or k
    half = 1 << (bits - 1)
    w = w_NK.astype(np.float32).reshape(*lead, n, k // b, b)
    extreme = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)[..., 0]
    scale = extreme / -half
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]), -half, half - 1).astype(np.int16) + half
    q = q.reshape(*lead, n, k).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), (scale if block_size else scale[..., 0])


def dequantize_symmetric(q: np.ndarray, scale: np.ndarray, bits: int, block_size: int = 0) -> np.ndarray:
    """Inverse of `quantize_symmetric` (the reference the tests compare the ORT kernels to)."""
    if bits == 4:
        q = np.stack([q & 0xF, q >> 4], -1).reshape(*q.shape[:-1], q.shape[-1] * 2)
    w = q.astype(np.float32) - (1 << (bits - 1))
    *lead, n, k = w.shape
    b = block_size or k
    s = scale if block_size else scale[..., None]
    return (w.reshape(*lead, n, k // b, b) * s[..., None]).reshape(*lead, n, k)


def _quantize_embeddings(graph: onnx.GraphProto, bits: int, block_size: int) -> None:
    """Gather(embedding [V, D]) → GatherBlockQuantized with uint8 codes (bits 8, or 4 packed two per
    byte along D), block-wise along D, default zero point 2^(bits-1). `block_size` 0: the largest
    power-of-two block <= 128 that divides D (one scale per row when D is a power of two)."""
    inits = _initializers(graph)
    for n in _embedding_gathers(graph):
        table_VD = numpy_helper.to_array(inits[n.input[0]])
        d = table_VD.shape[1]
        b = block_size if block_size and d % block_size == 0 else _largest_pow2_block(d)
        if b is None:
            continue  # D has no power-of-two block >= 16: leave this table fp32
        codes, scales = quantize_symmetric(table_VD, bits, b)
        base = n.input[0]
        graph.initializer.extend([numpy_helper.from_array(codes, f"{base}_q{bits}"),
                                  numpy_helper.from_array(scales, f"{base}_scales{bits}")])
        new = helper.make_node("GatherBlockQuantized", [f"{base}_q{bits}", n.input[1], f"{base}_scales{bits}"],
                               list(n.output), name=f"{n.name}_q{bits}", domain=MSFT, bits=bits, block_size=b,
                               gather_axis=0, quantize_axis=1)
        n.CopyFrom(new)
    _drop_unused_initializers(graph)


def _largest_pow2_block(d: int) -> int | None:
    b = 128
    while b >= 16 and d % b:
        b //= 2
    return b if b >= 16 else None


def _int8_matmul_weights(graph: onnx.GraphProto, block_size: int) -> None:
    """Every MatMul's constant weight W [.., K, N] (leading dims 1), routers excepted → int8 codes
    q [K/b, b, N] and fp32 scales s [K/b, 1, N] (quantize_symmetric along K) with W = Reshape(Cast(q)
    · s): nodes on initializers only, which ONNX Runtime folds into one fp32 weight at session load.
    `block_size` 0: per weight the largest power of two <= 128 dividing K (a K with none: one block)."""
    inits = _initializers(graph)
    routers = _router_matmuls(graph)
    decoded: dict[str, str] = {}  # weight initializer → its decoded tensor (a weight shared by MatMuls once)
    new_nodes = []
    for n in graph.node:
        if n.op_type != "MatMul" or n.name in routers or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = n.input[1]
        if w not in decoded:
            t = inits[w]
            if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2 or any(d != 1 for d in t.dims[:-2]):
                continue
            w_KN = numpy_helper.to_array(t).reshape(t.dims[-2], t.dims[-1])
            k, n_out = w_KN.shape
            b = block_size or _largest_pow2_block(k) or k
            if block_size and (block_size < 16 or block_size & (block_size - 1) or k % block_size):
                raise ValueError(f"int8 block_size {block_size}: not a power of two >= 16 dividing K = {k} of {w!r}")
            codes_NK, scales_NB = quantize_symmetric(np.ascontiguousarray(w_KN.T), 8, b)
            q_BbN = (codes_NK.astype(np.int16) - 128).astype(np.int8).T.reshape(k // b, b, n_out)
            s_B1N = scales_NB.T.reshape(k // b, 1, n_out)
            graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(q_BbN), f"{w}_q8"),
                                      numpy_helper.from_array(np.ascontiguousarray(s_B1N), f"{w}_scales8"),
                                      numpy_helper.from_array(np.array(t.dims, np.int64), f"{w}_shape")])
            new_nodes += [helper.make_node("Cast", [f"{w}_q8"], [f"{w}_q8f"], name=f"{w}_cast8",
                                           to=onnx.TensorProto.FLOAT),
                          helper.make_node("Mul", [f"{w}_q8f", f"{w}_scales8"], [f"{w}_deq8_blocks"],
                                           name=f"{w}_scale8"),
                          helper.make_node("Reshape", [f"{w}_deq8_blocks", f"{w}_shape"], [f"{w}_deq8"],
                                           name=f"{w}_reshape8")]
            decoded[w] = f"{w}_deq8"
        n.input[1] = decoded[w]
    if new_nodes:  # their inputs are initializers only: first in topological order
        nodes = new_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    _drop_unused_initializers(graph)


def _replace_moe(graph: onnx.GraphProto, bits: int, block_size: int, accuracy_level: int) -> None:
    """Every com.microsoft MoE → QMoE: same activations, routing input, biases and attributes;
    expert weights quantized (`block_size` 0 = per output channel)."""
    inits = _initializers(graph)
    for n in graph.node:
        if n.op_type != "MoE" or n.domain != MSFT:
            continue
        ins = list(n.input) + [""] * (8 - len(n.input))
        q_ins = [""] * 11
        for key in ("input", "router_probs", "fc1_b", "fc2_b", "fc3_b"):
            q_ins[_QMOE_IN[key]] = ins[_MOE_IN[key]]
        for fc in ("fc1", "fc2", "fc3"):
            name = ins[_MOE_IN[f"{fc}_w"]]
            if not name:
                continue
            if name not in inits:
                raise ValueError(f"MoE node {n.name!r}: {fc} weights {name!r} are not an initializer")
            codes, scales = quantize_symmetric(numpy_helper.to_array(inits[name]), bits, block_size)
            graph.initializer.extend([numpy_helper.from_array(codes, f"{name}_q{bits}"),
                                      numpy_helper.from_array(scales, f"{name}_scales{bits}")])
            q_ins[_QMOE_IN[f"{fc}_w"]] = f"{name}_q{bits}"
            q_ins[_QMOE_IN[f"{fc}_s"]] = f"{name}_scales{bits}"
        while q_ins and not q_ins[-1]:
            q_ins.pop()
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        attrs["expert_weight_bits"] = bits
        if block_size:
            attrs["block_size"] = block_size
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
        n.CopyFrom(helper.make_node("QMoE", q_ins, list(n.output), name=f"{n.name}_q{bits}", domain=MSFT, **attrs))
    _drop_unused_initializers(graph)


# ----------------------------------------------------------------- output


def _census(model: onnx.ModelProto) -> dict:
    ops = collections.Counter(n.op_type for n in model.graph.node)
    qmoe_bits = sorted({a.i for n in model.graph.node if n.op_type == "QMoE"
                        for a in n.attribute if a.name == "expert_weight_bits"})
    return {"ops": dict(sorted(ops.items())), "qmoe_bits": qmoe_bits}


def _finish(model: onnx.ModelProto, src: Path, dst: Path) -> dict:
    """Check that ONNX Runtime loads the result, then write it in one piece (no external data)."""
    import onnxruntime as ort

    _ensure_opset(model, MSFT)
    data = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    # raises before anything is written; full optimization = the fusions a serving session applies
    ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    atomic_write_bytes(dst, data)
    src_bytes = src.stat().st_size
    return _census(model) | {"bytes": len(data), "fp32_bytes": src_bytes, "size_ratio": len(data) / src_bytes}


class _quiet_ort_logs:
    """ORT's quantizers log every node they skip; keep stage output readable."""

    def __enter__(self):
        self.loggers = [logging.getLogger("onnxruntime.quantization"), logging.getLogger()]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, lvl in zip(self.loggers, self.levels):
            lg.setLevel(lvl)
        return False


__all__ = ["quantize_int8", "quantize_int4", "check_block_size", "summarize", "quantize_symmetric",
           "dequantize_symmetric"]
