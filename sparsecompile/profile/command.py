"""The ``sparsecompile profile`` command (click): its options, and the table it prints."""

from __future__ import annotations

import click

from sparsecompile.backends import backend_names
from sparsecompile.profile.inputs import DEFAULT_BATCHES, parse_batches
from sparsecompile.profile.output import format_profile
from sparsecompile.profile.run import SCHEMA, ProfileOptions, profile
from sparsecompile.progress import Progress

BACKENDS = backend_names()  # every registered backend can be profiled


@click.command("profile", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("target", type=click.Path())
@click.option("-b", "--backend", default="ort", show_default=True, metavar="NAME",
              help=f"Runtime to time: {', '.join(BACKENDS)}. ort runs the build's model.onnx on the CPU; torch and "
                   "torch-cuda run a model file eagerly.")
@click.option("--batch", "batch_text", metavar="B1,B2,...",
              help=f"Batch sizes (default: {','.join(map(str, DEFAULT_BATCHES))} for a dynamic batch, the model's "
                   "fixed batch otherwise).")
@click.option("--runs", default=200, show_default=True, type=int, help="Timed runs per variant and batch size.")
@click.option("--warmup", default=20, show_default=True, type=int, help="Untimed runs before timing, per batch size.")
@click.option("--threads", type=int, help="Intra-op threads for ONNX Runtime and torch (default: physical cores).")
@click.option("--compare", metavar="dense",
              help="Also profile the build's dense model, interleaved, and report the sparse/dense latency ratio.")
@click.option("--dense", "dense_model", type=click.Path(), metavar="MODEL",
              help="Dense model file for --compare dense (default: the build's source, if unchanged). Implies "
                   "--compare dense.")
@click.option("--json-out", type=click.Path(), metavar="PATH",
              help=f"Write the results as JSON (schema {SCHEMA}).")
@click.option("--plot", type=click.Path(), metavar="PATH", help="Write latency and per-layer plots (needs matplotlib).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="D0,D1,...",
              help="Input shape of a model file that carries none (TorchScript); repeat per input.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled model file (runs code: trusted files only).")
@click.option("--top", default=10, show_default=True, type=int,
              help="Layers in the per-layer table (0 skips the per-layer profile).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs and the bootstrap.")
@click.option("--no-verify", is_flag=True, help="Skip checking a build's files against its manifest's SHA-256 hashes.")
@click.pass_context
def profile_command(ctx, target, backend, batch_text, runs, warmup, threads, compare, dense_model, json_out, plot,
                    input_shapes, trust_pickle, top, seed, no_verify):
    """Measure latency, throughput, load time, memory and per-layer time of TARGET.

    TARGET is a build directory (sparsecompile build) or a model file (the
    dense baseline). Prints a table; --json-out and --plot write files.

    \b
    Examples:
      sparsecompile profile build/ --batch 1,8 --runs 200
      sparsecompile profile build/ --compare dense --json-out profile.json
      sparsecompile profile model.pt2 --backend torch
    """
    from sparsecompile.frontend import parse_input_shape

    verbose = bool((ctx.obj or {}).get("verbose"))
    options = ProfileOptions(
        target=target, backend=backend, batches=parse_batches(batch_text), runs=runs, warmup=warmup,
        threads=threads, compare=compare, dense=dense_model, json_out=json_out, plot=plot,
        input_shapes=[parse_input_shape(s) for s in input_shapes], trust_pickle=trust_pickle, top=top, seed=seed,
        verify=not no_verify,
    )
    result = profile(options, Progress(verbose=verbose))
    click.echo(format_profile(result, top=top))
    for path, what in ((json_out, "JSON"), (plot, "plot")):
        if path:
            click.echo(f"wrote {what} to {path}")
