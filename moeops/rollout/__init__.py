"""Progressive delivery (issue 12): the canary's analysis against Prometheus (analysis.py) and the quality probe
that scores held-out documents through both served versions (probe.py). flows/rollout.py walks the steps."""
