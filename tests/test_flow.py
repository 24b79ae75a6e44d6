"""flows.pipeline against tiny real DVC projects built in tmp_path (no network, seconds each)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL

from flows.pipeline import StageFailed, StageTimeout, flatten, main, pipeline, run_stage

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"
FAST = {"retries": 0, "retry_delay_s": 0.0, "stage_timeout_s": 60.0}


pytestmark = pytest.mark.usefixtures("prefect_api")


def py(code: str) -> str:
    """A stage command; `python` is the venv's, put first on PATH by run_stage. No double quotes in `code`."""
    return f'python -c "{code}"'


def mark(name: str) -> str:
    """Code that appends the stage's name to order.txt (not a declared out: DVC ignores it)."""
    return f"open('order.txt', 'a').write('{name}' + chr(10))"


def make_repo(path: Path, stages: dict[str, dict], flow: dict | None = None) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=path, check=True)
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (path / "params.yaml").write_text(yaml.safe_dump({"flow": flow or FAST}))
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # An orphan that init has not reaped yet is a zombie: it has exited.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


METRICS = {"teacher": {"loss": 1.5, "ppl": 4.48}, "n_tokens": 1000}

PIPELINE = {
    "prepare": {"cmd": py(f"{mark('prepare')}; open('a.txt', 'w').write('a')"), "outs": ["a.txt"]},
    "train": {"cmd": py(f"{mark('train')}; open('b.txt', 'w').write(open('a.txt').read() * 2)"),
              "deps": ["a.txt"], "outs": ["b.txt"]},
    "evaluate": {
        "cmd": py(f"import json, os; {mark('evaluate')}; os.makedirs('metrics', exist_ok=True); "
                  f"json.dump({METRICS!r}, open('metrics/eval.json', 'w'))"),
        "deps": ["b.txt"],
        "metrics": [{"metrics/eval.json": {"cache": False}}],
    },
}

FAIL = py("import sys; open('runs.txt', 'a').write('x'); print('working'); "
          "print('error: something went wrong', file=sys.stderr); sys.exit(2)")

# The stage starts a grandchild in its process group, records both pids, then hangs (and would
# leave a `finished` file if it ever ran to the end).
HANG = py("import os, subprocess, time; p = subprocess.Popen(['sleep', '300']); "
          "open('pids.tmp', 'w').write(f'{os.getpid()} {p.pid}'); os.rename('pids.tmp', 'pids'); time.sleep(300); "
          "open('finished', 'w')")


def read_pids(repo: Path, within_s: float = 120.0) -> list[int]:  # a bound on the wait, not a timing claim
    deadline = time.monotonic() + within_s
    while not (repo / "pids").exists():
        assert time.monotonic() < deadline, "the stage never wrote its pids"
        time.sleep(0.05)
    return [int(p) for p in (repo / "pids").read_text().split()]


