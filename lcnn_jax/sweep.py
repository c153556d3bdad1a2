"""Vectorized ablations: a grid of (seed x regularizer coefficient) members trained as ONE compiled program.

Members are the product ``seeds x grid points``, seed-major. A grid key is a path into the regularizer states,
``"<regularizer name>.<state key>"`` (e.g. ``"datagrad.coeff"``; deeper keys as ``"clip.a.b"``), and member ``m``
is the run of the *base config with those values*: ``config.seed = m.seed`` and
``config.regularizers.<name>.<key> = value`` (see :func:`member_config`). That identity holds because coefficients
live in the regularizer state as float32 arrays (:mod:`lcnn_jax.regularizers.base`): every member shares the
model, optimizer and regularizer *structure*, and differs only in array values --

* the init key and step keys (``PRNGKey(seed)``, exactly as :func:`lcnn_jax.training.fit` derives them),
* the grid values written into its regularizer state,
* its data order (``data_order="per_seed"``, the default: member ``m`` sees the batches of ``fit`` with seed
  ``m.seed``, so **each member reproduces its single run** up to float reassociation, ~1e-6). With
  ``data_order="shared"`` every member sees the batch order of the base ``config.seed``; the batch is then sent once
  and broadcast to the members (``in_axes=None``) instead of stacked K times, which saves host work, transfer and
  device memory, but only the members with ``seed == config.seed`` then equal their single runs; the other seeds
  vary initialisation and step keys only.

The stacked state is a :class:`~lcnn_jax.training.TrainState` whose every leaf has a leading member axis ``K``;
the step is ``jax.jit(jax.vmap(step))`` of the very step ``fit`` compiles, so a sweep is one program whose cost
is about ``K x`` one step's FLOPs in one launch (see ``experiments/bench_sweep.py``). On CPU, a convolutional
net's members are instead computed one after another inside that program (``member_loop="auto"``, see
``MEMBER_LOOPS``): XLA:CPU runs a vmapped (grouped) convolution several times slower than K plain ones.

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

    from lcnn_jax import sweep
    from experiments.configs import quickstart
    config = quickstart.get_config()
    config.regularizers = {"datagrad": {"coeff": 0.0}}
    res = sweep.fit_sweep(config, "/tmp/sweep", seeds=(0, 1, 2), grid={"datagrad.coeff": (0.0, 1e-3, 1e-2)})
    config, model, stacked, members = sweep.load_sweep("/tmp/sweep")
    state_of_member_4 = sweep.member_state(stacked, 4)      # an ordinary TrainState, for measurement

or, through the config convention (``config.sweep``), ``sweep.fit_sweep_from_config(config, workdir)``.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import time
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcnn_jax import training
from lcnn_jax.training import ConfigError, TrainState

__all__ = [
    "Member",
    "SweepLayout",
    "flatten_grid",
    "sweep_members",
    "member_config",
    "init_member_state",
    "init_stacked_state",
    "stack_states",
    "member_state",
    "num_members",
    "sweep_layout",
    "place_state",
    "place_batch",
    "jit_sweep_step",
    "jit_sweep_eval_step",
    "MEMBER_LOOPS",
    "map_members",
    "resolve_member_loop",
    "uses_convolution",
    "fit_sweep",
    "fit_sweep_from_config",
    "config_members",
    "single_run_conflict",
    "format_summary",
    "load_sweep",
    "SeedsRun",
    "train_seeds",
]

DATA_ORDERS = ("per_seed", "shared")
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Members


class Member(NamedTuple):
    """One member of a sweep: position ``index`` in the stacked state, directory name ``id``, its ``seed`` and its
    grid ``values`` (``{"datagrad.coeff": 0.01, ...}``)."""

    index: int
    id: str
    seed: int
    values: dict


def flatten_grid(grid: Mapping | None) -> dict[str, tuple[float, ...]]:
    """``{"a.coeff": (...)}`` or nested ``{"a": {"coeff": (...)}}`` (a config's ``sweep.grid``) ->
    ``{"a.coeff": (floats...)}`` in insertion order. A scalar value is a one-point axis."""
    out: dict[str, tuple[float, ...]] = {}

    def walk(prefix: str, node):
        items = node.items() if hasattr(node, "items") else None
        if items is not None:
            for k, v in items:
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        if "." not in prefix:
            raise ConfigError(f"sweep grid key {prefix!r} must be a regularizer-state path "
                              f"'<regularizer>.<state key>', e.g. 'datagrad.coeff'.")
        values = tuple(node) if isinstance(node, (list, tuple, np.ndarray)) else (node,)
        if not values:
            raise ConfigError(f"sweep grid {prefix!r} has no values; give at least one, e.g. (0.0, 1e-3).")
        try:
            values = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise ConfigError(f"sweep grid {prefix!r} values must be numbers, got {values!r}.") from None
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"sweep grid {prefix!r} values must be finite, got {values!r}.")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep grid {prefix!r} repeats a value: {values!r}.")
        out[prefix] = values

    if grid is not None:
        if not hasattr(grid, "items"):
            raise ConfigError(f"sweep grid must be a mapping 'regularizer.key' -> values, got {type(grid).__name__}.")
        walk("", grid.to_dict() if hasattr(grid, "to_dict") else grid)
    return out


def sweep_members(seeds: Sequence[int], grid: Mapping | None = None) -> list[Member]:
    """The members ``seeds x product(grid values)``, seed-major, grid axes in key order (last key fastest)."""
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ConfigError(f"sweep seeds must be non-negative integers, got {seeds!r}.") from None
    if not seeds:
        raise ConfigError("sweep seeds is empty; give at least one seed, e.g. seeds=(0, 1, 2).")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"sweep seeds must be distinct non-negative integers, got {tuple(seeds)}.")
    flat = flatten_grid(grid)
    points = [dict(zip(flat, combo)) for combo in itertools.product(*flat.values())]
    k = len(seeds) * len(points)
    width = max(3, len(str(k - 1)))
    return [Member(i, f"{i:0{width}d}", seed, dict(values))
            for i, (seed, values) in enumerate(itertools.product(seeds, points))]


def member_config(config, member: Member) -> ml_collections.ConfigDict:
    """The single-run config of ``member``: the base config with ``seed`` and every grid value set
    (``config.regularizers.<name>.<key> = value``). ``fit(member_config(config, m), ...)`` is the run that member
    ``m`` of the sweep reproduces (with ``data_order="per_seed"``)."""
    cfg = copy.deepcopy(config)
    cfg.seed = int(member.seed)
    regs = cfg.regularizers.to_dict() if cfg.get("regularizers") else {}
    for path, value in member.values.items():
        parts = path.split(".")
        node = regs
        for name in parts[:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[parts[-1]] = float(value)
    # Rebuilt rather than assigned in place: ConfigDict refuses a float into a field that held an int (coeff=0).
    cfg.regularizers = ml_collections.ConfigDict(regs)
    if "sweep" in cfg:
        cfg.sweep = ml_collections.ConfigDict(dict(seeds=(int(member.seed),), grid=ml_collections.ConfigDict(),
                                                   data_order=cfg.sweep.get("data_order", "per_seed")))
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Stacked states


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """Stack K train states of identical structure into one whose every leaf has a leading member axis K."""
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state.")
    structs = {jax.tree.structure(s) for s in states}
    if len(structs) != 1:
        raise ValueError("stack_states: the states differ in structure (model, optimizer or regularizers); every "
                         "member of a sweep must share them and differ only in array values.")
    return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(l) for l in leaves]), *states)


def num_members(stacked: TrainState) -> int:
    """K, the length of the leading member axis of a stacked state."""
    return int(np.shape(stacked.step)[0]) if np.ndim(stacked.step) else 0


def member_state(stacked: TrainState, i: int) -> TrainState:
    """Member ``i`` of a stacked state as an ordinary :class:`~lcnn_jax.training.TrainState` (for measurement:
    ``model.apply({"params": s.params, **s.model_state}, x, train=False)``)."""
    k = num_members(stacked)
    if k == 0:
        raise ValueError("member_state expects a stacked state (leaves with a leading member axis); "
                         "build it with stack_states or load_sweep.")
    if not -k <= int(i) < k:
        raise ValueError(f"member index {i} out of range for a sweep of {k} members.")
    return jax.tree.map(lambda a: a[int(i)], stacked)


def _set_path(tree, parts: Sequence[str], value):
    """A copy of the nested dict ``tree`` with ``tree[p0][p1]... = value``."""
    head, rest = parts[0], parts[1:]
    new = dict(tree)
    new[head] = value if not rest else _set_path(tree[head], rest, value)
    return new


def _get_path(tree, parts: Sequence[str]):
    for p in parts:
        tree = tree[p]
    return tree


def _state_paths(regularizers, reg_state) -> list[str]:
    paths = []
    for reg, st in zip(regularizers, reg_state):
        for path, _ in jax.tree_util.tree_flatten_with_path(st)[0]:
            paths.append(".".join([reg.name] + [str(getattr(k, "key", getattr(k, "name", k))) for k in path]))
    return paths


def _with_grid_values(state: TrainState, regularizers, values: Mapping[str, float]) -> TrainState:
    """``state`` with each ``"name.key"`` of ``values`` written into that regularizer's state, keeping the leaf's
    shape and dtype (so every member has the same structure and the step compiles once)."""
    names = [r.name for r in regularizers]
    reg_state = list(state.reg_state)
    for path, value in values.items():
        name, *parts = path.split(".")
        known = _state_paths(regularizers, state.reg_state)
        if name not in names:
            raise ConfigError(
                f"sweep grid key {path!r} names regularizer {name!r}, which the config does not use (it has "
                f"{names or 'none'}). Add it to the base config, e.g. config.regularizers.{name} = "
                f"{{'coeff': 0.0}}; the grid then sets its value per member.")
        i = names.index(name)
        try:
            leaf = _get_path(reg_state[i], parts)
        except (KeyError, TypeError, IndexError):
            leaf = None
        if leaf is None or not hasattr(leaf, "dtype"):
            raise ConfigError(f"sweep grid key {path!r} is not a regularizer-state path; known paths: {known}.")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ConfigError(f"sweep grid key {path!r} points at a {leaf.dtype} leaf; only floating-point state "
                              f"entries (coefficients) can be swept.")
        if parts[-1].endswith("coeff") and value < 0:
            raise ConfigError(f"sweep grid {path!r}: a coefficient must be >= 0, got {value}.")
        reg_state[i] = _set_path(reg_state[i], parts, jnp.full(jnp.shape(leaf), value, leaf.dtype))
    return state.replace(reg_state=tuple(reg_state))


def init_member_state(setup: training.RunSetup, member: Member) -> TrainState:
    """The initial state ``fit`` would build for ``member``'s config: ``PRNGKey(member.seed)`` for model init and
    step keys, then the grid values written into the regularizer states."""
    state = training.create_train_state(setup.model, setup.tx, setup.regularizers, jax.random.PRNGKey(member.seed),
                                        setup.sample)
    return _with_grid_values(state, setup.regularizers, member.values)


def init_stacked_state(setup: training.RunSetup, members: Sequence[Member]) -> TrainState:
    """:func:`init_member_state` of every member, stacked (one model init per distinct seed)."""
    by_seed = {}
    for m in members:
        if m.seed not in by_seed:
            by_seed[m.seed] = training.create_train_state(setup.model, setup.tx, setup.regularizers,
                                                          jax.random.PRNGKey(m.seed), setup.sample)
    return stack_states([_with_grid_values(by_seed[m.seed], setup.regularizers, m.values) for m in members])


# ----------------------------------------------------------------------------------------------------------
# Devices


class SweepLayout(NamedTuple):
    """How a stacked sweep sits on the devices: a 2-D mesh ``("members", "data")``.

    Attributes:
      mesh: the mesh, ``member_shards x data_shards`` devices (all devices of the run's mesh).
      num_members: K.
      axis: ``"member"`` (members split over every device: no communication between devices at all),
        ``"batch"`` (every device holds all K members and a slice of the examples: ``fit``'s data parallelism, K
        models at once), ``"members x data"`` (both: groups of devices, each group a share of the members with the
        examples split inside the group; the gradient all-reduce stays inside a group). One device: ``"member"``.
      member_shards, data_shards: the mesh's shape; ``member_shards`` is the largest divisor of the device count
        that divides K, so every device holds the same number of whole members.
      state: sharding of the stacked state and of every per-member output (metrics, eval sums): leading axis on
        ``"members"``, replicated over ``"data"``.
      batch: sharding of a stacked ``(K, B, ...)`` batch: ``P("members", "data")``.
      shared_batch: sharding of an unstacked ``(B, ...)`` batch (shared data order, evaluation): ``P("data")``.
    """

    mesh: Mesh
    num_members: int
    axis: str
    member_shards: int
    data_shards: int
    state: NamedSharding
    batch: NamedSharding
    shared_batch: NamedSharding


def sweep_layout(mesh: Mesh, num_members: int) -> SweepLayout:
    """The ``("members", "data")`` layout of K members over the devices of ``mesh`` (any shape).

    ``member_shards = gcd(K, devices)``: as many member groups as divide both, so the members are spread as widely
    as the count allows (the cheaper axis: no all-reduce between groups), and ``data_shards = devices /
    member_shards`` devices split each member's batch (which must then be a multiple of ``data_shards``; ``fit``'s
    check that it is a multiple of the device count implies it). E.g. 8 devices: 8 seeds -> 8 x 1, 2 seeds ->
    2 x 4, 3 seeds -> 1 x 8; 4 devices and 6 members -> 2 x 2."""
    if num_members <= 0:
        raise ValueError(f"a sweep needs at least one member, got {num_members}.")
    devices = np.asarray(mesh.devices).reshape(-1)
    n_dev = devices.size
    m = math.gcd(int(num_members), n_dev)
    d = n_dev // m
    mesh2 = Mesh(devices.reshape(m, d), ("members", "data"))
    ns = lambda *spec: NamedSharding(mesh2, P(*spec))  # noqa: E731
    axis = "member" if d == 1 else "batch" if m == 1 else "members x data"
    return SweepLayout(mesh2, num_members, axis, m, d, ns("members"), ns("members", "data"), ns("data"))


def place_state(stacked: TrainState, layout: SweepLayout) -> TrainState:
    """Put a (host or device) stacked state on the mesh with the layout's state sharding."""
    return training.put_global(stacked, layout.state)


def place_batch(batch: Mapping[str, np.ndarray], layout: SweepLayout, *, shared: bool = False) -> dict:
    """Place a global host batch (the same in every process) on the mesh: stacked ``(K, B, ...)``
    (``shared=False``) or one ``(B, ...)`` batch for all members (``shared=True``, also used by evaluation); each
    process copies only the slices of its own devices."""
    return training.place_global(dict(batch), layout.shared_batch if shared else layout.batch)


# How the K members of one compiled step are computed (``member_loop``):
#   "vmap":   jax.vmap over the member axis. A member-batched convolution becomes ONE grouped convolution
#             (feature_group_count = K), which cuDNN runs well but XLA:CPU runs 3-4x slower per member than K
#             ordinary convolutions (experiments/bench_sweep.py --model small_cnn prints the ratios).
#   "unroll": the K members one after another inside the same jitted program (a Python loop at trace time: K
#             copies of the step, K x the compile time), each an ordinary single-model step. lax.map would
#             compile once, but XLA:CPU runs a convolution's backward pass inside a while loop on a slow path
#             (see lcnn_jax.attacks.apgd_stepwise), slower still than vmap in a trial run.
#   "auto":   "unroll" on CPU when the step convolves, the members are not split over devices and K <= 16;
#             "vmap" otherwise (dense layers batch well under vmap on every backend).
MEMBER_LOOPS = ("auto", "vmap", "unroll")
MAX_UNROLLED_MEMBERS = 16


def _jaxprs_in(value):
    """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _jaxprs_in(v)


def uses_convolution(fn, *args) -> bool:
    """Whether ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct``; traced, not run) performs a convolution
    anywhere, inside ``jit``/``scan``/``cond``/custom-derivative bodies included. Cost: one trace of ``fn``."""
    todo = [jax.make_jaxpr(fn)(*args).jaxpr]
    while todo:
        jaxpr = todo.pop()
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                return True
            for v in eqn.params.values():
                todo.extend(_jaxprs_in(v))
    return False


def _check_member_loop(member_loop) -> None:
    if member_loop not in MEMBER_LOOPS:
        raise ConfigError(f"member_loop={member_loop!r} is unknown; use one of {MEMBER_LOOPS}.")


def resolve_member_loop(member_loop: str, layout: SweepLayout, convolves) -> str:
    """``"vmap"`` or ``"unroll"`` for ``member_loop`` (see ``MEMBER_LOOPS``); ``convolves`` is a bool or a
    zero-argument callable (called only when ``"auto"`` needs it: tracing costs a little).

    Raises:
      ConfigError: an unknown ``member_loop``."""
    _check_member_loop(member_loop)
    if member_loop != "auto":
        return member_loop
    platform = np.asarray(layout.mesh.devices).reshape(-1)[0].platform
    if platform != "cpu" or layout.member_shards != 1 or layout.num_members > MAX_UNROLLED_MEMBERS:
        return "vmap"
    return "unroll" if (convolves() if callable(convolves) else convolves) else "vmap"


def map_members(fn, in_axes: Sequence[int | None], loop: str = "vmap"):
    """``fn`` applied to every member: arguments with ``in_axes`` 0 carry a leading member axis (the same length
    K for all), ``None`` ones are shared; every output gets a leading member axis. ``loop``: ``"vmap"``
    (``jax.vmap``) or ``"unroll"`` (K calls at trace time, outputs stacked); same values up to float error.
    Cost: K times ``fn``'s work either way; ``"unroll"`` traces and compiles ``fn`` K times."""
    in_axes = tuple(in_axes)
    if loop == "vmap":
        return jax.vmap(fn, in_axes=in_axes)
    if loop != "unroll":
        raise ValueError(f"loop must be 'vmap' or 'unroll', got {loop!r}")

    def unrolled(*args):
        mapped = [a for a, ax in zip(args, in_axes) if ax == 0]
        k = jax.tree.leaves(mapped)[0].shape[0]
        outs = [fn(*[jax.tree.map(lambda leaf, i=i: leaf[i], a) if ax == 0 else a for a, ax in zip(args, in_axes)])
                for i in range(k)]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)

    return unrolled


