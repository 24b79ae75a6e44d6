"""Expert-load balance: DeepSeek-V3's auxiliary-loss-free bias update vs the sequence-wise balance
loss, alone, together and neither, in four otherwise identical 1-process pretrain runs.

    python -m bench.balance [--flavor small] [--steps 200] [--warmup 50]

Per run and MoE layer: the MaxVio curve (dvclive, every step), and after the warm-up the median and
max of busiest-expert share / uniform share = 1 + MaxVio, against the target <= 1.3; and the val
loss of the trained model on fixed val batches. Writes bench/results/balance.json and balance.png.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench import distributed as bd

TARGET = 1.3  # busiest expert at most 1.3x its uniform share
RUNS = {  # name -> (bias_update_speed, model.seq_aux_alpha)
    "bias": (0.01, 0.0),
    "aux": (0.0, 0.001),
    "both": (0.01, 0.001),
    "neither": (0.0, 0.0),
}


def maxvio_curves(project: Path) -> dict[str, list[tuple[int, float]]]:
    """{"layer<i>": [(step, MaxVio), ...]} for every MoE layer logged by the stage."""
    folder = project / "dvclive/pretrain/plots/metrics/expert_load"
    layers = sorted(int(p.stem.removeprefix("maxvio_layer")) for p in folder.glob("maxvio_layer*.tsv"))
    return {f"layer{i}": bd.read_tsv(project, f"expert_load/maxvio_layer{i}") for i in layers}


def after_warmup(curve: list[tuple[int, float]], warmup: int) -> dict:
    shares = [1 + v for step, v in curve if step > warmup]
    if not shares:
        return {"median_share": None, "max_share": None, "median_ok": None, "max_ok": None}
    med, top = statistics.median(shares), max(shares)
    return {"median_share": round(med, 4), "max_share": round(top, 4), "median_ok": med <= TARGET,
            "max_ok": top <= TARGET}


def plot(runs: dict, warmup: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(next(iter(runs.values()))["curves"])
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name, r in runs.items():
            steps, vio = zip(*r["curves"][layer]) if r["curves"][layer] else ((), ())
            ax.plot(steps, [1 + v for v in vio], label=name, linewidth=1)
        ax.axhline(TARGET, color="k", linestyle="--", linewidth=0.8)
        ax.axvline(warmup, color="gray", linestyle=":", linewidth=0.8)
        ax.set_title(f"MoE {layer}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("busiest expert / uniform share (1 + MaxVio)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.balance", description=__doc__.split("\n\n")[0])
    bd.add_common_args(ap)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=50, help="steps excluded from the median/max")
    a = ap.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="moeops-bench-") as tmp:
        for name, (gamma, alpha) in RUNS.items():
            p = bd.pretrain_params(a, steps=a.steps, log_every=1, checkpoint_every=a.steps, world_size=1,
                                bias_update_speed=gamma, model={"seq_aux_alpha": alpha})
            project = bd.make_project(Path(tmp), a.prepared, p)
            proc, wall = bd.run_stage(project)
            bd.check(proc)
            m = bd.stage_metrics(project)
            curves = maxvio_curves(project)
            r = runs[name] = {
                "bias_update_speed": gamma, "seq_aux_alpha": alpha,
                "after_warmup": {layer: after_warmup(c, a.warmup) for layer, c in curves.items()},
                "final_train_loss": m["final_train_loss"], "val_loss": round(bd.val_loss(project, a.prepared), 5),
                "tokens_per_s": m["tokens_per_s"], "wall_seconds": round(wall, 1), "curves": curves}
            r["target_met_median"] = all(s["median_ok"] for s in r["after_warmup"].values())
            r["target_met_max"] = all(s["max_ok"] for s in r["after_warmup"].values())
            print(f"{name}: {({k: v for k, v in r.items() if k != 'curves'})}", flush=True)
            shutil.rmtree(project)
    from bench.common import out_dir

    out_dir().mkdir(parents=True, exist_ok=True)
    plot(runs, a.warmup, out_dir() / "balance.png")
    path = bd.save("balance", "bench.balance", {
        "pretrain": bd.pretrain_params(a, steps=a.steps, log_every=1, checkpoint_every=a.steps), "warmup": a.warmup,
        "target_share": TARGET, "plot": "bench/results/balance.png", "runs": runs,
        "note": "share = busiest expert's tokens / uniform share = 1 + MaxVio, per training step (dvclive); "
                "median/max over steps > warmup; val loss = models/teacher on 8 fixed val batches (seed 1234); "
                "one run per setting (same seed: deterministic)"}, argv)
    layers = list(next(iter(runs.values()))["curves"])

    def med_max(s: dict) -> str:
        return f"{bd.fmt(s['median_share'])}/{bd.fmt(s['max_share'])}"

    print(bd.table(["run", *[f"{layer} med/max" for layer in layers], f"<= {TARGET} (median)", "val loss"],
                   [[name, *[med_max(r["after_warmup"][layer]) for layer in layers], r["target_met_median"],
                     r["val_loss"]] for name, r in runs.items()]))
    print(f"written {path} and {out_dir() / 'balance.png'}")


if __name__ == "__main__":
    main()
