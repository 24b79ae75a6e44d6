"""Start the pretrain workers: torchrun on this machine, DeepSpeed's runner across a hostfile.

The pretrain stage calls `launch(p, ["-m", "stages.pretrain", "--worker"])` when `needs_launcher(p)`;
each worker reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from its environment.

- No hostfile: `python -m torch.distributed.run --standalone` with world_size processes; when one
  dies, its agent stops the others.
- A hostfile (DeepSpeed format, `hostname slots=N`): `python -m deepspeed.launcher.runner`, which
  reaches other hosts with pdsh over ssh.
- After a failure `launch` relaunches the whole job, up to max_restarts times, and the workers resume
  from the last checkpoint by themselves. (Not torchrun's own --max-restarts: its restarted workers
  reuse the rendezvous store, and gloo then reads the dead workers' addresses from it.)

Everything that can be checked before a process starts is: the hostfile's syntax, its slots against
world_size, that every host resolves and answers on the ssh port, and that pdsh is there. Each
problem is one line (UserError). The job runs in its own process group; SIGTERM/SIGINT to the
stage are forwarded to it (a second one kills it), the job's first process gets SIGTERM should the
stage die without cleaning up (Linux), and whatever the job leaves behind is killed when it ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moeops.cli import UserError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_MASTER_PORT = 29500  # torch.distributed's default; DeepSpeed's too
SSH_PORT = 22
KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL of what a job leaves behind

_HOST_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>[+-]?\d+)")  # what DeepSpeed's runner accepts


def needs_launcher(p: Any) -> bool:
    """Whether pretraining must run under a launcher rather than in the stage's own process."""
    return p.world_size > 1 or p.max_restarts > 0 or bool(p.hostfile)


# ---------------------------------------------------------------- hostfile


def read_hostfile(path: str | os.PathLike[str], world_size: int | None = None) -> dict[str, int]:
    """Parse a DeepSpeed hostfile into {host: slots}, in file order.

    Lines are `hostname slots=N`; `#` starts a comment; blank lines are skipped. With `world_size`,
    the slots must add up to it. Any problem is a one-line UserError naming the file (and line)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"hostfile {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"hostfile {path}: not a text file") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.fullmatch(line)
        if not m:
            raise UserError(f"hostfile {path} line {n}: expected 'hostname slots=N', got {line!r}")
        host, slots = m["host"], int(m["slots"])
        if slots <= 0:
            raise UserError(f"hostfile {path} line {n}: slots must be >= 1, got {slots}")
        if host in hosts:
            raise UserError(f"hostfile {path} line {n}: duplicate host {host!r} (first on line {first_line[host]})")
        hosts[host] = slots
        first_line[host] = n
    if not hosts:
        raise UserError(f"hostfile {path}: no hosts (expected lines 'hostname slots=N')")
    if len(hosts) > 1:
        for host in hosts:
            if _is_loopback(host):
                raise UserError(f"hostfile {path} line {first_line[host]}: {host!r} in a hostfile of several hosts; "
                                "the other hosts cannot reach it, use this machine's name")
    if world_size is not None:
        total = sum(hosts.values())
        if total != world_size:
            listing = ", ".join(f"{h}={s}" for h, s in hosts.items())
            raise UserError(f"pretrain.world_size: {world_size} but hostfile {path} has {total} slots ({listing})")
    return hosts


def _is_loopback(host: str) -> bool:
    return host in LOCAL_NAMES or host.startswith("127.")


def is_local_host(host: str) -> bool:
    """localhost, 127.0.0.1, ::1 or this machine's hostname (short or full)."""
    if host in LOCAL_NAMES:
        return True
    name = socket.gethostname()
    return host in (name, name.split(".", 1)[0])


