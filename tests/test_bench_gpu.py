"""experiments/bench_gpu.py at smoke sizes on the CPU: the script a GPU session will run must work, write its
files, and time the library's own computations (checked against direct calls)."""
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import bench_gpu  # noqa: E402

from lcnn_jax.measures.sharpness import layer_hessian_traces  # noqa: E402

pytestmark = pytest.mark.slow  # compiles five ResNet-18 train steps (width 1/16): ~1 minute on 2 cores


def test_smoke_run_writes_every_row_and_times_the_librarys_computations(tmp_path):
    res = bench_gpu.main(["--smoke", "--out", str(tmp_path), "--ms_images", "64", "--ms_chunk", "32"])
    files = {f: os.path.join(tmp_path, f) for f in ("bench_gpu_smoke.json", "bench_gpu_smoke.md")}
    assert all(os.path.isfile(p) for p in files.values())
    with open(files["bench_gpu_smoke.json"]) as f:
        assert json.load(f)["rows"].keys() == res["rows"].keys()
    assert res["skipped"] == []
    assert set(res["rows"]) == set(bench_gpu.STEP_ROWS) | set(bench_gpu.CURVATURE_ROWS) | {"ms_mlp traces"}
    for name in bench_gpu.STEP_ROWS:
        row = res["rows"][name]
        assert row["loss_finite"] and row["images_per_s"] > 0 and row["compile_s"] > 0, name
    assert res["rows"]["plain"]["x_plain_step_time"] == pytest.approx(1.0)
    for name in bench_gpu.CURVATURE_ROWS:
        assert res["rows"][name]["all_finite"] and res["rows"][name]["curvature_mean"] >= 0
    # the timed traces are those of the library on the same weights and images, and repeatable
    row = res["rows"]["ms_mlp traces"]
    assert row["repeatable"]
    logits_fn, params, xs = bench_gpu.ms_mlp_setup(64)
    direct = layer_hessian_traces(logits_fn, params, xs, chunk_size=32)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): float(v)
            for path, v in jax.tree_util.tree_flatten_with_path(direct)[0]}
    assert flat.keys() == row["traces"].keys()
    np.testing.assert_allclose([row["traces"][k] for k in flat], list(flat.values()), rtol=1e-6)
    with open(files["bench_gpu_smoke.md"]) as f:
        table = f.read()
    assert all(f"| {name} |" in table for name in res["rows"])


def test_bad_sizes_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench_gpu.main(["--smoke", "--steps", "0"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
