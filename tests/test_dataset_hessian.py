"""Parameter-space measures over a data set (``data=`` / an iterable of batches) against dense float64 oracles.

The oracle is ``jax.hessian`` of the mean loss over ALL examples, flattened with ``ravel_pytree``, and
``numpy.linalg.eigh`` of it. The data are split into batches of unequal sizes, so a wrong weighting of the
smaller batch (the mean of batch means instead of the mean over examples) fails the tests.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lcnn_jax import estimators as est
from lcnn_jax.measures import (dataset_hvp, hessian_spectral_density, hessian_top_eigenvalues, hessian_trace,
                               layer_hessian_traces, minimum_sharpness)

N = 10


def per_example_ce(p, batch):
    """Per-example CE of a 3-4-2 tanh MLP (26 parameters). Module level: one function object, so the jitted
    per-chunk programs compile once for the whole file (per dtype and chunk size)."""
    x, y = batch
    z = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0]


def _problem(dtype=np.float64, seed=12):
    """Parameters of the MLP and 10 labelled points."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.standard_normal((3, 4)), dtype), "b1": jnp.asarray(rng.standard_normal(4), dtype),
        "w2": jnp.asarray(rng.standard_normal((4, 2)), dtype), "b2": jnp.asarray(rng.standard_normal(2), dtype),
    }
    xs = rng.standard_normal((N, 3)).astype(dtype)
    ys = rng.integers(0, 2, N).astype(np.int32)
    return params, xs, ys, per_example_ce


def _dense_hessian(loss_of_params, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda v: loss_of_params(unravel(v))))(flat))


def _uneven_batches(xs, ys):
    """Batches of 3, 5 and 2 examples: chunks of 3 (the first batch's size); the second batch is split."""
    cuts = [(0, 3), (3, 8), (8, 10)]
    return [(xs[a:b], ys[a:b]) for a, b in cuts]


def test_dataset_hvp_is_the_hessian_of_the_mean_over_examples(x64):
    params, xs, ys, per_example = _problem()
    dense = _dense_hessian(lambda p: jnp.mean(per_example(p, (xs, ys))), params)
    flat, unravel = ravel_pytree(params)
    vs = np.random.default_rng(0).standard_normal((3, flat.size))  # random directions see every entry of H
    for kwargs in ({"data": (xs, ys), "chunk_size": 3}, {"data": _uneven_batches(xs, ys)}):
        hvp = dataset_hvp(per_example, params, **kwargs)
        for v in vs:
            np.testing.assert_allclose(ravel_pytree(hvp(unravel(jnp.asarray(v))))[0], dense @ v, rtol=1e-10,
                                       atol=1e-12)
        assert hvp.num_examples == N and hvp.num_passes == 3 and hvp.chunk_size == 3
    # The other convention (mean of the three batch means) is a different matrix: the weighting matters here.
    batch_means = _dense_hessian(
        lambda p: jnp.mean(jnp.stack([jnp.mean(per_example(p, b)) for b in _uneven_batches(xs, ys)])), params)
    assert np.max(np.abs(batch_means - dense)) > 1e-3 * np.max(np.abs(dense))


PROBES, RUNS = 3, 2


