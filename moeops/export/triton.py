"""A Triton Inference Server model repository for an exported ONNX language model:

    <out_dir>/README.md                          how to serve it and call it
    <out_dir>/<model_name>/config.pbtxt          onnxruntime backend, dynamic batching, warm-up
    <out_dir>/<model_name>/1/model.onnx          (+ its external data file, if any)
    <out_dir>/<model_name>/warmup/<input>_ones   raw bytes of a warm-up input (the attention mask)

Every input and output entry of config.pbtxt is read from the ONNX graph, so names, types and
dims always match the model Triton loads. The server keeps no state: the client passes the KV
cache (past_*) in and gets it back (present_*), as with plain ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeops.cli import UserError
from moeops.io import replace_dir

WARMUP_SEQ = 8  # prompt length of the warm-up prefill
PAST_PREFIX = "past_"  # the KV-cache inputs: empty (length 0) in a prefill
INSTANCE_KIND = "KIND_AUTO"  # Triton picks GPU when there is one, else CPU

# ONNX TensorProto element type name -> Triton data type
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64",
    "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    onnx_type: int  # onnx.TensorProto element type
    triton_type: str
    dims: tuple[int, ...]  # without the batch dim; -1 = dynamic


def tensor_specs(values, onnx_path: Path) -> list[TensorSpec]:
    """Graph inputs/outputs -> specs. The first dim must be a dynamic batch dim (Triton batches on it)."""
    import onnx

    specs = []
    for v in values:
        t = v.type.tensor_type
        kind = onnx.TensorProto.DataType.Name(t.elem_type)
        if kind not in TRITON_TYPES:
            raise UserError(f"{onnx_path}: {v.name}: element type {kind} has no Triton data type")
        if not t.HasField("shape") or not t.shape.dim:
            raise UserError(f"{onnx_path}: {v.name}: no shape in the graph (re-export with shapes)")
        batch, *rest = t.shape.dim
        if batch.HasField("dim_value"):
            raise UserError(f"{onnx_path}: {v.name}: batch dim is fixed at {batch.dim_value}; "
                            "Triton's dynamic batching needs it dynamic")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in rest)
        specs.append(TensorSpec(v.name, t.elem_type, TRITON_TYPES[kind], dims))
    return specs


def read_io(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    """(inputs, outputs, external data files relative to the model's folder). Initializers that
    are also graph inputs (old exporters list them) are not model inputs."""
    import onnx

    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: missing (run the export stage first)")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a file that is not a model
        raise UserError(f"{onnx_path}: not an ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    graph = model.graph
    if not graph.input or not graph.output:
        raise UserError(f"{onnx_path}: the graph has no inputs or no outputs")
    weights = {init.name for init in graph.initializer}
    inputs = tensor_specs([v for v in graph.input if v.name not in weights], onnx_path)
    outputs = tensor_specs(graph.output, onnx_path)
    external = sorted({entry.value for init in onnx_iter_tensors(model) for entry in init.external_data
                       if entry.key == "location"})
    for rel in external:
        check_confined(onnx_path, rel)
    return inputs, outputs, external


def check_confined(onnx_path: Path, location: str) -> None:
    """An external-data location must name a file inside the model's folder: `../x`, an absolute
    path, or a symlink out of it would make the model read (and a copy of it carry) bytes nobody
    checksummed."""
    folder = onnx_path.parent.resolve()
    target = (onnx_path.parent / location).resolve()
    if not location or Path(location).is_absolute() or ".." in Path(location).parts or \
            not target.is_relative_to(folder):
        raise UserError(f"{onnx_path}: external data location {location!r} is outside the model directory "
                        f"{onnx_path.parent}")


def onnx_iter_tensors(model):
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included
    (any of them may live in external data)."""
    import onnx

    def walk(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                    yield from walk(sub)

    return walk(model.graph)


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two above 1 up to max_batch_size, and max_batch_size itself."""
    sizes = [b for b in (2 ** i for i in range(1, max_batch_size.bit_length())) if b < max_batch_size]
    return sizes + [max_batch_size] if max_batch_size > 1 else []


def warmup_dims(spec: TensorSpec) -> tuple[int, ...]:
    """Concrete dims of a batch-1 prefill: the cache inputs have length 0, every other dynamic dim
    (prompt length, attention-mask length = past + prompt) is WARMUP_SEQ."""
    fill = 0 if spec.name.startswith(PAST_PREFIX) else WARMUP_SEQ
    return tuple(fill if d == -1 else d for d in spec.dims)


def warmup_file(spec: TensorSpec) -> str | None:
    """An attention mask of zeros masks every position (a degenerate softmax), so the mask gets a
    file of ones; everything else is zeros (token id 0 is a valid token, EOS)."""
    return f"{spec.name}_ones" if "mask" in spec.name and spec.triton_type != "TYPE_STRING" else None


def quote(s: str) -> str:
    return json.dumps(s)  # protobuf text format reads a JSON string literal of plain text as is


def dims_text(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def io_block(kind: str, specs: list[TensorSpec]) -> list[str]:
    entries = [f'  {{\n    name: {quote(s.name)}\n    data_type: {s.triton_type}\n    dims: {dims_text(s.dims)}\n  }}'
               for s in specs]
    return [f"{kind} [\n" + ",\n".join(entries) + "\n]"]


def warmup_block(inputs: list[TensorSpec]) -> list[str]:
    lines = ["model_warmup [", "  {", '    name: "prefill_batch1"', "    batch_size: 1"]
    for s in inputs:
        data = f"input_data_file: {quote(warmup_file(s))}" if warmup_file(s) else "zero_data: true"
        lines += ["    inputs {", f"      key: {quote(s.name)}", "      value {", f"        data_type: {s.triton_type}",
                  f"        dims: {dims_text(warmup_dims(s))}", f"        {data}", "      }", "    }"]
    return ["\n".join(lines + ["  }", "]"])]


def config_pbtxt(model_name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int,
                 max_queue_delay_us: int) -> str:
    blocks = [f'name: {quote(model_name)}\nplatform: "onnxruntime_onnx"\nbackend: "onnxruntime"\n'
              f"max_batch_size: {max_batch_size}"]
    blocks += io_block("input", inputs) + io_block("output", outputs)
    batching = ["dynamic_batching {"]
    if sizes := preferred_batch_sizes(max_batch_size):
        batching.append(f"  preferred_batch_size: {dims_text(sizes)}")
    batching += [f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    blocks.append("\n".join(batching))
    blocks.append(f"instance_group [\n  {{\n    count: 1\n    kind: {INSTANCE_KIND}\n  }}\n]")
    blocks += warmup_block(inputs)
    return "\n".join(blocks) + "\n"


def warmup_ones(spec: TensorSpec) -> bytes:
    """Raw row-major little-endian bytes of one batch row of ones, as Triton reads input_data_file."""
    from onnx.helper import tensor_dtype_to_np_dtype

    dtype = np.dtype(tensor_dtype_to_np_dtype(spec.onnx_type)).newbyteorder("<")
    return np.ones(warmup_dims(spec), dtype=dtype).tobytes()


def readme(model_name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int) -> str:
    io = "\n".join(f"| {kind} | `{s.name}` | {s.triton_type} | {dims_text((-1, *s.dims))} |"
                   for kind, specs in (("in", inputs), ("out", outputs)) for s in specs)
    return f"""# Triton model repository: `{model_name}`

Serve it with Triton Inference Server (ONNX Runtime backend), for example from NVIDIA's container:

```
tritonserver --model-repository=$PWD
docker run --rm --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD:/models \\
    nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
```

`{model_name}` takes up to {max_batch_size} sequences per batch; Triton's dynamic batcher joins
requests whose tensors have the same shapes (same prompt and cache length). Instances run on a GPU
when there is one (`{INSTANCE_KIND}`), else on CPU; a batch-1 prefill warms each instance up at load.

To run the TensorRT-compilable part of the graph under TensorRT on a GPU (the MoE nodes stay on
CUDA), add to `{model_name}/config.pbtxt`:

```
optimization {{ execution_accelerators {{ gpu_execution_accelerator: [ {{ name: "tensorrt" }} ] }} }}
```

## The KV cache is passed by the client

The server keeps no per-sequence state. A generation is a sequence of calls:

1. prefill: `input_ids` = the prompt `[1, S]`, `attention_mask` = ones `[1, S]`, and every
   `past_*` input empty (`[1, 0, ...]`, zero rows);
2. take the next token from `logits[:, -1]`;
3. decode: `input_ids` = that token `[1, 1]`, `attention_mask` = ones `[1, past + 1]`, and each
   `past_*.i` = the `present_*.i` output of the previous call; repeat from 2.

Tensors (dims include the batch dim; -1 = dynamic):

| | name | type | dims |
| --- | --- | --- | --- |
{io}
"""


def check_repo_args(model_name: str, max_batch_size: int, max_queue_delay_us: int) -> None:
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise UserError(f"model_name: {model_name!r} is not a usable directory name")
    if max_batch_size < 1:
        raise UserError(f"max_batch_size: must be >= 1 for dynamic batching, got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise UserError(f"max_queue_delay_us: must be >= 0, got {max_queue_delay_us}")


def write_triton_repo(onnx_path: Path, out_dir: Path, model_name: str, max_batch_size: int,
                      max_queue_delay_us: int) -> None:
    """Write the repository (see the module docstring) in a temp directory next to `out_dir`,
    then swap it in with one rename: a failure leaves the previous `out_dir` (or none)."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    check_repo_args(model_name, max_batch_size, max_queue_delay_us)
    inputs, outputs, external = read_io(onnx_path)
    for rel in external:
        if not (onnx_path.parent / rel).is_file():
            raise UserError(f"{onnx_path}: its external data file {rel} is missing")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model_dir = tmp / model_name
        (model_dir / "1").mkdir(parents=True)
        shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
        for rel in external:  # same relative path next to model.onnx, where ONNX Runtime looks
            (model_dir / "1" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(onnx_path.parent / rel, model_dir / "1" / rel)
        for spec in inputs:
            if name := warmup_file(spec):
                (model_dir / "warmup").mkdir(exist_ok=True)
                (model_dir / "warmup" / name).write_bytes(warmup_ones(spec))
        (model_dir / "config.pbtxt").write_text(
            config_pbtxt(model_name, inputs, outputs, max_batch_size, max_queue_delay_us))
        (tmp / "README.md").write_text(readme(model_name, inputs, outputs, max_batch_size))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
