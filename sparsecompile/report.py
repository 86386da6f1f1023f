"""Build reports: ``report.json`` (machine-readable) and ``report.md`` (readable).

``format_report`` renders the same table for ``sparsecompile inspect``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsecompile.damage import DAMAGE_WHAT, worst_output


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
    permute = report.get("permutation", {}).get("enabled", False)
    header = ["layer", "op", "weight shape", "status", "kept |w|", "out err", "corrected", "predicted", "why dense"]
    if permute:
        header.insert(4, "permutation")
    rows = []
    for layer in report["layers"]:
        correction = layer.get("correction")
        if correction is None:
            corrected = "-"
        elif "skipped" in correction:
            corrected = f"skipped: {correction['skipped']}"
        else:
            corrected = f"{correction['mode']} {correction['error_before']:.2e}->{correction['error_after']:.2e}"
        row = [
            layer["name"], layer["op"], "x".join(map(str, layer["shape"])) or "-", layer["status"],
            _pct(layer.get("retained_magnitude")), _err(layer.get("output_error")), corrected,
            speed_cell(layer.get("speed")), layer.get("reason") or "",
        ]
        if permute:
            row.insert(4, permutation_cell(layer.get("permutation")))
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row).rstrip() for row in rows]
    return "\n".join(lines)


def speed_cell(speed: dict | None) -> str:
    """The speed model's call: ``1.38x`` or ``1.02x, likely dense`` (TensorRT keeps dense kernels)."""
    if not speed:
        return "-"
    return f"{speed['speedup']:.2f}x" + (", likely dense" if speed["likely_dense"] else "")


def permutation_cell(stats: dict | None) -> str:
    """``g3 74.5%->75.6% eff 0.21`` for a permuted layer, ``g3 no: <reason>`` otherwise."""
    if not stats:
        return "-"
    head = f"g{stats['group']} "
    if "kept_permuted" in stats:
        return f"{head}{_pct(stats['kept_plain'])}->{_pct(stats['kept_permuted'])} eff {stats['efficacy']:.2f}"
    return head + ("no: " + stats["reason"] if stats.get("reason") else stats.get("note", ""))


def permutation_lines(report: dict) -> list[str]:
    permutation = report.get("permutation", {})
    if not permutation.get("enabled"):
        return []
    groups = permutation["groups"]
    permuted = [g for g in groups if g["status"] == "permuted"]
    line = f"permute: {len(permuted)} of {len(groups)} channel groups permuted"
    if permuted:
        gain = [g["kept_permuted"] - g["kept_plain"] for g in permuted]
        efficacy = [g["efficacy"] for g in permuted]
        line += (f"; kept {permutation['importance']} +{100 * sum(gain) / len(gain):.2f} pt per layer on average "
                 f"(efficacy {sum(efficacy) / len(efficacy):.2f}), search {permutation['search_seconds']:.1f}s")
    lines = [line]
    exhausted = [g for g in groups if g.get("budget_exhausted")]
    if exhausted:
        lines.append(f"         {len(exhausted)} group(s) hit the --permute-budget {permutation['budget_s']:g}s time cap "
                     "(best order found so far used; not reproducible): " + ", ".join(f"g{g['id']}" for g in exhausted))
    return lines