@pytest.mark.slow  # long for the default run; CI runs it
def test_dataset_trace_eigenvalues_and_density_match_dense_and_the_single_batch_mode(x64):
    params, xs, ys, per_example = _problem()
    dense = _dense_hessian(lambda p: jnp.mean(per_example(p, (xs, ys))), params)
    eig = np.linalg.eigvalsh(dense)
    n = dense.shape[0]
    data = _uneven_batches(xs, ys)

    # Hutchinson: exactly the mean of z^T H z over the probes the estimator draws (fold_in(key, i)).
    key = jax.random.key(0)
    zs = np.stack([np.asarray(ravel_pytree(est.tree_rademacher(jax.random.fold_in(key, i), params))[0])
                   for i in range(PROBES)])
    samples = np.einsum("pi,ij,pj->p", zs, dense, zs)
    trace, se = hessian_trace(per_example, params, key=key, num_probes=PROBES, data=data)
    np.testing.assert_allclose(trace, samples.mean(), rtol=1e-10)
    np.testing.assert_allclose(se, samples.std(ddof=1) / np.sqrt(PROBES), rtol=1e-8)

    # Lanczos with as many steps as parameters: the Ritz values are the eigenvalues.
    top = hessian_top_eigenvalues(per_example, params, key=jax.random.key(1), k=3, num_iters=n, data=data)
    np.testing.assert_allclose(top.eigenvalues, np.sort(eig)[::-1][:3], rtol=1e-8, atol=1e-10)
    vec0 = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], top.eigenvectors))[0]
    np.testing.assert_allclose(dense @ vec0, eig.max() * vec0, atol=1e-8)

    # SLQ: nodes are eigenvalues; the quadrature reproduces the moments v^T H^j v of the start vector.
    sd = hessian_spectral_density(per_example, params, key=jax.random.key(2), num_iters=n, num_runs=RUNS,
                                  grid=2000, data=data)
    assert np.all(np.min(np.abs(np.asarray(sd.nodes)[..., None] - eig), axis=-1) < 1e-8)
    for run in range(RUNS):
        v = np.asarray(ravel_pytree(est.tree_rademacher(jax.random.fold_in(jax.random.key(2), run), params))[0])
        v = v / np.linalg.norm(v)
        w, th = np.asarray(sd.weights[run]), np.asarray(sd.nodes[run])
        np.testing.assert_allclose(np.sum(w * th), v @ dense @ v, rtol=1e-9)
        np.testing.assert_allclose(np.sum(w * th ** 2), v @ dense @ dense @ v, rtol=1e-9)
    np.testing.assert_allclose(np.trapezoid(sd.density, sd.grid), 1.0, atol=1e-3)

    # The data are ONE batch (the first three examples): the single-batch (closure) mode, same keys.
    one = data[:1]
    mean_loss = lambda p: jnp.mean(per_example(p, one[0]))  # noqa: E731

    @jax.jit
    def single_batch(p):
        return (hessian_trace(mean_loss, p, key=key, num_probes=PROBES),
                hessian_top_eigenvalues(mean_loss, p, key=jax.random.key(1), k=3, num_iters=n),
                hessian_spectral_density(mean_loss, p, key=jax.random.key(2), num_iters=n, num_runs=RUNS, grid=50))

    (t1, se1), e1, d1 = single_batch(params)
    t2, se2 = hessian_trace(per_example, params, key=key, num_probes=PROBES, data=one)
    np.testing.assert_allclose([t2, se2], [t1, se1], rtol=1e-10)
    e2 = hessian_top_eigenvalues(per_example, params, key=jax.random.key(1), k=3, num_iters=n, data=one)
    np.testing.assert_allclose(e2.eigenvalues, e1.eigenvalues, rtol=1e-8, atol=1e-12)
    d2 = hessian_spectral_density(per_example, params, key=jax.random.key(2), num_iters=n, num_runs=RUNS, grid=50,
                                  data=one)
    # The single batch has rank <= 3 x 2: most Ritz values are (numerically) 0, compare the weighted moments.
    for j in (1, 2):
        np.testing.assert_allclose(np.sum(d2.weights * d2.nodes ** j, axis=1),
                                   np.sum(d1.weights * d1.nodes ** j, axis=1), rtol=1e-8)


@pytest.mark.slow
def test_dataset_mode_tol_stops_on_whole_rounds_with_the_rule_of_the_estimators(x64):
    # Hutchinson over a data set with tol: rounds of min_probes probes (one pass each); it stops after the first
    # round whose running standard error is within tol (oracle: the dense Hessian's samples of the same probes)
    params, xs, ys, per_example = _problem()
    dense = _dense_hessian(lambda p: jnp.mean(per_example(p, (xs, ys))), params)
    data = _uneven_batches(xs, ys)
    key = jax.random.key(0)
    zs = np.stack([np.asarray(ravel_pytree(est.tree_rademacher(jax.random.fold_in(key, i), params))[0])
                   for i in range(60)])
    samples = np.einsum("pi,ij,pj->p", zs, dense, zs)
    tol, rounds = 0.3, 5
    ok = [p for p in range(rounds, 61, rounds)
          if np.std(samples[:p], ddof=1) / np.sqrt(p) <= tol * abs(samples[:p].mean())]
    assert ok and ok[0] < 60
    res = hessian_trace(per_example, params, key=key, num_probes=60, data=data, tol=tol, min_probes=rounds)
    assert int(res.num_probes) == ok[0] and bool(res.converged)
    np.testing.assert_allclose(res.estimate, samples[:ok[0]].mean(), rtol=1e-10)
    # Lanczos over a data set with tol (host loop): the top eigenvalue within its residual, fewer passes than the cap
    top = hessian_top_eigenvalues(per_example, params, key=jax.random.key(1), k=1, num_iters=20, data=data, tol=1e-4)
    assert bool(top.converged) and int(top.num_iters) < 20
    assert abs(float(top.eigenvalues[0]) - np.linalg.eigvalsh(dense).max()) <= float(top.residuals[0]) + 1e-12


