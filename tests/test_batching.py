"""map_chunks: chunked application of a per-example function with one input shape (one compilation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcnn_jax.batching import map_chunks


def test_map_chunks_equals_the_unchunked_function_and_keeps_one_shape():
    xs = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    ys = np.arange(23) % 4
    shapes = set()

    def fn(x, y, key):
        shapes.add((x.shape, y.shape))
        return {"s": x.sum(axis=1) + y, "k": jnp.broadcast_to(jax.random.uniform(key), y.shape)}

    out = map_chunks(fn, xs, ys, key=jax.random.PRNGKey(3), chunk_size=5)
    np.testing.assert_allclose(out["s"], xs.sum(axis=1) + ys)  # padding rows dropped, order kept
    assert shapes == {((5, 3), (5,))}  # the last chunk (3 rows) was padded to 5
    # chunk c used fold_in(key, c): rows 5..9 share chunk 1's draw
    want = float(jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), 1)))
    np.testing.assert_allclose(out["k"][5:10], want)
    assert len(set(np.round(out["k"], 7))) == 5


def test_map_chunks_array_output_small_input_and_bad_chunk():
    xs = np.ones((2, 4), np.float32)
    out = map_chunks(lambda x, y, k: x[:, 0] * 2, xs, np.zeros(2, int), key=jax.random.PRNGKey(0), chunk_size=8)
    np.testing.assert_allclose(out, [2.0, 2.0])  # fewer rows than a chunk: one chunk of 2, no padding needed
    with pytest.raises(ValueError, match="chunk_size"):
        map_chunks(lambda x, y, k: x, xs, np.zeros(2, int), key=jax.random.PRNGKey(0), chunk_size=0)
    with pytest.raises(ValueError, match="same number of rows"):
        map_chunks(lambda x, y, k: x, xs, np.zeros(3, int), key=jax.random.PRNGKey(0), chunk_size=2)