def permutation_table(report: dict) -> str:
    header = ["group", "channels", "readers", "producers", "kept", "efficacy", "search s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in report["permutation"]["groups"]:
        kept = f"{_pct(g['kept_plain'])} -> {_pct(g['kept_permuted'])}" if "kept_permuted" in g else "-"
        status = "permuted" + (" (time cap hit)" if g.get("budget_exhausted") else "") if g["status"] == "permuted" \
            else f"unpermuted: {g['reason']}"
        cells = [f"g{g['id']}", str(g["channels"] or "-"), ", ".join(g["consumers"]), ", ".join(g["producers"]) or "-",
                 kept, f"{g['efficacy']:.2f}" if "efficacy" in g else "-",
                 f"{g.get('search_seconds', 0.0):.2f}", status]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _unit(out: dict) -> str:
    return "%" if out["unit"] == "%" else " pt"


def _choice_text(choice: dict | None) -> str:
    if not choice:
        return ""
    chosen = choice["chosen"]
    tried = [t for t in choice["tried"] if "skipped" not in t and "failed" not in t]
    update = " --update-weights" if chosen.get("update_weights") else ""
    mix = chosen.get("per_layer")
    if mix:  # per-layer choice: each layer's mask from one of the best candidates
        sources = ", ".join(f"{count} layer(s) {name}" for name, count in mix.items())
        text = (f" (chosen by --method auto: per layer among the best of {len(tried)} candidates ({sources}), "
                f"less damage than any one of them on held-back samples, {choice['seconds']:.1f}s")
    elif chosen.get("learned"):  # --auto-learned: the learned masks measured less damaging than every heuristic
        text = (f" (chosen by --method auto --auto-learned with --correct {chosen['correct']}: learned masks did less "
                f"damage than the other {len(tried) - 1} candidates on held-back samples, {choice['seconds']:.1f}s")
    else:
        text = (f" (chosen by --method auto with{update} --correct {chosen['correct']}: least damage of {len(tried)} "
                f"candidates on held-back samples, {choice['seconds']:.1f}s")
    failed = sum("failed" in t for t in choice["tried"])
    if failed:
        text += f"; {failed} failed (see report.json method_choice)"
    if choice.get("skipped"):
        text += f"; {choice['skipped']} skipped at --auto-time-cap"
    return text + ")"


def quantization_line(quantization: dict) -> str:
    """The summary's ``int8:`` line: what was quantized, what stayed float, the 2:4 check and the damage split."""
    damage = quantization.get("damage", {})

    def worst(part: str) -> str:
        out = worst_output(damage.get(part, {}).get("outputs", []))
        if out is None:
            return "?"
        return "non-finite" if out["damage"] is None else f"{out['damage']:.3g}{'%' if out['unit'] == '%' else ' pt'}"

    check = quantization.get("sparsity_check", {})
    verdict = "within budget" if damage.get("both", {}).get("within_budget") else "OVER BUDGET"
    return (f"int8:    {quantization['path']} ({quantization['format']}, {quantization['calibration']} ranges from "
            f"{quantization['calibration_samples']} samples): {len(quantization['quantized'])} layer(s) int8, "
            f"{len(quantization['kept_float'])} kept float; 2:4 "
            f"{'kept' if check.get('passed') else 'BROKEN'} in {len(check.get('required', []))} sparse layer(s); "
            f"damage vs dense {worst('both')} (sparsity {worst('sparsity')}, quantization {worst('quantization')}): "
            f"{verdict}")


def int8_weights_line(weights: dict) -> str:
    """The summary's INT8 weight-file line: the sparse layers' int8 values compressed against dense int8."""
    if not weights.get("compressed_bytes"):
        return f"         {weights['path']}: no sparse layers (weights dense); file {_bytes(weights['file_bytes'])}"
    return (f"         {weights['path']}: sparse layers {_bytes(weights['compressed_bytes'])} compressed (int8 values, "
            f"indices, scales) vs {_bytes(weights['dense_bytes'])} dense int8 ({weights['ratio_vs_dense']:.4f}x); "
            f"file {_bytes(weights['file_bytes'])}")


def certificate_line(certificate: dict) -> str:
    """The summary's ``certify:`` line; a certificate without a bound (not certifiable, not a
    classifier, nothing changed) prints what it has."""
    summary = certificate.get("summary", {})
    if summary.get("samples") and summary.get("certified_fraction") is not None:
        observed = summary.get("observed_unchanged_fraction")
        looseness = summary.get("median_looseness")
        return (f"certify: {100 * summary['certified_fraction']:.1f}% of {summary['samples']} calibration samples "
                "guaranteed unchanged"
                + (f", {100 * observed:.1f}% observed unchanged" if observed is not None else "")
                + (f" (bound median {looseness:.3g}x the actual change; " if looseness is not None else " (")
                + "sparsecompile certify for the riskiest layers)")
    reasons = summary.get("not_certifiable", [])[:2]
    return "certify: not certifiable: " + ("; ".join(reasons) if reasons else "no bound was computed")


def margin_line(certificate: dict, top: int = 5) -> str | None:
    """Which layers take the class margin (median over samples, closest class pair), from the certificate's
    ``margin_ranking``; None when the certificate has none."""
    ranking = certificate.get("margin_ranking") or []
    if not ranking:
        return None
    used = certificate.get("summary", {}).get("margin_used") or {}
    total = used.get("median_total")
    return ("         margin taken by layer (median; "
            + (f"total {total:.3g}" if total is not None else "closest class pair") + "): "
            + ", ".join(f"{row['layer']} {row['median']:.3g}" for row in ranking[:top])
            + (f" and {len(ranking) - top} more" if len(ranking) > top else ""))


def summary_lines(report: dict) -> list[str]:
    s = report["summary"]
    target = report["target"]
    lines = [
        f"source:  {report['source']['path']} ({report['source']['kind']})",
        f"target:  {target['name']} - {target['description']}",
        f"method:  {report['method']} {report['pattern']}" + _choice_text(report.get("method_choice")),
        f"layers:  {s['sparse_layers']} sparse / {s['layers']} GEMM-like "
        f"({s['sparse_layer_weights']} of {s['gemm_weights']} weights in sparse layers"
        + (f"; {100 * s['sparse_layer_macs'] / s['gemm_macs']:.1f}% of GEMM MACs sparse" if s.get("gemm_macs") else "")
        + ")",
    ]
    verification = report["verification"]
    damage = verification.get("damage")
    if damage:
        held = verification["calibration"].get("held_back_samples")
        where = f"{held} held-back samples" if held else f"{damage['samples']} samples (none held back)"
        for out in damage["outputs"]:
            value = "non-finite outputs" if out["damage"] is None else f"{out['damage']:.3g}{_unit(out)}"
            what = DAMAGE_WHAT[out["kind"]]
            budget = f"{out['budget']:.3g}{_unit(out)}"
            if "budget_asked" in out:
                budget += f" (one changed prediction; {out['budget_asked']:g}{_unit(out)} asked)"
            decoded = (f" (decoded: {100 * out['decoded_error']:.3g}% of characters differ from dense)"
                       if out.get("decoded_error") is not None else "")
            lines.append(f"damage:  output {out['output']} ({out['kind']}): {what} {value}{decoded}, budget "
                         f"{budget} on {where}: " + ("within" if out["within"] else "OVER BUDGET"))
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
    lines += permutation_lines(report)
    engine = report.get("engine", {})
    if engine.get("status") == "recipe":
        profile = engine.get("profile")
        parts = [engine["precision"],
                 "sparse weights" if report.get("pattern", "2:4") == "2:4" else "dense kernels (not 2:4)"]
        if profile:
            parts.append("batch " + "/".join(str(next(iter(profile.values()))[k][0]) for k in ("min", "opt", "max")))
        lines.append(f"engine:  TensorRT recipe in engine/ ({', '.join(parts)}); "
                     "not built here: run 'sparsecompile engine BUILD_DIR' on the target GPU")
    elif engine.get("status") == "built":
        counts = ", ".join(f"{v} {k}" for k, v in sorted(engine.get("counts", {}).items()))
        lines.append(f"engine:  {engine['file']} built; TensorRT per layer: {counts or 'no (Sparsity) lines in its log'}")
    quantization = report.get("quantization")
    if quantization:
        lines.append(quantization_line(quantization))
        if quantization.get("weights"):
            lines.append(int8_weights_line(quantization["weights"]))
    certificate = report.get("certificate")
    if certificate:
        lines.append(certificate_line(certificate))
        margins = margin_line(certificate)
        if margins:
            lines.append(margins)
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
        "dense model (everything upstream included) before and after statistics correction."
        + (" *permutation*: the layer's channel group and the fraction of its weight magnitude a 2:4 mask "
           "keeps without -> with the group's channel permutation, and the efficacy (gain over the gain "
           "possible up to the row-wise unstructured 50% optimum)." if report.get("permutation", {}).get("enabled")
           else ""),
        "",
    ]
    if report.get("permutation", {}).get("enabled"):
        markdown += ["## Channel permutation", "", permutation_table(report), ""]
    (directory / "report.md").write_text("\n".join(markdown))
