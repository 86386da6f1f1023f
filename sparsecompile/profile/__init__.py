"""``sparsecompile profile``: latency, throughput, load time, memory and per-layer time.

TARGET is a build directory (its ``model.onnx``) or a model file that was not
built (the dense baseline). With ``--compare dense`` the build's dense model is
profiled in the same run, interleaved with the sparse one.

Timing discipline (shared machines swing by +-30 %):

* thread counts are pinned per variant and reported with the results
  (``variants[].threads``): ONNX Runtime sessions get ``intra_op_num_threads``
  = ``--threads`` (default: the physical cores this process may use) and one
  inter-op thread, spinning off (``OrtRunner``); torch variants set
  ``torch.set_num_threads(--threads)`` before every run, outside the timer;
* every variant is loaded and run once at every batch size first (this run
  measures peak memory), then per batch size each variant runs ``--warmup``
  times in a row untimed, and ``--runs`` timed rounds run *interleaved*: each
  round runs every variant once, in the order of a balanced design
  (``interleaving_design``): every ordering once per block of k! rounds,
  chained so every variant runs directly after every variant, itself
  included, equally often. Drift of the machine hits every variant alike, and
  a variant slowed down by whatever ran just before it (a runtime's threads
  still spinning, evicted caches) slows every variant alike. The orders and
  their seed (``--seed`` + batch size) are stored in ``design``;
* one iteration is one ``infer`` call timed with ``time.perf_counter_ns``
  (CPU) or CUDA events with ``torch.cuda.synchronize`` (``torch-cuda``, inputs
  already on the device);
* statistics are outlier-robust: percentiles (NumPy's linear interpolation),
  median absolute deviation (MAD, unscaled), and throughput =
  batch / median latency.

Ratio of two variants (sparse/dense): ``median(sparse) / median(dense)``. Its
confidence interval is a *paired percentile bootstrap*: the iteration pairs
(run i of sparse, run i of dense, which ran back to back) are resampled with
replacement ``BOOTSTRAP_RESAMPLES`` times and the ratio of medians recomputed
each time; the interval is the central ``CONFIDENCE`` of those ratios.
Resampling pairs, not the two series separately, keeps the drift the pair
shares out of the interval.

A result is flagged noisy when ``p90 / p50 > NOISY_P90_OVER_P50`` or
``MAD / median > NOISY_MAD_OVER_MEDIAN``: either means the machine was busy
or throttling while measuring, and the numbers should be re-taken.

Peak memory (CPU) is the growth of the process's peak RSS (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) from just before the variant
was loaded to the end of its first run at that batch size (batches run in the
order given, each variant before the next is loaded; freed heap pages are
handed back to the OS with glibc's ``malloc_trim`` first, so a variant cannot
look smaller by reusing pages the previous one freed); on CUDA it is
``torch.cuda.max_memory_allocated`` over the same span.

Per-layer time: ONNX Runtime's profiler (a separate session with
``enable_profiling``) gives per-node kernel times of the *optimized* graph ORT
really runs (fused, renamed nodes). That graph is saved too, and a node maps to
a layer when one of its inputs is the layer's weight or bias initializer (ONNX
initializers keep the parameter names); fused NCHWc nodes, whose weights ORT
reorders into new tensors, map through their bias or through the original
node that produced the tensor the fused node is named after. The torch backend
labels each FX node that uses a layer's weight with
``torch.profiler.record_function`` and reads ``torch.profiler``'s inclusive
time per label.

Where each job lives:

* ``stats.py`` -- latency statistics, the noisy-machine test, the paired bootstrap of a ratio;
* ``machine.py`` -- CPUs and default threads, the environment stored with the numbers, the load of
  other processes (``OtherLoad``), the peak-memory meters (``RssMeter``, ``CudaMemoryMeter``);
* ``inputs.py`` -- ``--batch`` parsing, batch checks against a model's specs, seeded random inputs;
* ``design.py`` -- ``Variant`` (one thing being timed), the balanced round order
  (``interleaving_design``) and the timing loop (``measure_interleaved``);
* ``layers.py`` -- parameter-to-layer maps and the per-layer profiles (ONNX Runtime, torch);
* ``sources.py`` -- what TARGET gives to time: the build's report and engine, the dense source of
  ``--compare dense``, the variants and their loaders (``_make_variants``);
* ``run.py`` -- ``ProfileOptions``, their checks, ``profile()`` and the measurement (``_measure``);
* ``output.py`` -- the table (``format_profile``), ``write_json``, ``write_plot``;
* ``command.py`` -- the click command ``profile_command``.
"""

from sparsecompile.profile.command import BACKENDS, profile_command
from sparsecompile.profile.design import (
    BALANCED_MAX_VARIANTS, Variant, interleaving_design, measure_interleaved, predecessor_counts,
)
from sparsecompile.profile.inputs import DEFAULT_BATCHES, check_batch, concrete_shape, parse_batches, random_inputs
from sparsecompile.profile.layers import (
    LAYER_RUNS, LAYER_WARMUP, layer_map_from_onnx, layer_map_from_report, map_ort_nodes, ort_layer_profile,
    torch_layer_map, torch_layer_profile,
)
from sparsecompile.profile.machine import (
    CudaMemoryMeter, OtherLoad, RssMeter, default_threads, machine_environment, physical_cores, usable_cpus,
)
from sparsecompile.profile.output import check_matplotlib, format_profile, write_json, write_plot
from sparsecompile.profile.run import SCHEMA, ProfileOptions, check_backend_available, profile
from sparsecompile.profile.stats import (
    BOOTSTRAP_RESAMPLES, CONFIDENCE, NOISY_MAD_OVER_MEDIAN, NOISY_P90_OVER_P50, bootstrap_ratio, latency_stats,
    noise_reasons,
)

__all__ = [
    "SCHEMA", "BACKENDS", "ProfileOptions", "profile", "profile_command", "format_profile", "latency_stats",
    "bootstrap_ratio", "noise_reasons", "parse_batches", "measure_interleaved", "interleaving_design",
    "predecessor_counts", "write_json", "write_plot",
]
