"""Regenerate the onnxcomp model zoo (digits CNN / MLP / transformer) and its data.

Run from the repository root:

    python models/make_models.py

Everything is seeded; on the same machine and library versions the outputs are
bit-for-bit reproducible (training runs single-threaded with
torch.use_deterministic_algorithms(True)).

Data: scikit-learn's bundled ``digits`` (1797 8x8 images, values 0..16, no
download), scaled to [0, 1] and upsampled to 32x32 with bilinear interpolation
(torch.nn.functional.interpolate, align_corners=False).  Splits (stratified,
SEED):

    eval   450 images   -> digits_eval.npz ("image"), digits_eval_labels.npy
    dev   1347 images   -> training set (all of it)
    calib  200 images   -> digits_calib.npz ("image"), a stratified subset of dev

Calibration never overlaps eval; it does overlap training.

Models (all: input ``image`` float32 [batch,1,32,32], output ``logits``
float32 [batch,10], batch dimension symbolic "batch", opset 17, weights stored
inside the file, BatchNormalization kept as separate nodes):

    digits_cnn.onnx          small ResNet-style CNN
    digits_mlp.onnx          1024-256-128-10 Gemm stack
    digits_transformer.onnx  2-layer pre-LN transformer encoder, rows as tokens
"""

from __future__ import annotations

import collections
import math
import os
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
N_EVAL = 450
N_CALIB = 200
OPSET = 17
IMG = 32
OUT_DIR = os.path.dirname(os.path.abspath(__file__))

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------- data
def make_data():
    x, y = load_digits(return_X_y=True)  # x: [1797, 64] float64 in 0..16
    x = torch.from_numpy((x / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).numpy().astype(np.float32)
    y = y.astype(np.int64)

    idx = np.arange(len(y))
    dev_idx, eval_idx = train_test_split(
        idx, test_size=N_EVAL, stratify=y, random_state=SEED
    )
    calib_idx, _ = train_test_split(
        dev_idx, train_size=N_CALIB, stratify=y[dev_idx], random_state=SEED
    )
    dev_idx, eval_idx, calib_idx = np.sort(dev_idx), np.sort(eval_idx), np.sort(calib_idx)
    assert not set(eval_idx) & set(dev_idx)
    assert set(calib_idx) <= set(dev_idx)
    return {
        "train": (x[dev_idx], y[dev_idx]),
        "eval": (x[eval_idx], y[eval_idx]),
        "calib": (x[calib_idx], y[calib_idx]),
    }


def random_shift(xb: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift every image independently by up to +-max_shift pixels (zero fill)."""
    n, c, h, w = xb.shape
    p = max_shift
    padded = F.pad(xb, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
    bidx = torch.arange(n)[:, None, None]
    out = padded[:, 0][bidx, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1)


# ------------------------------------------------------------------------- models
def conv_bn_relu(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + x)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.dw = conv_bn_relu(cin, cin, 3, groups=cin)
        self.pw = conv_bn_relu(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class TwoBranch(nn.Module):
    """1x1 branch and 3x3 branch, concatenated along channels."""

    def __init__(self, cin, cbranch):
        super().__init__()
        self.b1 = conv_bn_relu(cin, cbranch, 1)
        self.b3 = conv_bn_relu(cin, cbranch, 3)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x)], dim=1)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(1, 16, 3)               # 16 x 32 x 32
        self.res = ResidualBlock(16)                     # 16 x 32 x 32
        self.down = conv_bn_relu(16, 32, 3, stride=2)    # 32 x 16 x 16
        self.dwsep = DepthwiseSeparable(32, 32)          # 32 x 16 x 16
        self.pool = nn.MaxPool2d(2)                      # 32 x 8 x 8
        self.branches = TwoBranch(32, 24)                # 48 x 8 x 8
        self.gap = nn.AdaptiveAvgPool2d(1)               # 48 x 1 x 1
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(48, 10)

    def forward(self, image):
        x = self.stem(image)
        x = self.res(x)
        x = self.down(x)
        x = self.dwsep(x)
        x = self.pool(x)
        x = self.branches(x)
        x = self.flatten(self.gap(x))
        return self.fc(x)


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(IMG * IMG, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, image):
        x = self.flatten(image)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out with MatMul / Softmax."""

    def __init__(self, d, heads, tokens):
        super().__init__()
        self.d, self.h, self.t, self.dh = d, heads, tokens, d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):  # x: [B, T, D]
        t, h, dh = self.t, self.h, self.dh
        q = self.q(x).reshape(-1, t, h, dh).transpose(1, 2)  # [B, H, T, dh]
        k = self.k(x).reshape(-1, t, h, dh).transpose(1, 2)
        v = self.v(x).reshape(-1, t, h, dh).transpose(1, 2)
        att = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(dh)  # [B, H, T, T]
        att = torch.softmax(att, dim=-1)
        out = torch.matmul(att, v)  # [B, H, T, dh]
        out = out.transpose(1, 2).reshape(-1, t, self.d)
        return self.o(out)


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, tokens, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, tokens)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x


