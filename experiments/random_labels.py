"""The random-label study of minimum sharpness (SPEC 1.5, Ibayashi et al. arXiv 2106.12612), on mnist5k.

    python experiments/random_labels.py [--models ms_mlp,lenet] [--ratios 0,0.1,...,1] [--trials 3]
                                        [--n_train 2000] [--n_measure 1000] [--max_steps 3000]
                                        [--out experiments/results/random_labels] [--mnist_test_dir DIR]

Protocol. ``--n_train`` images drawn stratified (seed 0) from the 4000 mnist5k training images; in each run a
fraction ``r`` of their labels is shuffled (:func:`lcnn_jax.data.shuffle_labels`: ``round(r N)`` positions get a
random permutation of their own labels, so about ``0.9 r N`` labels end up wrong; the JSON records the exact
fraction). Trial ``t`` of ratio ``r`` uses init seed ``t`` and shuffle seed ``100 t + round(10 r)``. The networks
(registry names ``ms_mlp`` = MLP 784-512-128-512-10 and ``lenet`` = LeNet-5 with max-pool, both ReLU) are trained
with SGD (momentum 0.9, constant learning rate, batch 128, no weight decay) until EVERY image of the training set
is fitted (train accuracy 1.0, checked every ``--eval_every`` steps; a trial that gets there stops updating) or
``--max_steps``; the final train accuracy is recorded as it is. All trials of one ``(model, r)`` train as ONE
program (one ``lax.scan`` over steps, each step mapped over the trials: see the member loop below).

Per run (on the first ``--n_measure`` training images, with the labels the run was trained on):

- ``gap``: train accuracy (trained labels) minus test accuracy on the mnist5k test split (1000 images, true labels);
- ``minimum_sharpness``: :func:`lcnn_jax.measures.minimum_sharpness_from_traces` with biases (Newton), from the exact
  per-layer traces (``minimum_sharpness_nobias``: the closed form without biases, recorded too);
- ``normalized_sharpness``: Tsuzuku et al., from the same exact diagonal;
- ``hessian_trace``: Hutchinson (``--hutchinson_probes`` Rademacher probes) of the mean cross-entropy's Hessian;
  the exact total trace (sum of the diagonal) is recorded beside it as ``exact_trace``;
- ``top_eigenvalue``: Lanczos (``--lanczos_iters`` steps) on the same loss.

Files in ``--out``: ``runs/<model>_r<r>_t<trial>.json`` per run (atomic; a run whose file exists with the same
protocol is not recomputed, so the script resumes), then, after every finished ``(model, r)``,
``kendall_tau.{md,json}`` (Kendall tau of each measure with the gap, per network, over all finished runs, beside the
paper's numbers from SPEC 1.5) and ``scatter.png`` (each measure vs the gap, coloured by r, one row per network).
``python experiments/random_labels.py --aggregate_only`` rebuilds the table and figure from the run files.

``--target_loss EPS`` additionally requires the mean training cross-entropy to be <= EPS before a run stops
(loss-matched runs). Without it the stopping point is the first check at train accuracy 1.0, where the loss still
varies several-fold between runs, and every Hessian measure of the cross-entropy scales with that loss level: the
summary reports the Kendall tau of each measure with the final training loss as a confound check.

Sizing used for the committed results (2 shared CPU cores; about 4 min per MLP ratio, 10+ min per LeNet ratio)::

    python experiments/random_labels.py --models ms_mlp
    python experiments/random_labels.py --models lenet --n_train 500 --n_measure 500 --batch_size 64 \
        --max_steps 1200 --eval_every 50 --hutchinson_probes 20 --lanczos_iters 15
    python experiments/random_labels.py --models ms_mlp --target_loss 4e-4 --eval_every 25 \
        --out experiments/results/random_labels/loss_matched

The trials of one program are the members of one stacked train state on the library's sweep machinery
(``lcnn_jax.sweep``: ``stack_states``, ``member_state``, ``map_members``); ``--member_loop auto`` takes the library's
rule (``resolve_member_loop``: a convolutional net's members unrolled on CPU, where a convolution vmapped over
members with different kernels runs slower; vmapped otherwise). The training protocols and measures are in
``experiments/random_labels_train.py``, the tables and figures in ``experiments/random_labels_report.py``.

``--protocol reference`` trains as the reference code does (``ibayashi-hikaru/minimum-sharpness``,
``02-sharpness-comparison/experiment/work-train.py`` and ``run.py``) instead of stopping at the first full fit:

- a FIXED budget of ``--steps`` optimizer steps, far past 100 % train accuracy, measured at the LAST step;
- SGD momentum 0.9 (PyTorch's form, no dampening), batch 1024 (``min(1024, n)``; each epoch is a fresh permutation
  cut into ``ceil(n / 1024)`` batches, the last one smaller, as ``torch.split`` does), lr 0.1 for the MLP and 0.01 for
  LeNet, weight decay 1e-5 on ALL parameters added to the gradient (``torch.optim.SGD(weight_decay=1e-5)``);
- lr multiplied by ``1 / (lr_decay * t + 1)`` with ``t`` the number of optimizer steps taken: the reference's
  ``LambdaLR`` is stepped after every batch, so its "epoch" counter counts steps. Its budgets on 60,000 images are
  3000 epochs (MLP) and 1000 epochs (LeNet) of 59 steps, i.e. 177,000 and 59,000 steps with ``lr_decay = 1e-4``,
  ending at lr factors 1/18.7 and 1/6.9. On our smaller data sets the budget is scaled down (``--steps``) and, by
  default, ``lr_decay`` is scaled with it (``1e-4 * reference_steps / steps``) so that the schedule has the same
  shape over the budget and ends at the same factor; ``--lr_decay 1e-4`` keeps the per-step constant instead.
- every ``--eval_every`` steps the full training-set loss and accuracy of each run are recorded (``curve`` in the run
  file); ``loss_curves.png`` draws them beside the reference's archived final training losses
  (``REFERENCE_FINAL_TRAIN_LOSS``), the evidence that the scaled budget reaches the reference's loss plateau.

Trials of several ratios train as one program (``--ratios_per_program``; members are vmapped, each with its own
labels, initialisation and batch order). Per-model defaults (``REFERENCE_DEFAULTS``) apply to every option not
given. Results go to ``experiments/results/random_labels/reference_protocol`` and
``python experiments/random_labels.py --protocol reference --aggregate_only`` also rebuilds
``experiments/results/random_labels/protocol_comparison.md``, the Kendall-tau table of both protocols::

    python experiments/random_labels.py --protocol reference --models ms_mlp --ratios 0,1,0.5,0.2,0.8 \
        --ratios_per_program 2       # the committed MLP results (15 runs; about 40 min on 2 shared cores)
    python experiments/random_labels.py --protocol reference --models lenet --ratios 0,1,0.5,0.2,0.8
                                     # the committed LeNet results (15 runs; r = 0 and 1 took about 55 min each
                                     # with scanned steps, r = 0.5 / 0.2 / 0.8 about 13 min each with steps from
                                     # the host, :func:`experiments.random_labels_train.steps_from_host`)

Kept from our side (departures from the reference, each a SPEC choice): inputs in [0, 1] (the reference normalises to
[-1, 1]), Flax initialisation (LeCun normal kernels, zero biases; PyTorch draws both uniformly in +-1/sqrt(fan_in)),
our data sizes, sharpness on ``--n_measure`` training images (the reference uses all 60,000) and minimum sharpness
minimised to convergence by Newton (the reference runs 10,000 steps of SGD on the log-scales).
``--save_params DIR`` writes each run's final parameters as ``DIR/<model>_r<r>_t<trial>.npz`` (flat ``/`` keys).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterable, Sequence

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable like under pytest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.random_labels_report import (DIAGNOSTICS, MEASURE_LABELS, MEASURES, MODEL_LABELS, PAPER_LENET_MS,
                                              PAPER_TAU, REFERENCE_FINAL_TRAIN_LOSS, fit_steps, fmt, load_runs,
                                              loss_curves, protocol_note, reference_archive_table, scatter, tau_table,
                                              write_protocol_comparison)
from experiments.random_labels_train import (Measurer, accuracy, generalization_gap, make_chunk_trainer,
                                             make_member_logits, make_weighted_chunk_trainer, mean_cross_entropy,
                                             member_loop, reference_optimizer, steps_from_host, train_fixed_budget,
                                             train_group)
from lcnn_jax import io
from lcnn_jax import train as training
from lcnn_jax.data import Split, load_split, shuffle_labels, subset
from lcnn_jax.nn import make_model

RATIOS = tuple(round(0.1 * i, 1) for i in range(11))
# Spread order: after any prefix of finished ratios the table already covers the whole range of r.
SPREAD_ORDER = (0.0, 1.0, 0.5, 0.3, 0.7, 0.1, 0.9, 0.2, 0.8, 0.4, 0.6)
# The fields of the protocol: a run file is reused only if all of them match.
PROTOCOL_KEYS = ("n_train", "n_measure", "max_steps", "lr", "momentum", "batch_size", "eval_every",
                 "hutchinson_probes", "lanczos_iters", "data_seed", "target_loss")
REFERENCE_PROTOCOL_KEYS = ("protocol", "n_train", "n_measure", "steps", "lr", "momentum", "batch_size",
                           "weight_decay", "lr_decay", "eval_every", "hutchinson_probes", "lanczos_iters", "data_seed")
# Our protocol's defaults (the same for every network; the README's LeNet command overrides some on the command line).
OURS_DEFAULTS = {"n_train": 2000, "n_measure": 1000, "max_steps": 3000, "eval_every": 100, "lr": 0.05,
                 "momentum": 0.9, "batch_size": 128, "hutchinson_probes": 30, "lanczos_iters": 20}
# The reference code's training (02-sharpness-comparison/experiment/run.py, work-train.py): on 60,000 MNIST images,
# batch 1024 = 59 steps per epoch; LambdaLR(1 / (1e-4 t + 1)) stepped after every optimizer step.
REFERENCE_TRAIN = {"ms_mlp": {"lr": 0.1, "epochs": 3000}, "lenet": {"lr": 0.01, "epochs": 1000},
                   "ms_lenet": {"lr": 0.01, "epochs": 1000}}
REFERENCE_N, REFERENCE_BATCH, REFERENCE_LR_DECAY = 60_000, 1024, 1e-4
REFERENCE_WEIGHT_DECAY, REFERENCE_MOMENTUM = 1e-5, 0.9


def reference_steps(model: str) -> int:
    """Optimizer steps of the reference's full budget: epochs * ceil(60000 / 1024)."""
    return REFERENCE_TRAIN[model]["epochs"] * -(-REFERENCE_N // REFERENCE_BATCH)


# Our scaled budgets and sizes under --protocol reference (chosen from pilots: see the README).
REFERENCE_DEFAULTS = {
    "ms_mlp": {"n_train": 2000, "n_measure": 1000, "steps": 3000, "eval_every": 50, "hutchinson_probes": 30,
               "lanczos_iters": 20},
    "lenet": {"n_train": 500, "n_measure": 500, "steps": 1000, "eval_every": 25, "hutchinson_probes": 20,
              "lanczos_iters": 15},
    "ms_lenet": {"n_train": 500, "n_measure": 500, "steps": 1000, "eval_every": 25, "hutchinson_probes": 20,
                 "lanczos_iters": 15},
}


def shuffle_seed(ratio: float, trial: int) -> int:
    return 100 * int(trial) + int(round(10 * ratio))


def trial_labels(labels: np.ndarray, ratio: float, trials: Sequence[int]) -> np.ndarray:
    """``(T, N)`` labels: row ``i`` is ``labels`` with a fraction ``ratio`` shuffled, seed of trial ``trials[i]``."""
    split = Split(np.zeros((len(labels), 1), np.float32), np.asarray(labels))
    return np.stack([shuffle_labels(split, ratio, seed=shuffle_seed(ratio, t)).labels for t in trials])


def run_path(out: str, model: str, ratio: float, trial: int) -> str:
    return os.path.join(out, "runs", f"{model}_r{ratio:.1f}_t{trial}.json")


def run_is_done(path: str, protocol: dict) -> bool:
    """A run is finished when its file exists, parses, and was made with the same protocol: every field of
    ``protocol`` (``PROTOCOL_KEYS``, or ``REFERENCE_PROTOCOL_KEYS`` under ``--protocol reference``) matches
    (:func:`lcnn_jax.io.load_if_matches`)."""
    return io.load_if_matches(path, protocol, field="protocol", keys=tuple(protocol)) is not None


def pending_trials(out: str, model: str, ratio: float, trials: Iterable[int], protocol: dict) -> list:
    return [t for t in trials if not run_is_done(run_path(out, model, ratio, t), protocol)]


# ------------------------------------------------------------------------------------------------ the study
def load_data(cfg):
    train = subset(load_split("mnist5k", "train"), cfg.n_train, seed=cfg.data_seed, stratified=True)
    test = load_split("mnist5k", "test")
    official = load_split("mnist", "test", data_dir=cfg.mnist_test_dir) if cfg.mnist_test_dir else None
    return train, test, official


def protocol_of(cfg) -> dict:
    if getattr(cfg, "protocol", "ours") == "reference":
        return {k: getattr(cfg, k) for k in REFERENCE_PROTOCOL_KEYS}
    return {k: getattr(cfg, k) for k in PROTOCOL_KEYS}


def model_cfg(cfg, model_name: str):
    """``cfg`` with the per-model defaults of its protocol filled in (options given on the command line win).

    Our protocol has one set of defaults for every network (filled by :func:`parse_args`); the reference protocol
    takes lr and budget per network (``REFERENCE_TRAIN``, ``REFERENCE_DEFAULTS``) and, unless ``--lr_decay`` is
    given, scales the reference's ``1e-4`` per step so the lr ends at the reference's final factor."""
    if getattr(cfg, "protocol", "ours") != "reference":
        return cfg
    if model_name not in REFERENCE_TRAIN:
        raise ValueError(f"--protocol reference knows the networks {sorted(REFERENCE_TRAIN)}; got {model_name!r}.")
    out = argparse.Namespace(**vars(cfg))
    fill = {**REFERENCE_DEFAULTS[model_name], "lr": REFERENCE_TRAIN[model_name]["lr"],
            "momentum": REFERENCE_MOMENTUM, "batch_size": REFERENCE_BATCH, "weight_decay": REFERENCE_WEIGHT_DECAY}
    for k, v in fill.items():
        if getattr(out, k, None) is None:
            setattr(out, k, v)
    if out.steps < 1 or out.eval_every < 1:
        raise ValueError(f"steps and eval_every must be positive; got {out.steps} and {out.eval_every}.")
    if out.lr_decay is None:
        out.lr_decay = REFERENCE_LR_DECAY * reference_steps(model_name) / out.steps
    return out


_PROGRAMS: dict = {}


def programs(model_name: str, cfg, num_members: int) -> dict:
    """Model, optimizer, trainer, logits and measurer of ``model_name`` under ``cfg``'s protocol for
    ``num_members`` members, and the member ``loop`` (:func:`experiments.random_labels_train.member_loop`); built
    once per process, protocol and loop (each group reuses the compiled programs; shapes only change with the
    number of pending members)."""
    model = make_model(model_name, 10)
    loop = member_loop(model, cfg.member_loop, num_members)
    key = (model_name, json.dumps(protocol_of(cfg), sort_keys=True), loop)
    if key not in _PROGRAMS:
        if getattr(cfg, "protocol", "ours") == "reference":
            tx = reference_optimizer(cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_decay)
            trainer = make_weighted_chunk_trainer(model, loop, host_steps=steps_from_host(model))
        else:
            tx = optax.sgd(cfg.lr, momentum=cfg.momentum)
            trainer = make_chunk_trainer(model, loop, host_steps=steps_from_host(model))
        _PROGRAMS[key] = {"model": model, "tx": tx, "trainer": trainer, "loop": loop,
                          "logits": make_member_logits(model, loop=loop), "measurer": Measurer(model, cfg)}
    return _PROGRAMS[key]


def flat_params(params) -> dict:
    """``{"dense0/kernel": array, ...}`` of a nested parameter dict (for ``np.savez``)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
    return out


def run_group(model_name: str, ratio: float, trials: Sequence[int], data, cfg) -> list:
    """Train the given trials of ``(model, ratio)`` together, measure each, write one JSON per run."""
    return run_members(model_name, [(ratio, t) for t in trials], data, cfg)


def run_members(model_name: str, members: Sequence[tuple], data, cfg) -> list:
    """Train the ``(ratio, trial)`` members together (one program), measure each, write one JSON per run."""
    train, test, official = data
    reference = getattr(cfg, "protocol", "ours") == "reference"
    progs = programs(model_name, cfg, len(members))
    model = progs["model"]
    labels = np.stack([trial_labels(train.labels, r, [t])[0] for r, t in members])
    seeds = [int(t) for _, t in members]
    tag = ", ".join(f"r{r:.1f}/t{t}" for r, t in members)
    print(f"[{model_name}] training {tag} on {len(train.labels)} images", flush=True)
    if reference:
        res = train_fixed_budget(model, train.images, labels, seeds, cfg, progs)
    else:
        res = train_group(model, train.images, labels, seeds, cfg, progs)
    logits_fn = progs["logits"]
    train_logits = np.asarray(logits_fn(res["state"], jnp.asarray(train.images)))
    test_logits = np.asarray(logits_fn(res["state"], jnp.asarray(test.images)))
    off_logits = np.asarray(logits_fn(res["state"], jnp.asarray(official.images))) if official else None
    measurer = progs["measurer"]
    xs_m = jnp.asarray(train.images[:cfg.n_measure])
    records = []
    for i, (ratio, trial) in enumerate(members):
        params = training.member_state(res["state"], i).params
        t = time.perf_counter()
        meas = measurer.measure(params, xs_m, jnp.asarray(labels[i, :cfg.n_measure]),
                                jax.random.PRNGKey(10_000 + shuffle_seed(ratio, trial)))
        if reference:
            accs = np.asarray(res["curve"]["train_acc"][i])
            fit = np.flatnonzero(accs >= 1.0)
            reached = int(res["curve"]["step"][fit[0]]) if fit.size else -1
        else:
            reached = int(res["reached_step"][i])
        rec = {
            "model": model_name, "ratio": ratio, "trial": int(trial), "init_seed": int(trial),
            "shuffle_seed": shuffle_seed(ratio, trial), "protocol": protocol_of(cfg),
            "frac_labels_changed": float(np.mean(labels[i] != train.labels)),
            "steps": res["steps"], "reached_full_fit_at_step": reached,
            **generalization_gap(train_logits[i], labels[i], test_logits[i], test.labels),
            "train_loss": mean_cross_entropy(train_logits[i], labels[i]),
            "test_loss": mean_cross_entropy(test_logits[i], test.labels),
            "train_seconds_group": res["seconds"], "group_size": len(members),
            "member_loop": progs["loop"], "backend": jax.default_backend(),
            "measure_seconds_total": None, **meas,
        }
        if reference:
            rec["curve"] = {"step": res["curve"]["step"], "train_loss": res["curve"]["train_loss"][i],
                            "train_acc": res["curve"]["train_acc"][i]}
        if off_logits is not None:
            rec["official_test_acc"] = accuracy(off_logits[i], official.labels)
            rec["official_gap"] = rec["train_acc"] - rec["official_test_acc"]
        rec["measure_seconds_total"] = time.perf_counter() - t
        path = run_path(cfg.out, model_name, ratio, trial)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        io.write_json_atomic(path, rec)
        if getattr(cfg, "save_params", None):
            os.makedirs(cfg.save_params, exist_ok=True)
            np.savez(os.path.join(cfg.save_params, f"{model_name}_r{ratio:.1f}_t{trial}.npz"), **flat_params(params))
        records.append(rec)
        print(f"  r{ratio:.1f} trial {trial}: train {rec['train_acc']:.4f} (loss {rec['train_loss']:.2g}) test "
              f"{rec['test_acc']:.4f} gap {rec['gap']:.4f} | MS {rec['minimum_sharpness']:.4g} NS "
              f"{rec['normalized_sharpness']:.4g} trace {rec['hessian_trace']:.4g} (exact {rec['exact_trace']:.4g}) "
              f"top {rec['top_eigenvalue']:.4g} | measured in {rec['measure_seconds_total']:.1f} s", flush=True)
    return records


def write_summary(out: str, models: Sequence[str], cfg_note: str = "") -> dict:
    """Kendall tau table (markdown + json) and the scatter figure, from the run files in ``out``."""
    runs = load_runs(out)
    # every network with run files, the requested ones first (a LeNet-only rerun keeps the MLP rows)
    found = [r["model"] for r in runs]
    models = [m for m in list(models) + sorted(set(found)) if m in found]
    models = list(dict.fromkeys(models))
    table = tau_table(runs, models)
    lines = ["# Random-label study: Kendall tau of each measure with the generalization gap", ""]
    if cfg_note:
        lines += [cfg_note, ""]
    for m in models:
        protos = {json.dumps(r["protocol"], sort_keys=True) for r in runs if r["model"] == m}
        for proto in sorted(protos):
            lines.append(f"- {MODEL_LABELS.get(m, m)}: " + protocol_note(json.loads(proto)))
    lines.append("")
    reference = any(r.get("protocol", {}).get("protocol") == "reference" for r in runs)
    who = "reference protocol" if reference else "ours"
    head = "| measure | " + " | ".join(
        f"{who}: {MODEL_LABELS.get(m, m)} | paper (SPEC 1.5): {MODEL_LABELS.get(m, m)}" for m in models) + " |"
    lines += [head, "|---" * (1 + 2 * len(models)) + "|"]
    for meas in MEASURES + tuple(DIAGNOSTICS):
        cells = []
        for m in models:
            t = table[m][meas]
            cells.append(f"{fmt(t['tau'])} (p={fmt(t['pvalue'], '.1g')}, n={t['n']})")
            cells.append(fmt(PAPER_TAU.get((meas, m))))
        lines.append(f"| {MEASURE_LABELS.get(meas) or DIAGNOSTICS[meas]} | " + " | ".join(cells) + " |")
    lines += ["", "Runs per network: " + ", ".join(
        f"{MODEL_LABELS.get(m, m)} {table[m]['_runs']} runs over r = {table[m]['_ratios']}, lowest final train "
        f"accuracy {table[m]['_min_train_acc']:.4f}" for m in models) + ".", ""]
    why = ("a fixed budget: every run ends where its loss has got to" if reference else
           "training stops at the first check with train accuracy 1.0, so the loss level differs between runs")
    lines += [f"Confound check, Kendall tau of each measure with the final training loss ({why}): " + "; ".join(
                  f"{MODEL_LABELS.get(m, m)}: " + ", ".join(
                      f"{meas} {fmt(v)}" for meas, v in table[m]["_tau_with_train_loss"].items())
                  for m in models) + ".", ""]
    lines += ["Mean over trials per ratio" + (" (ref. loss: the reference's archived final training loss, median of "
                                            "its 10 runs on 60,000 images; steps to fit: first check at train "
                                            "accuracy 1.0)" if reference else "") + ":", "",
              "| network | r | trials | steps | train acc | train loss | test acc | gap | MS | NS | trace | top eig |"
              + (" ref. loss | steps to fit |" if reference else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if reference else "")]
    for m in models:
        for ratio in sorted({r["ratio"] for r in runs if r["model"] == m}):
            rs = [r for r in runs if r["model"] == m and r["ratio"] == ratio]
            mean = lambda k: float(np.mean([r.get(k, float("nan")) for r in rs]))  # noqa: E731
            loss = float(np.mean([r.get("train_loss", float("nan")) for r in rs]))
            lines.append(f"| {MODEL_LABELS.get(m, m)} | {ratio:.1f} | {len(rs)} | {fmt(mean('steps'), '.0f')} | "
                         f"{mean('train_acc'):.4f} | {loss:.2g} | {mean('test_acc'):.4f} | {mean('gap'):.4f} | "
                         f"{mean('minimum_sharpness'):.4g} | "
                         f"{mean('normalized_sharpness'):.4g} | {mean('hessian_trace'):.4g} | "
                         f"{mean('top_eigenvalue'):.4g} |"
                         + (f" {fmt(REFERENCE_FINAL_TRAIN_LOSS.get(m, {}).get(ratio), '.2g')} | "
                            f"{fit_steps(rs)} |" if reference else ""))
    lines += ["", "Paper's LeNet minimum sharpness (SPEC 1.5, reference's archived runs on full MNIST): " + ", ".join(
        f"r={k}: {v}" for k, v in PAPER_LENET_MS.items()) + ". Their LeNet is the reference code's variant "
        "(`ms_lenet`), trained on 60000 images; ours is LeNet-5 on a mnist5k subset, so only the trend compares."]
    os.makedirs(out, exist_ok=True)
    io.write_text_atomic(os.path.join(out, "kendall_tau.md"), "\n".join(lines) + "\n")
    io.write_json_atomic(os.path.join(out, "kendall_tau.json"),
                      {"ours": table, "paper_spec_1_5": {f"{a}/{b}": v for (a, b), v in PAPER_TAU.items()}})
    if runs:
        scatter(runs, models, os.path.join(out, "scatter.png"))
    if any("curve" in r for r in runs):
        loss_curves(runs, models, os.path.join(out, "loss_curves.png"))
    return table


def member_groups(pending: Sequence[tuple], ratios_per_program: int) -> list:
    """Pending ``(ratio, trial)`` members cut into groups of at most ``ratios_per_program`` ratios (in order)."""
    if ratios_per_program < 1:
        raise ValueError(f"ratios_per_program must be >= 1; got {ratios_per_program}.")
    order = list(dict.fromkeys(r for r, _ in pending))
    groups = []
    for i in range(0, len(order), ratios_per_program):
        chunk = set(order[i:i + ratios_per_program])
        groups.append([(r, t) for r, t in pending if r in chunk])
    return groups


def run_study(cfg) -> dict:
    if getattr(cfg, "protocol", "ours") == "reference":
        return run_reference_study(cfg)
    data = load_data(cfg)
    protocol = protocol_of(cfg)
    note = ""
    trials = list(range(cfg.trials))
    for model_name in cfg.models:
        for ratio in cfg.ratios:
            todo = pending_trials(cfg.out, model_name, ratio, trials, protocol)
            if not todo:
                print(f"[{model_name} r={ratio:.1f}] all {len(trials)} trials finished; skipped", flush=True)
                continue
            t0 = time.perf_counter()
            run_group(model_name, ratio, todo, data, cfg)
            print(f"[{model_name} r={ratio:.1f}] done in {time.perf_counter() - t0:.0f} s", flush=True)
            write_summary(cfg.out, cfg.models, note)
    return write_summary(cfg.out, cfg.models, note)


def run_reference_study(cfg) -> dict:
    """The reference protocol: per network, the pending ``(ratio, trial)`` runs in groups of
    ``--ratios_per_program`` ratios, each group one training program."""
    trials = list(range(cfg.trials))
    for model_name in cfg.models:
        mcfg = model_cfg(cfg, model_name)
        protocol = protocol_of(mcfg)
        pending = [(r, t) for r in cfg.ratios for t in pending_trials(cfg.out, model_name, r, trials, protocol)]
        if not pending:
            print(f"[{model_name}] all runs finished; skipped", flush=True)
            continue
        data = load_data(mcfg)
        for group in member_groups(pending, cfg.ratios_per_program):
            t0 = time.perf_counter()
            run_members(model_name, group, data, mcfg)
            print(f"[{model_name}] group of {len(group)} runs done in {time.perf_counter() - t0:.0f} s", flush=True)
            write_summary(cfg.out, cfg.models)
    table = write_summary(cfg.out, cfg.models)
    write_comparison(cfg)
    return table


def write_comparison(cfg) -> None:
    """``protocol_comparison.md`` beside our protocol's results, when the reference results sit in its default
    place (``<ours>/reference_protocol``)."""
    ours_dir = os.path.dirname(os.path.normpath(cfg.out))
    if os.path.isfile(os.path.join(ours_dir, "kendall_tau.json")):
        write_protocol_comparison(ours_dir, cfg.out, os.path.join(ours_dir, "protocol_comparison.md"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="ours", choices=("ours", "reference"),
                   help="ours: stop at the first full fit; reference: the reference code's fixed budget and optimizer")
    p.add_argument("--models", default="ms_mlp,lenet")
    p.add_argument("--ratios", default=",".join(str(r) for r in SPREAD_ORDER),
                   help="comma-separated r values, run in this order (default: spread over [0, 1])")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--n_train", type=int, default=None, help="default 2000 (reference protocol: per network)")
    p.add_argument("--n_measure", type=int, default=None, help="default 1000 (reference protocol: per network)")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=None, help="our protocol: step cap (default 3000)")
    p.add_argument("--steps", type=int, default=None, help="reference protocol: the fixed budget (per network)")
    p.add_argument("--eval_every", type=int, default=None,
                   help="steps between train-set checks (default 100; reference protocol: per network)")
    p.add_argument("--target_loss", type=float, default=None,
                   help="also require mean train CE <= this to stop (loss-matched runs; default: accuracy 1.0 only)")
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (reference protocol: 0.1 MLP, 0.01 LeNet)")
    p.add_argument("--momentum", type=float, default=None, help="default 0.9")
    p.add_argument("--batch_size", type=int, default=None, help="default 128 (reference protocol: 1024)")
    p.add_argument("--weight_decay", type=float, default=None, help="reference protocol: default 1e-5")
    p.add_argument("--lr_decay", type=float, default=None,
                   help="reference protocol: lr / (1 + lr_decay * step); default 1e-4 * reference steps / --steps")
    p.add_argument("--ratios_per_program", type=int, default=1,
                   help="reference protocol: ratios whose trials train together in one program")
    p.add_argument("--hutchinson_probes", type=int, default=None, help="default 30 (reference protocol: per network)")
    p.add_argument("--lanczos_iters", type=int, default=None, help="default 20 (reference protocol: per network)")
    p.add_argument("--trace_chunk", type=int, default=64)
    p.add_argument("--ns_tol", type=float, default=1e-6)
    p.add_argument("--ns_max_iters", type=int, default=2000)
    p.add_argument("--member_loop", default="auto", choices=("auto", "vmap", "unroll"),
                   help="how the trials of one r share a program: vmap, or unrolled (auto: unroll conv nets)")
    p.add_argument("--mnist_test_dir", default=None, help="folder of MNIST IDX files: adds official_test_acc")
    p.add_argument("--save_params", default=None, help="folder for each run's final parameters (.npz)")
    p.add_argument("--reference_archive", default=None,
                   help="a checkout of ibayashi-hikaru/minimum-sharpness: tabulate its archived runs' Kendall taus "
                        "into <out of our protocol>/reference_archive.md")
    p.add_argument("--out", default=None, help="default experiments/results/random_labels (reference protocol: "
                                              "its reference_protocol subfolder)")
    p.add_argument("--aggregate_only", action="store_true")
    cfg = p.parse_args(argv)
    cfg.models = [m for m in cfg.models.split(",") if m]
    cfg.ratios = [round(float(r), 1) for r in cfg.ratios.split(",") if r]
    bad = [r for r in cfg.ratios if not 0.0 <= r <= 1.0]
    if bad:
        p.error(f"ratios must lie in [0, 1]; got {bad}")
    base = os.path.join("experiments", "results", "random_labels")
    if cfg.protocol == "ours":
        for k, v in OURS_DEFAULTS.items():
            if getattr(cfg, k) is None:
                setattr(cfg, k, v)
        for k in ("steps", "weight_decay", "lr_decay"):
            if getattr(cfg, k) is not None:
                p.error(f"--{k} belongs to --protocol reference")
        cfg.out = cfg.out or base
    else:
        for k in ("max_steps", "target_loss"):
            if getattr(cfg, k) is not None:
                p.error(f"--{k} belongs to our protocol (the reference protocol trains for a fixed --steps)")
        unknown = [m for m in cfg.models if m not in REFERENCE_TRAIN]
        if unknown:
            p.error(f"--protocol reference knows the networks {sorted(REFERENCE_TRAIN)}; got {unknown}")
        cfg.out = cfg.out or os.path.join(base, "reference_protocol")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.reference_archive:
        out = os.path.dirname(os.path.normpath(cfg.out)) if cfg.protocol == "reference" else cfg.out
        print(open(os.path.join(out, "reference_archive.md")).read() if reference_archive_table(
            cfg.reference_archive, out) else "")
    if cfg.aggregate_only:
        table = write_summary(cfg.out, cfg.models)
        if cfg.protocol == "reference":
            write_comparison(cfg)
    else:
        table = run_study(cfg)
    print(open(os.path.join(cfg.out, "kendall_tau.md")).read())
    return table


if __name__ == "__main__":
    main()