def jit_sweep_step(step_fn, layout: SweepLayout, *, shared_batch: bool = False, loop: str = "vmap"):
    """``jax.jit(jax.vmap(step_fn))`` (or the unrolled member loop, ``loop="unroll"``, see ``MEMBER_LOOPS``): one
    compiled step for all K members (stacked state donated).

    ``shared_batch=False``: the batch carries a leading member axis (``in_axes=0``), each member its own batch;
    ``True``: one batch for every member (``in_axes=None``). Metrics come back with a leading member axis."""
    vstep = map_members(step_fn, (0, None if shared_batch else 0), loop)
    batch_sharding = layout.shared_batch if shared_batch else layout.batch
    return jax.jit(vstep, in_shardings=(layout.state, batch_sharding), out_shardings=(layout.state, layout.state),
                   donate_argnums=(0,))


def jit_sweep_eval_step(eval_fn, layout: SweepLayout, *, loop: str = "vmap"):
    """The member-mapped eval step: every member on the same (unstacked) batch; per-member ``(K,)`` sums."""
    return jax.jit(map_members(eval_fn, (0, None), loop), in_shardings=(layout.state, layout.shared_batch),
                   out_shardings=layout.state)


# ----------------------------------------------------------------------------------------------------------
# Training


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
    elif training.is_primary():
        training.write_json_atomic(path, record)


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


