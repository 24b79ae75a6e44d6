"""moeops.train.launch: hostfile checks, host reachability, command shapes, and small real torchrun jobs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moeops.cli import UserError
from moeops.config import PretrainParams
from moeops.train import launch as L


def params(**kw) -> PretrainParams:
    base = dict(flavor="debug", world_size=2, batch_size=4, seq_len=32, steps=10, warmup_steps=0)
    return PretrainParams(**{**base, **kw})


def hostfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hostfile"
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---------------------------------------------------------------- needs_launcher


@pytest.mark.parametrize("kw, expected", [
    (dict(world_size=1), False),
    (dict(world_size=2), True),
    (dict(world_size=1, max_restarts=1), True),
    (dict(world_size=1, hostfile="hosts"), True),
])
def test_needs_launcher(kw, expected):
    assert L.needs_launcher(params(**kw)) is expected


# ---------------------------------------------------------------- hostfile


def test_read_hostfile_good(tmp_path):
    path = hostfile(tmp_path, """\
        # two nodes
        worker-1 slots=4

        worker-0   slots=2   # the second one
    """)
    assert L.read_hostfile(path) == {"worker-1": 4, "worker-0": 2}
    assert list(L.read_hostfile(path, world_size=6)) == ["worker-1", "worker-0"]  # file order: rank 0 first


@pytest.mark.parametrize("text, message", [
    ("worker-0 slots 2\n", "hostfile {p} line 1: expected 'hostname slots=N', got 'worker-0 slots 2'"),
    ("# x\nworker-0\n", "hostfile {p} line 2: expected 'hostname slots=N', got 'worker-0'"),
    ("worker-0 slots=two\n", "hostfile {p} line 1: expected 'hostname slots=N', got 'worker-0 slots=two'"),
    ("worker-0 slots=2 gpus=1\n", "hostfile {p} line 1: expected 'hostname slots=N', got 'worker-0 slots=2 gpus=1'"),
    ("slots=2\n", "hostfile {p} line 1: expected 'hostname slots=N', got 'slots=2'"),
    ("worker-0 slots=0\n", "hostfile {p} line 1: slots must be >= 1, got 0"),
    ("worker-0 slots=-1\n", "hostfile {p} line 1: slots must be >= 1, got -1"),
    ("a slots=1\n\nb slots=1\na slots=1\n", "hostfile {p} line 4: duplicate host 'a' (first on line 1)"),
    ("# only comments\n\n", "hostfile {p}: no hosts (expected lines 'hostname slots=N')"),
    ("localhost slots=1\nworker-1 slots=1\n",
     "hostfile {p} line 1: 'localhost' in a hostfile of several hosts; the other hosts cannot reach it, "
     "use this machine's name"),
])
def test_read_hostfile_bad(tmp_path, text, message):
    path = hostfile(tmp_path, text)
    with pytest.raises(UserError) as e:
        L.read_hostfile(path)
    assert str(e.value) == message.format(p=path)


def test_read_hostfile_missing(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(UserError) as e:
        L.read_hostfile(path)
    assert str(e.value) == f"hostfile {path}: cannot read (No such file or directory)"


def test_hostfile_slots_must_sum_to_world_size(tmp_path):
    path = hostfile(tmp_path, "worker-0 slots=2\nworker-1 slots=1\n")
    with pytest.raises(UserError) as e:
        L.read_hostfile(path, world_size=4)
    assert str(e.value) == f"pretrain.world_size: 4 but hostfile {path} has 3 slots (worker-0=2, worker-1=1)"
    # launch refuses it the same way before anything starts
    with pytest.raises(UserError, match=r"^pretrain\.world_size: 4 but hostfile"):
        L.launch(params(world_size=4, hostfile=path), ["-m", "x"])


# ---------------------------------------------------------------- hosts


def test_check_hosts_local_names_always_fine():
    import socket

    L.check_hosts(["localhost", "127.0.0.1", socket.gethostname()], port=1, timeout_s=0.5)


def test_check_hosts_unresolvable():
    with pytest.raises(UserError) as e:
        L.check_hosts(["localhost", "nohost.invalid"], hostfile="hosts.txt")
    assert re.fullmatch(r"hostfile hosts\.txt: host 'nohost\.invalid' is not reachable \(does not resolve: .+\)",
                        str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


def test_check_hosts_closed_port():
    # 127.0.0.2 is this machine's loopback too, but not one of the names taken on trust
    with pytest.raises(UserError) as e:
        L.check_hosts(["127.0.0.2"], port=1, timeout_s=2.0, hostfile="hosts.txt")
    assert str(e.value) == "hostfile hosts.txt: host '127.0.0.2' is not reachable (port 1: Connection refused)"


def test_unreachable_host_refused_before_anything_starts(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    path = hostfile(tmp_path, "nohost.invalid slots=2\n")
    with pytest.raises(UserError, match=rf"^hostfile {re.escape(path)}: host 'nohost\.invalid' is not reachable"):
        L.launch(params(hostfile=path), ["-m", "stages.pretrain", "--worker"])
    assert started == []


# ---------------------------------------------------------------- commands


def test_launch_command_torchrun():
    p = params(world_size=2, max_restarts=3)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", "0", "--monitor-interval", "1"]
    assert L.launch_command(p, ["-m", "stages.pretrain", "--worker"]) == [*head, "-m", "stages.pretrain", "--worker"]
    assert L.launch_command(p, ["/x/w.py", "a"]) == [*head, "/x/w.py", "a"]


def test_launch_command_deepspeed_this_machine(tmp_path):
    path = hostfile(tmp_path, "localhost slots=2\n")
    cmd = L.launch_command(params(hostfile=path), ["-m", "stages.pretrain", "--worker"], master_port=29600)
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", path,
                   "--master_addr", "127.0.0.1", "--master_port", "29600", "--no_ssh_check",
                   "--no_local_rank", "--module", "stages.pretrain", "--worker"]
    port = L.launch_command(params(hostfile=path), ["w.py"])[8]
    assert 0 < int(port) < 65536


def test_launch_command_deepspeed_several_hosts(tmp_path):
    path = hostfile(tmp_path, "node-a slots=1\nnode-b slots=1\n")
    cmd = L.launch_command(params(hostfile=path), ["/x/w.py", "--y"])
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", path,
                   "--master_addr", "node-a", "--master_port", "29500", "--force_multi",
                   "--no_local_rank", "/x/w.py", "--y"]


@pytest.mark.parametrize("argv", [[], ["-m"], ["--worker"]])
def test_launch_command_bad_worker_argv(argv):
    with pytest.raises(ValueError, match="worker_argv"):
        L.launch_command(params(), argv)


# ---------------------------------------------------------------- real jobs (torchrun, 2 processes)

WORKER = """\
import os, sys
rank = os.environ["RANK"]
print(f"rank {rank}/{os.environ['WORLD_SIZE']} local={os.environ['LOCAL_RANK']} "
      f"omp={os.environ['OMP_NUM_THREADS']} args={sys.argv[1:]}", flush=True)
