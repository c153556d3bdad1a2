"""Start one command as several JAX processes on this machine: multi-process training without a cluster.

    python -m lcnn_jax.launch --num_processes 2 [--devices_per_process 1] -- \\
        lcnn-jax train --config experiments/configs/quickstart.py --workdir runs/qs2

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which
:func:`lcnn_jax.training.maybe_initialize_distributed` (called first thing by ``lcnn-jax train`` / ``sweep``) hands
to ``jax.distributed.initialize``; process 0 hosts the coordinator. With ``--platform cpu`` (the default) each
process owns ``--devices_per_process`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``) and the
processes exchange gradients through gloo, JAX's CPU collectives. The global batch is the config's
``train.batch_size``, split over all ``num_processes x devices_per_process`` devices; the run computes what a
one-process run on the same global batch computes (to float32 all-reduce rounding).

Process 0's output goes to this terminal; the others' to ``<log_dir>/process_<i>.log`` (a fresh temporary folder
unless ``--log_dir``). Only process 0 writes results, configs and the metrics log; orbax writes the checkpoints
from every process as it expects. Ctrl-C (SIGINT) and SIGTERM reach every process as SIGINT, so each stops as
after Ctrl-C (JAX's distributed runtime takes a SIGTERM as a preemption notice and goes on); a second signal, or
processes still alive ``--grace`` seconds later, are killed. When any process exits with an error or is killed,
the launcher kills the others at once (they could not finish without it) and exits with that process's code after
one message naming it (with the end of its log when it is not process 0). Rerunning the same command then resumes
from the last checkpoint, as a one-process run does.

Exit codes: the failing process's (2 bad usage, 3 diverged, 4 disk full, 130 interrupted), 0 when all succeed;
128 + N when a process was killed by signal N, or after the launcher received signal N (130 Ctrl-C, 143 SIGTERM);
2 for bad launcher arguments (nothing started).

This is for one machine. On several hosts, start one process per host with the same three variables set (or
``LCNN_JAX_DISTRIBUTED=1`` on a cluster that JAX detects, such as SLURM).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

__all__ = ["main", "child_env", "free_port"]

POLL_S = 0.1
TAIL_LINES = 20


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(base: dict, *, process_id: int, num_processes: int, port: int, devices_per_process: int,
              platform: str) -> dict:
    """The environment of process ``process_id``: ``base`` plus the coordinator variables and, for
    ``platform="cpu"``, ``JAX_PLATFORMS=cpu`` and the CPU device count in ``XLA_FLAGS`` (replacing one already
    there, keeping the other flags)."""
    env = dict(base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    return env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lcnn_jax.launch",
        description="Run COMMAND as several JAX processes on this machine (coordinator on 127.0.0.1).",
        epilog="Example: python -m lcnn_jax.launch --num_processes 2 -- lcnn-jax train --config "
               "experiments/configs/quickstart.py --workdir runs/qs2")
    p.add_argument("--num_processes", type=int, default=2, help="number of JAX processes (default 2)")
    p.add_argument("--devices_per_process", type=int, default=1,
                   help="CPU devices each process owns (--platform cpu; default 1)")
    p.add_argument("--platform", choices=("cpu", "inherit"), default="cpu",
                   help="cpu: JAX_PLATFORMS=cpu and the device count above (default); inherit: leave the "
                        "environment's platform and XLA_FLAGS alone (e.g. one GPU per process chosen by the command)")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--log_dir", default=None, help="folder for process_<i>.log of processes 1.. (default: a new "
                                                   "temporary folder)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds the processes get to exit after a forwarded signal before they are killed "
                        "(default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- lcnn-jax train ...")
    return p


def _error(message: str) -> int:
    print(f"launch: error: {message}", file=sys.stderr, flush=True)
    return 2


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _tail(path: str, n: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + l for l in lines[-n:])


class _Group:
    """The started processes, each in its own session (a signal reaches exactly the processes it is sent to)."""

    def __init__(self, procs: list, logs: list):
        self.procs, self.logs = procs, logs

    def send(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def wait_all(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every process to exit; True when all did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(p.poll() is not None for p in self.procs):
                return True
            time.sleep(POLL_S)
        return all(p.poll() is not None for p in self.procs)

    def kill(self) -> None:
        """SIGKILL every live process and reap it. After a peer died the others cannot finish (their next
        collective would wait for it) and JAX's distributed runtime takes SIGTERM as a preemption notice, not as
        a request to exit; the checkpoints on disk are complete (orbax renames a finished save into place)."""
        self.send(signal.SIGKILL)
        self.wait_all(30.0)

    def close(self) -> None:
        for fh in self.logs:
            if fh is not None:
                fh.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    n, m = args.num_processes, args.devices_per_process
    if not command:
        return _error("no command given; put it after --, e.g. python -m lcnn_jax.launch --num_processes 2 -- "
                      "lcnn-jax train --config experiments/configs/quickstart.py --workdir runs/qs2")
    if n < 1:
        return _error(f"--num_processes must be >= 1, got {n}.")
    if m < 1:
        return _error(f"--devices_per_process must be >= 1, got {m}.")
    if not 0 <= args.port < 65536:
        return _error(f"--port must be in 0..65535, got {args.port}.")
    if shutil.which(command[0]) is None:
        return _error(f"command {command[0]!r} not found on PATH (is the virtual environment active?).")
    port = args.port or free_port()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="lcnn_jax_launch_")
    os.makedirs(log_dir, exist_ok=True)

    procs, logs = [], []
    for i in range(n):
        env = child_env(os.environ, process_id=i, num_processes=n, port=port, devices_per_process=m,
                        platform=args.platform)
        fh = None if i == 0 else open(os.path.join(log_dir, f"process_{i}.log"), "w")
        logs.append(fh)
        procs.append(subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT if fh else None,
                                      start_new_session=True))
    group = _Group(procs, logs)
    devices = f"{m} CPU device(s)" if args.platform == "cpu" else "the inherited platform"
    print(f"launch: {n} processes x {devices}, coordinator 127.0.0.1:{port}, pids "
          f"{' '.join(str(p.pid) for p in procs)}" + (f"; logs of processes 1-{n - 1} in {log_dir}" if n > 1 else ""),
          file=sys.stderr, flush=True)

    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        if received:  # a second signal: no more waiting
            group.send(signal.SIGKILL)
        else:  # SIGINT for both: each process stops at its next step as after Ctrl-C (JAX ignores SIGTERM)
            group.send(signal.SIGINT)
        received.append(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(group, args.grace, received, log_dir)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        group.close()


def _supervise(group: _Group, grace: float, received: list, log_dir: str) -> int:
    procs = group.procs
    signalled_at = None
    while True:
        codes = [p.poll() for p in procs]
        if received:
            if signalled_at is None:
                signalled_at = time.monotonic()
            if all(c is not None for c in codes):
                return 128 + int(received[0])
            if time.monotonic() - signalled_at > grace:
                group.send(signal.SIGKILL)
                group.wait_all(grace)
                print(f"launch: killed the processes still running {grace:g} s after the "
                      f"{signal.Signals(received[0]).name} that was forwarded to them.", file=sys.stderr, flush=True)
                return 128 + int(received[0])
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed and not received:
            time.sleep(0.5)  # let simultaneous failures (a bad config fails in every process) land together
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            first = 0 if 0 in failed else failed[0]
            rc = codes[first]
            alive = [i for i, c in enumerate(codes) if c is None]
            group.kill()
            how = f"was killed by {_signal_name(rc)}" if rc < 0 else f"exited with code {rc}"
            stopped = f"; stopped the other {len(alive)} process(es)" if alive else ""
            msg = f"launch: process {first} of {len(procs)} {how}{stopped}."
            if first != 0:
                log = os.path.join(log_dir, f"process_{first}.log")
                tail = _tail(log)
                msg += f" The end of its log ({log}):\n{tail}" if tail else f" Its log: {log} (empty)."
            if rc in (3, 4) or rc < 0 or rc == 130:
                msg += "\nRerun the same command to resume from the last checkpoint."
            print(msg, file=sys.stderr, flush=True)
            return _exit_code(rc)
        if all(c == 0 for c in codes):
            return 0
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
