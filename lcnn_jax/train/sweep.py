"""Vectorized ablations: a grid of (seed x regularizer coefficient) members trained as ONE compiled program.

Members are the product ``seeds x grid points``, seed-major. A grid key is a path into the regularizer states,
``"<regularizer name>.<state key>"`` (e.g. ``"datagrad.coeff"``; deeper keys as ``"clip.a.b"``), and member ``m``
is the run of the *base config with those values*: ``config.seed = m.seed`` and
``config.regularizers.<name>.<key> = value`` (see :func:`member_config`). That identity holds because coefficients
live in the regularizer state as float32 arrays (:mod:`lcnn_jax.regularizers.base`): every member shares the
model, optimizer and regularizer *structure*, and differs only in array values --

* the init key and step keys (``PRNGKey(seed)``, exactly as :func:`lcnn_jax.train.fit` derives them),
* the grid values written into its regularizer state,
* its data order (``data_order="per_seed"``, the default: member ``m`` sees the batches of ``fit`` with seed
  ``m.seed``, so **each member reproduces its single run** up to float reassociation, ~1e-6). With
  ``data_order="shared"`` every member sees the batch order of the base ``config.seed``; the batch is then sent once
  and broadcast to the members (``in_axes=None``) instead of stacked K times, which saves host work, transfer and
  device memory, but only the members with ``seed == config.seed`` then equal their single runs; the other seeds
  vary initialisation and step keys only.

The stacked state is a :class:`~lcnn_jax.train.state.TrainState` whose every leaf has a leading member axis ``K``;
the step is ``jax.jit(jax.vmap(step))`` of the very step ``fit`` compiles, so a sweep is one program whose cost
is about ``K x`` one step's FLOPs in one launch (see ``experiments/bench_sweep.py``). On CPU, a convolutional
net's members are instead computed one after another inside that program (``member_loop="auto"``, see
``MEMBER_LOOPS``, decided in :mod:`lcnn_jax.loops`): XLA:CPU runs a vmapped (grouped) convolution
several times slower than K plain ones.

Devices (:func:`sweep_layout`): a 2-D mesh ``("members", "data")`` over every device. The member axis of the
stacked state is split over ``gcd(K, devices)`` groups of devices (each group trains whole members: no gradient
all-reduce between groups) and each member's batch over the devices of its group (``fit``'s data parallelism). 8
seeds on 8 GPUs: one member per GPU; 2 seeds on 8: 2 groups of 4; 3 seeds on 8: one group, the batch split 8
ways. On one device all layouts are the same program. Several processes (:mod:`lcnn_jax.launch`) work the same
way: every process draws the same global batches and places its devices' slices; process 0 writes the files.

Divergence: the step freezes a member whose loss is not finite and records the step in its ``diverged_at``; the
other members go on. Results report it (``diverged``/``diverged_at``) and evaluate its last good parameters; the
aggregates leave it out. Each member's regularizer ``epoch_end`` hooks run on the host with that member's own epoch
accuracy (a diverged member's hooks are skipped, it stays frozen).

Files in ``workdir``: ``config.json`` (base config), ``sweep.json`` (the member list; a resume must match it),
``metrics.jsonl`` (one record per log step; every metric is a list over members), ``checkpoints/`` (the stacked
state, orbax), ``members/<id>/config.json`` and ``members/<id>/results.json`` (seed, grid values, accuracies,
losses, divergence) and ``sweep_results.json`` (all members, the diverged ids, mean/std over seeds per grid point).

Example::

    from lcnn_jax.train import sweep
    from experiments.configs import quickstart
    config = quickstart.get_config()
    config.regularizers = {"datagrad": {"coeff": 0.0}}
    res = sweep.fit_sweep(config, "/tmp/sweep", seeds=(0, 1, 2), grid={"datagrad.coeff": (0.0, 1e-3, 1e-2)})
    config, model, stacked, members = sweep.load_sweep("/tmp/sweep")
    state_of_member_4 = sweep.member_state(stacked, 4)      # an ordinary TrainState, for measurement

or, through the config convention (``config.sweep``), ``sweep.fit_sweep_from_config(config, workdir)``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax.errors import ConfigError
from lcnn_jax.io import write_json_atomic
from lcnn_jax.loops import check_member_loop
from lcnn_jax.train.distributed import is_primary, put_global, to_host
from lcnn_jax.train.evaluation import dead_network, evaluation_totals
from lcnn_jax.train.single import fit
from lcnn_jax.train.loop import LoopHooks, already_finished, apply_epoch_end_hooks, open_run, train_loop
from lcnn_jax.train.members import (DATA_ORDERS, Member, flatten_grid, init_stacked_state, jit_sweep_eval_step,
                                    jit_sweep_step, member_config, member_state, place_batch, place_state,
                                    resolve_member_loop, stack_states, sweep_layout, sweep_members,
                                    uses_convolution)
from lcnn_jax.train.rundir import (check_run_dir, check_workdir_is_ours, load_trained, read_config,
                                   restore_latest, template_state, workdir_lock)
from lcnn_jax.train.setup import RunSetup, prepare_run
from lcnn_jax.train.state import TrainState

__all__ = ["fit_sweep", "fit_sweep_from_config", "config_members", "single_run_conflict", "format_summary",
           "load_sweep", "SeedsRun", "train_seeds", "aggregate_members", "step_convolves"]

_log = logging.getLogger(__name__)


def _check_sweep_file(workdir: str, record: dict) -> None:
    """Refuse to resume a *different* sweep from ``workdir``'s checkpoints; write the member list otherwise."""
    path = os.path.join(workdir, "sweep.json")
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        if old != json.loads(json.dumps(record)):
            raise ConfigError(
                f"{workdir!r} holds a different sweep (seeds, grid or data order differ from {path}); its "
                f"checkpoints cannot be resumed by this one. Use a fresh workdir, or rerun the original sweep.")
    elif is_primary():
        write_json_atomic(path, record)


