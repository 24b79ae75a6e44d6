"""Mirror registry promotions into GTO-style git tags, so `gto show` in a git repository agrees with the registry.

- `<name>@v<N>.0.0` registers registry version vN (GTO needs semver, so vN maps to vN.0.0), created once per version
  on the commit in lineage["git_commit"] ("-dirty" stripped) when the repo has it, else HEAD. GTO allows one version
  per commit, so when another version of `name` already sits on that commit the tag goes on a new commit with the
  same tree and that commit as parent (`git commit-tree`; no branch, index or working tree is touched).
- `<name>#prod#<K>` assigns the prod stage to that version, for every promote and every rollback (a rollback is an
  assignment of the older version again); K is one more than the highest counter of any `name` tag, as `gto` does.

GTO orders events by the tagger date, which has one-second resolution, and breaks ties by tag name ("#10" sorts
before "#2"), not by K. So every tag of `name` gets a tagger date strictly later than the newest existing one
(GIT_COMMITTER_DATE), at most a few seconds ahead of the clock when promotions come in quick succession.
Plain `git tag -a` is used (no gto import: it is slow to import and the registry needs no more of it).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

STAGE = "prod"
_FALLBACK_IDENTITY = {"GIT_COMMITTER_NAME": "moeops registry", "GIT_COMMITTER_EMAIL": "moeops-registry@localhost",
                      "GIT_AUTHOR_NAME": "moeops registry", "GIT_AUTHOR_EMAIL": "moeops-registry@localhost"}


class TagError(RuntimeError):
    pass


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
    if check and r.returncode:
        msg = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise TagError(f"git {args[0]}: {msg}")
    return r.stdout.strip() if r.returncode == 0 else ""


def gto_version(version: str) -> str:
    """Registry 'v3' -> GTO 'v3.0.0'."""
    return f"{version}.0.0"


def _env(repo: Path, when: int) -> dict[str, str]:
    env = {"GIT_COMMITTER_DATE": f"{when} +0000"}
    if not _git(repo, "config", "user.email", check=False):  # CI runners often have no identity
        env.update(_FALLBACK_IDENTITY)
    return env


def _tags(repo: Path, name: str) -> list[tuple[str, str, int]]:
    """(tag, peeled commit, tagger unix time) for every annotated tag of artifact `name`."""
    out = _git(repo, "for-each-ref", "--format=%(refname:strip=2) %(*objectname) %(taggerdate:unix)",
               f"refs/tags/{name}@*", f"refs/tags/{name}#*")
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():  # lightweight tags have no tagger date; GTO ignores them too
            rows.append((parts[0], parts[1], int(parts[2])))
    return rows


def tag_assignment(repo: str | Path, name: str, version: str, lineage: dict[str, Any], reason: str,
                   previous: str | None = None) -> list[str]:
    """Mirror "champion: previous -> version": write `name@vN.0.0` if missing, `name#prod!#K` unassigning
    `previous` (when GTO knows it), then `name#prod#K+1` assigning `version`. Returns the tags created."""
    repo = Path(repo)
    if not repo.is_dir():
        raise TagError("not a directory")
    _git(repo, "rev-parse", "--git-dir")  # raises "not a git repository"
    tags = _tags(repo, name)
    existing = {t: c for t, c, _ in tags}
    counter = max([int(m[1]) for t in existing if (m := re.fullmatch(r".*#(\d+)", t))], default=0)
    when = max([int(time.time())] + [t + 1 for _, _, t in tags])
    created = []

    def tag(tag: str, commit: str, message: str) -> None:
        nonlocal when
        _git(repo, "tag", "-a", tag, commit, "-m", message, env=_env(repo, when))
        created.append(tag)
        when += 1  # strictly increasing tagger dates: GTO orders events by them, at 1 s resolution

    vtag = f"{name}@{gto_version(version)}"
    commit = existing.get(vtag)
    if commit is None:
        want = str(lineage.get("git_commit") or "").removesuffix("-dirty")
        want = want if re.fullmatch(r"[0-9a-f]{4,64}", want) else ""
        commit = (want and _git(repo, "rev-parse", "--verify", "--quiet", f"{want}^{{commit}}", check=False)) or \
            _git(repo, "rev-parse", "--verify", "HEAD^{commit}")
        if any(re.fullmatch(rf"{re.escape(name)}@v\d+\.\d+\.\d+", t) and c == commit for t, c in existing.items()):
            commit = _git(repo, "commit-tree", f"{commit}^{{tree}}", "-p", commit, "-m",
                          f"moeops registry: {name} {version} (GTO allows one version per commit)",
                          env=_env(repo, when))
        tag(vtag, commit, f"Registering artifact {name} version {gto_version(version)}")
    prev_commit = existing.get(f"{name}@{gto_version(previous)}") if previous else None
    if prev_commit:  # so that GTO's semver-sorted views (`--sort semver`, the Python API) agree too
        counter += 1
        tag(f"{name}#{STAGE}!#{counter}", prev_commit,
            f"Unassigning stage {STAGE} from artifact {name} version {gto_version(previous)}: {reason}")
    counter += 1
    tag(f"{name}#{STAGE}#{counter}", commit,
        f"Assigning stage {STAGE} to artifact {name} version {gto_version(version)}: {reason}")
    return created
