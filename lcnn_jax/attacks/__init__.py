"""Adversarial and random perturbations of image batches, and (robust) accuracy.

``logits_fn(xs) -> logits`` is the model as a batched function of its inputs (B, ...) -> (B, K), e.g.
``lambda xs: model.apply(variables, xs)`` in eval mode; it must treat examples independently. Inputs live in the box
``clip = (0, 1)`` (``clip=None`` disables it); radii ``eps`` are in that scale.

One module per family, every public name re-exported here:

* :mod:`~lcnn_jax.attacks.pgd`: :func:`fgsm`, :func:`pgd`, :func:`gaussian_noise`, :func:`accuracy`,
  :func:`robust_accuracy`, the CLIP reference's protocols (:func:`pgd_l2_clip_reference`,
  :func:`gaussian_noise_normalized`);
* :mod:`~lcnn_jax.attacks.apgd`: Auto-PGD (:func:`apgd`, :func:`apgd_stepwise`, ``schedule="reference"`` or
  ``"paper"``), :func:`dlr_loss`, :func:`robust_accuracy_worst_case`, :func:`apgd_attacks`;
* :mod:`~lcnn_jax.attacks.fab`: FAB, the fast adaptive boundary attack (:func:`fab`, targeted and untargeted);
* :mod:`~lcnn_jax.attacks.square`: the Square attack (:func:`square`, gradient-free, random search);
* :mod:`~lcnn_jax.attacks.autoattack`: the AutoAttack cascade (:func:`autoattack`), the protocol reviewers ask for.

For evaluation prefer :func:`autoattack` (``version="standard"``: APGD-CE, APGD-T, FAB-T, Square, each run only on
the points still robust); :func:`apgd` with the worst case over CE and DLR is its cheaper core; fixed-step :func:`pgd`
can overstate robustness. :func:`autoattack`'s docstring has a runnable example.
"""
from lcnn_jax.attacks.base import Clip, LogitsFn, attack_unroll, cross_entropy
from lcnn_jax.attacks.pgd import (MNIST_MEAN, MNIST_STD, accuracy, fgsm, gaussian_noise, gaussian_noise_normalized, pgd,
                                  pgd_l2_clip_reference, robust_accuracy)
from lcnn_jax.attacks.apgd import (APGD_LOSSES, APGD_MOMENTUM, APGD_RHO, APGD_SCHEDULE, APGD_SCHEDULES, APGD_SEGMENT,
                                   WorstCase, apgd, apgd_attacks, apgd_checkpoints, apgd_machine, apgd_stepwise,
                                   dlr_loss, robust_accuracy_worst_case, target_classes)
from lcnn_jax.attacks.fab import FAB_ALPHA_MAX, FAB_BETA, FAB_ETA, fab, fab_stepwise, project_hyperplane
from lcnn_jax.attacks.square import (SQUARE_CHUNK, SQUARE_P_INIT, SQUARE_QUERIES, square, square_p, square_sizes,
                                     square_stepwise)
from lcnn_jax.attacks.autoattack import (AUTOATTACK_STAGES, AUTOATTACK_VERSIONS, AutoAttackResult, autoattack,
                                         autoattack_settings)

__all__ = ["attack_unroll", "cross_entropy", "MNIST_MEAN", "MNIST_STD", "accuracy", "fgsm", "gaussian_noise",
           "gaussian_noise_normalized", "pgd", "pgd_l2_clip_reference", "robust_accuracy", "APGD_LOSSES",
           "APGD_MOMENTUM", "APGD_RHO", "APGD_SEGMENT", "WorstCase", "apgd", "apgd_attacks", "apgd_checkpoints",
           "apgd_stepwise", "dlr_loss", "robust_accuracy_worst_case", "APGD_SCHEDULE", "APGD_SCHEDULES",
           "apgd_machine", "target_classes", "Clip", "LogitsFn",
           "FAB_ALPHA_MAX", "FAB_BETA", "FAB_ETA", "fab", "fab_stepwise", "project_hyperplane",
           "SQUARE_CHUNK", "SQUARE_P_INIT", "SQUARE_QUERIES", "square", "square_p", "square_sizes", "square_stepwise",
           "AUTOATTACK_STAGES", "AUTOATTACK_VERSIONS", "AutoAttackResult", "autoattack", "autoattack_settings"]
