"""Multi-process runs on one machine (``python -m lcnn_jax.launch``).

Fast tests drive the launcher with plain Python children (no JAX): a failing process stops the others with one
message and its exit code, signals reach every process, bad arguments exit 2 before anything starts. The slow
tests launch real ``lcnn-jax train`` / ``sweep`` processes with gloo CPU collectives and compare them with
one-process runs on the same global batch: parameters to 1e-5, every logged metric, each log record written once
(only process 0 writes), and a run whose process 1 is killed resumes to the same end.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lcnn_jax import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
LAUNCH = [sys.executable, "-m", "lcnn_jax.launch"]


def _pids(stderr_text: str) -> list[int]:
    m = re.search(r"pids ([0-9 ]+)", stderr_text)
    assert m, stderr_text
    return [int(p) for p in m.group(1).split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the launcher


def test_child_env_sets_coordinator_and_replaces_device_count():
    env = launch.child_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "A": "b"},
                           process_id=1, num_processes=3, port=1234, devices_per_process=2, platform="cpu")
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["JAX_PLATFORMS"], env["A"]) == ("3", "1", "cpu", "b")
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
    kept = launch.child_env({"XLA_FLAGS": "--x"}, process_id=0, num_processes=2, port=1, devices_per_process=4,
                            platform="inherit")
    assert kept["XLA_FLAGS"] == "--x" and "JAX_PLATFORMS" not in kept


@pytest.mark.parametrize("args, needle", [
    ([], "no command"),
    (["--num_processes", "0", "--", "true"], "--num_processes"),
    (["--devices_per_process", "0", "--", "true"], "--devices_per_process"),
    (["--", "no-such-command-xyz"], "not found"),
])
def test_bad_arguments_exit_2_before_starting_anything(capsys, args, needle):
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "launch: error" in err and "pids" not in err


FAIL_ONE = textwrap.dedent("""
    import os, sys, time
    if os.environ["JAX_PROCESS_ID"] == "1":
        time.sleep(0.3)
        print("process one fails here: MARKER-42", flush=True)
        sys.exit(3)
    time.sleep(60)
""")


def test_failing_process_stops_the_others_with_one_message(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run(LAUNCH + ["--num_processes", "3", "--log_dir", str(tmp_path), "--", sys.executable, "-c",
                                 FAIL_ONE], env=ENV, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 3, p.stderr
    assert took < 20  # not the 60 s the healthy processes would sleep
    lines = [l for l in p.stderr.splitlines() if l.startswith("launch: process") and " of 3 " in l]
    assert len(lines) == 1 and "process 1 of 3 exited with code 3" in lines[0]
    assert "stopped the other 2 process(es)" in lines[0]
    assert "MARKER-42" in p.stderr  # the end of the failing process's log
    assert "resume" in p.stderr  # exit 3 (diverged) is resumable
    assert not any(_alive(pid) for pid in _pids(p.stderr))


# Process 1 holds a lock as gloo holds its sockets: the kernel releases it when process 1 dies, and process 0,
# blocked on it as on a collective, fails at once with a long traceback (exit 1), often before the launcher saw
# process 1 end. Process 1 exits with code 3 or is killed by SIGKILL.
PEER_DIES = textwrap.dedent("""
    import fcntl, os, signal, sys, time
    d, how = sys.argv[1], sys.argv[2]
    lock = os.path.join(d, "lock")
    if os.environ["JAX_PROCESS_ID"] == "1":
        fh = open(lock, "w")
        fcntl.flock(fh, fcntl.LOCK_EX)
        open(os.path.join(d, "locked"), "w").close()
        print("process one fails here: MARKER-17", flush=True)
        time.sleep(0.5)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(3)
    print("process zero is training", flush=True)
    while not os.path.exists(os.path.join(d, "locked")):
        time.sleep(0.01)
    fcntl.flock(open(lock, "a"), fcntl.LOCK_EX)  # returns when process 1 is dead
    def collective(depth):
        if depth == 0:
            raise ValueError("UNKNOWN: Gloo all-reduce failed: Connection closed by peer")
        return collective(depth - 1)
    collective(20)
