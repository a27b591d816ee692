"""Markdown table of the size-route rows of benchmark result JSONs: file, zipped and Huffman-estimate bytes.

Usage: python benchmarks/size_route_table.py RESULTS.json [...]  (run from the checkout root). The Huffman
estimate replaces the stored label streams (bit-packed labels, mask or gaps) by their optimal Huffman
code length and keeps everything else as stored. The metric is given on both scored splits: tune
(the evaluation split defaults are chosen on) and report (held out), each with its fp32 figure.
"""
import json, sys, zlib
from pathlib import Path
FP32 = {"digits_cnn": "models/digits_cnn.onnx", "digits_mlp": "models/digits_mlp.onnx",
        "ppocr_rec": "benchmarks/.cache/rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"}
print("| model | candidate | file bytes | x fp32 | zipped bytes (x fp32 zipped) | Huffman est. bytes | tune: metric (fp32, Δ pts) | report: metric (fp32, Δ pts) | session creation s (fp32) | latency x fp32 [95% CI] | build s | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")


def split_cell(value, fp32):
    if value is None or fp32 is None:
        return "-"
    return f"{value:.4f} ({fp32:.4f}, {100 * (value - fp32):+.2f})"


for path in sys.argv[1:]:
    r = json.load(open(path))
    for name, m in r["models"].items():
        rows = m["rows"]
        fp = next(x for x in rows if x["candidate"] == "fp32")
        fz = len(zlib.compress(Path(FP32[name]).read_bytes(), 9))
        for x in rows:
            if x["candidate"] == "fp32" or x["status"] != "ok":
                continue
            n = x["build"].get("notes", {})
            size = x["size_bytes"]
            zipped = n.get("file_zipped_kb")
            huff = size - n["stored_kb"] * 1024 + n["entropy_kb"] * 1024 if "label_storage" in n else None
            tune = split_cell(x["metrics"].get(m["metric"]), m["fp32_metric"])
            report = split_cell((x.get("report_metrics") or {}).get(m["metric"]), m.get("fp32_report_metric"))
            lat = x["latency"]
            ci = lat.get("ratio_fp32_ci") or [float("nan")] * 2
            zs = f"{zipped * 1024:,.0f} ({fz / (zipped * 1024):.1f}x; fp32 {fz:,})" if zipped else "-"
            hs = f"{huff:,.0f} ({fp['size_bytes'] / huff:.1f}x)" if huff else "-"
            print(f"| {name} | {x['candidate']} | {size:,} | {fp['size_bytes'] / size:.1f} | {zs} | {hs} | "
                  f"{tune} | {report} | {lat['session_creation_s']:.2f} ({fp['latency']['session_creation_s']:.2f}) | "
                  f"{lat['ratio_fp32']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {x['build']['wall_s']:.0f} | {x['build']['peak_rss_mb']:.0f} |")
