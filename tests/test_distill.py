"""Distillation: the loss by hand, student construction and teacher-init, the stage end to end on
the debug flavor (resume, determinism, a new teacher), bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, run_stage, write_params
from safetensors.torch import load_file

from moeops.cli import run_main
from moeops.compress.student import evenly_spaced, init_from_teacher, make_student_args
from moeops.config import DistillParams, load_section, make_model_args
from moeops.model.io import load_model_dir, save_model_dir
from moeops.model.transformer import Transformer, build_model, param_counts
from moeops.train.distill import distill_loss

# A student of the debug teacher (dim 64, 2 layers, 8 experts): half as wide, 4 experts.
DISTILL = {"student": {"dim": 32, "inter_dim": 64, "moe_inter_dim": 16, "n_routed_experts": 4},
           "steps": 12, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "checkpoint_every": 4,
           "keep_checkpoints": 2, "log_every": 4, "threads": 1, "temperature": 2.0, "alpha": 0.7}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the loss


def distill_loss_reference(student_NV: torch.Tensor, teacher_NV: torch.Tensor, targets_N: torch.Tensor,
                           temperature: float, alpha: float, kl: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """The formula as written, differentiated by autograd."""
    student_NV = student_NV.float()
    ce = F.cross_entropy(student_NV, targets_N)
    log_s_NV = F.log_softmax(student_NV / temperature, dim=-1)
    log_t_NV = F.log_softmax(teacher_NV.float().detach() / temperature, dim=-1)
    if kl == "forward":  # Σ p_t (log p_t − log p_s)
        kl_N = (log_t_NV.exp() * (log_t_NV - log_s_NV)).sum(-1)
    else:  # Σ p_s (log p_s − log p_t)
        kl_N = (log_s_NV.exp() * (log_s_NV - log_t_NV)).sum(-1)
    return alpha * temperature**2 * kl_N.mean() + (1 - alpha) * ce, ce


def _softmax(row, T):
    z = [math.exp(v / T) for v in row]
    return [v / sum(z) for v in z]


def _hand(student, teacher, targets, T, alpha, reverse):
    kl, ce = 0.0, 0.0
    for s, t, y in zip(student, teacher, targets):
        ps, pt = _softmax(s, T), _softmax(t, T)
        a, b = (ps, pt) if reverse else (pt, ps)
        kl += sum(x * math.log(x / z) for x, z in zip(a, b))
        ce -= math.log(_softmax(s, 1.0)[y])
    n = len(targets)
    return alpha * T * T * kl / n + (1 - alpha) * ce / n, ce / n


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.3), (3.0, 1.0), (2.0, 0.0)])
def test_loss_equals_hand_computation(kl, T, alpha):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, generator=gen) * 2, torch.randn(3, 5, generator=gen) * 2
    targets = torch.tensor([0, 3, 4])
    loss, ce = distill_loss(student, teacher, targets, T, alpha, kl)
    want, want_ce = _hand(student.tolist(), teacher.tolist(), targets.tolist(), T, alpha, kl == "reverse")
    assert float(loss) == pytest.approx(want, rel=1e-5) and float(ce) == pytest.approx(want_ce, rel=1e-5)
    if alpha == 0:  # the CE end: exactly the cross-entropy
        assert torch.equal(loss, torch.nn.functional.cross_entropy(student, targets))


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (1.0, 1.0), (2.0, 0.7), (0.5, 0.2)])
def test_gradient_equals_autograd_of_the_formula(kl, T, alpha):
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 2, torch.randn(6, 9, generator=gen) * 2
    y = torch.randint(0, 9, (6,), generator=gen)
    ours, ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    (3 * distill_loss(ours, t, y, T, alpha, kl)[0]).backward()
    (3 * distill_loss_reference(ref, t, y, T, alpha, kl)[0]).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_kl_end_is_t_squared_kl_and_zero_on_the_teacher():
    gen = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen), torch.tensor([1, 2, 3, 4])
    kl_t = torch.nn.functional.kl_div((s / 3).log_softmax(-1), (t / 3).log_softmax(-1), log_target=True,
                                      reduction="batchmean")
    assert float(distill_loss(s, t, y, 3.0, 1.0)[0]) == pytest.approx(9 * float(kl_t), rel=1e-5)
    same = s.clone().requires_grad_()
    loss, _ = distill_loss(same, s, y, 2.0, 1.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and same.grad.abs().max() < 1e-6  # the teacher is a minimum


# ---------------------------------------------------------------- the student


def test_default_student_is_at_most_a_quarter_of_the_small_teacher():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    p = DistillParams.model_validate(params["distill"])
    teacher = make_model_args(params["pretrain"]["flavor"], {"vocab_size": params["prepare"]["vocab_size"],
                                                            "max_seq_len": params["pretrain"]["seq_len"]})
    student = make_student_args(teacher, p.student, p.seq_len)
    assert param_counts(student)["total"] <= 0.25 * param_counts(teacher)["total"]
    assert student.vocab_size == teacher.vocab_size and student.max_seq_len == p.seq_len


def _teacher(n_layers=4):
    model = build_model(make_model_args("debug", {"n_layers": n_layers}), seed=3).eval()
    gen = torch.Generator().manual_seed(4)
    for moe in model.moe_layers():  # a trained teacher's balancing bias is not zero
        moe.gate.e_score_correction_bias.copy_(torch.rand(8, generator=gen))
    return model


@pytest.mark.parametrize("how", ["subset", "merge"])
def test_teacher_init_copies_chosen_layers_and_experts(how):
    teacher = _teacher()
    t = teacher.state_dict()
    args = make_student_args(teacher.args, {"n_layers": 2, "n_routed_experts": 4}, 64)
    assert evenly_spaced(4, 2) == [0, 3] and evenly_spaced(4, 3) == [0, 2, 3] and evenly_spaced(4, 1) == [0]
    state = init_from_teacher(teacher, args, [0, 2], how)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight"):
        assert torch.equal(state[name], t[name])
    assert torch.equal(state["model.layers.1.self_attn.q_b_proj.weight"], t["model.layers.2.self_attn.q_b_proj.weight"])
    assert torch.equal(state["model.layers.1.mlp.shared_experts.up_proj.weight"],
                       t["model.layers.2.mlp.shared_experts.up_proj.weight"])
    for key in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight",
                "mlp.gate.e_score_correction_bias"):
        src, got = t[f"model.layers.2.{key}"], state[f"model.layers.1.{key}"]
        want = src[[0, 2, 4, 6]] if how == "subset" else (src[0::2] + src[1::2]) / 2
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
        assert how == "merge" or torch.equal(got, want)
    student = Transformer(args)
    student.load_state_dict(state, strict=True)
    assert student(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, args.vocab_size)


def test_teacher_init_with_every_layer_and_expert_is_the_teacher():
    teacher = _teacher(2)
    args = make_student_args(teacher.args, {}, teacher.args.max_seq_len)
    student = Transformer(args)
    student.load_state_dict(init_from_teacher(teacher, args, [], "merge"), strict=True)
    x = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(student.eval()(x), teacher(x))


@pytest.mark.parametrize("overrides,layers,how,message", [
    ({"dim": 32}, [], "merge", "init: teacher: model.embed_tokens.weight is (512, 32) in the student but (512, 64)"),
    ({"n_routed_experts": 3, "n_group": 1, "topk_group": 1}, [], "merge", "does not divide the teacher's 8"),
    ({"n_layers": 2}, [1, 3], "merge", "student layer 0 is dense but teacher layer 1 is MoE"),
    ({"n_layers": 2}, [0, 9], "merge", "teacher_layers: 9 is not a layer of the teacher"),
    ({"n_layers": 5}, [], "subset", "student.n_layers: 5 > the teacher's 4 layers"),
])
def test_teacher_init_refuses_what_does_not_fit(overrides, layers, how, message):
    teacher = _teacher()
    args = make_student_args(teacher.args, overrides, 64)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        init_from_teacher(teacher, args, layers or evenly_spaced(4, args.n_layers), how)


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def teacher_project(pretrained_project, tmp_path_factory) -> Path:
    """The prepared debug project with a debug teacher: the session's pretrain stage run
    (conftest.pretrained_project), with this module's distill params."""
    dst = tmp_path_factory.mktemp("distill") / "project"
    shutil.copytree(pretrained_project, dst)
    write_params(dst, distill=DISTILL)
    return dst