""")


@pytest.mark.parametrize("how, code, says", [("exit", 3, "exited with code 3"),
                                             ("kill", 128 + signal.SIGKILL, "was killed by SIGKILL")])
def test_survivor_traceback_is_one_line_and_the_failing_process_is_named(tmp_path, how, code, says):
    logs = tmp_path / "logs"
    p = subprocess.run(LAUNCH + ["--num_processes", "2", "--log_dir", str(logs), "--", sys.executable, "-c",
                                 PEER_DIES, str(tmp_path), how], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == code, p.stderr
    assert "process zero is training" in p.stdout  # process 0's output before the failure is shown as it comes
    out = p.stdout + p.stderr
    assert "Traceback" not in out and "Gloo" not in out and "collective(depth" not in out, out
    named = [l for l in p.stderr.splitlines() if "of 2" in l]
    assert len(named) == 1 and f"launch: process 1 of 2 {says}; stopped the other 1 process(es)." in named[0], out
    assert "MARKER-17" in p.stderr  # the failing process's own last lines
    stopped = [l for l in p.stderr.splitlines() if "process 0 stopped" in l]
    assert len(stopped) == 1 and stopped[0].startswith("launch: process 0 stopped after process 1 failed"), out
    assert str(logs / "process_0.log") in stopped[0]
    kept = (logs / "process_0.log").read_text()  # nothing is lost: process 0's whole output is in its log
    assert "process zero is training" in kept and "Traceback" in kept and "Gloo all-reduce failed" in kept
    assert len(p.stderr.splitlines()) <= 2 + launch.TAIL_LINES + 2


@pytest.mark.parametrize("failures, consequences, named", [
    ([(0, 1), (1, 3)], {0}, (1, 3)),  # process 1 exits 3; its sockets closed before it ended: 0 failed first
    ([(0, 1), (1, -9)], set(), (1, -9)),  # an uncaught error (code 1) beside a kill: the kill is the cause
    ([(0, 1), (1, 1)], {0}, (1, 1)),  # two crashes: the one whose log does not end in a collective's error
    ([(1, 1), (0, 1)], set(), (1, 1)),  # nothing to tell them apart: the first to end
    ([(1, 2), (0, 2)], set(), (0, 2)),  # a bad config fails everywhere: process 0, whose message is on screen
    ([(1, 3)], set(), (1, 3)),
])
def test_the_named_failure_is_the_cause_not_the_first_to_end(failures, consequences, named):
    assert launch._first_failure(failures, lambda i: i in consequences) == named


OWN_ERROR = textwrap.dedent("""
    import os, sys, time
    if os.environ["JAX_PROCESS_ID"] == "0":
        print("about to fail", flush=True)
        time.sleep(0.3)
        raise RuntimeError("process zero's own mistake: MARKER-99")
    time.sleep(60)
