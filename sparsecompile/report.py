"""Build reports: ``report.json`` (machine-readable) and ``report.md`` (readable).

``format_report`` renders the same table for ``sparsecompile inspect``.
"""

from __future__ import annotations

import json
from pathlib import Path


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _err(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _bytes(count) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def layer_table(report: dict, markdown: bool = False) -> str:
    header = ["layer", "op", "weight shape", "status", "kept |w|", "out err", "corrected", "why dense"]
    rows = []
    for layer in report["layers"]:
        correction = layer.get("correction")
        if correction is None:
            corrected = "-"
        elif "skipped" in correction:
            corrected = f"skipped: {correction['skipped']}"
        else:
            corrected = f"{correction['mode']} {correction['error_before']:.2e}->{correction['error_after']:.2e}"
        rows.append([
            layer["name"], layer["op"], "x".join(map(str, layer["shape"])) or "-", layer["status"],
            _pct(layer.get("retained_magnitude")), _err(layer.get("output_error")), corrected,
            layer.get("reason") or "",
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row).rstrip() for row in rows]
    return "\n".join(lines)


def summary_lines(report: dict) -> list[str]:
    s = report["summary"]
    target = report["target"]
    lines = [
        f"source:  {report['source']['path']} ({report['source']['kind']})",
        f"target:  {target['name']} - {target['description']}",
        f"method:  {report['method']} {report['pattern']}",
        f"layers:  {s['sparse_layers']} sparse / {s['layers']} GEMM-like "
        f"({s['sparse_layer_weights']} of {s['gemm_weights']} weights in sparse layers)",
    ]
    verification = report["verification"]
    for out in verification["sparse_vs_dense"]:
        agreement = out.get("top1_agreement")
        lines.append(
            f"output {out['output']}: sparse vs dense relative error {out['relative_error']:.3e}, "
            f"max abs {out['max_abs_error']:.3e}"
            + (f", top-1 agreement {100 * agreement:.2f}%" if agreement is not None else "")
            + f" ({verification['calibration']['samples']} samples from {verification['calibration']['source']})"
        )
    compression = report.get("compression", {})
    if compression.get("compressed_bytes"):
        lines.append(
            f"weights: sparse layers {_bytes(compression['compressed_bytes'])} compressed vs "
            f"{_bytes(compression['dense_fp16_bytes'])} dense fp16 "
            f"({compression['ratio_vs_dense_fp16']:.4f}x); file {_bytes(compression['file_bytes'])}, "
            f"ONNX {_bytes(compression['onnx_bytes'])}"
        )
    options = report.get("options", {})
    if options.get("correct", "none") != "none":
        lines.append(f"correct: {options['correct']} ({'sequential' if options.get('sequential') else 'one-shot'})")
    if report.get("batchnorm_reestimated"):
        names = ", ".join(sorted(report["batchnorm_reestimated"]))
        lines.append(f"         batch norms re-estimated in place (not foldable): {names}")
    for note in report.get("notes", []):
        lines.append(f"note:    {note}")
    return lines


def format_report(report: dict) -> str:
    return "\n".join(summary_lines(report)) + "\n\n" + layer_table(report) + "\n"


def write_reports(directory: Path, report: dict) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = ["# sparsecompile build report", ""]
    markdown += [f"- {line}" for line in summary_lines(report)]
    markdown += ["", "## Layers", "", layer_table(report, markdown=True), ""]
    markdown += [
        "Columns: *kept |w|* is the fraction of the layer's weight magnitude the mask keeps; "
        "*out err* is the layer's relative output error from its mask alone, on the dense model's "
        "activations over the calibration inputs; *corrected* is the layer's output error against the "
        "dense model (everything upstream included) before and after statistics correction.",
        "",
    ]
    (directory / "report.md").write_text("\n".join(markdown))