def _member_batches(split, members: Sequence[Member], batch_size: int, epoch: int, start_batch: int):
    """Per-seed data order: yield ``(K, B, ...)`` host batches, row ``m`` being the batch ``fit`` with seed
    ``members[m].seed`` draws at that step (seeds shared by several members are drawn once)."""
    from lcnn_jax import data as data_lib

    seeds = list(dict.fromkeys(m.seed for m in members))
    rows = [seeds.index(m.seed) for m in members]
    iters = [data_lib.batches(split, batch_size, seed=s, epoch=epoch, shuffle=True, drop_remainder=True,
                              start_batch=start_batch) for s in seeds]
    for per_seed in zip(*iters):
        yield {k: np.stack([per_seed[r][k] for r in rows]) for k in per_seed[0]}


def aggregate_members(member_results: Sequence[dict]) -> list[dict]:
    """Mean and sample std (ddof=1; 0 for one seed) over seeds of each grid point, diverged members left out."""
    groups: dict[str, list[dict]] = {}
    for r in member_results:
        groups.setdefault(json.dumps(r["grid"], sort_keys=True), []).append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if not r["diverged"]]
        row = {"grid": json.loads(key), "seeds": [r["seed"] for r in ok], "num_ok": len(ok),
               "num_diverged": len(rs) - len(ok)}
        for metric in ("test_accuracy", "test_loss", "train_accuracy", "train_loss"):
            vals = np.array([r[metric] for r in ok], np.float64)
            row[f"{metric}_mean"] = float(vals.mean()) if len(vals) else None
            row[f"{metric}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else None)
        out.append(row)
    return out


def step_convolves(setup: RunSetup, stacked: TrainState) -> bool:
    """Whether one member's forward pass (the eval step, traced on shapes only) convolves."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)
    n = 2
    batch = {"image": jax.ShapeDtypeStruct((n, *setup.train.images.shape[1:]), jnp.float32),
             "label": jax.ShapeDtypeStruct((n,), jnp.int32), "mask": jax.ShapeDtypeStruct((n,), jnp.float32)}
    return uses_convolution(setup.eval_fn, one, batch)


def fit_sweep(config, workdir: str, *, seeds: Sequence[int], grid: Mapping[str, Sequence[float]] | None = None,
              data_order: str = "per_seed", member_loop: str = "auto", allow_nonempty: bool = False) -> dict:
    """Train every member of ``seeds x grid`` as one jitted program and write the results to ``workdir``.

    Args:
      config: the base config (as for :func:`lcnn_jax.train.fit`); it must already use every regularizer the
        grid names (any coefficient; the grid overrides it per member).
      workdir: output directory; rerunning with the same ``workdir`` and the same sweep resumes from the last
        checkpoint of the stacked state and ends as an uninterrupted sweep would; rerunning a finished sweep
        writes nothing and returns its stored summary with ``already_finished: True``. The workdir is locked
        while training (a second process is refused), as for :func:`lcnn_jax.train.fit`.
      seeds: distinct non-negative integers; each is a member's ``config.seed`` (init key, step keys, data order).
      grid: ``{"<regularizer>.<state key>": values}`` (or the nested form ``{"datagrad": {"coeff": values}}``);
        None or empty: the seeds alone.
      data_order: ``"per_seed"`` (each member sees its own seed's batch order, reproducing its single run) or
        ``"shared"`` (all see ``config.seed``'s order; one batch broadcast to all members, cheaper).
      member_loop: how one compiled step computes the K members, ``"vmap"``, ``"unroll"`` or ``"auto"`` (the
        choice of :func:`lcnn_jax.loops.member_loop`: unroll for convolutional nets on CPU). The same values up
        to float error; not part of the run's identity (a sweep may resume with another loop). The choice is in
        the summary's ``member_loop``.
      allow_nonempty: train into an existing non-empty directory that the library did not write.

    Cost: one step costs about K times the single run's step in one compiled launch; host work per step is
    one batch per distinct seed (``per_seed``) or one batch (``shared``).

    Returns:
      The summary written to ``sweep_results.json``: ``members`` (one dict per member: ``index``, ``id``, ``seed``,
      ``grid``, ``diverged``, ``diverged_at``, train/test accuracy and loss, ``steps``), ``diverged`` (ids),
      ``aggregate`` (mean/std over the seeds of each grid point, diverged members left out), timing and layout.

    Raises:
      ConfigError: a bad config, seed list or grid key (message names it and lists the valid state paths), or a
        workdir holding a different sweep, a single run, or no readable checkpoint (``RunDirError``).
      lcnn_jax.data.DatasetError: the dataset cannot be found.
      lcnn_jax.errors.TrainingInterrupted, lcnn_jax.errors.NoSpaceLeft: Ctrl-C or a full disk; the last
        complete checkpoint is kept and rerunning resumes.

    A member whose network ends dead (one output for every input, or one class for 99 % of the training images)
    has ``dead: true`` in its results and a warning is logged: see :func:`lcnn_jax.train.evaluation.dead_network`.
    """
    from lcnn_jax.configs import resolve_paths, validate_config

    t_start = time.time()
    if data_order not in DATA_ORDERS:
        raise ConfigError(f"data_order={data_order!r} is unknown; use one of {DATA_ORDERS}.")
    check_member_loop(member_loop)  # before any work; resolved once the devices are known
    config = resolve_paths(config)
    validate_config(config)
    check_run_dir(config, workdir, kind="sweep")
    check_workdir_is_ours(workdir, allow_nonempty=allow_nonempty)
    members = sweep_members(seeds, grid)
    flat = flatten_grid(grid)
    record = {"seeds": [int(s) for s in seeds], "grid": {p: list(v) for p, v in flat.items()},
              "data_order": data_order,
              "members": [{"index": m.index, "id": m.id, "seed": m.seed, "grid": m.values} for m in members]}
    # data, model, regularizer and grid checks (the grid paths are checked against the regularizer states by
    # init_stacked_state): nothing is written before they pass
    setup = prepare_run(config)
    stacked = init_stacked_state(setup, members)
    with workdir_lock(workdir, enabled=is_primary()):
        _check_sweep_file(workdir, record)
        return _train_sweep(config, workdir, seeds, members, flat, data_order, member_loop, t_start, setup,
                            stacked)


def _train_sweep(config, workdir: str, seeds, members, flat, data_order: str, member_loop: str,
                 t_start: float, setup, stacked) -> dict:
    """:func:`fit_sweep` after its checks, with the workdir locked."""
    from lcnn_jax import data as data_lib

    tcfg, train, test, mesh = config.train, setup.train, setup.test, setup.mesh
    k = len(members)
    layout = sweep_layout(mesh, k)
    # orbax restores into the placed state's sharding, each process its own members
    stacked, run = open_run(workdir, config, place_state(stacked, layout),
                            start_of=lambda s: to_host(s.step)[0])
    finished = already_finished(run, setup.total_steps, "sweep_results.json", "sweep")
    if finished is not None:
        return finished

    shared = data_order == "shared"
    loop = resolve_member_loop(member_loop, layout, lambda: step_convolves(setup, stacked))
    train_step = jit_sweep_step(setup.step_fn, layout, shared_batch=shared, loop=loop)
    eval_step = jit_sweep_eval_step(setup.eval_fn, layout, loop=loop)
    n_data = layout.data_shards
    ev_bs = max(n_data, (int(tcfg.get("eval_batch_size", 500)) // n_data) * n_data)

    def epoch_batches(epoch, start_batch):
        if shared:
            it = data_lib.batches(train, setup.batch_size, seed=int(config.seed), epoch=epoch, shuffle=True,
                                  drop_remainder=True, start_batch=start_batch)
        else:
            it = _member_batches(train, members, setup.batch_size, epoch, start_batch)
        for b in it:
            yield place_batch(b, layout, shared=shared)

    def evaluate_all(st) -> dict:
        res = {}
        for name, split in (("train", train), ("test", test)):
            tot = evaluation_totals(lambda b: eval_step(st, place_batch(b, layout, shared=True)),
                                    split.images, split.labels, batch_size=ev_bs)
            n = np.maximum(tot["count"], 1.0)
            res[f"{name}_accuracy"] = (tot["correct"] / n).tolist()
            res[f"{name}_loss"] = (tot["loss_sum"] / n).tolist()
            if name == "train":  # a dead member (see lcnn_jax.train.evaluation.dead_network)
                counts = np.asarray(tot["pred_counts"]).reshape(k, -1)
                res["dead"] = [dead_network(float(a), float(b), c) for a, b, c in
                               zip(np.ravel(tot["logit_spread"]), np.ravel(tot["logit_scale"]), counts)]
        return res

    def run_eval(st, step):
        res = evaluate_all(st)
        run.log.write({"step": step, "kind": "eval", **res})
        return res

    reported: set[int] = set()

    def summarize(metrics):
        rec = {key: np.asarray(v).tolist() for key, v in to_host(metrics).items()}
        loss, acc = np.asarray(rec["loss"]), np.asarray(rec["accuracy"])
        ok = np.isfinite(loss)
        postfix = {"loss": f"{loss[ok].mean():.3f}" if ok.any() else "nan",
                   "acc": f"{acc[ok].mean():.3f}" if ok.any() else "nan", "diverged": len(reported)}
        return rec, postfix

    hooks = any(r.epoch_end is not None for r in setup.regularizers)

    def epoch_end(st, epoch):
        reset = put_global(np.zeros((k,), np.float32), layout.state)
        if not hooks:
            return st.replace(epoch_accuracy_sum=reset)
        acc_sum, bad, host = to_host((st.epoch_accuracy_sum, st.diverged_at, st.reg_state))
        acc = acc_sum / np.float32(setup.steps_per_epoch)
        diverged = bad >= 0
        per_member = []
        for i in range(k):
            mine = jax.tree.map(lambda a: jnp.asarray(a[i]), host)
            if not diverged[i]:  # a diverged member stays frozen, hooks included
                mine = apply_epoch_end_hooks(mine, setup.regularizers, jnp.asarray(acc[i]), epoch)
            per_member.append(mine)
        reg_state = jax.tree.map(lambda *a: jnp.stack(a), *per_member)
        return st.replace(reg_state=put_global(reg_state, layout.state), epoch_accuracy_sum=reset)

    def check(st, step):  # a sweep never stops for one member; it says so once per member
        bad = to_host(st.diverged_at)
        for i in np.flatnonzero(bad >= 0):
            if int(i) not in reported:
                reported.add(int(i))
                _log.warning("sweep member %s (seed %d, %s) diverged at step %d; it is frozen, the others go on.",
                             members[i].id, members[i].seed, members[i].values, int(bad[i]))

    stacked, step, train_time = train_loop(
        stacked, LoopHooks(epoch_batches=epoch_batches, train_step=train_step, epoch_end=epoch_end, check=check,
                           summarize=summarize, run_eval=run_eval),
        setup=setup, tcfg=tcfg, run=run, desc=f"sweep[{k}]")

    final = run_eval(stacked, step)
    diverged_at = to_host(stacked.diverged_at)
    member_results = []
    for m in members:
        bad = int(diverged_at[m.index])
        r = {"index": m.index, "id": m.id, "seed": m.seed, "grid": dict(m.values), "diverged": bad >= 0,
             "diverged_at": bad if bad >= 0 else None, "steps": step, "epochs": step / setup.steps_per_epoch,
             "num_train": len(train.images), "num_test": len(test.images),
             **{key: vals[m.index] for key, vals in final.items()}}
        member_results.append(r)
        if r.get("dead") and not r["diverged"]:
            _log.warning("sweep member %s (seed %d, %s) is dead: one output, or one class for 99 %% of the training "
                         "images (train accuracy %.3f); its smoothness measures describe a constant function.",
                         m.id, m.seed, m.values, r["train_accuracy"])
    summary = {"num_members": k, "members": member_results,
               "diverged": [r["id"] for r in member_results if r["diverged"]],
               "aggregate": aggregate_members(member_results), "seeds": [int(s) for s in seeds],
               "grid": {p: list(v) for p, v in flat.items()}, "data_order": data_order, "layout": layout.axis,
               "member_loop": loop,
               "mesh": {"members": layout.member_shards, "data": layout.data_shards},
               "num_processes": int(jax.process_count()),
               "steps": step, "wall_time_s": train_time, "total_time_s": time.time() - t_start,
               "num_devices": int(mesh.devices.size), "devices": str(jax.devices()[0].platform),
               "config": config.to_dict()}
    if is_primary():
        for m, r in zip(members, member_results):
            d = os.path.join(workdir, "members", m.id)
            os.makedirs(d, exist_ok=True)
            write_json_atomic(os.path.join(d, "config.json"), member_config(config, m).to_dict())
            write_json_atomic(os.path.join(d, "results.json"), {**r, "wall_time_s": train_time,
                                                                         "sweep_workdir": os.path.abspath(workdir)})
        write_json_atomic(os.path.join(workdir, "sweep_results.json"), summary)
    return summary


def _section_axes(config) -> tuple[tuple, Mapping | None, str]:
    """``(seeds, grid, data_order)`` of the config's ``sweep`` section (``seeds=()`` means ``(config.seed,)``)."""
    section = config.get("sweep") or {}
    seeds = tuple(section.get("seeds", ()) or ()) or (int(config.seed),)
    return seeds, section.get("grid") or None, section.get("data_order", "per_seed") or "per_seed"


def config_members(config) -> list[Member]:
    """The members the config's ``sweep`` section describes (what :func:`fit_sweep_from_config` trains).

    Raises:
      ConfigError: bad seeds or grid values."""
    seeds, grid, _ = _section_axes(config)
    return sweep_members(seeds, grid)


def single_run_conflict(config) -> str | None:
    """None when the ``sweep`` section describes just the run ``fit`` trains (no seeds or only ``config.seed``, no
    grid); otherwise what it asks for, in words, e.g. ``"sweep.seeds=(0, 1) x sweep.grid datagrad.coeff=(0.0,
    0.01): 4 members"``. ``fit`` reads no sweep section: ``lcnn-jax train`` uses this to refuse a config that asks
    for a sweep instead of silently training one run of it.

    Raises:
      ConfigError: bad seeds or grid values."""
    members = config_members(config)
    if len(members) == 1 and members[0].seed == int(config.seed) and not members[0].values:
        return None
    seeds, _, _ = _section_axes(config)
    parts = [f"sweep.seeds={tuple(int(s) for s in seeds)}"]
    parts += [f"sweep.grid {k}={v}" for k, v in flatten_grid(_section_axes(config)[1]).items()]
    return f"{' x '.join(parts)}: {len(members)} member{'s' * (len(members) != 1)}"


def fit_sweep_from_config(config, workdir: str, *, allow_nonempty: bool = False) -> dict:
    """:func:`fit_sweep` driven by the config's ``sweep`` section: ``config.sweep.seeds`` (``()`` means
    ``(config.seed,)``), ``config.sweep.grid`` (nested ``{name: {state_key: values}}``) and
    ``config.sweep.data_order``. E.g. ``--config.sweep.seeds="(0,1,2,3,4)"
    --config.sweep.grid.datagrad.coeff="(0.0,1e-3,1e-2)"``; this is ``lcnn-jax sweep``."""
    seeds, grid, data_order = _section_axes(config)
    return fit_sweep(config, workdir, seeds=seeds, grid=grid, data_order=data_order, allow_nonempty=allow_nonempty)


def format_summary(summary: dict, workdir: str, *, width: int = 120) -> str:
    """What ``lcnn-jax sweep`` prints: one row per member (id, seed, grid values, test / train accuracy in %,
    test loss, and ``diverged at N`` / ``dead`` where so), then, when there are several seeds, mean ± std over
    the seeds of each grid point (diverged members left out); limited to ``width`` characters, the files named."""
    from lcnn_jax.tables import format_table

    keys = list(summary.get("grid") or {})
    header = ["member", "seed"] + keys + ["test acc %", "train acc %", "test loss", "status"]
    rows = []
    for r in summary["members"]:
        status = (f"diverged at step {r['diverged_at']}" if r.get("diverged") else "dead" if r.get("dead") else "ok")
        rows.append([r["id"], str(r["seed"])] + [f"{r['grid'][k]:g}" for k in keys]
                    + [f"{100 * r['test_accuracy']:.2f}", f"{100 * r['train_accuracy']:.2f}", f"{r['test_loss']:.4f}",
                       status])
    text, hidden = format_table(header, rows, fixed=2 + len(keys), width=width)
    lines = [text]
    if len(summary.get("seeds", [])) > 1:
        agg_rows = []
        for a in summary["aggregate"]:
            point = ", ".join(f"{k}={a['grid'][k]:g}" for k in keys if k in a["grid"]) or "all members"
            mean, std = a["test_accuracy_mean"], a["test_accuracy_std"]
            tmean, tstd = a["train_accuracy_mean"], a["train_accuracy_std"]
            fmt = lambda m, s: "n/a" if m is None else f"{100 * m:.2f} ± {100 * s:.2f}"  # noqa: E731
            seeds = f"{a['num_ok']}" + (f" ({a['num_diverged']} diverged)" if a["num_diverged"] else "")
            agg_rows.append([point, seeds, fmt(mean, std), fmt(tmean, tstd)])
        agg, more = format_table(["grid point", "seeds", "test acc %", "train acc %"], agg_rows, width=width)
        hidden += more
        lines += ["", "mean ± std over seeds:", agg]
    if hidden:
        lines.append(f"(columns left out to fit {width} characters are in the files below)")
    lines.append(f"results: {workdir}/sweep_results.json, {workdir}/members/<id>/results.json")
    if summary.get("diverged"):
        lines.append(f"WARNING: member(s) {', '.join(summary['diverged'])} diverged; they were frozen at their last "
                     f"good step and are left out of the means.")
    return "\n".join(lines)


def load_sweep(workdir: str):
    """``(config, model, stacked_state, members)`` from a sweep's ``workdir`` (its latest checkpoint): the base
    config, the Flax model, the stacked :class:`~lcnn_jax.train.state.TrainState` (take one member with
    :func:`member_state`) and the :class:`Member` list."""
    config = read_config(workdir)
    path = os.path.join(workdir, "sweep.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No sweep in {workdir!r} (sweep.json missing): run fit_sweep there first.")
    with open(path) as fh:
        record = json.load(fh)
    members = [Member(int(m["index"]), m["id"], int(m["seed"]), dict(m["grid"])) for m in record["members"]]
    model, template, _ = template_state(config)
    stacked = restore_latest(workdir, stack_states([template] * len(members)), what="sweep")
    return config, model, stacked, members


class SeedsRun(NamedTuple):
    """What :func:`train_seeds` returns: the Flax ``model``, one :class:`~lcnn_jax.train.state.TrainState` per seed
    (in the order asked), ``trained_with`` (``"fit_sweep"`` or ``"fit"``), ``note`` (why the sweep was not used,
    or ``""``) and ``wall_s`` (seconds spent, loading included)."""
    model: object
    states: list
    trained_with: str
    note: str
    wall_s: float


def train_seeds(config, workdir: str, seeds: Sequence[int], *, use_sweep: bool = True) -> SeedsRun:
    """Train ``seeds`` of one config and return every seed's final state.

    First as one vmapped program (:func:`fit_sweep` in ``workdir``, which resumes an interrupted sweep and only
    reloads a finished one). Should the sweep raise (e.g. a model whose vmapped program does not fit in memory),
    the reason is logged and kept in ``note`` and each seed is trained alone with
    :func:`lcnn_jax.train.fit` in ``workdir/seed<N>`` (the same member config, so the same result up to float
    error; each resumable too). ``use_sweep=False`` goes straight to the per-seed runs."""
    t0 = time.time()
    seeds = tuple(int(s) for s in seeds)
    note = ""
    if use_sweep:
        try:
            fit_sweep(config, workdir, seeds=seeds)
            _, model, stacked, members = load_sweep(workdir)
            by_seed = {m.seed: m.index for m in members}
            states = [member_state(stacked, by_seed[s]) for s in seeds]
            return SeedsRun(model, states, "fit_sweep", note, time.time() - t0)
        except Exception as e:  # noqa: BLE001 -- reported in ``note``, then the per-seed fallback
            note = f"fit_sweep failed ({type(e).__name__}: {e}); fell back to one fit per seed"
            _log.warning(note)
    states, model = [], None
    for s in seeds:
        wd = os.path.join(workdir, f"seed{s}")
        fit(member_config(config, Member(0, "000", s, {})), wd)
        _, model, state, _ = load_trained(wd)
        states.append(state)
    return SeedsRun(model, states, "fit", note, time.time() - t0)
