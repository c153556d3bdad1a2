"""What a new user hit on a fresh clone (issue 28, item 5): a workdir lock held for the life of the training
process, refusal of a foreign non-empty directory, a finished run that a rerun leaves byte-identical, a model file
named by a relative path that still resolves from elsewhere, and every bad override reported in one message."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from lcnn_jax import cli, configs
from lcnn_jax import train as training
from lcnn_jax.errors import ConfigError, RunDirError
from lcnn_jax.train.rundir import LOCK_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "configs", "quickstart.py")


def test_a_second_lock_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    wd = str(tmp_path / "run")
    with training.workdir_lock(wd):
        with pytest.raises(RunDirError) as e:  # another open file description: flock refuses it as it would
            with training.workdir_lock(wd):    # refuse another process
                pass
        msg = str(e.value)
        assert f"process {os.getpid()} on host {socket.gethostname()}" in msg and "nothing was written" in msg
    with training.workdir_lock(wd):  # released at the end of the block
        pass
    with training.workdir_lock(wd, enabled=False):  # processes other than 0 of a multi-process run
        with training.workdir_lock(wd):
            pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    wd = str(tmp_path / "run")
    code = textwrap.dedent(f"""
        import sys, time
        from lcnn_jax.train.rundir import workdir_lock
        with workdir_lock({wd!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"process {proc.pid} on host"):
            with training.workdir_lock(wd):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert os.path.exists(os.path.join(wd, LOCK_FILE))  # the file stays, the lock does not
    with training.workdir_lock(wd):
        pass


def test_train_refuses_a_foreign_nonempty_directory_before_writing(tmp_path, capsys):
    wd = tmp_path / "project"
    wd.mkdir()
    for name in ("notes.txt", "data.csv"):
        (wd / name).write_text("mine\n")
    rc = cli.main(["train", "--config", QUICKSTART, "--workdir", str(wd)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds other files (data.csv, notes.txt)" in err and "--allow_nonempty" in err
    assert sorted(os.listdir(wd)) == ["data.csv", "notes.txt"]  # nothing written, not even a lock file
    training.check_workdir_is_ours(str(wd), allow_nonempty=True)  # the user says so: accepted
    training.check_workdir_is_ours(str(tmp_path / "new"))  # missing or empty directories are fine
    (tmp_path / "empty").mkdir()
    training.check_workdir_is_ours(str(tmp_path / "empty"))
    (wd / "config.json").write_text("{}")  # a run directory (a run's own files) is ours
    training.check_workdir_is_ours(str(wd))


def test_every_bad_override_in_one_message(capsys):
    config = configs.default_config()
    with pytest.raises(ConfigError) as e:
        configs.apply_overrides(config, ["optim.lerning_rate=0.1", "train.batch_size=64", "train.bogus=1",
                                         "nonsense", "train.batch_size.x=3"])
    msg = str(e.value)
    assert msg.startswith("4 overrides are invalid")
    for needle in ("'optim.lerning_rate'", "'train.bogus'", "'nonsense' is not of the form key=value",
                   "'train.batch_size' is a value, not a section"):
        assert needle in msg, needle
    assert config.train.batch_size == 64  # the good one was applied
    rc = cli.main(["train", "--config", QUICKSTART, "--workdir", "/nonexistent/never", "--config.a=1",
                   "--config.b=2", "--config.train.num_epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "'a'" in err and "'b'" in err


def test_relative_model_paths_are_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "models.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    config = configs.default_config()
    config.model.name = "models.py:Net"
    resolved = configs.resolve_paths(config)
    assert resolved.model.name == f"{tmp_path / 'models.py'}:Net" and config.model.name == "models.py:Net"
    for name in ("mlp", "my_pkg.models:Net", "missing.py:Net", f"{tmp_path}/models.py:Net"):
        config.model.name = name
        assert configs.resolve_paths(config).model.name == name  # nothing else changes
    # a config.json written before paths were resolved still matches the resolved config
    old = configs.default_config().to_dict()
    old["model"]["name"] = "models.py:Net"
    new = configs.default_config()
    new.model.name = f"{tmp_path / 'models.py'}:Net"
    assert training.config_differences(old, new.to_dict()) == {}


def _digests(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f == LOCK_FILE:  # the lock's own record of its holder (pid, host, start), rewritten by each holder
                continue
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.slow
def test_rerunning_a_finished_run_changes_nothing(tmp_path, monkeypatch, capsys):
    """Trains a 6-step MLP defined in a file named by a relative path, from another directory than the test's."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "nets.py").write_text(textwrap.dedent("""
        import flax.linen as nn

        class Tiny(nn.Module):
            num_classes: int = 10

            @nn.compact
            def __call__(self, x):
                return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
    """))
    monkeypatch.chdir(tmp_path / "src")
    args = ["train", "--config", QUICKSTART, "--workdir", str(tmp_path / "run"), "--config.model.name=nets.py:Tiny",
            "--config.model.kwargs={}", "--config.data.train_size=320", "--config.train.num_steps=6",
            "--config.train.batch_size=64", "--config.train.checkpoint_every=3", "--config.train.progress=False"]
    assert cli.main(args) == 0
    stored = json.load(open(tmp_path / "run" / "config.json"))
    assert stored["model"]["name"] == f"{tmp_path / 'src' / 'nets.py'}:Tiny"
    before = _digests(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "already finished" in capsys.readouterr().out
    assert _digests(tmp_path / "run") == before  # byte-identical: no timings rewritten, no eval record appended
    monkeypatch.chdir(tmp_path)  # the run's model resolves from anywhere
    config, model, state, info = training.load_trained(str(tmp_path / "run"))
    assert type(model).__name__ == "Tiny"