""")


def test_process_0_own_traceback_is_shown_in_full(tmp_path):
    p = subprocess.run(LAUNCH + ["--num_processes", "2", "--log_dir", str(tmp_path), "--", sys.executable, "-c",
                                 OWN_ERROR], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "Traceback (most recent call last)" in p.stderr and "RuntimeError: process zero's own mistake: MARKER-99" \
        in p.stderr
    assert p.stderr.index("MARKER-99") < p.stderr.index("launch: process 0 of 2 exited with code 1")
    assert "stopped after" not in p.stderr and "about to fail" in p.stdout


TRAP = textwrap.dedent("""
    import os, signal, sys, time
    d, i = sys.argv[1], os.environ["JAX_PROCESS_ID"]
    def on_int(signum, frame):
        open(os.path.join(d, f"got_{signum}_{i}"), "w").close()
        sys.exit(130)
    signal.signal(signal.SIGINT, on_int)
    open(os.path.join(d, f"ready_{i}"), "w").close()
    time.sleep(60)
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_reach_every_process_as_sigint(tmp_path, sig, code):
    p = subprocess.Popen(LAUNCH + ["--num_processes", "2", "--log_dir", str(tmp_path / "logs"), "--",
                                   sys.executable, "-c", TRAP, str(tmp_path)], env=ENV, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready_{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(sig)
    rc = p.wait(timeout=30)
    p.stderr.close()
    assert rc == code
    assert all((tmp_path / f"got_{int(signal.SIGINT)}_{i}").exists() for i in range(2))


def test_measure_refuses_to_run_as_one_of_several_processes(tmp_path, monkeypatch, capsys):
    from lcnn_jax.cli import main

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert main(["measure", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "process 1 of 2" in err and "lcnn_jax.launch" in err


# ------------------------------------------------------------------------------------------------ real runs

TINY = ["--config", os.path.join(REPO, "experiments/configs/quickstart.py"), "--config.model.name=mlp",
        "--config.model.kwargs.widths=(32,)", "--config.data.train_size=640", "--config.train.batch_size=32",
        "--config.optim.schedule=constant", "--config.train.log_every=5", "--config.train.progress=False",
        "--config.regularizers.datagrad.coeff=0.01"]
CLI = [sys.executable, "-m", "lcnn_jax"]


def _leaves(tree):
    import jax

    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _run_ok(cmd: list) -> subprocess.CompletedProcess:
    """Run ``cmd`` (the CLI, or the launcher in front of it) to completion and require exit code 0."""
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _max_diff(a, b) -> float:
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) and all(x.shape == y.shape for x, y in zip(la, lb))
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(la, lb))


def _log(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(l) for l in fh if l.strip()]


def _assert_same_log(a, b, tol=1e-5):
    assert [(r["step"], r.get("kind")) for r in a] == [(r["step"], r.get("kind")) for r in b]
    for ra, rb in zip(a, b):
        keys = set(ra) - {"wall_time_s"}
        assert keys == set(rb) - {"wall_time_s"}
        for k in keys:
            a, b = np.asarray(ra[k]), np.asarray(rb[k])
            if a.dtype.kind == "f":  # a float, or a list of them (one per sweep member)
                assert a.shape == b.shape and np.all(np.abs(a - b) <= tol * np.maximum(1.0, np.abs(a))), \
                    (ra["step"], k, ra[k], rb[k])
            else:
                assert ra[k] == rb[k], (k, ra[k], rb[k])


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_after_killing_one(tmp_path):
    from lcnn_jax import train as training

    args = TINY + ["--config.train.num_steps=100", "--config.train.checkpoint_every=10"]
    one, two, killed = (str(tmp_path / n) for n in ("one", "two", "killed"))
    _run_ok(CLI + ["train"] + args + ["--workdir", one])
    _run_ok(LAUNCH + ["--num_processes", "2", "--"] + CLI + ["train"] + args + ["--workdir", two])
    ref, got = training.load_trained(one), training.load_trained(two)
    assert _max_diff(ref[2].params, got[2].params) < 1e-5
    assert int(got[2].step) == 100
    _assert_same_log(_log(one), _log(two))  # every record once: process 1 wrote none
    r1, r2 = training.read_results(one), training.read_results(two)
    assert (r1["num_processes"], r2["num_processes"], r2["num_devices"]) == (1, 2, 2)
    for k in ("train_accuracy", "test_accuracy", "train_loss", "test_loss"):
        assert abs(r1[k] - r2[k]) < 1e-5, k

    # Kill process 1 once a checkpoint is on disk: the launcher stops process 0 and says so; a rerun resumes.
    proc = subprocess.Popen(LAUNCH + ["--num_processes", "2", "--"] + CLI + ["train"] + args + ["--workdir", killed],
                            env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first = proc.stderr.readline()
    pids = _pids(first)
    deadline = time.monotonic() + 300
    while not training.checkpoint_steps(killed):
        assert time.monotonic() < deadline and proc.poll() is None, first + proc.stderr.read()
        time.sleep(0.02)
    os.kill(pids[1], signal.SIGKILL)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    proc.stderr.close()
    assert rc == 128 + signal.SIGKILL, err
    assert "process 1 of 2 was killed by SIGKILL" in err and "resume" in err
    assert "Traceback" not in err and "all-reduce failed" not in err, err  # process 0's error: one line at most
    assert not any(_alive(pid) for pid in pids)
    stopped_at = training.checkpoint_steps(killed)[-1]
    assert stopped_at < 100
    _run_ok(LAUNCH + ["--num_processes", "2", "--"] + CLI + ["train"] + args + ["--workdir", killed])
    resumed = training.load_trained(killed)
    assert int(resumed[2].step) == 100
    assert _max_diff(ref[2].params, resumed[2].params) < 1e-5
    _assert_same_log(_log(one), _log(killed))


@pytest.mark.slow
def test_four_process_sweep_on_a_members_x_data_mesh_equals_one_process(tmp_path):
    """2 seeds on 4 processes of one device each: mesh members x data = 2 x 2, each member's batch split over two
    processes and the two members on different process pairs."""
    from lcnn_jax.train import sweep

    args = TINY + ["--config.train.num_steps=30", "--config.train.checkpoint_every=10",
                   "--config.sweep.seeds=(0,1)"]
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    _run_ok(CLI + ["sweep"] + args + ["--workdir", one])
    p = _run_ok(LAUNCH + ["--num_processes", "4", "--"] + CLI + ["sweep"] + args + ["--workdir", four])
    assert "mesh members x data = 2 x 2" in p.stdout
    ref, got = sweep.load_sweep(one)[2], sweep.load_sweep(four)[2]
    assert _max_diff(ref.params, got.params) < 1e-5
    _assert_same_log(_log(one), _log(four))
    with open(os.path.join(four, "sweep_results.json")) as fh:
        s4 = json.load(fh)
    with open(os.path.join(one, "sweep_results.json")) as fh:
        s1 = json.load(fh)
    assert s4["mesh"] == {"members": 2, "data": 2} and s4["num_processes"] == 4
    for a, b in zip(s1["members"], s4["members"]):
        assert abs(a["test_accuracy"] - b["test_accuracy"]) < 1e-5 and abs(a["test_loss"] - b["test_loss"]) < 1e-5