def test_one_compilation_whatever_the_batch_sizes_and_params():
    params, xs, ys, _ = _problem(np.float32)
    traces = []

    def per_example(p, batch):  # counts how often JAX traces it (once per compilation)
        traces.append(1)
        x, y = batch
        z = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0]

    hessian_trace(per_example, params, key=jax.random.key(0), num_probes=2, data=(xs, ys), chunk_size=4)
    first = len(traces)
    assert first >= 1
    # A different parameter value, more batches and a ragged list: no new trace (params are arguments,
    # not constants; every batch is padded or split to the first one's size).
    other = jax.tree_util.tree_map(lambda a: 2 * a, params)
    hessian_trace(per_example, other, key=jax.random.key(1), num_probes=2, data=(np.tile(xs, (3, 1)),
                  np.tile(ys, 3)), chunk_size=4)
    ragged = [(xs[:4], ys[:4]), (xs[4:], ys[4:]), (xs[:1], ys[:1])]
    t_list = hessian_trace(per_example, params, key=jax.random.key(2), num_probes=2, data=ragged)
    # Hutchinson makes one pass: a one-shot generator is accepted, and gives the same estimate.
    t_gen = hessian_trace(per_example, params, key=jax.random.key(2), num_probes=2, data=(b for b in ragged))
    np.testing.assert_allclose(np.asarray(t_gen), np.asarray(t_list), rtol=1e-6)
    assert len(traces) == first
    # Lanczos over 3 chunks x 3 steps: one more compilation (the HVP program), however many matvecs.
    hessian_top_eigenvalues(per_example, params, key=jax.random.key(0), k=1, num_iters=3, data=(xs, ys),
                            chunk_size=4)
    after_lanczos = len(traces)
    hessian_top_eigenvalues(per_example, other, key=jax.random.key(1), k=1, num_iters=3, data=(xs, ys),
                            chunk_size=3)
    assert after_lanczos > first
    assert len(traces) == after_lanczos + (after_lanczos - first)  # chunk 3 != 4: exactly one new compilation


def test_dataset_mode_errors_name_the_problem():
    params, xs, ys, per_example = _problem(np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="one-shot iterator"):  # Lanczos needs one pass per step
        hessian_top_eigenvalues(per_example, params, key=key, num_iters=2, data=((xs, ys) for _ in range(2)))
    passes = []

    def loader():  # a loader that drops a batch on its second pass
        passes.append(1)
        return [(xs[:4], ys[:4])] * (3 if len(passes) == 1 else 2)

    with pytest.raises(ValueError, match="changed between passes"):
        hessian_top_eigenvalues(per_example, params, key=key, num_iters=3, data=loader)
    with pytest.raises(ValueError, match="chunk_size"):
        hessian_trace(per_example, params, key=key, num_probes=1, data=(xs, ys))
    with pytest.raises(ValueError, match="per-example losses"):
        hessian_trace(lambda p, b: jnp.mean(per_example(p, b)), params, key=key, num_probes=1, data=[(xs, ys)])
    with pytest.raises(ValueError, match="leading"):
        hessian_trace(per_example, params, key=key, num_probes=1, data=[(xs, ys[:3])])
    with pytest.raises(ValueError, match="no examples"):
        hessian_trace(per_example, params, key=key, num_probes=1, data=[])
    with pytest.raises(ValueError, match=r"loss_fn\(params, batch\)"):
        hessian_trace(lambda p: 0.0, params, key=key, num_probes=1, data=[(xs, ys)])
    with pytest.raises(ValueError, match="chunk_size"):
        hessian_trace(per_example, params, key=key, num_probes=1, data=(xs, ys), chunk_size=0)
    with pytest.raises(ValueError, match="data="):
        hessian_trace(per_example, params, key=key, num_probes=1, chunk_size=4)


# ------------------------------------------------------------------------------ minimum-sharpness traces


def relu_logits(p, x):
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _relu_mlp(seed=0):
    """A 4-5-3 ReLU MLP (piecewise linear: the Gauss-Newton diagonal is the Hessian diagonal) and 10 inputs."""
    rng = np.random.default_rng(seed)
    params = {f"Dense_{i}": {"kernel": jnp.asarray(rng.standard_normal((m, k)) / np.sqrt(m)),
                             "bias": jnp.asarray(0.3 * rng.standard_normal(k))}
              for i, (m, k) in enumerate([(4, 5), (5, 3)])}
    return params, relu_logits, jnp.asarray(rng.standard_normal((N, 4)))


def test_layer_traces_over_batches_match_dense_hessian_diagonal(x64):
    params, logits_fn, xs = _relu_mlp()
    labels = jnp.arange(N) % 3

    def mean_ce(p):
        z = jax.vmap(lambda x: logits_fn(p, x))(xs)
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, labels[:, None], 1)[:, 0])

    dense_diag = np.diag(_dense_hessian(mean_ce, params))
    _, unravel = ravel_pytree(params)
    oracle = unravel(jnp.asarray(dense_diag))
    # Input batches of 3, 5, 2: bare arrays in a list, (x, y) tuples from a factory, {"image", "label"} dicts
    # from a one-shot generator (one pass is all this measure needs).
    batches = [xs[:3], xs[3:8], xs[8:]]
    for data in (batches, lambda: iter([(b, None) for b in batches]),
                 ({"image": b, "label": labels[:len(b)]} for b in batches)):
        diag = layer_hessian_traces(logits_fn, params, data, chunk_size=4, diagonal=True)
        for a, b in zip(jax.tree_util.tree_leaves(diag), jax.tree_util.tree_leaves(oracle)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
    whole = layer_hessian_traces(logits_fn, params, xs)
    split = layer_hessian_traces(logits_fn, params, batches)
    for a, b in zip(jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    ms_whole = minimum_sharpness(logits_fn, params, xs)
    ms_split = minimum_sharpness(logits_fn, params, batches)
    np.testing.assert_allclose(ms_split.value, ms_whole.value, rtol=1e-9)
    with pytest.raises(ValueError, match="no examples"):
        layer_hessian_traces(logits_fn, params, [])
