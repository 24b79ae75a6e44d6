#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU check of issue 13, one prepared script for a machine with a CUDA GPU,
# at most 8 minutes in all (GPU_CHECK_BUDGET_S, default 480: each step's timeout is cut to what is left;
# GPU_CHECK_LIMITS=kernels=240,... changes a step's own timeout).
#
#   bash bench/gpu_check.sh [STEP ...]      steps: env nvidia-smi kernels moe_layer grouped_gemm pipeline
#                                           (default: all, in that order; env always runs first)
#
# Steps, each timed and under `timeout`:
#   env           what the check needs is there (else it says what is missing and how to get it)
#   nvidia-smi    the GPU, its driver and memory
#   kernels       the Triton kernel tests COMPILED on the GPU: TRITON_INTERPRET=0 pytest tests/test_triton_*.py
#   moe_layer     python -m bench.moe_layer --device cuda (ours vs transformers' DeepseekV3MoE and DeepSpeed's MoE)
#   grouped_gemm  python -m bench.grouped_gemm (Triton grouped SwiGLU GEMM vs dense cuBLAS of the same FLOPs)
#   pipeline      python -m bench.pipeline: `dvc repro` + summary in a fresh clone of HEAD (commit first!) with
#                 a shortened params set (tiny flavor, pretrain 30 steps, distill 20, small evaluate and gate)
# then a table (step, status, seconds, key figure); exit 1 when a step failed, 2 when the environment lacks
# what the GPU steps need.
#
# The environment (once per machine, from the repository root):
#   python3 -m venv .venv && .venv/bin/pip install -r requirements.txt     # the pinned CPU environment
#   .venv/bin/pip install --force-reinstall torch==<the pinned version> --index-url <PyTorch's CUDA 12.x wheel index>
#   .venv/bin/pip uninstall -y onnxruntime && .venv/bin/pip install onnxruntime-gpu==<onnxruntime's pinned version>
#   (TensorRT for the export stage's engine: .venv/bin/pip install tensorrt; optional, the stage says when absent)
# triton comes with requirements.txt (and with the CUDA torch wheel). PYTHON=... picks another interpreter.
#
# Results: bench/results/gpu/{moe_layer,grouped_gemm,make_pipeline}.json (MOEOPS_BENCH_OUT overrides), to
# quote in BENCHMARKS.md; logs and the pipeline's clone under GPU_CHECK_DIR (default: a new temp dir, kept).

