"""``lcnn-jax compare``: every method trained under one protocol, measured by one suite, in one table.

For each method of ``config.compare.methods`` (a name of ``config.compare.method_specs``: a set of overrides of
the base config, see :func:`method_config`) the seeds ``config.compare.seeds`` are trained as ONE vmapped program
(:func:`lcnn_jax.train.fit_sweep`), then every (method, seed) *cell* is measured with the report suite
(:func:`lcnn_jax.report.measure_state`: accuracy, Jacobian Frobenius norm, input curvature, gradient stability,
local Lipschitz, APGD and/or PGD robust accuracy, certified accuracy, Gaussian-noise accuracy, parameter-Hessian
trace and top eigenvalue) plus minimum sharpness (:func:`lcnn_jax.measures.minimum_sharpness`) where it is defined.

Files in ``workdir``:

* ``cells/<method>/seed<k>.json``: one finished cell (its values, its config fingerprint), written atomically.
* ``runs/<method>-<fingerprint>-s<seeds>/``: the method's sweep (checkpoints, metrics, ``sweep_results.json``).
* ``results.csv``: one row per cell: ``method, seed, member, diverged, <metric columns>`` (see :func:`columns`).
* ``results_summary.csv``: one row per method: ``method, num_seeds, <metric>_mean, <metric>_std ...``.
* ``results.json``: ``columns`` (name, label, direction), ``cells``, ``aggregate`` (``method -> metric ->
  {mean, std, n}``), ``best`` (``metric -> [methods]``), ``methods``, ``models`` (``method -> model``),
  ``seeds``, ``timing``, ``config``.
* ``results.md``: mean ± std per method and column; the best mean per column in **bold**; a ``model`` column
  where the methods train different models (the title then counts them: ``models: small_cnn (8 methods),
  mine.py:Net (1)``).
* ``figures/accuracy_vs_curvature.png``, ``figures/robustness_vs_jacobian.png``: one point per method, seed
  standard deviations as error bars (labelled ``method (model)`` where the models differ).

A method of one's own from the command line (:func:`apply_compare_overrides`, what ``lcnn-jax compare`` applies):
``--config.compare.method_specs.mine.model.name=path/to/models.py:Net
--config.compare.method_specs.mine.regularizers.datagrad.coeff=0.01`` adds the method ``mine`` to the run.

Aggregates are the mean and the sample standard deviation (ddof=1; 0 for one seed) over the seeds that did not
diverge and have a finite value. NaN (JSON ``null``) marks a value that is undefined (e.g. minimum sharpness of a
smooth network with ``sharpness="auto"``).

Resuming: a rerun with the same config skips every cell whose file exists with the same fingerprint (the
method's resolved config + the measurement settings), and does not train a method whose cells are all done;
a method whose sweep finished but whose cells are missing is loaded from its checkpoint, not retrained; an
interrupted sweep resumes from its last checkpoint. Changing a method's config or the measurement settings
changes the fingerprint, so its cells are recomputed (in a new run directory).

Cost: training as in :func:`~lcnn_jax.train.fit_sweep` (K seeds ~ K x a single run, one compilation per
method); measurement as in ``lcnn-jax measure`` on ``measure.num_examples`` test images per cell, plus
minimum sharpness (one forward and K backward passes per example on ``measure.hessian_examples`` training
images).

Example::

    from lcnn_jax import compare
    from lcnn_jax.configs import load_config
    config = load_config("experiments/configs/compare_mnist5k.py")
    config.compare.methods = ("standard", "datagrad")
    summary = compare.run_compare(config, "runs/compare_two")
    print(summary["aggregate"]["datagrad"]["curvature"])       # {"mean": ..., "std": ..., "n": 2}
"""
from __future__ import annotations

# The package's public names, from its modules (each module's __all__).
# ruff: noqa: F401, F403
from lcnn_jax.compare.methods import *
from lcnn_jax.compare.tables import *
from lcnn_jax.compare.figures import *
from lcnn_jax.compare.run import *
