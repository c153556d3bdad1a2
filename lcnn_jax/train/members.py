"""The members of a sweep (seeds x grid points) as one stacked train state, laid out on a 2-D device mesh, and
the member-mapped step that trains them all in one compiled program. :mod:`lcnn_jax.train.sweep` trains them.

A grid key is a path into the regularizer states, ``"<regularizer name>.<state key>"`` (e.g.
``"datagrad.coeff"``; deeper keys as ``"clip.a.b"``), and member ``m`` is the run of the *base config with those
values* (:func:`member_config`). That identity holds because coefficients live in the regularizer state as
float32 arrays (:mod:`lcnn_jax.regularizers.base`): every member shares the model, optimizer and regularizer
*structure*, and differs only in array values.

The stacked state is a :class:`~lcnn_jax.train.state.TrainState` whose every leaf has a leading member axis
``K`` (:func:`stack_states`, :func:`member_state`). Devices (:func:`sweep_layout`): a 2-D mesh
``("members", "data")``; the member axis is split over ``gcd(K, devices)`` groups of devices and each member's
batch over the devices of its group. How one compiled step computes the K members (vmap or unrolled) is decided
in :mod:`lcnn_jax.loops`.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcnn_jax import loops
from lcnn_jax.errors import ConfigError
from lcnn_jax.loops import MEMBER_LOOPS, uses_convolution  # noqa: F401  (re-exported: part of the sweep API)
from lcnn_jax.train.distributed import place_global, put_global
from lcnn_jax.train.setup import RunSetup
from lcnn_jax.train.state import TrainState, create_train_state

DATA_ORDERS = ("per_seed", "shared")

__all__ = ["DATA_ORDERS", "Member", "flatten_grid", "sweep_members", "member_config", "stack_states", "num_members",
           "member_state", "init_member_state", "init_stacked_state", "SweepLayout", "sweep_layout", "place_state",
           "place_batch", "resolve_member_loop", "map_members", "jit_sweep_step", "jit_sweep_eval_step"]


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
    """Member ``i`` of a stacked state as an ordinary :class:`~lcnn_jax.train.state.TrainState` (for measurement:
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


def init_member_state(setup: RunSetup, member: Member) -> TrainState:
    """The initial state ``fit`` would build for ``member``'s config: ``PRNGKey(member.seed)`` for model init and
    step keys, then the grid values written into the regularizer states."""
    state = create_train_state(setup.model, setup.tx, setup.regularizers, jax.random.PRNGKey(member.seed),
                                        setup.sample)
    return _with_grid_values(state, setup.regularizers, member.values)


def init_stacked_state(setup: RunSetup, members: Sequence[Member]) -> TrainState:
    """:func:`init_member_state` of every member, stacked (one model init per distinct seed)."""
    by_seed = {}
    for m in members:
        if m.seed not in by_seed:
            by_seed[m.seed] = create_train_state(setup.model, setup.tx, setup.regularizers,
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
    return put_global(stacked, layout.state)


def place_batch(batch: Mapping[str, np.ndarray], layout: SweepLayout, *, shared: bool = False) -> dict:
    """Place a global host batch (the same in every process) on the mesh: stacked ``(K, B, ...)``
    (``shared=False``) or one ``(B, ...)`` batch for all members (``shared=True``, also used by evaluation); each
    process copies only the slices of its own devices."""
    return place_global(dict(batch), layout.shared_batch if shared else layout.batch)


def resolve_member_loop(member_loop: str, layout: SweepLayout, convolves) -> str:
    """``"vmap"`` or ``"unroll"`` for ``member_loop`` on ``layout`` (:func:`lcnn_jax.loops.member_loop`);
    ``convolves`` is a bool or a zero-argument callable (called only when ``"auto"`` needs it).

    Raises:
      ConfigError: an unknown ``member_loop``."""
    return loops.member_loop(member_loop, platform=loops.default_platform(layout.mesh.devices),
                             member_shards=layout.member_shards, num_members=layout.num_members,
                             convolves=convolves)


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
