"""Cross-check (issue 20): our per-layer Hessian traces and minimum sharpness vs a PyTorch re-statement of
the reference code's computation (ibayashi-hikaru/minimum-sharpness, 02-sharpness-comparison/experiment/sharpness/
Hessian_diag.py + gradient_per_example.py + Minimum.py, read for the method; this is our own re-statement).

    pip install torch   # not a dependency of lcnn_jax; only this script needs it
    python experiments/crosscheck_ms_torch.py PARAMS.npz [--n_train 2000] [--n_measure 1000] [--dtype float64|float32]

Same weights (a Flax ms_mlp checkpoint written by random_labels.py --save_params), same inputs (the first n_measure
of the study's stratified mnist5k subset), on both sides.

Reference's computation, as re-stated here:
  * per-example gradients of a Linear layer = outer(backprop at its output, its input) (bias: backprop);
  * diag H = [ sum_k p_k (d f_k)^2  -  (d logsumexp f)^2 ] summed over examples, / n   (no labels);
    the p_k-weighted part from K backward passes of sum_b f_k, the second from one backward pass of sum_b lse;
  * per-layer traces = sums of the diagonal blocks; MS = 10,000 SGD steps (lr 1e-3, LambdaLR 1/(1e-3 e + 1)) on
    sum_{l<L} W_l a_l^-2 + B_l (a_1..a_l)^-2 + W_L (a_1..a_{L-1})^2 + B_L over log a (traces normalised by their
    sum), returning the objective before the last step times the sum.
Also: the exact minimum of that objective (torch L-BFGS, float64, to convergence) for our Newton value.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("params")
p.add_argument("--n_train", type=int, default=2000)
p.add_argument("--n_measure", type=int, default=1000)
p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
p.add_argument("--batch", type=int, default=100)
p.add_argument("--out", default=None)
p.add_argument("--factorised", action="store_true",
               help="square per-example gradients as outer(bp^2, fp^2) (identical algebra, no (n, out, in) tensor)")
p.add_argument("--study_run", default=None, help="the run JSON the study wrote for these weights (float32 numbers)")
cfg = p.parse_args()

import jax  # noqa: E402

if cfg.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from lcnn_jax.data import load_split, subset  # noqa: E402
from lcnn_jax.measures.sharpness import (layer_hessian_traces, layer_order, minimum_sharpness,  # noqa: E402
                                         minimum_sharpness_from_traces)
from lcnn_jax.nn import make_model  # noqa: E402
from random_labels import reference_sgd_ms  # noqa: E402

np_dtype = np.float64 if cfg.dtype == "float64" else np.float32
t_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
torch.set_num_threads(1)

# ---------------------------------------------------------------- data and weights (identical on both sides)
train = subset(load_split("mnist5k", "train"), cfg.n_train, seed=0, stratified=True)
xs = np.asarray(train.images[:cfg.n_measure], np_dtype)
flat = dict(np.load(cfg.params))
layers = ["dense0", "dense1", "dense2", "head"]
params = {l: {"kernel": jnp.asarray(flat[f"{l}/kernel"].astype(np_dtype)),
              "bias": jnp.asarray(flat[f"{l}/bias"].astype(np_dtype))} for l in layers}

# ---------------------------------------------------------------- ours (JAX)
model = make_model("ms_mlp", 10)
logits_fn = lambda q, x: model.apply({"params": q}, x[None], train=False)[0]  # noqa: E731
t0 = time.perf_counter()
ours_tr = layer_hessian_traces(logits_fn, params, jnp.asarray(xs), chunk_size=64)
ours_tr = {l: {k: float(v) for k, v in d.items()} for l, d in ours_tr.items()}
t_ours = time.perf_counter() - t0
assert tuple(layer_order(params)) == tuple(layers), layer_order(params)
ms_b = minimum_sharpness_from_traces(ours_tr, layers=layers, include_bias=True)
ms_nb = minimum_sharpness_from_traces(ours_tr, layers=layers, include_bias=False)
ms_direct = minimum_sharpness(logits_fn, params, jnp.asarray(xs), include_bias=True, chunk_size=64)
ours_logits = np.asarray(model.apply({"params": params}, jnp.asarray(xs), train=False))


# ---------------------------------------------------------------- reference re-stated (PyTorch)
class RefMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer0 = torch.nn.Linear(784, 512)
        self.layer1 = torch.nn.Linear(512, 128)
        self.layer2 = torch.nn.Linear(128, 512)
        self.layer3 = torch.nn.Linear(512, 10)

    def forward(self, x, keep=None):
        x = x.flatten(1, -1)
        outs = []
        for i, lin in enumerate([self.layer0, self.layer1, self.layer2, self.layer3]):
            if keep is not None:
                keep.append(x)  # the layer's input (forward-prop)
            z = lin(x)
            outs.append(z)  # the layer's output (back-prop is taken here)
            x = torch.relu(z) if i < 3 else z
        return x, outs


net = RefMLP().to(t_dtype)
with torch.no_grad():
    for i, l in enumerate(layers):
        lin = getattr(net, f"layer{i}")
        lin.weight.copy_(torch.tensor(flat[f"{l}/kernel"].astype(np_dtype)).T)  # Flax (in,out) -> torch (out,in)
        lin.bias.copy_(torch.tensor(flat[f"{l}/bias"].astype(np_dtype)))
net.eval()


def ref_diag(net, x_all, batch):
    diag = [[torch.zeros_like(getattr(net, f"layer{i}").weight), torch.zeros_like(getattr(net, f"layer{i}").bias)]
            for i in range(4)]
    n = len(x_all)
    for xb in torch.split(x_all, batch):
        ins = []
        out, zs = net(xb, keep=ins)

        def sq_grads(scalar, c):
            """sum_n c_n (per-example gradient)^2 of every layer's weight and bias."""
            bps = torch.autograd.grad(scalar, zs, retain_graph=True)
            res = []
            for bp, fp in zip(bps, ins):
                if cfg.factorised:
                    gw2 = (c[:, None] * bp ** 2).T @ fp.detach() ** 2
                else:
                    gw2 = torch.einsum("n,nij->ij", c, torch.einsum("ni,nj->nij", bp, fp.detach()) ** 2)
                res.append((gw2, c @ bp ** 2))
            return res

        ones = torch.ones(len(xb), dtype=xb.dtype)
        # (sum_k p_k g_k)^2 part: gradient of logsumexp
        for i, (gw2, gb2) in enumerate(sq_grads(torch.logsumexp(out, dim=1).sum(), ones)):
            diag[i][0] -= gw2
            diag[i][1] -= gb2
        prob = torch.softmax(out, dim=1).detach()
        for k in range(out.shape[1]):
            for i, (gw2, gb2) in enumerate(sq_grads(out[:, k].sum(), prob[:, k])):
                diag[i][0] += gw2
                diag[i][1] += gb2
    return [[d / n for d in pair] for pair in diag]


