"""The result, written out: the readable table (``format_profile``), ``profile.json`` and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SparseCompileError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None


def _fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def format_profile(result: dict, top: int = 10) -> str:
    settings, env = result["settings"], result["environment"]
    target = result["target"]
    what = (f"build for {target['build_target']} ({target['pattern']})" if target["kind"] == "build"
            else "model file, dense")
    lines = [
        f"profile of {target['path']} ({what}): backend {result['backend']}, {settings['threads']} thread(s), "
        f"{settings['runs']} timed runs after {settings['warmup']} warm-up runs of each variant per batch"
        + (", variants interleaved" if settings["interleaved"] else ""),
    ]
    threads = []
    for v in result["variants"]:
        info = v.get("threads") or {}
        if info.get("intra_op_num_threads") is not None:
            inter = f", inter-op {info['inter_op_num_threads']}" if info.get("inter_op_num_threads") else ""
            threads.append(f"{v['name']} {info['runtime']} intra-op {info['intra_op_num_threads']}{inter}")
    if threads:
        lines.append("threads: " + "; ".join(threads))
    designs = result.get("design") or []
    if settings["interleaved"] and designs:
        order, block = settings["order"], settings["order"]["block_rounds"]
        if block:
            extra = settings["runs"] % block
            lines.append(f"round order: every ordering of the {len(designs[0]['variants'])} variants once per block of "
                         f"{block} rounds, so each variant runs after each (itself included) equally often; "
                         + (f"{settings['runs'] // block} complete blocks" if not extra else
                            f"{settings['runs'] // block} complete blocks + {extra} round(s), balanced over the "
                            "complete blocks only")
                         + f"; orderings shuffled with seed {settings['seed']} + batch size")
        else:
            lines.append(f"round order: {order['method']} (seed {settings['seed']} + batch size)")
    lines.append("")
    header = ["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "min ms", "max ms", "items/s", "peak MB", ""]
    rows = []
    by_batch: dict[int, list] = {}
    for variant in result["variants"]:
        for row in variant["results"]:
            by_batch.setdefault(row["batch"], []).append((variant["name"], row))
    for batch in sorted(by_batch):
        for name, row in by_batch[batch]:
            lat = row["latency_ms"]
            mem = row["peak_memory_mb"]
            rows.append([name, str(batch), _fmt_ms(lat["p50"]), _fmt_ms(lat["p90"]), _fmt_ms(lat["p99"]),
                         _fmt_ms(lat["min"]), _fmt_ms(lat["max"]), f"{row['throughput_per_s']:,.1f}",
                         "n/a" if mem is None else f"{mem:,.1f}", "noisy" if row["noisy"] else ""])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    loads = ", ".join(f"{v['name']} {v['load_s']:.2f} s" for v in result["variants"] if v["load_s"] is not None)
    lines += ["", f"load time: {loads}"]
    for v in result["variants"]:
        if v["prepare_note"]:
            lines.append(f"  {v['name']}: {v['prepare_note']} in {v['prepare_s']:.1f} s (not part of its load time)")
    lines.append(f"peak MB: {settings['memory']}, from before loading to the first run at that batch")
    if result["comparison"]:
        first = result["comparison"][0]
        lines += ["", f"{first['numerator']}/{first['denominator']} latency (ratio of medians, "
                      f"{first['confidence']:.0%} CI from {first['resamples']} paired bootstrap resamples):"]
        for c in result["comparison"]:
            lines.append(f"  batch {c['batch']:>4}: {c['ratio']:.3f}x  [{c['ci_low']:.3f}, {c['ci_high']:.3f}]")
        if result["backend"] == "ort":
            lines.append("  (ONNX Runtime runs 2:4 weights dense on a CPU: expect about 1.0x here; the speed-up "
                         "comes from sparse tensor cores through TensorRT)")
    layers = result.get("layers")
    if layers and top > 0:
        names = list(layers["variants"])
        primary = layers["variants"][names[0]]
        status_note = "; status = in the build" if target["kind"] == "build" else ""
        lines += ["", f"top {top} layers at batch {layers['batch']} ({primary['profiler']}, mean of "
                      f"{primary['runs']} runs{status_note}):"]
        others = {n: {r["layer"]: r for r in layers["variants"][n]["layers"]} for n in names[1:]}
        header = ["layer", "op", "status"] + [f"{n} ms" for n in names] + ["share"]
        rows = []
        for row in primary["layers"][:top]:
            cells = [row["layer"], row["op"], row["status"], _fmt_ms(row["ms"])]
            for n in names[1:]:
                other = others[n].get(row["layer"])
                cells.append(_fmt_ms(other["ms"]) if other else "-")
            cells.append(f"{row['share']:.1%}")
            rows.append(cells)
        tail = ["(not a layer)", "other", "", _fmt_ms(primary["other_ms"])]
        tail += [_fmt_ms(layers["variants"][n]["other_ms"]) for n in names[1:]]
        total = primary["total_ms"]
        tail.append(f"{primary['other_ms'] / total:.1%}" if total else "")
        rows.append(tail)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        for r in [header] + rows:
            lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2])]
                                   + [c.rjust(w) for c, w in zip(r[3:], widths[3:])]).rstrip())
        if primary["layers"] and not any(r["status"] == "sparse" for r in primary["layers"]) and target["kind"] == "build":
            lines.append("  (no profiled node mapped to a sparse layer)")
    gpu = env.get("gpu")
    load = env.get("load_average_1min")
    lines += ["", f"machine: {env['cpu_model']}, {env['physical_cores']} physical core(s), {env['usable_cpus']} usable "
                  f"CPU(s)" + (f", load average {load:.2f} at start" if load is not None else "")]
    versions = env["versions"]
    lines.append(f"software: python {env['python']}, torch {versions['torch']}, onnxruntime {versions['onnxruntime']}, "
                 f"onnx {versions['onnx']}" + (f"; GPU {gpu['name']}" if gpu else ""))
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(finite(result), indent=1) + "\n"))


def write_plot(result: dict, path: Path) -> None:
    """Latency distributions per variant and batch, and the per-layer bars."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = result.get("layers")
    fig, axes = plt.subplots(1, 2 if layers else 1, figsize=(13 if layers else 7, 5), squeeze=False)
    ax = axes[0][0]
    data, labels, colors = [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for batch in result["settings"]["batches"]:  # variants side by side per batch size
        for index, variant in enumerate(result["variants"]):
            for row in variant["results"]:
                if row["batch"] == batch:
                    data.append(row["samples_ms"])
                    labels.append(f"{variant['name']}\nbatch {batch}")
                    colors.append(palette[index % len(palette)])
    boxes = ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2}, patch_artist=True)
    for patch, color in zip(boxes["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.5)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_ylabel("latency per run (ms, log scale; whiskers p1-p99)")
    ax.set_title(f"latency, backend {result['backend']} ({result['settings']['threads']} threads)")
    if layers:
        ax = axes[0][1]
        names = list(layers["variants"])
        primary = layers["variants"][names[0]]["layers"][:15][::-1]
        y = np.arange(len(primary))
        height = 0.8 / len(names)
        for index, name in enumerate(names):
            rows = {r["layer"]: r["ms"] for r in layers["variants"][name]["layers"]}
            values = [rows.get(r["layer"], 0.0) for r in primary]
            ax.barh(y + index * height, values, height=height, label=name)
        ax.set_yticks(y + height * (len(names) - 1) / 2,
                      [f"{r['layer']} ({r['status']})" for r in primary], fontsize=7)
        ax.set_xlabel("mean time per run (ms)")
        ax.set_title(f"top layers at batch {layers['batch']}")
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda temp: fig.savefig(temp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
