"""``sparsecompile inspect --spectra``: Marchenko-Pastur diagnostics per layer, readable.

For a build made with ``--spectra`` (or ``--budget-signal mp``) they come from its report. For a model
file they are computed on its dense weights (BatchNorm folded), and ``--plot`` writes the spectra
against the fitted MP density. The math is in :mod:`sparsecompile.analysis.spectral`.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsecompile.errors import SparseCompileError


def spectra_of(target: str, plot: str | None = None, verify: bool = True) -> dict[str, dict]:
    path = Path(target)
    if path.is_dir():
        from sparsecompile.builddir import open_build

        build, _ = open_build(path, verify=verify)
        report = json.loads((build / "report.json").read_text())
        found = {r["name"]: r["spectrum"] for r in report["layers"] if "spectrum" in r}
        if not found:
            raise SparseCompileError(f"build '{build}' has no spectra: rebuild with --spectra, or run "
                                     "sparsecompile inspect MODEL --spectra on the model file")
        if plot:
            raise SparseCompileError("--plot needs the eigenvalues: run it on the model file, not the build")
        return found
    from sparsecompile.analysis.spectral import model_spectra, mp_sensitivity, plot_spectra
    from sparsecompile.frontend import load_model
    from sparsecompile.hardware import torch_threads
    from sparsecompile.layers import find_layers
    from sparsecompile.passes import FoldBatchNorm, PassContext, PassManager, RemoveIdentity

    if plot:
        from sparsecompile.profile import check_matplotlib

        check_matplotlib()
    loaded = load_model(path)
    gm = PassManager([RemoveIdentity(), FoldBatchNorm()]).run(loaded.module, PassContext(loaded.example_inputs))
    layers = [layer for layer in find_layers(gm, min_weights=0) if layer.weight_target and len(layer.weight_shape) > 1]
    with torch_threads(1):
        spectra = model_spectra(gm, layers, keep_eigenvalues=bool(plot))
    for spectrum in spectra.values():
        spectrum["mp_sensitivity"] = mp_sensitivity(spectrum)
    if plot:
        plot_spectra(spectra, plot)
    return spectra


def spectra_lines(spectra: dict[str, dict]) -> list[str]:
    header = f"{'layer':<28} {'q':>6} {'sigma^2':>9} {'MP edge':>9} {'spikes':>6} {'bulk energy':>11} {'sensitivity':>11}"
    lines = [header, "-" * len(header)]
    for name, s in spectra.items():
        flag = "" if s.get("reliable", True) else "  (small matrix: fit unreliable)"
        lines.append(f"{name:<28} {s['q']:6.3f} {s['sigma2']:9.3g} {s['edge']:9.3g} {s['spikes']:6d} "
                     f"{s['bulk_energy_fraction']:11.3f} {s['mp_sensitivity']:11.3f}{flag}")
    lines.append("MP: eigenvalues s_i^2/max(n,p) of each weight (convs as Cout x Cin*kh*kw); spikes above the fitted "
                 "bulk edge carry learned structure; sensitivity = 1 - bulk energy (a prior for --budget-signal mp)")
    return lines