def ref_sgd_ms(weights, biases, lr=1e-3, num_epoch=10_000, decay=1e-3):
    scale = sum(weights) + sum(biases)
    w = [v / scale for v in weights]
    b = [v / scale for v in biases]
    n_free = len(w) - 1
    expo = torch.nn.Parameter(torch.zeros(n_free, dtype=torch.float64))
    opt = torch.optim.SGD([expo], lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 / (e * decay + 1))

    def objective():
        alpha = torch.exp(expo)
        loss, prod = 0, 1
        for l in range(n_free):
            loss = loss + w[l] / alpha[l] ** 2
            prod = prod * alpha[l]
            loss = loss + b[l] / prod ** 2
        return loss + w[n_free] * prod ** 2 + b[n_free]

    for _ in range(num_epoch):
        loss = objective()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
    # the exact minimum of the same objective (our target): L-BFGS to convergence from where SGD stopped
    lb = torch.optim.LBFGS([expo], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                           line_search_fn="strong_wolfe")

    def closure():
        lb.zero_grad()
        f = objective()
        f.backward()
        return f

    for _ in range(5):
        lb.step(closure)
    exact = objective().item()
    return value * scale, exact * scale


t0 = time.perf_counter()
xt = torch.tensor(xs)
d = ref_diag(net, xt, cfg.batch)
t_ref = time.perf_counter() - t0
ref_tr = {l: {"kernel": float(d[i][0].detach().sum()), "bias": float(d[i][1].detach().sum())}
          for i, l in enumerate(layers)}
with torch.no_grad():
    ref_logits = net(xt)[0].numpy()
