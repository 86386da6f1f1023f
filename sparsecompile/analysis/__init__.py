"""Analyses of a dense model and its sparse build (diagnostics, not passes: nothing here changes a graph).

* :mod:`~sparsecompile.analysis.spectral` -- Marchenko-Pastur fits of weight
  spectra: bulk edge, spikes, energy in the bulk, a per-layer sensitivity prior.
* :mod:`~sparsecompile.analysis.certify` -- per-sample guaranteed bounds on how
  far masking (and every other parameter change of a build) can move the
  outputs, margin certificates for classifiers, and a ranking of risky layers.
"""

from sparsecompile.analysis.certify import (
    NotCertifiable, certify, conv_operator_norm_bound, matrix_norm_bound, modelled_ops, power_iteration_norm,
)
from sparsecompile.analysis.spectral import layer_spectrum, model_spectra, mp_sensitivity, plot_spectra

__all__ = [
    "NotCertifiable", "certify", "conv_operator_norm_bound", "layer_spectrum", "matrix_norm_bound",
    "model_spectra", "modelled_ops", "mp_sensitivity", "plot_spectra", "power_iteration_norm",
]