def _aggregate(member_results: Sequence[dict]) -> list[dict]:
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


def _step_convolves(setup: training.RunSetup, stacked: TrainState) -> bool:
    """Whether one member's forward pass (the eval step, traced on shapes only) convolves."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)
    n = 2
    batch = {"image": jax.ShapeDtypeStruct((n, *setup.train.images.shape[1:]), jnp.float32),
             "label": jax.ShapeDtypeStruct((n,), jnp.int32), "mask": jax.ShapeDtypeStruct((n,), jnp.float32)}
    return uses_convolution(setup.eval_fn, one, batch)


def fit_sweep(config, workdir: str, *, seeds: Sequence[int], grid: Mapping[str, Sequence[float]] | None = None,
              data_order: str = "per_seed", member_loop: str = "auto") -> dict:
    """Train every member of ``seeds x grid`` as one jitted program and write the results to ``workdir``.

    Args:
      config: the base config (as for :func:`lcnn_jax.training.fit`); it must already use every regularizer the
        grid names (any coefficient; the grid overrides it per member).
      workdir: output directory; rerunning with the same ``workdir`` and the same sweep resumes from the last
        checkpoint of the stacked state and ends as an uninterrupted sweep would.
      seeds: distinct non-negative integers; each is a member's ``config.seed`` (init key, step keys, data order).
      grid: ``{"<regularizer>.<state key>": values}`` (or the nested form ``{"datagrad": {"coeff": values}}``);
        None or empty: the seeds alone.
      data_order: ``"per_seed"`` (each member sees its own seed's batch order, reproducing its single run) or
        ``"shared"`` (all see ``config.seed``'s order; one batch broadcast to all members, cheaper).
      member_loop: how one compiled step computes the K members, ``"vmap"``, ``"unroll"`` or ``"auto"`` (unroll
        for convolutional nets on CPU, where a vmapped convolution is 3-4x slower per member; see
        ``MEMBER_LOOPS``). The same values up to float error; not part of the run's identity (a sweep may resume
        with another loop). The choice is in the summary's ``member_loop``.

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
      lcnn_jax.training.TrainingInterrupted, lcnn_jax.training.NoSpaceLeft: Ctrl-C or a full disk; the last
        complete checkpoint is kept and rerunning resumes.

    A member whose network ends dead (one output for every input, or one class for 99 % of the training images)
    has ``dead: true`` in its results and a warning is logged: see :func:`lcnn_jax.training.dead_network`.
    """
    from lcnn_jax.configs import validate_config

    t_start = time.time()
    if data_order not in DATA_ORDERS:
        raise ConfigError(f"data_order={data_order!r} is unknown; use one of {DATA_ORDERS}.")
    _check_member_loop(member_loop)  # before any work; resolved once the devices are known
    validate_config(config)
    training.check_run_dir(config, workdir, kind="sweep")
    members = sweep_members(seeds, grid)
    flat = flatten_grid(grid)
    setup = training.prepare_run(config)
    tcfg, train, test, mesh = config.train, setup.train, setup.test, setup.mesh
    k = len(members)

    stacked = init_stacked_state(setup, members)

    os.makedirs(workdir, exist_ok=True)
    _check_sweep_file(workdir, {"seeds": [int(s) for s in seeds], "grid": {p: list(v) for p, v in flat.items()},
                                "data_order": data_order,
                                "members": [{"index": m.index, "id": m.id, "seed": m.seed, "grid": m.values}
                                            for m in members]})
    layout = sweep_layout(mesh, k)
    stacked = place_state(stacked, layout)  # orbax restores into this sharding, each process its own members
    ckpt = training.Checkpointer(workdir, max_to_keep=int(tcfg.get("keep_checkpoints", 2)))
    try:  # the newest intact checkpoint; damaged ones are moved aside with a warning
        restored, start_step = ckpt.restore_newest_intact(stacked, quarantine=True)
    except BaseException:
        ckpt.close()
        raise
    if restored is not None:
        stacked = restored
    primary = training.is_primary()
    if primary:
        training.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    start = int(training.to_host(stacked.step)[0])
    log = training.MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                              resume_step=start if start_step is not None else None, write=primary)

    shared = data_order == "shared"
    loop = resolve_member_loop(member_loop, layout, lambda: _step_convolves(setup, stacked))
    train_step = jit_sweep_step(setup.step_fn, layout, shared_batch=shared, loop=loop)
    eval_step = jit_sweep_eval_step(setup.eval_fn, layout, loop=loop)
    n_data = layout.data_shards
    ev_bs = max(n_data, (int(tcfg.get("eval_batch_size", 500)) // n_data) * n_data)

    def epoch_batches(epoch, start_batch):
        if shared:
            from lcnn_jax import data as data_lib

            it = data_lib.batches(train, setup.batch_size, seed=int(config.seed), epoch=epoch, shuffle=True,
                                  drop_remainder=True, start_batch=start_batch)
        else:
            it = _member_batches(train, members, setup.batch_size, epoch, start_batch)
        for b in it:
            yield place_batch(b, layout, shared=shared)

    def evaluate_all(st) -> dict:
        res = {}
        for name, split in (("train", train), ("test", test)):
            tot = training.evaluation_totals(lambda b: eval_step(st, place_batch(b, layout, shared=True)),
                                             split.images, split.labels, batch_size=ev_bs)
            n = np.maximum(tot["count"], 1.0)
            res[f"{name}_accuracy"] = (tot["correct"] / n).tolist()
            res[f"{name}_loss"] = (tot["loss_sum"] / n).tolist()
            if name == "train":  # a dead member (see training.dead_network)
                counts = np.asarray(tot["pred_counts"]).reshape(k, -1)
                res["dead"] = [training.dead_network(float(a), float(b), c) for a, b, c in
                               zip(np.ravel(tot["logit_spread"]), np.ravel(tot["logit_scale"]), counts)]
        return res

    def run_eval(st, step):
        res = evaluate_all(st)
        log.write({"step": step, "kind": "eval", **res})
        return res

    reported: set[int] = set()

    def summarize(metrics):
        rec = {key: np.asarray(v).tolist() for key, v in training.to_host(metrics).items()}
        loss, acc = np.asarray(rec["loss"]), np.asarray(rec["accuracy"])
        ok = np.isfinite(loss)
        postfix = {"loss": f"{loss[ok].mean():.3f}" if ok.any() else "nan",
                   "acc": f"{acc[ok].mean():.3f}" if ok.any() else "nan", "diverged": len(reported)}
        return rec, postfix

    hooks = any(r.epoch_end is not None for r in setup.regularizers)

    def epoch_end(st, epoch):
        reset = training.put_global(np.zeros((k,), np.float32), layout.state)
        if not hooks:
            return st.replace(epoch_accuracy_sum=reset)
        acc_sum, bad, host = training.to_host((st.epoch_accuracy_sum, st.diverged_at, st.reg_state))
        acc = acc_sum / np.float32(setup.steps_per_epoch)
        diverged = bad >= 0
        per_member = []
        for i in range(k):
            mine = jax.tree.map(lambda a: jnp.asarray(a[i]), host)
            if not diverged[i]:  # a diverged member stays frozen, hooks included
                mine = training.apply_epoch_end_hooks(mine, setup.regularizers, jnp.asarray(acc[i]), epoch)
            per_member.append(mine)
        reg_state = jax.tree.map(lambda *a: jnp.stack(a), *per_member)
        return st.replace(reg_state=training.put_global(reg_state, layout.state), epoch_accuracy_sum=reset)

    def check(st, step):  # a sweep never stops for one member; it says so once per member
        bad = training.to_host(st.diverged_at)
        for i in np.flatnonzero(bad >= 0):
            if int(i) not in reported:
                reported.add(int(i))
                _log.warning("sweep member %s (seed %d, %s) diverged at step %d; it is frozen, the others go on.",
                             members[i].id, members[i].seed, members[i].values, int(bad[i]))

    elapsed_before = training._previous_wall_time(workdir) if start else 0.0
    bar = training._progress(setup.total_steps, start, bool(tcfg.get("progress", True)) and jax.process_index() == 0,
                             desc=f"sweep[{k}]")
    try:
        stacked, step, train_time = training._train_loop(
            stacked, setup=setup, tcfg=tcfg, start=start, epoch_batches=epoch_batches, train_step=train_step,
            epoch_end=epoch_end, check=check, summarize=summarize, run_eval=run_eval, ckpt=ckpt, log=log, bar=bar,
            elapsed_before=elapsed_before)
    finally:
        bar.close()
        ckpt.close()

    final = run_eval(stacked, step)
    diverged_at = training.to_host(stacked.diverged_at)
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
               "aggregate": _aggregate(member_results), "seeds": [int(s) for s in seeds],
               "grid": {p: list(v) for p, v in flat.items()}, "data_order": data_order, "layout": layout.axis,
               "member_loop": loop,
               "mesh": {"members": layout.member_shards, "data": layout.data_shards},
               "num_processes": int(jax.process_count()),
               "steps": step, "wall_time_s": train_time, "total_time_s": time.time() - t_start,
               "num_devices": int(mesh.devices.size), "devices": str(jax.devices()[0].platform),
               "config": config.to_dict()}
    if primary:
        for m, r in zip(members, member_results):
            d = os.path.join(workdir, "members", m.id)
            os.makedirs(d, exist_ok=True)
            training.write_json_atomic(os.path.join(d, "config.json"), member_config(config, m).to_dict())
            training.write_json_atomic(os.path.join(d, "results.json"), {**r, "wall_time_s": train_time,
                                                                         "sweep_workdir": os.path.abspath(workdir)})
        training.write_json_atomic(os.path.join(workdir, "sweep_results.json"), summary)
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


def fit_sweep_from_config(config, workdir: str) -> dict:
    """:func:`fit_sweep` driven by the config's ``sweep`` section: ``config.sweep.seeds`` (``()`` means
    ``(config.seed,)``), ``config.sweep.grid`` (nested ``{name: {state_key: values}}``) and
    ``config.sweep.data_order``. E.g. ``--config.sweep.seeds="(0,1,2,3,4)"
    --config.sweep.grid.datagrad.coeff="(0.0,1e-3,1e-2)"``; this is ``lcnn-jax sweep``."""
    seeds, grid, data_order = _section_axes(config)
    return fit_sweep(config, workdir, seeds=seeds, grid=grid, data_order=data_order)


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
    config, the Flax model, the stacked :class:`~lcnn_jax.training.TrainState` (take one member with
    :func:`member_state`) and the :class:`Member` list."""
    config = training.read_config(workdir)
    path = os.path.join(workdir, "sweep.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No sweep in {workdir!r} (sweep.json missing): run fit_sweep there first.")
    with open(path) as fh:
        record = json.load(fh)
    members = [Member(int(m["index"]), m["id"], int(m["seed"]), dict(m["grid"])) for m in record["members"]]
    model, template, _ = training.template_state(config)
    stacked = training.restore_latest(workdir, stack_states([template] * len(members)), what="sweep")
    return config, model, stacked, members


class SeedsRun(NamedTuple):
    """What :func:`train_seeds` returns: the Flax ``model``, one :class:`~lcnn_jax.training.TrainState` per seed
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
    :func:`lcnn_jax.training.fit` in ``workdir/seed<N>`` (the same member config, so the same result up to float
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
        training.fit(member_config(config, Member(0, "000", s, {})), wd)
        _, model, state, _ = training.load_trained(wd)
        states.append(state)
    return SeedsRun(model, states, "fit", note, time.time() - t0)
