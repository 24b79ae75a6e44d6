"""Do the experts pay? The MoE against two dense models trained on the same tokens with the same
schedule (params.yaml's pretrain section: data, seed, steps, batch, seq_len, lr schedule), each by
the real stage (`python -m stages.pretrain`) in a fresh project:

    python -m bench.dense_vs_moe [--flavor small] [--steps 500] [--calib-steps 5] [--calib-rounds 3]

  moe            the flavor as it is
  dense_active   every layer dense (first_k_dense_replace = n_layers), inter_dim solved so that the
                 active parameters per token match the MoE's (a multiple of 16; within a few %)
  dense_compute  every layer dense, inter_dim calibrated so that a training step takes the MoE's
                 wall time on this machine: candidate widths and the MoE are timed in this process
                 (the loop's step: fused loss, backward, clipping, AdamW, bias update, on real
                 batches), interleaved over rounds, median per candidate; the closest wins

Per model: val bits-per-byte, micro and macro (the shared evaluation, moeops/evaluate/scoring.py:
metrics/pretrain.json "val" when the stage writes it, else scored here the same way), tokens/s,
total and active parameters, train seconds; loss vs tokens and loss vs seconds (dvclive's curve; the
seconds of a logged interval = its tokens / its logged tokens/s) in bench/results/dense_vs_moe.png,
everything in bench/results/dense_vs_moe.json. The three models are trained one after another in
this fixed order on the same machine, one run each (a run is deterministic for its params; the
spread between runs is machine noise on tokens/s and seconds, not on loss).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench import distributed as bd
from bench.common import out_dir

ORDER = ["moe", "dense_active", "dense_compute"]
WIDTHS = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]  # dense_compute candidates, in units of dense_active's inter_dim


def counts(flavor: str, model: dict, vocab_size: int) -> dict[str, int]:
    from moeops.config import make_model_args
    from moeops.model.transformer import param_counts

    return param_counts(make_model_args(flavor, {**model, "vocab_size": vocab_size}))


def dense(model: dict, n_layers: int, inter_dim: int) -> dict:
    return {**model, "first_k_dense_replace": n_layers, "inter_dim": inter_dim}


def active_matched_inter_dim(flavor: str, model: dict, vocab_size: int, n_layers: int, multiple: int = 16) -> int:
    """The dense inter_dim (a multiple of `multiple`) whose active parameters are closest to the MoE's
    (a dense model's parameters are linear in inter_dim)."""
    target = counts(flavor, model, vocab_size)["active"]
    a, b = (counts(flavor, dense(model, n_layers, d), vocab_size)["active"] for d in (multiple, 2 * multiple))
    exact = multiple + (target - a) / (b - a) * multiple
    return max(multiple, round(exact / multiple) * multiple)


def step_fn(p, model_over: dict, vocab_size: int, tokens):
    """One training step as moeops/train/loop.py runs it in one process, on batch i of the run's data."""
    from moeops.config import PretrainParams
    from moeops.model.transformer import build_model, update_router_bias
    from moeops.train.data import get_batch
    from moeops.train.loop import make_optimizer

    p = PretrainParams.model_validate({**p, "model": model_over})
    model = build_model(p.model_args(vocab_size), seed=p.seed).train()
    opt = make_optimizer(model, p)
    state = {"i": 0}

    def step():
        x_BS, y_BS = get_batch(tokens, p.seed, state["i"], 0, p.batch_size, p.seq_len)
        state["i"] += 1
        loss = model(x_BS, y_BS)
        loss.backward()
        if p.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_router_bias(model, p.bias_update_speed)
    return step


def calibrate(p: dict, vocab_size: int, tokens, n_layers: int, active_dim: int, steps: int, rounds: int) -> dict:
    """Median step seconds of the MoE and of dense candidates (interleaved rounds of `steps` timed
    steps each, after one warm-up step); the candidate closest to the MoE's median."""
    from moeops.train.loop import resolve_bf16, setup_determinism

    bf16, _ = resolve_bf16(p["bf16"])
    setup_determinism(p["seed"], p["threads"])  # the stage's threads and deterministic kernels
    candidates = {"moe": p["model"]}
    for f in WIDTHS:
        d = max(16, round(active_dim * f / 16) * 16)
        candidates[f"dense_{d}"] = dense(p["model"], n_layers, d)
    fns = {name: step_fn(p, m, vocab_size, tokens) for name, m in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for fn in fns.values():
            fn()
        for r in range(rounds):
            for name, fn in fns.items():
                for _ in range(steps):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            print(f"calibration round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {statistics.median(t):.3f} s" for n, t in times.items()), flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    best = min((n for n in med if n != "moe"), key=lambda n: abs(med[n] - med["moe"]))
    return {"inter_dim": candidates[best]["inter_dim"], "bf16": bf16, "steps_per_round": steps, "rounds": rounds,
            "step_seconds_median": {n: round(v, 4) for n, v in med.items()},
            "step_seconds": {n: [round(v, 4) for v in t] for n, t in times.items()},
            "chosen": best, "chosen_vs_moe": round(med[best] / med["moe"], 4)}


def val_metrics(project: Path, prepared: Path, evaluate: dict) -> dict:
    """metrics/pretrain.json's "val" block; where the stage does not write one, the same scoring here."""
    m = bd.stage_metrics(project)
    if "val" in m:
        return {k: m["val"][k] for k in ("bits_per_byte", "bits_per_byte_macro")} | {"scored_by": "stage"}
    from moeops.evaluate.scoring import document_bytes, score_documents, summarize, val_documents
    from moeops.model.io import load_model_dir

    model = load_model_dir(project / "models" / "teacher")
    docs = val_documents(prepared, evaluate["max_tokens_per_doc"])
    with torch.inference_mode():
        scores = score_documents(lambda x_BS: model(torch.from_numpy(x_BS)), prepared / "tokenizer.json", docs,
                                 model.args.max_seq_len, evaluate["stride"], evaluate["batch_size"])
    s = summarize(scores, document_bytes(docs))
    return {"bits_per_byte": round(s["bits_per_byte"], 5), "bits_per_byte_macro": round(s["bits_per_byte_macro"], 5),
            "scored_by": "bench"}


def curves(project: Path, tokens_per_step: int) -> dict:
    """Loss per logged step with the tokens seen and the training seconds so far."""
    loss = bd.read_tsv(project, "train/loss")
    tok_s = dict(bd.read_tsv(project, "train/tokens_per_s"))
    seconds, prev, out = 0.0, 0, {"step": [], "tokens": [], "seconds": [], "loss": []}
    for step, value in loss:
        seconds += (step - prev) * tokens_per_step / tok_s[step]
        prev = step
        for k, v in zip(out, (step, step * tokens_per_step, round(seconds, 3), value)):
            out[k].append(v)
    return out


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, r in runs.items():
        label = f"{name} (inter_dim {r['inter_dim']})" if name != "moe" else name
        axes[0].plot(r["curve"]["tokens"], r["curve"]["loss"], label=label, linewidth=1)
        axes[1].plot(r["curve"]["seconds"], r["curve"]["loss"], label=label, linewidth=1)
    axes[0].set_xlabel("tokens")
    axes[1].set_xlabel("training seconds (this machine)")
    axes[0].set_ylabel("train loss (nats/token)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.dense_vs_moe", description=__doc__.split("\n\n")[0])
    bd.add_common_args(ap)
    ap.add_argument("--steps", type=int, default=None, help="default: params.yaml's pretrain.steps")
    ap.add_argument("--calib-steps", type=int, default=5, help="timed steps per candidate and round")
    ap.add_argument("--calib-rounds", type=int, default=3)
    a = ap.parse_args(argv)
    from moeops.config import make_model_args
    from moeops.train.data import load_meta, load_tokens

    params = yaml.safe_load(bd.PARAMS.read_text())
    steps = a.steps or params["pretrain"]["steps"]
    base = bd.pretrain_params(a, steps=steps, checkpoint_every=steps, world_size=1)
    vocab_size = load_meta(a.prepared)["vocab_size"]
    n_layers = make_model_args(base["flavor"], base["model"]).n_layers
    active_dim = active_matched_inter_dim(base["flavor"], base["model"], vocab_size, n_layers)
    calib = calibrate(base, vocab_size, load_tokens(a.prepared, "train"), n_layers, active_dim, a.calib_steps,
                      a.calib_rounds)
    models = {"moe": base["model"], "dense_active": dense(base["model"], n_layers, active_dim),
              "dense_compute": dense(base["model"], n_layers, calib["inter_dim"])}
    tokens_per_step = base["batch_size"] * base["seq_len"] * base["grad_accum"]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="moeops-bench-") as tmp:
        for name in ORDER:  # sequentially, this order, same machine
            p = bd.pretrain_params(a, steps=steps, checkpoint_every=steps, world_size=1)
            p["model"] = models[name]
            project = bd.make_project(Path(tmp), a.prepared, p)
            (project / "params.yaml").write_text(yaml.safe_dump({"pretrain": p, "evaluate": params["evaluate"]},
                                                                sort_keys=False))
            proc, wall = bd.run_stage(project)
            bd.check(proc)
            m = bd.stage_metrics(project)
            runs[name] = {
                "model": models[name], "inter_dim": make_model_args(p["flavor"], models[name]).inter_dim,
                "params_total": m["params_total"], "params_active": m["params_active"],
                "val": val_metrics(project, a.prepared, params["evaluate"]),
                "tokens_per_s": m["tokens_per_s"], "train_seconds": m["train_seconds"],
                "step_seconds_in_training": round(tokens_per_step / bd.steady_tokens_per_s(project), 4),
                "final_train_loss": m["final_train_loss"], "wall_seconds": round(wall, 1),
                "curve": curves(project, tokens_per_step)}
            print(f"{name}: {({k: v for k, v in runs[name].items() if k != 'curve'})}", flush=True)
            shutil.rmtree(project)
    moe = runs["moe"]
    for r in runs.values():
        r["active_vs_moe"] = round(r["params_active"] / moe["params_active"], 4)
        r["step_seconds_vs_moe"] = round(r["step_seconds_in_training"] / moe["step_seconds_in_training"], 4)
    out_dir().mkdir(parents=True, exist_ok=True)
    plot(runs, out_dir() / "dense_vs_moe.png")
    path = bd.save("dense_vs_moe", "bench.dense_vs_moe", {
        "pretrain": base, "calibration": calib, "runs": runs, "plot": "bench/results/dense_vs_moe.png",
        "note": "trained sequentially in this order on the same machine, one run each (same params: "
                "deterministic loss; seconds and tokens/s are one sample of machine noise); val = the shared "
                "evaluation (every val document capped at evaluate.max_tokens_per_doc, stride evaluate.stride); "
                "dense_compute's inter_dim = the calibration candidate whose median step time is closest to the "
                "MoE's; step_seconds_in_training = tokens per step / the run's median logged tokens/s"}, argv)
    print(bd.table(["model", "inter_dim", "params", "active", "active/moe", "tok/s", "step s", "step/moe",
                    "train s", "val bpb", "val bpb macro"],
                   [[n, r["inter_dim"], r["params_total"], r["params_active"], r["active_vs_moe"], r["tokens_per_s"],
                     r["step_seconds_in_training"], r["step_seconds_vs_moe"], r["train_seconds"],
                     r["val"]["bits_per_byte"], r["val"]["bits_per_byte_macro"]] for n, r in runs.items()]))
    print(f"written {path} and {out_dir() / 'dense_vs_moe.png'}")


if __name__ == "__main__":
    main()