class DigitsTransformer(nn.Module):
    def __init__(self, d=64, heads=4, layers=2, hidden=128):
        super().__init__()
        self.embed = nn.Linear(IMG, d)
        self.pos = nn.Parameter(torch.zeros(1, IMG, d))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(
            [EncoderLayer(d, heads, IMG, hidden) for _ in range(layers)]
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, image):
        x = image.reshape(-1, IMG, IMG)  # 32 tokens (rows) of 32 features
        x = self.embed(x) + self.pos
        for layer in self.layers:
            x = layer(x)
        x = self.ln_f(x).mean(dim=1)
        return self.head(x)


# ----------------------------------------------------------------------- training
def train(model, data, *, epochs, lr, weight_decay, max_shift, seed, batch=64):
    x = torch.from_numpy(data["train"][0])
    y = torch.from_numpy(data["train"][1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            bi = perm[i : i + batch]
            xb, yb = x[bi], y[bi]
            if max_shift:
                xb = random_shift(xb, max_shift, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


# ------------------------------------------------------------------------- export
def _inline_identity_initializers(model: onnx.ModelProto) -> None:
    """The TorchScript exporter deduplicates equal initializers via Identity
    nodes (e.g. BN running_mean == bias); turn them back into initializers."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def _name_matmul_weights(model: onnx.ModelProto) -> None:
    """With constant folding, Linear weights on 3-D inputs become anonymous
    pre-transposed initializers ("onnx::MatMul_143", shape [in, out]); give
    them the owning module's name, e.g. "layers.0.attn.q.weight"."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    used = set(inits) | {v for n in g.node for v in list(n.input) + list(n.output)}
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        old = node.input[1]
        if not old.startswith("onnx::"):
            continue
        new = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight"
        assert new not in used, new
        used.add(new)
        inits[old].name = new
        for n in g.node:
            for j, v in enumerate(n.input):
                if v == old:
                    n.input[j] = new


def export(model, path):
    model.eval()
    has_bn = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules())
    dummy = torch.zeros(1, 1, IMG, IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            # With constant folding on, the TorchScript exporter fuses BN into
            # the preceding Conv; keep BN for models that have it.  Models
            # without BN are folded (else every Linear weight gets a Transpose).
            do_constant_folding=not has_bn,
        )
    m = onnx.load(path)
    _inline_identity_initializers(m)
    _name_matmul_weights(m)
    onnx.save(m, path)  # < 2 GB: weights stay inside the file
    onnx.checker.check_model(path, full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(path), check_type=True, strict_mode=True)
    m = onnx.load(path)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert n_bn == sum(isinstance(mod, nn.BatchNorm2d) for mod in model.modules()), n_bn
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    (inp,), (out,) = m.graph.input, m.graph.output
    assert inp.name == "image" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    return m


def ort_accuracy(path, x, y):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image": x})[0]
    return float((logits.argmax(1) == y).mean()), logits


def main():
    t_all = time.time()
    data = make_data()
    np.savez(os.path.join(OUT_DIR, "digits_calib.npz"), image=data["calib"][0])
    np.savez(os.path.join(OUT_DIR, "digits_eval.npz"), image=data["eval"][0])
    np.save(os.path.join(OUT_DIR, "digits_eval_labels.npy"), data["eval"][1])
    print(
        f"data: train {len(data['train'][1])}  calib {len(data['calib'][1])}  "
        f"eval {len(data['eval'][1])}  (seed {SEED})"
    )

    specs = [
        ("digits_cnn", DigitsCNN, dict(epochs=30, lr=3e-3, weight_decay=1e-4, max_shift=2), 0.97),
        ("digits_mlp", DigitsMLP, dict(epochs=40, lr=1e-3, weight_decay=1e-4, max_shift=2), 0.95),
        ("digits_transformer", DigitsTransformer, dict(epochs=60, lr=2e-3, weight_decay=1e-4, max_shift=2), 0.95),
    ]
    x_eval, y_eval = data["eval"]
    ok = True
    for i, (name, cls, hp, target) in enumerate(specs):
        t0 = time.time()
        torch.manual_seed(SEED + i)
        model = train(cls(), data, seed=SEED + i, **hp)
        path = os.path.join(OUT_DIR, name + ".onnx")
        m = export(model, path)
        acc, logits = ort_accuracy(path, x_eval, y_eval)
        with torch.no_grad():
            ref = model(torch.from_numpy(x_eval)).numpy()
        n_params = sum(p.numel() for p in model.parameters())
        n_init = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
        ops = collections.Counter(n.op_type for n in m.graph.node)
        print(
            f"{name}: onnxruntime eval accuracy {acc:.4f} ({int(round(acc * len(y_eval)))}/{len(y_eval)})  "
            f"params {n_params} (onnx initializer elements {n_init})  "
            f"size {os.path.getsize(path)} B  max|ort-torch| {np.abs(logits - ref).max():.2e}  "
            f"{time.time() - t0:.0f}s"
        )
        print("    ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
        if acc < target:
            print(f"    WARNING: below target {target}")
            ok = False
    print(f"total {time.time() - t_all:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
