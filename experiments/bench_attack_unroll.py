"""Loops of the attacks on this machine: small CNN at width 0.5, 512 mnist5k test images, weights as arguments of
the programs. The figures behind :func:`lcnn_jax.attacks.attack_unroll` and :func:`lcnn_jax.attacks.apgd_stepwise`.

    python experiments/bench_attack_unroll.py            # PGD-Linf, 20 steps: unroll = 1 (rolled), 5, True
    python experiments/bench_attack_unroll.py --apgd     # APGD-CE, L2 eps 1, 100 steps: the rolled loop of apgd
                                                         # against apgd_stepwise (host-driven 5-step segments)

Each line: compile time (first call minus a steady call, for the host-driven driver) and the median of 3 runs.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcnn_jax import attacks
from lcnn_jax.data import load_split
from lcnn_jax.nn import make_model


def _timed(fn, *args) -> tuple[float, float]:
    """(seconds of the first call, median seconds of 3 further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--apgd", action="store_true", help="APGD-100: rolled loop vs host-driven segments")
    args = p.parse_args()
    split = load_split("mnist5k", "test")
    xs, ys = jnp.asarray(split.images[:512]), jnp.asarray(split.labels[:512])
    model = make_model("small_cnn", 10, width_mult=0.5)
    variables = model.init(jax.random.PRNGKey(0), xs[:1], train=False)
    key = jax.random.PRNGKey(1)

    def apply(v, z):
        return model.apply(v, z, train=False)

    if args.apgd:
        kw = dict(norm="l2", eps=1.0, num_steps=100, loss="ce", key=key)
        rolled = jax.jit(lambda v, x, y: attacks.apgd(lambda z: apply(v, z), x, y, **kw))
        first, run = _timed(rolled, variables, xs, ys)
        print(f"apgd (rolled loop, one program): compile {first - run:.2f} s, run {run:.2f} s (median of 3)")
        first, run_s = _timed(lambda v, x, y: attacks.apgd_stepwise(apply, x, y, params=v, **kw), variables, xs, ys)
        print(f"apgd_stepwise (segments of {attacks.APGD_SEGMENT}): compile {first - run_s:.2f} s, run {run_s:.2f} s "
              f"(median of 3); rolled / stepwise run time {run / run_s:.2f}x", flush=True)
        return
    for unroll in (1, 5, True):
        fn = jax.jit(lambda v, x, y, k, u=unroll: attacks.pgd(lambda z: apply(v, z), x, y, norm="linf", eps=0.1,
                                                              step_size=0.0125, num_steps=20, key=k, unroll=u))
        t0 = time.perf_counter()
        compiled = fn.lower(variables, xs, ys, key).compile()
        t_compile = time.perf_counter() - t0
        _, run = _timed(compiled, variables, xs, ys, key)
        print(f"unroll={unroll}: compile {t_compile:.2f} s, run {run:.2f} s (median of 3)", flush=True)


if __name__ == "__main__":
    main()
