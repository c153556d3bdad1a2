"""Helpers shared by the LCNN layer tests and the curvature-bound tests (not a test module)."""
import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

KEY = jax.random.PRNGKey(0)
F64 = jnp.float64


@contextlib.contextmanager
def xla_optimizations(enabled):
    """XLA:CPU spends tens of seconds optimising the init or the Hessian of a ResNet, far more than these tiny
    programs then run; the tests need correctness, not speed, so most of them compile unoptimised."""
    prev = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", not enabled)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", prev)


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, F64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
                        tree)


def randomise(variables, seed):
    """Spread the LCNN parameters and statistics so every branch of the bound is exercised."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "log_beta":
            return jnp.asarray(rng.uniform(math.log(1.0), math.log(20.0)), leaf.dtype)
        if name == "log_gamma":
            return jnp.asarray(rng.uniform(math.log(0.5), math.log(10.0)), leaf.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.05, 2.0, size=leaf.shape), leaf.dtype)
        if name in ("mean", "bias"):
            return jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(-2.0, 2.0, size=leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, variables)


def random_variables(model, input_shape, seed):
    """Variables on ``model.init``'s shapes without running it (its PRNG calls cost many seconds to compile on
    CPU): LeCun-normal kernels, random unit power-iteration vectors (the bound must not assume they converged),
    then :func:`randomise`."""
    shapes = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
        if name == "v":
            v = rng.normal(size=leaf.shape)
            return jnp.asarray(v / np.linalg.norm(v), leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return randomise(jax.tree_util.tree_map_with_path(fill, shapes), seed)


def downsample(images, factor):
    """Real digits at lower resolution (block means), so that dense Hessians stay cheap."""
    n, h, w, c = images.shape
    return np.asarray(images).reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