# shellcheck disable=SC2317  # env_check, kernel_tests and pipeline are called indirectly (run -> timeout -> bash -c)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v python3 || true)
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
export MOEOPS_BENCH_OUT=${MOEOPS_BENCH_OUT:-$ROOT/bench/results/gpu}
export PYTHONHASHSEED=0 TORCH_EXTENSIONS_DIR=$ROOT/.torch_extensions PYTHONPATH=$ROOT
PATH="$(dirname "${PY:-/usr/bin/python3}"):$PATH"
export PATH
START=$SECONDS
ALL_STEPS=(nvidia-smi kernels moe_layer grouped_gemm pipeline)
declare -A LIMIT=([env]=60 [nvidia-smi]=15 [kernels]=120 [moe_layer]=75 [grouped_gemm]=60 [pipeline]=300)
for kv in ${GPU_CHECK_LIMITS:+${GPU_CHECK_LIMITS//,/ }}; do  # e.g. GPU_CHECK_LIMITS=kernels=240,pipeline=400 (seconds per step)
    [[ $kv =~ ^([a-z_-]+)=([0-9]+)$ && -v "LIMIT[${BASH_REMATCH[1]}]" ]] ||
        { echo "error: GPU_CHECK_LIMITS: '$kv' is not STEP=SECONDS with a step of: ${!LIMIT[*]}" >&2; exit 2; }
    LIMIT[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
steps=("$@")
((${#steps[@]})) || steps=("${ALL_STEPS[@]}")
for s in "${steps[@]}"; do
    [[ -v "LIMIT[$s]" ]] || { echo "error: unknown step '$s'; steps: ${ALL_STEPS[*]}" >&2; exit 2; }
done
WORK=${GPU_CHECK_DIR:-$(mktemp -d -t moeops-gpu-check-XXXXXX)}
mkdir -p "$WORK"
ROWS=()
FAILED=0
LAST_RC=0

# The figure a step's table row shows, read from its log or its result file.
figure() {
    local step=$1 log=$2
    case $step in
        env) grep -m1 '^torch ' "$log" ;;
        nvidia-smi) "$PY" - "$log" <<'EOF' 2>/dev/null
import sys
lines = [l for l in open(sys.argv[1]) if l.startswith("GPU ")]
print(lines[0].split("(UUID")[0].strip() if lines else "")
EOF
            ;;
        kernels) grep -E '(passed|failed|error|no tests ran)' "$log" | tail -1 | tr -d '=' | sed 's/^ *//' ;;
        moe_layer | grouped_gemm | pipeline)
            # no result from this run: the log's "skipped: ..." or "error: ..." line says why
            "$PY" - "$MOEOPS_BENCH_OUT" "$step" "$WORK/$step.start" <<'EOF' 2>/dev/null || grep -m1 -E '^(skipped|error)' "$log"
import json, sys
from pathlib import Path
out, step, start = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
path = out / f"{ {'pipeline': 'make_pipeline'}.get(step, step)}.json"
if not path.is_file() or path.stat().st_mtime < start.stat().st_mtime:
    sys.exit(f"no {path.name} from this run")  # an older result must not pass for this run's
r = json.loads(path.read_text())
if step == "moe_layer":
    print(", ".join(f"{k} {v['median']}x ({r['verdicts'][k]})" for k, v in r["ratio_spread"].items())
          + f"; kernels {'/'.join(sorted(set(r['kernels'].values())))}, {r['dtype']}")
elif step == "grouped_gemm":
    print(", ".join(f"{k} {v['median']} ({r['verdicts'][k]})" for k, v in r["ratio_spread"].items()))
else:
    m = r["runs"][-1]["metrics"]
    print(f"wall {r['wall_s']['median']} s; pretrain {m.get('pretrain', {}).get('tokens_per_s')} tok/s; "
          f"gate {m.get('gate', {}).get('decision')}")
EOF
            ;;
    esac
}

# run STEP CMD...: CMD under `timeout` (the step's limit, cut to the budget left), logged to $WORK/STEP.log.
run() {
    local step=$1
    shift
    local left=$((BUDGET_S - (SECONDS - START)))
    local limit=${LIMIT[$step]}
    ((limit > left)) && limit=$left
    local log=$WORK/$step.log status t0=$SECONDS rc
    LAST_RC=1
    if ((limit < 5)); then
        ROWS+=("$step|skipped|0|the ${BUDGET_S} s budget is spent")
        FAILED=1
        return 1
    fi
    printf '== %s (timeout %s s) ... ' "$step" "$limit"
    touch "$WORK/$step.start"
    # a function of this script runs in a child bash (exported below): `timeout` runs programs, not functions
    [[ $(type -t "$1") == function ]] && set -- bash -c '"$@"' _ "$@"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    LAST_RC=$rc
    local took=$((SECONDS - t0))
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status="TIMEOUT"
    else
        status="FAIL($rc)"
    fi
    echo "$status in ${took} s (log: $log)"
    if [[ $status != ok ]]; then
        FAILED=1
        tail -n 25 "$log" | sed 's/^/    /'
    fi
    ROWS+=("$step|$status|$took|$(figure "$step" "$log" | head -1)")
    [[ $status == ok ]]
}

# Exit 0: all there; 3: only what the pipeline step needs is missing (onnxruntime-gpu, dvc); 1: more.
env_check() {
    local missing=0
    command -v nvidia-smi >/dev/null || { echo "missing: nvidia-smi (the NVIDIA driver)"; missing=1; }
    [[ -n $PY && -x $PY ]] || { echo "missing: a python (set PYTHON=... or build .venv: see this script's header)"; exit 1; }
    "$PY" - <<'EOF'
import importlib, shutil, sys
missing, pipeline_missing = [], []
try:
    import torch
    print(f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    if not torch.cuda.is_available():
        missing.append("CUDA torch: torch.cuda.is_available() is False (" + ("a CPU-only wheel: install the CUDA wheel"
                       if torch.version.cuda is None else "no GPU visible to torch: driver / CUDA_VISIBLE_DEVICES") + ")")
except ImportError:
    missing.append("torch (pip install -r requirements.txt)")
for mod, how in [("triton", "pip install triton (pinned in requirements.txt)"), ("pytest", "pip install -r requirements.txt"),
                 ("transformers", "pip install -r requirements.txt"), ("deepspeed", "pip install -r requirements.txt")]:
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as e:  # deepspeed may raise more than ImportError on a half-installed CUDA
        missing.append(f"{mod} ({how}; import failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
try:
    import onnxruntime as ort
    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} providers {providers}")
    if "CUDAExecutionProvider" not in providers:
        pipeline_missing.append("onnxruntime-gpu (the CPU onnxruntime is installed: pip uninstall onnxruntime, "
                       "pip install onnxruntime-gpu)")
    if "TensorrtExecutionProvider" not in providers:
        print("note: no TensorrtExecutionProvider: the export stage will skip the TensorRT engine (says why)")
except ImportError:
    pipeline_missing.append("onnxruntime-gpu (pip install onnxruntime-gpu)")
if shutil.which("dvc") is None:
    pipeline_missing.append("dvc on PATH (pip install -r requirements.txt; the pipeline step runs `dvc repro`)")
for m in missing + pipeline_missing:
    print(f"missing: {m}")
sys.exit(1 if missing else 3 if pipeline_missing else 0)
EOF
    local rc=$?
    ((missing && rc != 1)) && rc=1
    return "$rc"
}

kernel_tests() {
    local tests=()
    mapfile -t tests < <(compgen -G 'tests/test_triton_*.py' | sort)
    if ((${#tests[@]} == 0)); then
        echo "no tests/test_triton_*.py in $ROOT: nothing to run"
        return 1
    fi
    TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}"
}

pipeline() {
    local params=$WORK/pipeline-params.yaml
    # Shortened `make pipeline`: tiny teacher, 30 + 20 steps, small evaluate and gate (the gate rejects such an
    # undertrained model: a reject is a result, the stage exits 0).
    cat >"$params" <<'EOF'
pretrain: {flavor: tiny, steps: 30, batch_size: 16, seq_len: 128, warmup_steps: 5, checkpoint_every: 10, log_every: 10}
distill: {steps: 20, batch_size: 16, seq_len: 128, warmup_steps: 5, checkpoint_every: 10, log_every: 10}
evaluate: {max_tokens: 20000, speed_tokens: 1024, decode_prompt_len: 32, decode_new_tokens: 16}
gate: {max_tokens: 20000, bootstrap_samples: 200}
EOF
    if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        echo "note: uncommitted changes are not in the clone the pipeline runs (it clones HEAD $(git rev-parse --short HEAD))"
    fi
    rm -rf "$WORK/pipeline"
    "$PY" -m bench.pipeline --params "$params" --keep "$WORK/pipeline"
}

export ROOT PY WORK
export -f env_check kernel_tests pipeline

echo "moeops GPU check: $ROOT (HEAD $(git rev-parse --short HEAD 2>/dev/null)), python $PY, budget ${BUDGET_S} s"
echo "results: $MOEOPS_BENCH_OUT   logs: $WORK"
if ! run env env_check && ((LAST_RC != 3)); then
    echo "skipped: ${steps[*]}: the environment lacks what the GPU steps need (missing: above; how to get it:" \
        "the header of bench/gpu_check.sh)" >&2
    exit 2
fi
for s in "${steps[@]}"; do
    case $s in
        env) ;;
        nvidia-smi) run nvidia-smi bash -c 'nvidia-smi -L && nvidia-smi' ;;
        kernels) run kernels kernel_tests ;;
        moe_layer) run moe_layer "$PY" -m bench.moe_layer --device cuda --repeats 5 --iters 10 ;;
        grouped_gemm) run grouped_gemm "$PY" -m bench.grouped_gemm --repeats 5 --iters 10 ;;
        pipeline) run pipeline pipeline ;;
    esac
done

echo
printf '%-14s %-10s %8s  %s\n' step status seconds "key figure"
for row in "${ROWS[@]}"; do
    IFS='|' read -r step status took fig <<<"$row"
    printf '%-14s %-10s %8s  %s\n' "$step" "$status" "$took" "$fig"
done
echo "total $((SECONDS - START)) s"
exit "$FAILED"
