"""1-Lipschitz layers by construction (lcnn_jax.nn.lipschitz), checked against float64 dense oracles.

Oracles: the layer's dense matrix (jax.jacfwd in float64 of the linear map the layer applies) and its largest
singular value by numpy SVD; MinMax's Jacobian is a permutation matrix; the bound interpreter's value for a stack.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax.measures.bounds import curvature_bound
from lcnn_jax.nn import lipschitz as lip
from lcnn_jax.nn.models import make_model


def _sigma_max(mat) -> float:
    return float(np.linalg.svd(np.asarray(mat, np.float64), compute_uv=False)[0])


@pytest.mark.parametrize("shape", [(5, 3), (3, 7), (16, 16)])
def test_aol_dense_operator_norm_at_most_one(x64, shape):
    for seed in range(4):
        w = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * (1 + 3 * seed)
        kernel = np.asarray(lip.aol_dense_kernel(w), np.float64)  # what the layer applies (float32 weights)
        assert _sigma_max(kernel) <= 1.0
        # and the layer computes x @ kernel + b: its Jacobian is kernel^T
        layer = lip.AOLDense(shape[1])
        params = {"params": {"kernel": w, "bias": jnp.zeros(shape[1], jnp.float32)}}
        jac = jax.jacfwd(lambda x, layer=layer, params=params: layer.apply(params, x))(
            jnp.zeros(shape[0], jnp.float64))
        assert _sigma_max(jac) <= 1.0


@pytest.mark.parametrize("strides,padding,cin,cout,k", [((1, 1), "SAME", 2, 3, 3), ((2, 2), "SAME", 3, 2, 4),
                                                         ((1, 1), "VALID", 1, 4, 3)])
def test_aol_conv_dense_matrix_norm_at_most_one(x64, strides, padding, cin, cout, k):
    for seed in range(3):
        w = jax.random.normal(jax.random.PRNGKey(seed), (k, k, cin, cout), jnp.float32)
        layer = lip.AOLConv(cout, kernel_size=(k, k), strides=strides, padding=padding, use_bias=False)
        params = {"params": {"kernel": w}}
        x0 = jnp.zeros((1, 7, 7, cin), jnp.float64)
        jac = jax.jacfwd(lambda x, layer=layer, params=params: layer.apply(params, x))(x0).reshape(-1, x0.size)
        s = _sigma_max(jac)
        assert 0.05 < s <= 1.0  # not vacuous either


def test_aol_conv_scales_match_the_dense_gram_row_sums(x64):
    """Independent oracle for the autocorrelation: the absolute row sums of A^T A on a large zero-padded image
    (interior rows see every offset) equal 1 / d_i^2 up to the shrink factor."""
    k, cin, cout = 3, 2, 3
    w = jax.random.normal(jax.random.PRNGKey(5), (k, k, cin, cout), jnp.float64)
    conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x0 = jnp.zeros((1, 9, 9, cin), jnp.float64)
    a = np.asarray(jax.jacfwd(conv)(x0).reshape(-1, x0.size))
    gram = np.abs(a.T @ a).sum(axis=1).reshape(9, 9, cin)
    d = np.asarray(lip.aol_conv_scales(w), np.float64)
    np.testing.assert_allclose(gram[4, 4], (lip.AOL_SHRINK / d) ** 2, rtol=1e-10)


def test_minmax_jacobian_is_a_permutation_and_one_lipschitz(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (8,), jnp.float64)
    jac = np.asarray(jax.jacfwd(lip.minmax_pairs)(x))
    assert set(np.unique(jac)) <= {0.0, 1.0}
    np.testing.assert_array_equal(jac.sum(0), 1.0)
    np.testing.assert_array_equal(jac.sum(1), 1.0)
    ys = jax.random.normal(jax.random.PRNGKey(1), (100, 8), jnp.float64)
    zs = jax.random.normal(jax.random.PRNGKey(2), (100, 8), jnp.float64)
    num = jnp.linalg.norm(jax.vmap(lip.minmax_pairs)(ys) - jax.vmap(lip.minmax_pairs)(zs), axis=1)
    assert bool(jnp.all(num <= jnp.linalg.norm(ys - zs, axis=1) * (1 + 1e-12)))


@pytest.mark.slow  # a long oracle test: CI runs it with -m slow (the default suite stays < 3 min)
@pytest.mark.parametrize("name,kwargs,shape", [
    ("aol_mlp", {"widths": (16, 8)}, (6, 6, 1)),
    ("aol_cnn", {"channels": (4, 6), "dense_widths": (8,)}, (8, 8, 1)),
    ("aol_cnn", {"channels": (4,), "dense_widths": (), "activation": "centered_softplus"}, (6, 6, 2)),
])
def test_interpreted_bound_of_a_stack_is_at_most_one_per_layer(name, kwargs, shape):
    net = make_model(name, 5, **kwargs)
    for seed in range(2):
        v = net.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape))
        # large random weights: the rescaling, not the initialisation, keeps the norm below 1
        v = {"params": jax.tree_util.tree_map(lambda a: a * 7.0 if a.ndim >= 2 else a, v["params"])}
        res = curvature_bound(net, v, shape, num_iters=1)
        layers = [f for f in res.factors if f.op in ("dense", "conv") and f.path.startswith("aol")]
        assert layers and all(f.upper <= 1.0 for f in layers)
        # the body up to the head: at most 1 (the centred softplus' b and 1/b cancel up to the safety margins)
        body = 1.0
        for f in res.factors:
            if f.path.startswith("head"):
                break
            body *= f.upper
        assert body <= 1.0 + 1e-4


def test_minmax_needs_even_channels():
    with pytest.raises(ValueError, match="even"):
        lip.MinMax().init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))


def test_training_bounds_refuse_other_models():
    net = make_model("mlp", 3, widths=(4,))
    v = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)))
    with pytest.raises(ValueError, match="not a 1-Lipschitz layer"):
        lip.training_bounds(v["params"])
