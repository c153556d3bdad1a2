"""What a trained network *is*: Jacobian norms, input curvature, Lipschitz estimates, parameter-space Hessian
measures and sharpness. Measures take plain functions (one example -> output, or a per-example loss), never
models; see each module's docstring for formulas and costs."""
from lcnn_jax.measures.bounds import Bound, CurvatureBound, curvature_bound, layer_bound
from lcnn_jax.measures.curvature import gradient_stability, input_curvature
from lcnn_jax.measures.hessian import (DatasetHVP, dataset_hvp, hessian_spectral_density, hessian_top_eigenvalues,
                                      hessian_trace)
from lcnn_jax.measures.jacobian import jacobian_frobenius
from lcnn_jax.measures.lipschitz import (STEP_GROWTH, PairAscentResult, lipschitz_pair_ascent, local_lipschitz,
                                         pair_ascent_step, pair_quotients)
from lcnn_jax.measures.sharpness import (LayerNormalizedSharpness, NormalizedSharpnessResult, SharpnessResult,
                                         layer_hessian_traces, layer_order, minimum_sharpness,
                                         minimum_sharpness_from_traces, normalized_layer_sharpness,
                                         normalized_sharpness, normalized_sharpness_from_diagonal, rescale_params)

__all__ = ["Bound", "CurvatureBound", "curvature_bound", "layer_bound", "gradient_stability", "input_curvature", "hessian_spectral_density", "hessian_top_eigenvalues",
           "dataset_hvp", "DatasetHVP",
           "hessian_trace", "jacobian_frobenius", "STEP_GROWTH", "PairAscentResult", "lipschitz_pair_ascent",
           "local_lipschitz", "pair_ascent_step", "pair_quotients", "LayerNormalizedSharpness",
           "NormalizedSharpnessResult", "SharpnessResult", "layer_hessian_traces", "layer_order",
           "minimum_sharpness", "minimum_sharpness_from_traces", "normalized_layer_sharpness",
           "normalized_sharpness", "normalized_sharpness_from_diagonal", "rescale_params"]
