"""AutoAttack's cost per stage on the small CNN, and our time per input gradient against our PGD's (issue 26, item 6).

    python experiments/bench_autoattack.py                            # train the quickstart CNN (2 epochs), 512 images
    python experiments/bench_autoattack.py --workdir runs/quickstart  # a trained run instead
    python experiments/bench_autoattack.py --num-images 16 --epochs 0 --num-steps 5 --num-queries 20  # smoke run

For each norm and radius (L-inf 0.1, L2 1.5 by default) the standard version runs twice on the same images; the
second run is reported (compiled programs are cached, so it times the attacks, not XLA). Per stage: the points it
ran on (summed over its runs: restarts, target classes), the rows computed (points padded to a power of two), the
points it broke, the forward and backward passes (counted from the algorithms on the computed rows), seconds, and
milliseconds per pass. Then the time of one input gradient inside APGD-CE (host-driven 5-step segments) against
one inside PGD (one compiled program, 20 unrolled steps) on the same images: the target is APGD within 1.2x of PGD,
i.e. APGD costs what its pass count says.

Passes per computed row (N steps, Q queries, K classes): APGD ``N + 1`` forward + backward and 2 forward (clean
logits, the final check); FAB-T ``N`` x (1 forward + 1 backward + 1 forward) + 3 forward; Square ``Q + 1`` forward + 2
forward. Hardware and the command go with any figure quoted from this script.
"""
import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp

from lcnn_jax import attacks
from lcnn_jax.data import load_split


def _model(args):
    """``(apply(variables, xs), variables)``: a trained run, or the quickstart CNN trained for ``--epochs``."""
    from lcnn_jax import train
    from lcnn_jax.configs import load_config

    def bind(model, state):
        variables = {"params": state.params, **state.model_state}
        return (lambda v, z: model.apply(v, z, train=False)), variables

    if args.workdir:
        _, model, state, _ = train.load_trained(args.workdir)
        return bind(model, state)
    config = load_config(os.path.join(os.path.dirname(__file__), "configs", "quickstart.py"))
    config.model.kwargs = {"width_mult": args.width}
    if args.epochs == 0:
        from lcnn_jax.nn import make_model

        model = make_model(config.model.name, 10, **config.model.kwargs)
        xs = jnp.zeros((1, 28, 28, 1))
        return (lambda v, z: model.apply(v, z, train=False)), model.init(jax.random.PRNGKey(0), xs, train=False)
    config.train.num_epochs = args.epochs
    config.train.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        train.fit(config, tmp)
        _, model, state, _ = train.load_trained(tmp)
    return bind(model, state)


def _passes(stage, rows, steps, queries):
    """(forward, backward) passes on ``rows`` computed rows of one run of ``stage``."""
    if stage.startswith("apgd"):
        return rows * (steps + 1 + 2), rows * (steps + 1)
    if stage == "fab-t":
        return rows * (2 * steps + 3), rows * steps
    if stage == "fab":
        return rows * (2 * steps + 3), rows * steps * 10  # K = 10 backward passes per iteration
    return rows * (queries + 3), 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="a trained run (lcnn-jax train); default: train the quickstart")
    p.add_argument("--epochs", type=int, default=2, help="quickstart epochs when no --workdir (0: untrained)")
    p.add_argument("--width", type=float, default=0.5, help="quickstart width_mult when no --workdir")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--num-steps", type=int, default=100)
    p.add_argument("--num-queries", type=int, default=5000)
    p.add_argument("--linf", type=float, nargs="*", default=[0.1])
    p.add_argument("--l2", type=float, nargs="*", default=[1.5])
    args = p.parse_args()
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    apply, variables = _model(args)
    split = load_split("mnist5k", "test")
    xs, ys = jnp.asarray(split.images[: args.num_images]), jnp.asarray(split.labels[: args.num_images])
    key = jax.random.PRNGKey(0)
    for norm, radii in (("linf", args.linf), ("l2", args.l2)):
        for eps in radii:
            kw = dict(norm=norm, eps=eps, key=key, params=variables, batch_size=args.batch_size,
                      num_steps=args.num_steps, num_queries=args.num_queries, progress=False)
            attacks.autoattack(apply, xs, ys, **kw)  # compiles
            log: list = []
            t0 = time.perf_counter()
            res = attacks.autoattack(apply, xs, ys, log=log, **kw)
            total = time.perf_counter() - t0
            print(f"\n{norm} eps={eps:g}: {len(xs)} images, clean {res.per_stage['clean']:.3f}, robust "
                  f"{res.robust.mean():.3f}, {total:.1f} s")
            print(f"{'stage':<9}{'runs':>5}{'points':>8}{'rows':>8}{'broken':>8}{'forward':>11}{'backward':>11}"
                  f"{'seconds':>9}{'ms/pass':>9}{'robust after':>14}")
            for stage in res.per_stage:
                if stage == "clean":
                    continue
                runs = [r for r in log if r["stage"] == stage]
                fwd = sum(_passes(stage, r["padded"], args.num_steps, args.num_queries)[0] for r in runs)
                bwd = sum(_passes(stage, r["padded"], args.num_steps, args.num_queries)[1] for r in runs)
                sec = sum(r["seconds"] for r in runs)
                ms = 1e3 * sec / max(fwd + bwd, 1)
                print(f"{stage:<9}{len(runs):>5}{sum(r['points'] for r in runs):>8}{sum(r['padded'] for r in runs):>8}"
                      f"{sum(r['broken'] for r in runs):>8}{fwd:>11}{bwd:>11}{sec:>9.2f}{ms:>9.4f}"
                      f"{res.per_stage[stage]:>14.3f}")
            # one input gradient inside APGD-CE (host-driven segments) against one inside PGD-20 (one program)
            apgd_kw = dict(params=variables, norm=norm, eps=eps, num_steps=args.num_steps, key=key)
            jax.block_until_ready(attacks.apgd_stepwise(apply, xs, ys, **apgd_kw))
            t0 = time.perf_counter()
            jax.block_until_ready(attacks.apgd_stepwise(apply, xs, ys, **apgd_kw))
            t_apgd = (time.perf_counter() - t0) / (len(xs) * (args.num_steps + 1))
            pgd = jax.jit(lambda v, x, y, k: attacks.pgd(lambda z: apply(v, z), x, y, norm=norm, eps=eps,
                                                         step_size=2.5 * eps / 20, num_steps=20, key=k))
            jax.block_until_ready(pgd(variables, xs, ys, key))
            t0 = time.perf_counter()
            jax.block_until_ready(pgd(variables, xs, ys, key))
            t_pgd = (time.perf_counter() - t0) / (len(xs) * 20)
            print(f"time per input gradient: APGD-CE {1e3 * t_apgd:.4f} ms, PGD-20 {1e3 * t_pgd:.4f} ms, "
                  f"ratio {t_apgd / t_pgd:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
