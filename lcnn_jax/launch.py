"""Start one command as several JAX processes on this machine: multi-process training without a cluster.

    python -m lcnn_jax.launch --num_processes 2 [--devices_per_process 1] -- \\
        lcnn-jax train --config experiments/configs/quickstart.py --workdir runs/qs2

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which
:func:`lcnn_jax.train.maybe_initialize_distributed` (called first thing by ``lcnn-jax train`` / ``sweep``) hands
to ``jax.distributed.initialize``; process 0 hosts the coordinator. With ``--platform cpu`` (the default) each
process owns ``--devices_per_process`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``) and the
processes exchange gradients through gloo, JAX's CPU collectives. The global batch is the config's
``train.batch_size``, split over all ``num_processes x devices_per_process`` devices; the run computes what a
one-process run on the same global batch computes (to float32 all-reduce rounding).

Process 0's output goes to this terminal (stdout to stdout, stderr to stderr, relayed by the launcher) and to
``<log_dir>/process_0.log``; the others' to ``<log_dir>/process_<i>.log`` (a fresh temporary folder unless
``--log_dir``). Only process 0 writes results, configs and the metrics log; orbax writes the checkpoints from every
process as it expects. Ctrl-C (SIGINT) and SIGTERM reach every process as SIGINT, so each stops as after Ctrl-C
(JAX's distributed runtime takes a SIGTERM as a preemption notice and goes on); a second signal, or processes still
alive ``--grace`` seconds later, are killed. When any process exits with an error or is killed, the launcher kills
the others at once (they could not finish without it) and exits with that process's code after one message naming
it (with the end of its log when it is not process 0). The survivors' own errors (the collective that waited for
the dead process fails: a gloo traceback) are not shown: process 0's output from the failure on is held back and
replaced by one line saying where it is (``process_0.log``); a traceback process 0 prints is held until the
launcher knows whether it is process 0's own error (then shown in full) or a consequence of another's failure.
Rerunning the same command then resumes from the last checkpoint, as a one-process run does.

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
import threading
import time

__all__ = ["main", "child_env", "free_port"]

POLL_S = 0.1
TAIL_LINES = 20
HOLD_S = 2.0  # how long a traceback of process 0 is held back while no other process has failed
CAUSE_WAIT_S = 5.0  # how long a collective's error waits for the failure that caused it to show up
# Where process 0 starts printing an error: a Python traceback, or an absl ERROR / FATAL line (gloo, XLA).
_ERROR_START = re.compile(rb"Traceback \(most recent call last\)|^[EF]\d{4} \d\d:\d\d:\d\d", re.M)
# How a process reports that another one went away (the end of its log): the consequence, not the cause.
_COLLECTIVE_ERROR = re.compile(rb"Gloo \S+ failed|Connection (?:closed|reset) by peer|missed heartbeat|"
                               rb"distributed service detected fatal errors")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(base: dict, *, process_id: int, num_processes: int, port: int, devices_per_process: int,
              platform: str) -> dict:
    """The environment of process ``process_id``: ``base`` plus the coordinator variables and, for
    ``platform="cpu"``, ``JAX_PLATFORMS=cpu`` and the CPU device count in ``XLA_FLAGS`` (replacing one already
    there, keeping the other flags); ``PYTHONUNBUFFERED=1`` unless ``base`` sets it, so a killed process's last
    lines are in its log."""
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")  # output reaches the relay and the logs as it is printed
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
    """The started processes, each in its own session (a signal reaches exactly the processes it is sent to).

    One thread per process waits for it and records ``(index, return code)`` in ``exits`` in the order the
    processes ended: when a process dies and a survivor's collective fails a few milliseconds later, both may end
    within one poll interval, and only this order says which failed first."""

    def __init__(self, procs: list, logs: list):
        self.procs, self.logs = procs, logs
        self.exits: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        for i in range(len(procs)):
            threading.Thread(target=self._wait, args=(i,), daemon=True).start()

    def _wait(self, i: int) -> None:
        rc = self.procs[i].wait()
        with self._lock:
            self.exits.append((i, rc))

    def codes(self) -> list:
        """Each process's return code, None while it runs."""
        with self._lock:
            done = dict(self.exits)
        return [done.get(i) for i in range(len(self.procs))]

    def failures(self) -> list[tuple[int, int]]:
        """``(index, return code)`` of the processes that failed, first failure first."""
        with self._lock:
            return [(i, rc) for i, rc in self.exits if rc != 0]

    def peer_failed_first(self) -> bool:
        """Whether the first process to fail is not process 0 (whose output then is a consequence)."""
        f = self.failures()
        return bool(f) and f[0][0] != 0

    def send(self, sig: int) -> None:
        for p, c in zip(self.procs, self.codes()):
            if c is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def wait_all(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every process to exit; True when all did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(c is not None for c in self.codes()):
                return True
            time.sleep(POLL_S)
        return all(c is not None for c in self.codes())

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


def _write(dest, data: bytes) -> None:
    try:
        buf = getattr(dest, "buffer", None)
        if buf is None:  # a replaced sys.stdout / sys.stderr (pytest's capture, a notebook)
            dest.write(data.decode(errors="replace"))
        else:
            dest.flush()
            buf.write(data)
            buf.flush()
        dest.flush()
    except (OSError, ValueError):  # the terminal went away (a closed pipe): the log still has everything
        pass


class _Relay:
    """Copies process 0's stdout and stderr to this terminal's and, all of it, to ``process_0.log``.

    Output is forwarded as it comes (chunks, so a progress bar's carriage returns work) until an error starts
    (``_ERROR_START``) or another process has failed first; from then on it is held. The supervisor decides at
    the end: :meth:`release` shows it (process 0's own error, a success, a forwarded signal), :meth:`drop` leaves
    it in the log only (process 0 stopped because another process failed). A traceback held ``HOLD_S`` seconds
    while no process has failed is shown (a logged, caught error)."""

    def __init__(self, proc, log_path: str, group: _Group):
        self.group, self.log_path = group, log_path
        self.log = open(log_path, "wb")
        self.lock = threading.Lock()
        self.held: list[tuple[object, bytes]] = []
        self.held_since: float | None = None
        self.pinned = False  # held because another process failed: no timed release
        self.dropped = False  # the supervisor decided: nothing more is shown
        self.threads = [threading.Thread(target=self._pump, args=(pipe, dest), daemon=True)
                        for pipe, dest in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in self.threads:
            t.start()

    def _pump(self, pipe, dest) -> None:
        fd = pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            self._take(chunk, dest)
        pipe.close()

    def _take(self, chunk: bytes, dest) -> None:
        with self.lock:
            if not self.log.closed:
                self.log.write(chunk)
                self.log.flush()
            if self.dropped:
                return
            if not self.pinned and self.group.peer_failed_first():
                self.pinned = True
            if not self.pinned and self.held_since is None:
                m = _ERROR_START.search(chunk)
                if m is None:
                    _write(dest, chunk)
                    return
                if m.start():
                    _write(dest, chunk[:m.start()])
                chunk, self.held_since = chunk[m.start():], time.monotonic()
            self.held.append((dest, chunk))

    def hold(self) -> None:
        """Hold everything from now on (another process failed)."""
        with self.lock:
            self.pinned = True

    def tick(self) -> None:
        """Show a traceback held ``HOLD_S`` seconds while no process has failed."""
        with self.lock:
            if (self.held_since is not None and not self.pinned and time.monotonic() - self.held_since > HOLD_S
                    and not self.group.failures()):
                self._flush()

    def _flush(self) -> None:
        if self.dropped:
            return
        for dest, data in self.held:
            _write(dest, data)
        self.held, self.held_since, self.pinned = [], None, False

    def finish(self, timeout: float = 5.0) -> None:
        """Wait for the end of process 0's output (its pipes close when it exits)."""
        for t in self.threads:
            t.join(timeout)

    def release(self) -> None:
        with self.lock:
            self._flush()

    def drop(self) -> int:
        """Forget the held output (it is in the log); returns its number of lines."""
        with self.lock:
            data = b"".join(d for _, d in self.held)
            self.held, self.dropped = [], True
        return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)

    def close(self) -> None:
        with self.lock:
            self.log.close()


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

    received: list[int] = []
    group = relay = None  # set once every process has started; forward reads them when a signal comes

    def forward(signum, frame):  # noqa: ARG001
        if group is not None and received:  # a second signal: no more waiting
            group.send(signal.SIGKILL)
        elif group is not None:  # SIGINT for both: each stops at its next step as after Ctrl-C (JAX ignores SIGTERM)
            group.send(signal.SIGINT)
        received.append(signum)

    # The handlers go in before the first process starts: a signal that arrives while the processes start (a
    # process can be up and running before the launcher gets the CPU back) is forwarded once they all exist.
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        procs, logs = [], []
        for i in range(n):
            env = child_env(os.environ, process_id=i, num_processes=n, port=port, devices_per_process=m,
                            platform=args.platform)
            fh = None if i == 0 else open(os.path.join(log_dir, f"process_{i}.log"), "w")
            logs.append(fh)
            out = (fh, subprocess.STDOUT) if fh else (subprocess.PIPE, subprocess.PIPE)  # process 0: the relay
            procs.append(subprocess.Popen(command, env=env, stdout=out[0], stderr=out[1], start_new_session=True))
        group = _Group(procs, logs)
        relay = _Relay(procs[0], os.path.join(log_dir, "process_0.log"), group)
        if received:  # signalled while starting: forward it now
            group.send(signal.SIGINT)
        devices = f"{m} CPU device(s)" if args.platform == "cpu" else "the inherited platform"
        print(f"launch: {n} processes x {devices}, coordinator 127.0.0.1:{port}, pids "
              f"{' '.join(str(p.pid) for p in procs)}; logs (process_<i>.log) in {log_dir}", file=sys.stderr,
              flush=True)
        return _supervise(group, relay, args.grace, received, log_dir)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if relay is not None:
            relay.finish()
            relay.release()
            relay.close()
        if group is not None:
            group.close()


def _first_failure(failures: list[tuple[int, int]], consequence) -> tuple[int, int]:
    """The process to name among ``failures`` (``(index, return code)`` in the order they ended).

    The order alone can mislead: a process that fails releases its sockets while Python shuts down, and the
    survivor's collective may fail and exit first. So a failure is secondary when its log ends in a collective's
    error (``consequence(index)``, see ``_COLLECTIVE_ERROR``) or when it is an uncaught error (code 1) beside a
    failure with another code (a deliberate exit code or a signal); the first primary failure is named, unless
    process 0 failed too with the same deliberate exit code (2 bad usage, 3 diverged, 4 disk full: every process
    meets a bad config or a NaN loss at once, and process 0's message is already on the terminal)."""
    codes = {rc for _, rc in failures}
    primary = [(i, rc) for i, rc in failures if not (consequence(i) or (rc == 1 and codes - {1}))]
    first, rc = (primary or failures)[0]
    if first != 0 and rc > 1 and (0, rc) in failures:
        return 0, rc
    return first, rc


def _supervise(group: _Group, relay: _Relay, grace: float, received: list, log_dir: str) -> int:
    procs = group.procs
    signalled_at = None
    while True:
        codes = group.codes()
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
        if group.failures() and not received:
            if group.peer_failed_first():
                relay.hold()  # what process 0 prints now is the consequence (its collective fails)
            time.sleep(0.5)  # let simultaneous failures (a bad config fails in every process) land together
            logs = [relay.log_path] + [os.path.join(log_dir, f"process_{i}.log") for i in range(1, len(procs))]
            consequence = lambda i: bool(_COLLECTIVE_ERROR.search(_tail(logs[i]).encode()))  # noqa: E731
            first, rc = _first_failure(group.failures(), consequence)
            wait_until = time.monotonic() + CAUSE_WAIT_S
            while consequence(first) and None in group.codes() and time.monotonic() < wait_until:
                time.sleep(POLL_S)  # the process whose death broke the collective is still shutting down
                first, rc = _first_failure(group.failures(), consequence)
            if first != 0:
                relay.hold()
            group.kill()
            relay.finish()
            stopped = [i for i, c in enumerate(codes) if i != first and c != 0]  # codes when it was seen
            if first != 0 and 0 in stopped:
                lines = relay.drop()
                if lines:
                    print(f"launch: process 0 stopped after process {first} failed; its last {lines} line(s) (a "
                          f"collective's error) are in {relay.log_path}.", file=sys.stderr, flush=True)
            else:
                relay.release()  # process 0's own error, in full, before the message that names it
            how = f"was killed by {_signal_name(rc)}" if rc < 0 else f"exited with code {rc}"
            others = f"; stopped the other {len(stopped)} process(es)" if stopped else ""
            msg = f"launch: process {first} of {len(procs)} {how}{others}."
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
        relay.tick()
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
