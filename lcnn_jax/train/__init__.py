"""Training: the train state and steps, devices and processes, checkpoints, run directories, ONE resumable loop,
and its two drivers: :func:`fit` (one network) and :func:`fit_sweep` (K members in one compiled program).

Modules (every public name is also importable from ``lcnn_jax.train``):

* :mod:`~lcnn_jax.train.state`: ``TrainState``, the optimizer, the pure train and eval steps;
* :mod:`~lcnn_jax.train.distributed`: the data mesh, placing batches and states, several processes;
* :mod:`~lcnn_jax.train.evaluation`: whole-split evaluation and the dead-network check;
* :mod:`~lcnn_jax.train.checkpoint`: orbax checkpoints that survive Ctrl-C, damage and a full disk;
* :mod:`~lcnn_jax.train.setup`: what a run builds from its config before the first step;
* :mod:`~lcnn_jax.train.rundir`: may this config train in this workdir; loading finished runs;
* :mod:`~lcnn_jax.train.loop`: the one loop and its hooks;
* :mod:`~lcnn_jax.train.single`: :func:`fit`;
* :mod:`~lcnn_jax.train.members`, :mod:`~lcnn_jax.train.sweep`: sweep members and :func:`fit_sweep`.

Example::

    from lcnn_jax import train
    from experiments.configs import quickstart
    results = train.fit(quickstart.get_config(), workdir="/tmp/run")
    config, model, state, info = train.load_trained("/tmp/run")
"""
from __future__ import annotations

# The flat namespace re-exports every public name of the submodules (their __all__).
# ruff: noqa: F401
from lcnn_jax.train.state import (TrainState, weight_decay_mask, make_schedule, make_optimizer, create_train_state,
                                  cross_entropy, DROPOUT_STREAM, make_train_step, make_eval_step)
from lcnn_jax.train.distributed import (maybe_initialize_distributed, is_primary, sync_processes, data_mesh,
                                        shard_batch, place_global, put_global, replicate, to_host, jit_train_step,
                                        jit_eval_step)
from lcnn_jax.train.evaluation import (evaluation_totals, evaluate, DEAD_SPREAD_RTOL, DEAD_COLLAPSE, dead_network,
                                       dead_network_report)
from lcnn_jax.train.checkpoint import TMP_MARK, Checkpointer, kept_message, remove_unfinished_checkpoints
from lcnn_jax.train.setup import (build_regularizers, check_regularizers_fit_model, RunSetup, prepare_run,
                                  check_model_fits_data)
from lcnn_jax.train.rundir import (RERUN_NEUTRAL_KEYS, EXTEND_KEYS, check_workdir_path, config_differences,
                                   checkpoint_steps, check_run_dir, show_value, previous_wall_time, read_config,
                                   template_state, restore_latest, load_trained, read_results)
from lcnn_jax.train.loop import LoopHooks, OpenRun, open_run, train_loop, progress_bar, apply_epoch_end_hooks
from lcnn_jax.train.single import fit, epoch_end_hooks
from lcnn_jax.train.members import (DATA_ORDERS, Member, flatten_grid, sweep_members, member_config, stack_states,
                                    num_members, member_state, init_member_state, init_stacked_state, SweepLayout,
                                    sweep_layout, place_state, place_batch, resolve_member_loop, map_members,
                                    jit_sweep_step, jit_sweep_eval_step)
from lcnn_jax.train.sweep import (fit_sweep, fit_sweep_from_config, config_members, single_run_conflict,
                                  format_summary, load_sweep, SeedsRun, train_seeds, aggregate_members, step_convolves)