@pytest.fixture
def tproject(teacher_project, tmp_path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(teacher_project, dst)
    return dst


def test_stage_writes_student_baseline_metrics_then_resume_is_bitwise(tproject, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    shutil.copytree(tproject, other)
    run_stage("distill", tproject)
    for model in ("student", "baseline"):
        for name in ("model.safetensors", "config.json", "tokenizer.json", "lineage.json"):
            assert (tproject / "models" / model / name).is_file()
        assert (tproject / f"dvclive/distill/{model}/plots/metrics/train/loss.tsv").is_file()
    assert (tproject / "dvclive/distill/student/plots/metrics/train/objective.tsv").is_file()
    m = json.loads((tproject / "metrics/distill.json").read_text())
    assert m["params_ratio"] == pytest.approx(m["student"]["params_total"] / m["teacher"]["params_total"], abs=1e-4)
    assert m["params_ratio"] < 0.5 and m["steps"] == 12 and m["tokens"] == 12 * 4 * 32
    for run in ("student", "baseline"):
        assert math.isfinite(m[run]["final_train_loss"]) and m[run]["tokens_per_s"] > 0
    lineage = json.loads((tproject / "models/student/lineage.json").read_text())
    assert "models/teacher/model.safetensors" in lineage["inputs"] and lineage["params"]["alpha"] == 0.7
    config = json.loads((tproject / "models/student/config.json").read_text())
    assert config["dim"] == 32 and config["max_seq_len"] == 32 and config["n_routed_experts"] == 4
    student = load_file(tproject / "models/student/model.safetensors")
    assert student.keys() == load_file(tproject / "models/baseline/model.safetensors").keys()
    assert not torch.equal(student["lm_head.weight"],
                           load_file(tproject / "models/baseline/model.safetensors")["lm_head.weight"])

    # In another copy, in this process: interrupted after the step-4 checkpoint, then resumed: the
    # same weights as the uninterrupted stage run, bit for bit.
    from moeops.train.data import load_meta, load_tokens
    from moeops.train.distill import plan_student, train_student

    monkeypatch.chdir(other)
    p = load_section("distill")
    meta, tokens = load_meta(Path("data/prepared")), load_tokens(Path("data/prepared"), "train")

    def plan():
        return plan_student(p, Path("models/teacher"), Path("data/prepared"), meta["vocab_size"], len(tokens))

    def interrupt(step, loss):
        if step == 6:
            raise KeyboardInterrupt
        return loss

    ckpt = Path("checkpoints/distill/student")
    try:
        with pytest.raises(KeyboardInterrupt):
            train_student(p, plan(), tokens, meta, ckpt, loss_hook=interrupt)
        resumed = train_student(p, plan(), tokens, meta, ckpt)
        assert resumed.resumed_from == 4
        assert all(torch.equal(v, student[k]) for k, v in resumed.model.state_dict().items())
        # A new teacher never resumes the old student's checkpoints.
        teacher = load_model_dir("models/teacher")
        with torch.no_grad():
            teacher.lm_head.weight.mul_(1.01)
        save_model_dir("models/teacher", teacher, "models/teacher/tokenizer.json", {})
        capsys.readouterr()
        fresh = train_student(p, plan(), tokens, meta, ckpt)
        assert fresh.resumed_from == 0 and "parked the checkpoints of run" in capsys.readouterr().out
        assert len(list((ckpt / "runs").iterdir())) == 1  # the old student's, kept (keep_runs 3)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("distill,change,message", [
    ({"student": {"dim": 128}}, None, "params.yaml: distill.student: {n} parameters, more than the teacher's {t}"),
    ({"init": "teacher"}, None,
     "params.yaml: distill.init: teacher: model.embed_tokens.weight is (384, 32) in the student but (384, 64) in "
     "the teacher; init: teacher keeps the teacher's widths (use init: scratch to change them)"),
    ({"student": {**DISTILL["student"], "top_k": 5}}, None,
     "params.yaml: distill.student.top_k: 5 > n_routed_experts=4"),
    ({"student": {"vocab_size": 100}}, None,
     "params.yaml: distill.student.vocab_size: the teacher's tokenizer sets it"),
    ({"seq_len": 128}, None, "params.yaml: distill.seq_len: 128 > the teacher's max_seq_len 64"),
    ({}, "tokenizer", "models/teacher/tokenizer.json: differs from data/prepared/tokenizer.json: the teacher was "
                      "trained on another tokenization (re-run pretrain on this data)"),
])
def test_bad_input_one_line_exit_2_nothing_written(tproject, monkeypatch, capsys, distill, change, message):
    write_params(tproject, distill={**DISTILL, **distill})
    if change == "tokenizer":  # the data was prepared again with another tokenizer; the teacher is stale
        tok = tproject / "data/prepared/tokenizer.json"
        spec = json.loads(tok.read_text())
        spec["model"]["vocab"] = {k: (v + 1) % len(spec["model"]["vocab"]) for k, v in spec["model"]["vocab"].items()}
        tok.write_text(json.dumps(spec))
    if "{n}" in message:
        teacher = json.loads((tproject / "models/teacher/config.json").read_text())
        from moeops.config import ModelArgs

        t_args = ModelArgs(**teacher)
        n = param_counts(make_student_args(t_args, distill["student"], 32))["total"]
        message = message.format(n=f"{n:,}", t=f"{param_counts(t_args)['total']:,}")
    if change is None and distill == {"student": {"dim": 128}}:  # one of them through a real process
        proc = run_stage("distill", tproject, check=False)
        code, err = proc.returncode, proc.stderr
    else:  # the rest through the same entry point in this process (no interpreter start-up)
        from stages.distill import main

        monkeypatch.chdir(tproject)
        with pytest.raises(SystemExit) as exc:
            run_main(main)
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {message}"
    assert not (tproject / "models/student").exists() and not (tproject / "checkpoints/distill").exists()
    assert not (tproject / "metrics/distill.json").exists()
