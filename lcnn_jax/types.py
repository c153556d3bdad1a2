"""Type aliases shared across the library (nothing else lives here)."""
from typing import Any, Callable, Mapping

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays (usually a Flax ``params`` collection)
PyTree = Any
Batch = Mapping[str, Array]  # {"image": (B, H, W, C) float32 in [0, 1], "label": (B,) int32}
ApplyFn = Callable[..., Array]  # ``apply_fn(params, xs) -> logits`` (batched)
ExampleFn = Callable[[Array], Array]  # ``f(x) -> output vector`` for ONE example
LossFn = Callable[[Array, Array], Array]  # ``loss_fn(x, y) -> scalar`` for ONE example
