"""DVC stage `distill`: models/teacher + data/prepared → models/student (distilled), models/baseline
(the same architecture from scratch on cross-entropy, same token budget), metrics/distill.json,
dvclive curves of both runs.

Every check (params, tokenizer, student size, teacher-init shapes) runs before any work. Re-running
after an interruption resumes each run from its newest checkpoint in checkpoints/distill/; other
runs' checkpoints are parked in checkpoints/distill/{student,baseline}/runs/<run id>/ (distill.keep_runs).
"""

from __future__ import annotations

from pathlib import Path

from moeops.cli import run_main
from moeops.config import load_section
from moeops.io import atomic_write_json
from moeops.lineage import lineage
from moeops.model.io import save_model_dir
from moeops.model.transformer import param_counts
from moeops.train.data import load_meta, load_tokens
from moeops.train.distill import plan_student, train_baseline, train_student

PREPARED = Path("data/prepared")
TEACHER = Path("models/teacher")
STUDENT = Path("models/student")
BASELINE = Path("models/baseline")
CKPT = Path("checkpoints/distill")
LIVE = Path("dvclive/distill")
METRICS = Path("metrics/distill.json")


def _run_metrics(result) -> dict:
    return {"final_train_loss": round(result.final_loss, 5), "tokens_per_s": round(result.tokens_per_s, 1),
            "train_seconds": round(result.seconds, 1), "resumed_from_step": result.resumed_from}


def main() -> None:
    p = load_section("distill")
    meta = load_meta(PREPARED)
    tokens = load_tokens(PREPARED, "train")
    plan = plan_student(p, TEACHER, PREPARED, meta["vocab_size"], len(tokens))
    teacher_counts, student_counts = param_counts(plan.teacher.args), param_counts(plan.args)

    data = [PREPARED / n for n in ("train.bin", "tokenizer.json", "meta.json")]
    teacher_files = [TEACHER / n for n in ("model.safetensors", "config.json", "tokenizer.json")]
    student = train_student(p, plan, tokens, meta, CKPT / "student", LIVE / "student")
    save_model_dir(STUDENT, student.model, PREPARED / "tokenizer.json",
                   lineage(data + teacher_files, p.model_dump(), "distill") | {"role": "student"})
    metrics = {
        "steps": p.steps,
        "tokens": p.steps * p.batch_size * p.seq_len,
        "teacher": {"params_total": teacher_counts["total"], "params_active": teacher_counts["active"],
                    "sha256": plan.teacher_sha256},
        "student": {"params_total": student_counts["total"], "params_active": student_counts["active"],
                    **_run_metrics(student)},
        "params_ratio": round(student_counts["total"] / teacher_counts["total"], 4),
    }
    print(f"distill: {STUDENT} written; {student_counts['total']:,} params "
          f"({metrics['params_ratio']:.1%} of the teacher's), {student.tokens_per_s:,.0f} tokens/s")
    if p.baseline:
        plan.teacher = None  # not needed any more
        base = train_baseline(p, plan.args, tokens, meta, CKPT / "baseline", LIVE / "baseline")
        save_model_dir(BASELINE, base.model, PREPARED / "tokenizer.json",
                       lineage(data + [TEACHER / "config.json"], p.model_dump(), "distill") | {"role": "baseline"})
        metrics["baseline"] = {"params_total": student_counts["total"], **_run_metrics(base)}
        print(f"distill: {BASELINE} written; {base.tokens_per_s:,.0f} tokens/s")
    atomic_write_json(METRICS, metrics)


if __name__ == "__main__":
    run_main(main)
