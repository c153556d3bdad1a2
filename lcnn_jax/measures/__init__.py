"""What a trained network *is*: Jacobian norms, input curvature, Lipschitz estimates, parameter-space Hessian
measures and sharpness. Measures take plain functions (one example -> output, or a per-example loss), never
models; see each module's docstring for formulas and costs.

Non-finite inputs: called eagerly, every measure raises ``ValueError`` on an input batch holding NaN or inf.
Under ``jax.jit`` the values cannot be read, so nothing is raised and the result for such an example is silently
wrong: typically 0 for the Jacobian norm, gradient norm, Lipschitz estimate and gradient stability (the
gradient-safe norms return 0 for a non-finite square, and a ReLU treats NaN as an inactive unit), and NaN for the
curvature of a smooth network; the other examples of the batch are unaffected, but a mean over the batch is not.
Check inputs on the host before jitting (:func:`lcnn_jax.report.check_finite_images`); ``lcnn-jax measure`` and
``lcnn-jax compare`` do, and stop with exit code 2."""
from lcnn_jax.measures.bounds import Bound, CurvatureBound, Factor, curvature_bound, function_bound, layer_bound
from lcnn_jax.measures.certified import Certificate, certified_radii, certify
from lcnn_jax.measures.operator_norms import NormBounds, conv_general_norm_bounds, conv_norm_bounds, matrix_norm_bounds
from lcnn_jax.measures.curvature import gradient_stability, input_curvature
from lcnn_jax.measures.hessian import (DatasetHVP, dataset_hvp, hessian_spectral_density, hessian_top_eigenvalues,
                                      hessian_trace)
from lcnn_jax.measures.jacobian import jacobian_frobenius, probe_variance
from lcnn_jax.measures.lipschitz import (STEP_GROWTH, LipschitzEstimate, PairAscentResult, lipschitz_pair_ascent,
                                         local_lipschitz, pair_ascent_step, pair_quotients)
from lcnn_jax.measures.sharpness import (LayerNormalizedSharpness, NormalizedSharpnessResult, SharpnessResult,
                                         layer_hessian_traces, layer_order, minimum_sharpness,
                                         minimum_sharpness_from_traces, normalized_layer_sharpness,
                                         normalized_sharpness, normalized_sharpness_from_diagonal, rescale_params)

__all__ = ["Bound", "CurvatureBound", "Factor", "curvature_bound", "function_bound", "layer_bound", "NormBounds",
           "conv_norm_bounds", "conv_general_norm_bounds", "matrix_norm_bounds", "gradient_stability", "input_curvature", "hessian_spectral_density", "hessian_top_eigenvalues",
           "dataset_hvp", "DatasetHVP",
           "hessian_trace", "jacobian_frobenius", "probe_variance", "LipschitzEstimate", "STEP_GROWTH", "PairAscentResult", "lipschitz_pair_ascent",
           "local_lipschitz", "pair_ascent_step", "pair_quotients", "LayerNormalizedSharpness",
           "NormalizedSharpnessResult", "SharpnessResult", "layer_hessian_traces", "layer_order",
           "minimum_sharpness", "minimum_sharpness_from_traces", "normalized_layer_sharpness",
           "normalized_sharpness", "normalized_sharpness_from_diagonal", "rescale_params", "Certificate", "certify",
           "certified_radii"]