def test_runs_stages_in_order_and_publishes_metrics(tmp_path):
    repo = make_repo(tmp_path, PIPELINE)
    state = pipeline(repo=str(repo), return_state=True)
    assert state.is_completed()
    assert state.result() == {"eval": METRICS, "promotion": None}  # no gate stage: nothing to promote
    assert (repo / "order.txt").read_text().split() == ["prepare", "train", "evaluate"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["eval-metrics"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(artifacts) == 1
    assert artifacts[0].type == "table"
    table = artifacts[0].data if isinstance(artifacts[0].data, list) else json.loads(artifacts[0].data)
    assert table == [{"metric": "teacher.loss", "value": 1.5}, {"metric": "teacher.ppl", "value": 4.48},
                     {"metric": "n_tokens", "value": 1000}]

    # A stage subset runs as listed, each alone: DVC finds them up to date and runs nothing.
    assert pipeline(repo=str(repo), stages=["evaluate", "prepare"])["eval"] == METRICS
    assert (repo / "order.txt").read_text().split() == ["prepare", "train", "evaluate"]


def test_failed_stage_fails_the_flow_with_its_error_after_retries(tmp_path):
    stages = {"ok": {"cmd": py(mark("ok"))}, "broken": {"cmd": FAIL}, "after": {"cmd": py(mark("after"))}}
    repo = make_repo(tmp_path, stages, {**FAST, "retries": 1})
    state = pipeline(repo=str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed) as err:
        state.result()
    message = str(err.value)
    assert "error: something went wrong" in message
    assert "'broken'" in message and "exit code 2" in message
    assert (repo / "runs.txt").read_text() == "xx"  # ran, then retried once
    assert (repo / "order.txt").read_text().split() == ["ok"]  # nothing after the failed stage


def test_timeout_kills_the_stage_process_tree(tmp_path):
    repo = make_repo(tmp_path, {"hang": {"cmd": HANG}}, {**FAST, "stage_timeout_s": 4.0})
    with pytest.raises(StageTimeout, match="timed out after 4 s"):
        pipeline(repo=str(repo))
    for pid in read_pids(repo, within_s=0):
        assert wait_dead(pid), f"pid {pid} of the timed-out stage is still running"
    assert not (repo / "finished").exists()  # killed, not waited for


def test_run_stage_direct(tmp_path):
    stages = {"ok": {"cmd": py(mark("ok"))}, "broken": {"cmd": FAIL},
              "silent": {"cmd": py("import sys; sys.exit(3)")}, "crash": {"cmd": py("raise ValueError('boom')")}}
    repo = make_repo(tmp_path, stages)
    assert run_stage.fn("ok", repo, 60.0) is None
    assert (repo / "order.txt").read_text() == "ok\n"
    with pytest.raises(StageFailed, match=r"stage 'broken' failed with exit code 2: error: something went wrong$"):
        run_stage.fn("broken", repo, 60.0)
    # No `error:` line of its own: DVC's error line explains it.
    with pytest.raises(StageFailed, match=r"stage 'silent' failed with exit code 3: ERROR: failed to reproduce"):
        run_stage.fn("silent", repo, 60.0)
    # A traceback: its last line, the exception, comes first.
    with pytest.raises(StageFailed, match=r"stage 'crash' failed with exit code 1: ValueError: boom \| ERROR: "):
        run_stage.fn("crash", repo, 60.0)


def test_run_stage_logs_progress_bars_sparingly(tmp_path, caplog):
    # 100 tqdm-style updates (each ended by the next \r), then a killed stage: DVC's error line
    # lands on the same line as the last update.
    bar = py("import os, sys; [sys.stderr.write(chr(13) + f'{i}%|bar|') for i in range(100)]; sys.stderr.flush(); "
             "os.kill(os.getpid(), 15)")
    repo = make_repo(tmp_path, {"bar": {"cmd": bar}})
    with caplog.at_level(logging.INFO, logger="flows.pipeline"):
        with pytest.raises(StageFailed) as err:
            run_stage.fn("bar", repo, 60.0)
    logged = [r.getMessage() for r in caplog.records]
    # The first update, and the last one, which DVC's error line ended.
    assert [m[:8] for m in logged if m[0].isdigit()] == ["0%|bar|", "99%|bar|"]
    # -15 when the stage's shell exec'd python, 143 when a shell in between reported the signal.
    code = "-15" if str(err.value).endswith("exited with -15") else "143"
    assert str(err.value).startswith(f"stage 'bar' failed with exit code {code}: ")
    assert str(err.value).endswith(f"exited with {code}")


def test_sigterm_to_the_flow_process_kills_the_stage_tree(tmp_path):
    repo = make_repo(tmp_path, {"hang": {"cmd": HANG}})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--repo", str(repo)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pids = read_pids(repo)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out  # unwound through SystemExit, not killed outright
    for pid in pids:
        assert wait_dead(pid), f"pid {pid} outlived the flow process\n{out}"


def test_main_bad_params_is_one_line_exit_2(tmp_path, capsys):
    repo = make_repo(tmp_path, PIPELINE, {"retries": -1})
    with pytest.raises(SystemExit) as exit_:
        main(["--repo", str(repo)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "flow.retries" in err and "\n" not in err

    for key, value, message in (("retrain_cron", "61 3 * * 1", 'Invalid cron string: "61 3 * * 1"'),
                                ("retrain_timezone", "Mars/Olympus", 'Invalid timezone: "Mars/Olympus"')):
        (repo / "params.yaml").write_text(yaml.safe_dump({"flow": {**FAST, key: value}}))
        with pytest.raises(SystemExit) as exit_:
            main(["--repo", str(repo)])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {repo / 'params.yaml'}: flow.{key}: {message}")

    (repo / "params.yaml").write_text(yaml.safe_dump({"flow": FAST}))
    with pytest.raises(SystemExit) as exit_:
        main(["--repo", str(repo), "nope"])
    assert exit_.value.code == 2
    assert "nope: unknown stage" in capsys.readouterr().err


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