tw = [ref_tr[l]["kernel"] for l in layers]
tb = [ref_tr[l]["bias"] for l in layers]
ref_sgd, ref_exact = ref_sgd_ms(tw, tb)
ref_nobias = len(tw) * float(np.exp(np.mean(np.log(tw))))


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b))


rows = []
for l in layers:
    for k in ("kernel", "bias"):
        rows.append((f"{l}/{k}", ours_tr[l][k], ref_tr[l][k], rel(ours_tr[l][k], ref_tr[l][k])))
ms_rows = [
    ("MS with biases: our Newton vs exact min (torch L-BFGS) of the reference objective", ms_b.value, ref_exact),
    ("MS with biases: minimum_sharpness() end to end vs exact min", ms_direct.value, ref_exact),
    ("MS without biases: closed form, ours vs reference traces", ms_nb.value, ref_nobias),
    ("MS as the reference reports it (10,000 SGD steps): our NumPy re-statement vs torch", reference_sgd_ms(
        ms_b.weight_traces, ms_b.bias_traces), ref_sgd),
]
res = {
    "params": cfg.params, "dtype": cfg.dtype, "n_measure": cfg.n_measure,
    "max_abs_logit_diff": float(np.max(np.abs(ours_logits - ref_logits))),
    "traces": {r[0]: {"ours": r[1], "reference": r[2], "rel_diff": r[3]} for r in rows},
    "max_rel_diff_traces": max(r[3] for r in rows),
    "ms": {r[0]: {"ours": r[1], "reference": r[2], "rel_diff": rel(r[1], r[2])} for r in ms_rows},
    "ms_newton": ms_b.value, "ms_reference_sgd": ref_sgd,
    "ms_reference_sgd_vs_newton_rel": rel(ref_sgd, ms_b.value),
    "seconds": {"ours_traces": t_ours, "reference_traces": t_ref},
}
print(f"weights {cfg.params}  dtype {cfg.dtype}  n={cfg.n_measure}  max |logit diff| {res['max_abs_logit_diff']:.2e}")
print(f"{'block':16s} {'ours':>22s} {'reference (torch)':>22s} {'rel diff':>9s}")
for r in rows:
    print(f"{r[0]:16s} {r[1]:22.15g} {r[2]:22.15g} {r[3]:9.1e}")
for name, a, b in ms_rows:
    print(f"{name}: {a:.15g} vs {b:.15g} (rel {rel(a, b):.1e})")
print(f"reference-reported MS (SGD) vs our Newton MS: {ref_sgd:.6g} vs {ms_b.value:.6g} "
      f"(rel {res['ms_reference_sgd_vs_newton_rel']:.1e})")
if cfg.study_run:
    with open(cfg.study_run) as fh:
        st = json.load(fh)
    st_rows = [(f"{l}/{k}", st[f"{k2}_traces"][i], ref_tr[l][k]) for i, l in enumerate(st["layers"])
               for k, k2 in (("kernel", "weight"), ("bias", "bias"))]
    res["study_float32"] = {
        "traces": {r[0]: {"study": r[1], "reference": r[2], "rel_diff": rel(r[1], r[2])} for r in st_rows},
        "max_rel_diff_traces": max(rel(r[1], r[2]) for r in st_rows),
        "ms": {"study": st["minimum_sharpness"], "reference_exact_min": ref_exact,
               "rel_diff": rel(st["minimum_sharpness"], ref_exact)},
        "ms_nobias": {"study": st["minimum_sharpness_nobias"], "reference": ref_nobias,
                      "rel_diff": rel(st["minimum_sharpness_nobias"], ref_nobias)},
        "exact_trace": {"study": st["exact_trace"], "reference": sum(tw) + sum(tb)},
    }
    print(f"study's float32 numbers ({cfg.study_run}) vs the float64 reference re-statement: max rel diff of the "
          f"traces {res['study_float32']['max_rel_diff_traces']:.1e}, MS {st['minimum_sharpness']:.10g} vs "
          f"{ref_exact:.10g} (rel {res['study_float32']['ms']['rel_diff']:.1e})")
res["factorised"] = cfg.factorised
print(f"time: ours {t_ours:.1f} s, reference re-statement {t_ref:.1f} s")
if cfg.out:
    with open(cfg.out, "w") as fh:
        json.dump(res, fh, indent=1)