marker = sys.argv[1] if len(sys.argv) > 1 else None
if marker and rank == "0" and not os.path.exists(marker):  # fail on the first attempt only
    open(marker, "w").close()
    sys.exit(3)
"""


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return str(path)


def test_launch_two_ranks(worker, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert L.launch(params(world_size=2), [worker], cwd=tmp_path) == 0
    out = capfd.readouterr().out
    assert "pretrain: launching 2 processes (torchrun, max_restarts=0)" in out
    omp = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"rank 0/2 local=0 omp={omp} args=[]" in out
    assert f"rank 1/2 local=1 omp={omp} args=[]" in out


def test_launch_restarts_after_a_crash(worker, tmp_path, capfd):
    marker = str(tmp_path / "crashed-once")
    assert L.launch(params(world_size=2, max_restarts=1), [worker, marker], cwd=tmp_path) == 0
    assert os.path.exists(marker)
    assert capfd.readouterr().out.count("rank 0/2") == 2  # first attempt, then the restart

    os.remove(marker)
    assert L.launch(params(world_size=2, max_restarts=0), [worker, marker], cwd=tmp_path) != 0


def test_sigterm_stops_the_whole_job(tmp_path):
    """A SIGTERM to the stage reaches the workers (torchrun starts each in its own session): none is left."""
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(f"import os, time\nopen(os.path.join({str(tmp_path)!r}, 'pid.' + os.environ['RANK']), 'w')"
                       ".write(str(os.getpid()))\ntime.sleep(120)\n")
    driver = ("import sys\nfrom moeops.config import PretrainParams\nfrom moeops.train.launch import launch\n"
              "p = PretrainParams(flavor='debug', world_size=2, batch_size=4, seq_len=32, warmup_steps=0)\n"
              f"sys.exit(launch(p, [{str(sleeper)!r}]))\n")
    stage = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pidfiles = [tmp_path / "pid.0", tmp_path / "pid.1"]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pidfiles):
        assert time.monotonic() < deadline and stage.poll() is None, "workers did not start"
        time.sleep(0.2)
    pids = [int(f.read_text()) for f in pidfiles]
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
