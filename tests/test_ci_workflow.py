"""The CI promotion workflow (deploy/ci/promote.yml): it is a valid GitHub Actions workflow
(SchemaStore's github-workflow schema, vendored in deploy/ci/schema/, plus the checks the
schema cannot make: duplicate keys, bash syntax, step ids), it does what issue 5 §4 asks
(triggers, concurrency, permissions, the one promotion entry point, the job summary, the
artifacts), and its own shell steps (job summary, pushing exactly the new tags) behave,
run under bash against a local git remote. flows.promote itself is tested elsewhere."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "deploy" / "ci" / "promote.yml"
SCHEMA = REPO / "deploy" / "ci" / "schema" / "github-workflow.json"
ENTRY_POINT = "python -m flows.promote --from-gate metrics/gate.json"
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]  # what `shell: bash` runs


class WorkflowLoader(yaml.SafeLoader):
    """YAML as GitHub reads it: 1.2 booleans only (PyYAML's 1.1 rules turn the key `on`
    into True), and a duplicate key is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


WorkflowLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
WorkflowLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load(text: str) -> dict:
    return yaml.load(text, Loader=WorkflowLoader)


_validator = None


def schema_errors(doc: dict) -> list[str]:
    global _validator
    if _validator is None:
        schema = json.loads(SCHEMA.read_text())
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _validator = cls(schema)
    errors = []
    for e in _validator.iter_errors(doc):
        e = jsonschema.exceptions.best_match([e])  # the most relevant branch of a oneOf/anyOf
        errors.append(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: [{e.validator}] {e.message[:160]}")
    return errors


@pytest.fixture(scope="module")
def wf() -> dict:
    return load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def steps(wf) -> list[dict]:
    (job,) = wf["jobs"].values()
    return job["steps"]


def step_index(steps, pred) -> int:
    (i,) = [i for i, s in enumerate(steps) if pred(s)]  # exactly one
    return i


def uses(action):
    return lambda s: s.get("uses", "").split("@")[0] == action


def runs(fragment):
    return lambda s: fragment in s.get("run", "")


# --- validity ---------------------------------------------------------------------------

def test_workflow_matches_the_schema(wf):
    assert "on" in wf and True not in wf  # the key `on` read as GitHub reads it
    assert schema_errors(wf) == []


def _both_uses_and_run(doc):
    step = next(s for s in doc["jobs"]["promote"]["steps"] if ENTRY_POINT in s.get("run", ""))
    step["uses"] = "actions/checkout@v4"


def _misspelled_runs_on(doc):
    job = doc["jobs"]["promote"]
    job["runs-onn"] = job.pop("runs-on")


def _misspelled_top_level_key(doc):
    doc["permisions"] = doc.pop("permissions")


def _bad_permission_value(doc):
    doc["permissions"]["contents"] = "push"


@pytest.mark.parametrize("breakage, where", [
    (_both_uses_and_run, "jobs/promote/steps/"),
    (_misspelled_runs_on, "jobs/promote: "),
    (_misspelled_top_level_key, "<root>: [additionalProperties] "),
    (_bad_permission_value, "permissions/contents: [enum] "),
])
def test_a_broken_copy_fails_validation(wf, breakage, where):
    broken = copy.deepcopy(wf)
    breakage(broken)
    errors = schema_errors(broken)
    assert errors, f"{breakage.__name__} passed the schema"
    assert all(e.startswith(where) for e in errors), errors


def test_yaml_as_github_reads_it():
    assert load("on:\n  push:\n") == {"on": {"push": None}}
    assert load("a: yes\nb: true\n") == {"a": "yes", "b": True}
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'runs-on'"):
        load("jobs:\n  j:\n    runs-on: a\n    runs-on: b\n")


def _script(run: str) -> str:
    return re.sub(r"\$\{\{.*?\}\}", "EXPR", run)  # expressions are substituted before bash runs


def test_run_scripts_are_valid_bash(steps, tmp_path):
    for i, step in enumerate(s for s in steps if "run" in s):
        script = tmp_path / f"step{i}.sh"
        script.write_text(_script(step["run"]))
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{step.get('name', step['run'][:40])}: {r.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_run_scripts_pass_shellcheck(steps, tmp_path):
    for i, step in enumerate(s for s in steps if "run" in s):
        script = tmp_path / f"step{i}.sh"
        script.write_text("#!/bin/bash\n" + _script(step["run"]))
        # SC2154 (variable not assigned) is off, as in actionlint: the runner sets the env vars
        r = subprocess.run(["shellcheck", "--severity=warning", "--exclude=SC2154", str(script)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_step_references_name_earlier_steps(steps):
    seen: set[str] = set()
    for step in steps:
        text = json.dumps(step)
        for ref in re.findall(r"steps\.([A-Za-z_][\w-]*)\.", text):
            assert ref in seen, f"steps.{ref} is referenced before (or without) a step with that id"
        if "id" in step:
            assert step["id"] not in seen
            seen.add(step["id"])


def test_actions_are_pinned_by_major_version(steps):
    pinned = {s["uses"] for s in steps if "uses" in s}
    assert all(re.fullmatch(r"actions/[a-z-]+(/[a-z-]+)?@v\d+", u) for u in pinned), pinned
    assert {u.split("/")[1].split("@")[0] + "@" + u.split("@")[1] for u in pinned} == {
        "checkout@v4", "setup-python@v5", "cache@v4", "upload-artifact@v4"}


def test_make_targets_it_calls_exist(steps):
    for target in (".venv/bin/.installed", "pipeline"):
        assert any(f"make {target}" in s.get("run", "") for s in steps)
        r = subprocess.run(["make", "-n", "-C", str(REPO), target], capture_output=True, text=True)
        assert "No rule to make target" not in r.stderr and r.returncode == 0, r.stderr


def test_an_installed_copy_is_a_file_and_current():
    """GitHub does not follow a symlinked workflow file (actions/runner#1420): the copy in
    .github/workflows/ must be a plain file, and the same as deploy/ci/promote.yml."""
    installed = REPO / ".github" / "workflows" / "promote.yml"
    if not installed.exists() and not installed.is_symlink():
        pytest.skip("not installed in .github/workflows/ (see deploy/ci/README.md)")
    assert not installed.is_symlink(), "a symlink: GitHub would not run it; copy the file"
    assert installed.read_bytes() == WORKFLOW.read_bytes(), "stale: cp deploy/ci/promote.yml .github/workflows/"


# --- what issue 5 §4 asks ---------------------------------------------------------------

def test_triggers_concurrency_and_permissions(wf):
    assert wf["on"]["push"]["branches"] == ["main"]
    assert "workflow_dispatch" in wf["on"]
    assert wf["concurrency"]["group"] and wf["concurrency"]["cancel-in-progress"] is False
    assert wf["permissions"] == {"contents": "write"}


def test_checkout_python_and_cache(steps):
    checkout = steps[step_index(steps, uses("actions/checkout"))]
    assert checkout["with"]["fetch-depth"] == 0
    assert steps[step_index(steps, uses("actions/setup-python"))]["with"]["python-version"] == "3.11"
    restore = steps[step_index(steps, uses("actions/cache/restore"))]
    save = steps[step_index(steps, uses("actions/cache/save"))]
    assert set(restore["with"]["path"].split()) == {".venv", ".torch_extensions"} == set(save["with"]["path"].split())
    assert "hashFiles('requirements.txt')" in restore["with"]["key"]
    assert save["with"]["key"] == f"${{{{ steps.{restore['id']}.outputs.cache-primary-key }}}}"
    # the cache is saved only after a pipeline that succeeded (no always(): a half-built op is not kept)
    assert step_index(steps, lambda s: s.get("id") == "pipeline") < steps.index(save)
    assert "always()" not in save.get("if", "")


def test_registry_and_remote_come_from_the_environment(wf, steps):
    (job,) = wf["jobs"].values()
    assert "MOEOPS_REGISTRY" in job["env"] and "DVC_REMOTE_URL" in job["env"]
    pull = steps[step_index(steps, runs("dvc pull"))]
    assert pull["if"] == "env.DVC_REMOTE_URL != ''" and "dvc remote add" in pull["run"]


def test_the_single_promotion_entry_point_runs_after_the_pipeline(steps):
    promote = [s for s in steps if "-m flows.promote" in s.get("run", "")]
    assert len(promote) == 1 and promote[0]["run"].count("-m flows.promote") == 1  # one call, in one step
    assert f".venv/bin/{ENTRY_POINT} " in promote[0]["run"]
    # its exit status is the step's: 1 (rejected) fails the job
    assert "if" not in promote[0] and not promote[0].get("continue-on-error")
    assert promote[0]["run"].rstrip().endswith("exit $rc")
    assert step_index(steps, runs("make pipeline")) < steps.index(promote[0])


def test_promoted_only_steps_follow_promote_data_before_tags(steps):
    i_promote = step_index(steps, runs("-m flows.promote"))
    i_dvc_push = step_index(steps, runs("dvc push"))
    i_tags = step_index(steps, runs("git push"))
    assert i_promote < i_dvc_push < i_tags
    for i in (i_dvc_push, i_tags):
        assert "always()" not in steps[i].get("if", "") and "failure()" not in steps[i].get("if", "")


def test_job_summary_and_artifacts_always(steps):
    summary = steps[step_index(steps, runs("GITHUB_STEP_SUMMARY"))]
    assert summary["if"] == "always()" and "reports/gate.md" in summary["run"]
    upload = steps[step_index(steps, uses("actions/upload-artifact"))]
    assert upload["if"] == "always()"
    assert set(upload["with"]["path"].split()) == {"metrics/gate.json", "reports/gate.md", "metrics/eval.json"}


# --- its shell steps, run ---------------------------------------------------------------

def _run_step(step: dict, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    assert "${{" not in step["run"]
    return subprocess.run([*BASH, "-c", step["run"]], cwd=cwd, env=env, capture_output=True, text=True)


def test_summary_step_appends_the_gate_report(steps, tmp_path):
    summary = steps[step_index(steps, runs("GITHUB_STEP_SUMMARY"))]
    out = tmp_path / "summary.md"
    env = {"PATH": "/usr/bin:/bin", "GITHUB_STEP_SUMMARY": str(out)}
    assert _run_step(summary, tmp_path, env).returncode == 0
    assert "No gate report" in out.read_text()  # the pipeline died before the gate
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "gate.md").write_text("# Gate: reject\n- bits-per-byte 2.3 > 2.0\n")
    out.write_text("")
    assert _run_step(summary, tmp_path, env).returncode == 0
    assert out.read_text() == "# Gate: reject\n- bits-per-byte 2.3 > 2.0\n"


@pytest.mark.parametrize("rc, annotation", [(0, None), (1, "Candidate rejected"), (2, "Promotion failed"),
                                        (3, "Canary inconclusive")])
def test_promote_step_passes_the_entry_points_exit_status_on(steps, tmp_path, rc, annotation):
    """A stand-in for .venv/bin/python exits with `rc`: the step must exit with it too."""
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/bash\n[ "$*" = "-m flows.promote --from-gate metrics/gate.json" ] || exit 99\nexit {rc}\n')
    fake.chmod(0o755)
    r = _run_step(steps[step_index(steps, runs("-m flows.promote"))], tmp_path, {"PATH": "/usr/bin:/bin"})
    assert r.returncode == rc
    level = "warning" if rc == 3 else "error"  # inconclusive: the challenger waits at weight 0, nothing broke
    assert (f"::{level} title={annotation}::" in r.stdout) if annotation else r.stdout == ""


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_tag_steps_push_exactly_the_new_tags(steps, tmp_path):
    remote, work, tmp = tmp_path / "remote.git", tmp_path / "work", tmp_path / "runner"
    tmp.mkdir()
    _git(tmp_path, "init", "-q", "--bare", str(remote))
    _git(tmp_path, "init", "-q", str(work))
    _git(work, "commit", "-q", "--allow-empty", "-m", "c")
    _git(work, "remote", "add", "origin", str(remote))
    _git(work, "tag", "moeops@v0.1.0")  # already there before the run, and on the remote
    _git(work, "push", "-q", "origin", "HEAD:refs/heads/main", "--tags")
    _git(work, "tag", "unrelated-local")  # local only, before the run: must stay unpushed
    env = {"PATH": "/usr/bin:/bin", "RUNNER_TEMP": str(tmp), "HOME": str(tmp_path)}

    assert _run_step(steps[step_index(steps, runs('> "$RUNNER_TEMP/tags.before"'))], work, env).returncode == 0
    # what flows.promote does on promotion: register a version, assign the stage
    _git(work, "tag", "-a", "moeops@v0.2.0", "-m", "Registering version")
    _git(work, "tag", "-a", "moeops#champion#1", "-m", "Assigning stage")
    r = _run_step(steps[step_index(steps, runs("git push"))], work, env)
    assert r.returncode == 0, r.stderr
    pushed = subprocess.run(["git", "tag", "--list"], cwd=remote, capture_output=True, text=True).stdout.split()
    assert sorted(pushed) == ["moeops#champion#1", "moeops@v0.1.0", "moeops@v0.2.0"]
