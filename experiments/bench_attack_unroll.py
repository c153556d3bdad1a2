"""Unrolling of the attacks' step loop on this machine: PGD-Linf, 20 steps, small CNN at width 0.5, 512 mnist5k test
images, weights as arguments of the program; compile time and median run time (3 calls) for unroll = 1 (rolled),
5 (5 steps per loop iteration) and True (fully unrolled). The figures behind :func:`lcnn_jax.attacks.attack_unroll`.

    python experiments/bench_attack_unroll.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax import attacks
from lcnn_jax.data import load_split
from lcnn_jax.nn import make_model


def main() -> None:
    split = load_split("mnist5k", "test")
    xs, ys = jnp.asarray(split.images[:512]), jnp.asarray(split.labels[:512])
    model = make_model("small_cnn", 10, width_mult=0.5)
    variables = model.init(jax.random.PRNGKey(0), xs[:1], train=False)
    key = jax.random.PRNGKey(1)
    for unroll in (1, 5, True):
        fn = jax.jit(lambda v, x, y, k, u=unroll: attacks.pgd(lambda z: model.apply(v, z, train=False), x, y,
                                                              norm="linf", eps=0.1, step_size=0.0125, num_steps=20,
                                                              key=k, unroll=u))
        t0 = time.perf_counter()
        compiled = fn.lower(variables, xs, ys, key).compile()
        t_compile = time.perf_counter() - t0
        jax.block_until_ready(compiled(variables, xs, ys, key))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(variables, xs, ys, key))
            times.append(time.perf_counter() - t0)
        print(f"unroll={unroll}: compile {t_compile:.2f} s, run {np.median(times):.2f} s (median of 3)", flush=True)


if __name__ == "__main__":
    main()