def _probe(host: str, port: int, timeout_s: float) -> str | None:
    """None if `host` resolves and accepts a TCP connection on `port`, else the reason it does not."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        return f"does not resolve: {getattr(e, 'strerror', None) or e}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer on port {port} within {timeout_s:g}s"
    except OSError as e:
        return f"port {port}: {e.strerror or e}"


def check_hosts(hosts: Iterable[str], port: int = SSH_PORT, timeout_s: float = 3.0,
                hostfile: str | os.PathLike[str] | None = None) -> None:
    """Refuse (UserError) the first host, in order, that does not resolve or accept a TCP connection
    on `port` (ssh: DeepSpeed's multi-node runner uses pdsh over ssh). This machine's names are
    always fine. Hosts are probed in parallel; each probe gives up after about `timeout_s`."""
    names = [h for h in hosts if not is_local_host(h)]
    results: dict[str, str | None] = {}

    def probe(h: str) -> None:
        results[h] = _probe(h, port, timeout_s)

    # Daemon threads: a resolver that hangs past the deadline is abandoned, not waited for at exit.
    threads = [threading.Thread(target=probe, args=(h,), daemon=True) for h in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2 * timeout_s + 1.0  # resolution, then the connection
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    where = f"hostfile {hostfile}: " if hostfile is not None else ""
    for h in names:
        reason = results.get(h, f"no answer within {2 * timeout_s + 1.0:g}s")
        if reason is not None:
            raise UserError(f"{where}host {h!r} is not reachable ({reason})")


# ---------------------------------------------------------------- commands


def _split_worker(worker_argv: Sequence[str]) -> tuple[bool, str, list[str]]:
    """(is_module, script or module, its arguments) of `[script, *args]` or `["-m", module, *args]`."""
    argv = list(worker_argv)
    if argv[:1] in (["-m"], ["--module"]):
        if len(argv) < 2:
            raise ValueError("worker_argv: '-m' needs a module name")
        return True, argv[1], argv[2:]
    if not argv or argv[0].startswith("-"):
        raise ValueError(f"worker_argv: expected [script, *args] or ['-m', module, *args], got {argv!r}")
    return False, argv[0], argv[1:]


def free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError:
        return DEFAULT_MASTER_PORT


def _multi_node(hosts: Mapping[str, int]) -> bool:
    return len(hosts) > 1 or not is_local_host(next(iter(hosts)))


def launch_command(p: Any, worker_argv: Sequence[str], hosts: Mapping[str, int] | None = None,
                   master_port: int | None = None) -> list[str]:
    """The command line that starts the job (see the module docstring).

    `worker_argv` is `[script.py, *args]` or `["-m", module, *args]`. With a hostfile, `hosts` is its
    parsed content (read here when not given) and `master_port` the rendezvous port (a free local
    port for a job on this machine, else 29500, when not given)."""
    is_module, target, args = _split_worker(worker_argv)
    if not p.hostfile:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(p.world_size), "--max-restarts", "0",
                "--monitor-interval", "1", *(["-m"] if is_module else []), target, *args]
    if hosts is None:
        hosts = read_hostfile(p.hostfile, p.world_size)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(p.hostfile)]
    if _multi_node(hosts):
        # The first host runs rank 0 and hosts the rendezvous; without --master_addr the runner would
        # ask it over ssh for `hostname -I`. --force_multi: a single remote host still goes through pdsh.
        first = next(iter(hosts))
        master = socket.gethostname() if is_local_host(first) else first
        port = master_port or (free_port() if is_local_host(first) else DEFAULT_MASTER_PORT)
        cmd += ["--master_addr", master, "--master_port", str(port), "--force_multi"]
    else:
        # This machine only: the runner would still try `ssh localhost` unless told not to.
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(master_port or free_port()), "--no_ssh_check"]
    # --no_local_rank: otherwise every worker gets a `--local_rank=N` argument (LOCAL_RANK is in its env).
    cmd += ["--no_local_rank", *(["--module"] if is_module else []), target, *args]
    return cmd


def _child_env(p: Any, hosts: Mapping[str, int] | None) -> dict[str, str]:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        if hosts is None:
            per_node = p.world_size
        else:
            local = [s for h, s in hosts.items() if is_local_host(h)]
            per_node = local[0] if local else max(hosts.values())
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // max(1, per_node)))
    return env


# ---------------------------------------------------------------- running


def _parent_death_hook():
    """A preexec_fn that has the kernel SIGTERM the child when this process dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _descendants(pid: int) -> list[Any]:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing, or the process is gone
        return []


def _kill_leftovers(leader: subprocess.Popen, seen: dict[int, Any], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the job's process group and every descendant seen while it ran (torchrun starts
    each worker in a session of its own) that still runs; SIGKILL what is left after `grace_s`.

    The group's id stays reserved while any member lives (the leader too, until reaped), so this
    cannot signal a stranger."""
    pgid = leader.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    alive = []
    for proc in seen.values():
        try:
            if proc.is_running():  # psutil: false also when the pid now belongs to another process
                proc.terminate()
                alive.append(proc)
        except Exception:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        leader.poll()  # reap the leader: a zombie still counts as a group member
        try:
            os.killpg(pgid, 0)
            group_alive = True
        except (ProcessLookupError, PermissionError):
            group_alive = False
        alive = [q for q in alive if _running(q)]
        if not group_alive and not alive:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for proc in alive:
        with contextlib.suppress(Exception):
            proc.kill()
    if leader.poll() is None:
        leader.kill()
        leader.wait()


def _running(proc: Any) -> bool:
    try:
        import psutil

        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _run(cmd: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> tuple[int, int | None]:
    """Run `cmd` in its own process group until it ends; (exit code, the signal that interrupted it or None).

    The first SIGTERM/SIGINT to this process is forwarded to the group; a second one SIGKILLs it."""
    received: list[int] = []
    proc = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, start_new_session=True,
                            preexec_fn=_parent_death_hook())

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum if len(received) == 1 else signal.SIGKILL)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    seen: dict[int, Any] = {}
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                for q in _descendants(proc.pid):
                    seen.setdefault(q.pid, q)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _kill_leftovers(proc, seen, grace_s=KILL_GRACE_S if proc.poll() is not None else 1.0)
    rc = proc.returncode
    if received and rc != 0:  # stopped on request: say by which signal, as a shell would
        rc = 128 + received[0]
    elif rc < 0:  # killed by a signal
        rc = 128 - rc
    return rc, (received[0] if received else None)


def launch(p: Any, worker_argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> int:
    """Validate, start the job (see the module docstring) in `cwd` (default: the current directory)
    with this process's stdout/stderr, wait for it, and return its exit code (128+N if a signal N
    stopped it)."""
    hosts = None
    if p.hostfile:
        hosts = read_hostfile(p.hostfile, p.world_size)
        if _multi_node(hosts):
            check_hosts(hosts, hostfile=p.hostfile)
            if shutil.which("pdsh") is None:
                raise UserError(f"hostfile {p.hostfile}: a job on other hosts needs pdsh on PATH "
                                "(DeepSpeed's runner reaches them with pdsh over ssh)")
    cmd = launch_command(p, worker_argv, hosts)
    env = _child_env(p, hosts)
    if hosts is None:
        print(f"pretrain: launching {p.world_size} processes (torchrun, max_restarts={p.max_restarts})", flush=True)
    else:
        where = f"{len(hosts)} hosts" if len(hosts) > 1 else f"host {next(iter(hosts))}"
        print(f"pretrain: launching {p.world_size} processes on {where} (deepspeed runner, hostfile {p.hostfile}, "
              f"max_restarts={p.max_restarts})", flush=True)
    attempt = 0
    while True:
        rc, sig = _run(cmd, env, cwd)
        if rc == 0 or sig is not None or attempt >= p.max_restarts:
            return rc
        attempt += 1
        print(f"pretrain: job exited with code {rc}; relaunching ({attempt}/{p.max_restarts})", flush=True)
        if hosts is None or not _multi_node(hosts):
            cmd = launch_command(p, worker_argv, hosts)  # a fresh free port: the old one may linger
