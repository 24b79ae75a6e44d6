"""Prefect flows: pipeline (stages, gate, promotion), promote (gate.json -> registry), retrain (the served
schedule)."""

import os

# Without PREFECT_API_URL a flow runs on an ephemeral API server started in a subprocess. Prefect waits 20 s
# for it by default, less than it takes to start on a busy 2-core machine; a slow start is not an error.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
