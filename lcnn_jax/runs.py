"""What a ``--workdir`` holds, and which trained networks in it to load: the run-directory side of measuring.

A workdir is one of

* a **run** (:func:`lcnn_jax.train.fit`, ``lcnn-jax train``): ``config.json`` and ``checkpoints/``;
* a **sweep** (:func:`lcnn_jax.train.fit_sweep`, ``lcnn-jax sweep``): ``sweep.json`` lists its members, whose
  states are stacked in one checkpoint; ``members/<id>/`` holds each member's config and results;
* a **sweep member** folder ``<sweep>/members/<id>``: no checkpoint of its own, its state is in the sweep's;
* a **compare run** (``lcnn-jax compare``): one sweep per method under ``runs/``, its cells under ``cells/``.

:func:`inspect_workdir` reads the files (never a checkpoint) and lists the trained networks as
:class:`RunMember` s; :func:`select_members` picks the ones a user asked for (``member=`` an id, an index or
``"all"``; ``seed=``; ``method=``), raising :class:`MemberChoiceError` with the list of members when the choice
is missing, ambiguous or wrong; :func:`load_members` restores their states (a sweep's checkpoint once for all of
its members).

Example::

    from lcnn_jax import runs
    wd = runs.inspect_workdir("runs/sweep")                  # a sweep of 6 members
    print(wd.description)
    chosen = runs.select_members(wd, seed=1, member=None)    # MemberChoiceError if seed 1 is 3 members
    for member, config, model, state, info in runs.load_members(chosen):
        print(member.label, int(state.step))
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, NamedTuple, Sequence

from lcnn_jax.errors import MemberChoiceError

__all__ = ["RunMember", "Workdir", "MemberChoiceError", "inspect_workdir", "select_members", "load_members"]


class RunMember(NamedTuple):
    """One trained network of a workdir.

    Attributes:
      label: how to name it to a person, e.g. ``"member 001 (seed 0, datagrad.coeff=0.001)"``.
      run_dir: the directory whose checkpoints hold its state (the run, or the sweep).
      index: its position in the sweep's stacked state (None for a single run).
      id: the sweep's member id (``"001"``; None for a single run).
      seed: its ``config.seed``.
      values: its sweep-grid values (``{}`` when none).
      method: its compare method (None outside a compare run).
      out_dir: where its ``measures.json`` goes (the run's directory, or ``<sweep>/members/<id>``).
    """

    label: str
    run_dir: str
    index: int | None
    id: str | None
    seed: int
    values: dict
    method: str | None
    out_dir: str


class Workdir(NamedTuple):
    """What :func:`inspect_workdir` found: ``kind`` (``"run"``, ``"sweep"``, ``"member"`` or ``"compare"``), the
    ``path`` given, its ``members``, a one-line ``description`` and, for a compare run, its ``config`` (the
    compare config, whose ``compare.measure`` section is the default measurement setting)."""

    kind: str
    path: str
    members: list
    description: str
    config: object = None


# ----------------------------------------------------------------------------------------------------------
# Reading a workdir


def _read_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def _values_text(values: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _sweep_members(sweep_dir: str, method: str | None = None) -> list[RunMember]:
    """The members listed in ``sweep_dir/sweep.json``."""
    from lcnn_jax.errors import RunDirError

    record = _read_json(os.path.join(sweep_dir, "sweep.json"))
    if not isinstance(record, dict) or not isinstance(record.get("members"), list):
        raise RunDirError(f"{os.path.join(sweep_dir, 'sweep.json')} cannot be read, so the sweep's members are "
                          f"unknown; nothing was measured. Rerun the sweep's command to rewrite it.")
    out = []
    for m in record["members"]:
        values = dict(m.get("grid") or {})
        inner = ", ".join(filter(None, [f"seed {int(m['seed'])}", _values_text(values)]))
        label = f"{method}, seed {int(m['seed'])}" if method else f"member {m['id']} ({inner})"
        out.append(RunMember(label, sweep_dir, int(m["index"]), str(m["id"]), int(m["seed"]), values, method,
                             os.path.join(sweep_dir, "members", str(m["id"]))))
    return out


def _sweep_description(sweep_dir: str, members: Sequence[RunMember]) -> str:
    record = _read_json(os.path.join(sweep_dir, "sweep.json")) or {}
    grid = record.get("grid") or {}
    axes = [f"seeds {', '.join(str(s) for s in record.get('seeds', []))}"]
    axes += [f"{k} {', '.join(f'{v:g}' for v in vals)}" for k, vals in grid.items()]
    return f"a sweep of {len(members)} member{'s' * (len(members) != 1)} ({' x '.join(axes)})"


_RUN_NAME = re.compile(r"^(?P<method>.+)-(?P<fp>[0-9a-f]{10})-s[0-9_]+$")


def _compare_members(workdir: str, config) -> list[RunMember]:
    """One member per (method, seed) of a compare run: from its method sweeps under ``runs/``; where several
    sweeps hold the same cell (the config changed between invocations), the one its cell file names, else the
    newest."""
    cell_dirs = {}
    for path in _listdir(os.path.join(workdir, "cells")):
        for f in _listdir(os.path.join(workdir, "cells", path)):
            cell = _read_json(os.path.join(workdir, "cells", path, f))
            if isinstance(cell, dict) and cell.get("run_dir"):
                cell_dirs[(cell.get("method"), int(cell.get("seed", -1)))] = os.path.normpath(
                    os.path.join(workdir, cell["run_dir"]))
    found: dict = {}
    for name in _listdir(os.path.join(workdir, "runs")):
        run_dir = os.path.join(workdir, "runs", name)
        m = _RUN_NAME.match(name)
        if not m or not os.path.exists(os.path.join(run_dir, "sweep.json")):
            continue
        mtime = os.path.getmtime(os.path.join(run_dir, "sweep.json"))
        for member in _sweep_members(run_dir, method=m.group("method")):
            key = (member.method, member.seed)
            named = cell_dirs.get(key) == os.path.normpath(run_dir)
            rank = (named, mtime)
            if key not in found or rank > found[key][0]:
                found[key] = (rank, member)
    order = list(_compare_methods(config))
    members = [v[1] for v in found.values()]
    return sorted(members, key=lambda r: (order.index(r.method) if r.method in order else len(order), r.method,
                                          r.seed))


def _compare_methods(config) -> tuple:
    methods = (config.get("compare") or {}).get("methods", ()) if config is not None else ()
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    return tuple(methods)


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _sweep_of_member_dir(workdir: str) -> tuple[str, str] | None:
    """``(sweep_dir, member_id)`` when ``workdir`` is a sweep's ``members/<id>`` folder."""
    path = os.path.abspath(workdir)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "members" and os.path.exists(os.path.join(os.path.dirname(parent), "sweep.json")):
        return os.path.dirname(parent), os.path.basename(path)
    results = _read_json(os.path.join(workdir, "results.json"))
    if isinstance(results, dict) and results.get("sweep_workdir") and results.get("id") is not None and \
            os.path.exists(os.path.join(results["sweep_workdir"], "sweep.json")):
        return results["sweep_workdir"], str(results["id"])
    return None


def inspect_workdir(workdir: str) -> Workdir:
    """What ``workdir`` holds (see the module docstring), from its files alone.

    Raises:
      FileNotFoundError: nothing trained there (no ``config.json``).
      lcnn_jax.errors.RunDirError: ``workdir`` is a file, or its member list cannot be read.
    """
    from lcnn_jax.train import check_workdir_path, read_config

    check_workdir_path(workdir)
    if os.path.exists(os.path.join(workdir, "sweep.json")):
        members = _sweep_members(workdir)
        return Workdir("sweep", workdir, members, _sweep_description(workdir, members))
    owner = _sweep_of_member_dir(workdir)
    if owner is not None:
        sweep_dir, member_id = owner
        members = [m for m in _sweep_members(sweep_dir) if m.id == member_id]
        if not members:
            raise MemberChoiceError(f"{workdir} is a member folder of the sweep in {sweep_dir}, whose sweep.json "
                                    f"lists no member {member_id!r}; measure the sweep itself: "
                                    f"lcnn-jax measure --workdir {sweep_dir} --member all.")
        return Workdir("member", workdir, members, f"{members[0].label} of the sweep in {sweep_dir}")
    config = read_config(workdir)
    if "compare" in config and os.path.isdir(os.path.join(workdir, "runs")):
        members = _compare_members(workdir, config)
        methods = list(dict.fromkeys(m.method for m in members))
        return Workdir("compare", workdir, members,
                       f"a compare run with {len(members)} trained network{'s' * (len(members) != 1)} "
                       f"({len(methods)} method{'s' * (len(methods) != 1)}: {', '.join(methods) or 'none yet'})",
                       config)
    if "compare" in config:
        raise FileNotFoundError(f"{workdir} holds a compare config but no trained method yet (no runs/ folder): "
                                f"run `lcnn-jax compare --config ... --workdir {workdir}` first.")
    seed = int(config.get("seed", 0))
    return Workdir("run", workdir, [RunMember("the run", workdir, None, None, seed, {}, None, workdir)],
                   "a single training run")


# ----------------------------------------------------------------------------------------------------------
# Choosing


def _listing(members: Sequence[RunMember], limit: int = 24) -> str:
    names = [m.label for m in members[:limit]]
    more = f"; and {len(members) - limit} more" if len(members) > limit else ""
    return "; ".join(names) + more


def _how_to_choose(wd: Workdir) -> str:
    if wd.kind == "compare":
        return "Choose with --method NAME --seed N (e.g. --method " \
               f"{wd.members[0].method} --seed {wd.members[0].seed}), or measure every one with --member all."
    example = wd.members[0]
    return (f"Choose one with --member ID (e.g. --member {example.id}; the index works too), or --seed N where "
            f"a seed is one member, or measure every one with --member all.")


def select_members(wd: Workdir, *, member: str | int | None = None, seed: int | None = None,
                   method: str | None = None) -> list[RunMember]:
    """The members of ``wd`` to measure.

    ``member``: a sweep member's id (``"003"``) or index (``3``), or ``"all"`` (every member, of any kind of
    workdir); ``seed``: the members trained with that seed; ``method``: a compare run's members of that method.
    The selectors combine (``method`` and ``seed`` name one cell of a compare run). Without any selector, a
    workdir holding one network gives it; one holding several is a :class:`MemberChoiceError`.

    Raises:
      MemberChoiceError: no selector for several members, a selector that matches several (without ``"all"``)
        or none, or a selector the workdir's kind does not have; the message lists the members.
    """
    if not wd.members:
        raise MemberChoiceError(f"{wd.path} holds {wd.description}: there is nothing trained to measure yet.")
    everything = isinstance(member, str) and member.strip().lower() == "all"
    where = f"--workdir {wd.path} holds {wd.description}"
    if wd.kind == "run" and (seed is not None or method is not None or (member is not None and not everything)):
        raise MemberChoiceError(f"{where}; --member / --seed / --method choose among the members of a sweep or a "
                                f"compare run. Drop them to measure this run.")
    if method is not None and wd.kind != "compare":
        raise MemberChoiceError(f"{where}; --method chooses among the methods of a compare run. Members: "
                                f"{_listing(wd.members)}. {_how_to_choose(wd)}")
    if member is not None and not everything and wd.kind == "compare":
        raise MemberChoiceError(f"{where}; its networks are named by method and seed, not by member id: "
                                f"{_listing(wd.members)}. {_how_to_choose(wd)}")
    chosen = list(wd.members)
    asked = []
    if member is not None and not everything:
        text = str(member).strip()
        chosen = [m for m in chosen if m.id == text or (text.isdigit() and m.index == int(text))]
        asked.append(f"--member {text}")
    if seed is not None:
        chosen = [m for m in chosen if m.seed == int(seed)]
        asked.append(f"--seed {seed}")
    if method is not None:
        chosen = [m for m in chosen if m.method == method]
        asked.append(f"--method {method}")
    if not chosen:
        raise MemberChoiceError(f"{where}; none of them matches {' '.join(asked)}. Members: "
                                f"{_listing(wd.members)}. {_how_to_choose(wd)}")
    if len(chosen) > 1 and not everything:
        what = f"{' '.join(asked)} matches {len(chosen)} of them" if asked else "say which to measure"
        raise MemberChoiceError(f"{where}; {what}: {_listing(chosen)}. {_how_to_choose(wd)}")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Loading


def member_config(member: RunMember):
    """The training config of ``member``: the run's ``config.json``, or the sweep member's (written when the
    sweep finished; derived from the sweep's base config and ``sweep.json`` before that)."""
    from lcnn_jax import train as training

    if member.index is None:
        return training.read_config(member.run_dir)
    path = os.path.join(member.out_dir, "config.json")
    if os.path.exists(path):
        return training.read_config(member.out_dir)
    base = training.read_config(member.run_dir)
    return training.member_config(base, training.Member(member.index, member.id, member.seed, dict(member.values)))


def member_results(member: RunMember) -> dict | None:
    """The training results of ``member`` (``results.json`` of the run or of the sweep member), or None."""
    from lcnn_jax.train import read_results

    return read_results(member.out_dir)


def load_members(members: Sequence[RunMember]) -> Iterator[tuple]:
    """``(member, config, model, state, dataset_info)`` for each of ``members``, in order, from the newest intact
    checkpoint; a sweep's stacked checkpoint is restored once for all of its members that follow one another."""
    from lcnn_jax import data as data_lib
    from lcnn_jax import train as training
    from lcnn_jax.train import sweep

    loaded_dir, stacked, model = None, None, None
    for m in members:
        config = member_config(m)
        if m.index is None:
            _, model_m, state, info = training.load_trained(m.run_dir)
            yield m, config, model_m, state, info
            continue
        if loaded_dir != m.run_dir:
            _, model, stacked, _ = sweep.load_sweep(m.run_dir)
            loaded_dir = m.run_dir
        yield m, config, model, training.member_state(stacked, m.index), data_lib.dataset_info(config.data.name)
