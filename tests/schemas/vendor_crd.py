"""Vendor a CustomResourceDefinition's openAPIV3Schema as JSON for tests/test_k8s.py (offline validation).

    git -C <mirror of the upstream repo> show <tag>:<path to CRD yaml> | \
        python tests/schemas/vendor_crd.py <repo> <tag> <commit> <path> > tests/schemas/<kind>.json

Only the served version's openAPIV3Schema is kept, unchanged, plus a `$comment` naming where it came from and
Kubernetes' own `x-kubernetes-group-version-kind` so the test knows which apiVersion/kind it is for.
"""

from __future__ import annotations

import json
import sys

import yaml


def main(repo: str, tag: str, commit: str, path: str) -> None:
    crd = yaml.safe_load(sys.stdin)
    spec = crd["spec"]
    (version,) = [v for v in spec["versions"] if v.get("storage")]
    schema = version["schema"]["openAPIV3Schema"]
    header = {
        "$comment": f"openAPIV3Schema of {spec['names']['kind']} ({spec['group']}/{version['name']}) from "
                    f"github.com/{repo} {tag} (commit {commit}) {path}; vendored by tests/schemas/vendor_crd.py",
        "x-kubernetes-group-version-kind": [{"group": spec["group"], "version": version["name"],
                                             "kind": spec["names"]["kind"]}],
    }
    json.dump(header | schema, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
