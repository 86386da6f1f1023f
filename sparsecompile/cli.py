"""The ``sparsecompile`` command line. Thin: parse arguments, call the library.

User errors (:class:`SparseCompileError`) print one line, ``error: ...``, and
exit with status 1. ``--verbose`` adds per-pass progress and, for
unexpected failures, the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings

import click

from sparsecompile import __version__
from sparsecompile.errors import SparseCompileError
from sparsecompile.masks import MASK_METHODS
from sparsecompile.package.edges import EDGE_TARGETS as EDGE_NAMES
from sparsecompile.runtime import RUN_BACKENDS
from sparsecompile.targets import TARGETS

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns SparseCompileError (and stray exceptions) into one-line errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SparseCompileError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence for users
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            click.echo(f"error: unexpected {type(exc).__name__}: {first} (re-run with --verbose for details; "
                       "this is a sparsecompile bug, please report it)", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="sparsecompile")
@click.option("-v", "--verbose", is_flag=True, help="Show per-pass progress and details.")
@click.pass_context
def main(ctx, verbose):
    """Compile dense PyTorch models into 2:4 sparse deployment artifacts.

    \b
    Typical use:
      sparsecompile build model.pt2 --target a100 -o build/ --calib calib.npy
      sparsecompile inspect build/
      sparsecompile run build/ --input x.npy --output y.npy
      sparsecompile profile build/ --compare dense
      sparsecompile engine build/                 (on the target GPU)
      sparsecompile package build/ --edge jetson-orin -o model.scpkg
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    if not verbose:
        # torch's exporter warns about internals users cannot act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _key_values(items, flag: str) -> dict:
    """KEY=VALUE options with numbers parsed: ``init=random tau_end=0.05`` -> ``{"init": "random", "tau_end": 0.05}``."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE", param_hint=flag)
        for cast in (int, float):
            try:
                values[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            values[key] = raw
    return values


def _pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(p) for p in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"'{text}' is not N:M (e.g. 2:4)") from None
    if not 0 < n < m:
        raise click.BadParameter(f"'{text}': need 0 < N < M")
    return n, m



# BuildOptions fields the command line does not set: the API labels in-memory models itself, and these two
# sample counts are tuned in code and tests only.
NOT_ON_THE_COMMAND_LINE = frozenset({"source_label", "certify_samples", "error_samples"})


def build_options(params: dict):
    """The BuildOptions for ``build``'s click parameters: each option's parameter is the BuildOptions field of the
    same name (BuildOptions is the one list; tests/test_api.py checks every option maps to a field with the same
    default, and every field but NOT_ON_THE_COMMAND_LINE has an option); these few are renamed or parsed."""
    from sparsecompile.build import BuildOptions
    from sparsecompile.engine.recipe import parse_batch
    from sparsecompile.frontend import parse_input_shape

    renamed = {"masks_file": "masks", "certify_": "certify"}
    parsed = {
        "input_shapes": lambda shapes: [parse_input_shape(s) for s in shapes],
        "pattern": _pattern,
        "exclude": list,
        "batch": lambda batch: parse_batch(batch) if batch else None,
        "learn_options": lambda pairs: _key_values(pairs, "--learn-option"),
    }
    return BuildOptions(**{renamed.get(name, name): parsed[name](value) if name in parsed else value
                           for name, value in params.items()})


@main.command(context_settings=_CONTEXT)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Build directory to write (replaced atomically).")
@click.option("-t", "--target", default="a100", show_default=True, metavar="NAME",
              help=f"Deployment target: {', '.join(sorted(TARGETS))}.")
@click.option("--calib", metavar="PATH|DIR|PKG.MOD:FN",
              help="Calibration inputs: .npy (one input) or .npz (one array per input), samples on axis 0; a "
                   "directory of images (with --preprocess); or a Python callable returning batches.")
@click.option("--preprocess", metavar="'KEY=V ...'",
              help="For an image directory: resize=H,W scale=1/255 mean=.. std=.. layout=nchw|nhwc channels=1|3.")
@click.option("--calib-samples", type=click.IntRange(min=1), help="Use at most this many calibration samples.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="D0,D1,...",
              help="Input shape, e.g. 1,3,224,224; repeat for several inputs. Overrides the model's examples.")
@click.option("--model-factory", metavar="PKG.MODULE:FN", help="Build the model by calling FN() (use with --weights).")
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict for --model-factory (.pt or .safetensors).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading pickled modules. Unpickling runs arbitrary code: only for files you trust.")
@click.option("--method", default="auto", show_default=True, metavar="NAME",
              help=f"Mask method: auto, {', '.join(sorted(MASK_METHODS))}. auto (with --calib): builds the masks of "
                   "magnitude, activation and hessian, each with and without statistics correction, and keeps the "
                   "least damaging on held-back samples; without --calib: magnitude.")
@click.option("--correct", type=click.Choice(["auto", "none", "bn", "bias"]), default="auto", show_default=True,
              help="Statistics correction after masking: match the dense layer's per-channel mean/variance "
                   "(bias) or re-estimate folded BatchNorm (bn); rescales surviving weights per output row. "
                   "auto: bias with --calib, none without. gumbel/proxsparse learn their masks under the "
                   "correction; with none their weights stay bit for bit.")
@click.option("--sequential/--one-shot", default=True, show_default=True,
              help="Calibration statistics for layer k with layers < k already sparse (sequential), or all from "
                   "the dense model (one-shot).")
@click.option("--update-weights/--keep-weights", default=None,
              help="Let hessian compensate the surviving weights (OBS/SparseGPT), or never. Default: --method auto "
                   "tries hessian both ways; a named method keeps the surviving weights bit-identical.")
@click.option("--pattern", default="2:4", show_default=True, metavar="N:M",
              help="Keep N of every M weights along the reduction axis (2:4 is what GPUs accelerate).")
@click.option("--exclude", "--keep-dense", "exclude", multiple=True, metavar="REGEX",
              help="Keep layers whose name matches REGEX dense (repeatable).")
@click.option("--save-masks", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the chosen masks (and the weights they were chosen on) to FILE for reuse.")
@click.option("--masks", "masks_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Apply masks saved with --save-masks (same architecture, e.g. an updated checkpoint) "
                   "instead of choosing them; reports how far the weights moved since.")
@click.option("--max-steps", default=1500, show_default=True, type=click.IntRange(min=0),
              help="gumbel/proxsparse: optimiser steps of mask learning.")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="gumbel/proxsparse: stop learning after this long (the best masks so far are used).")
@click.option("--objective", type=click.Choice(["auto", "kl", "mse", "ce"]), default="auto", show_default=True,
              help="gumbel/proxsparse: match the dense outputs (kl for classifier logits, mse otherwise, "
                   "including outputs already in [0, 1]) or, with "
                   "--labels, cross-entropy (ce).")
@click.option("--labels", type=click.Path(dir_okay=False), help="gumbel/proxsparse: .npy of class labels, one per "
              "calibration sample (optional; learning is label-free without it).")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="gumbel/proxsparse: keep a learning checkpoint here (every 50 steps, at the end, on Ctrl-C).")
@click.option("--resume", is_flag=True, help="gumbel/proxsparse: continue the learning saved in --checkpoint.")
@click.option("--learn-option", "learn_options", multiple=True, metavar="KEY=VALUE",
              help="gumbel/proxsparse option (repeatable): a method option (init=random, tau_end=0.05, lambda1=2) "
                   "or a training-loop one (feature_weight=0, lr=0.1, patience=none; see the README).")
@click.option("--certify", "certify_", is_flag=True,
              help="Also compute prediction-stability certificates on the calibration set (see sparsecompile certify).")
@click.option("--spectra", is_flag=True, help="Record Marchenko-Pastur spectral diagnostics per layer (inspect --spectra).")
@click.option("--max-drop", default="auto", show_default=True, metavar="POINTS|auto|none",
              help="Accuracy guard: the most agreement with the dense model a class-score, sequence or scores "
                   "output may lose on held-back calibration samples, in points (top-1; per position for [N, T, C] "
                   "sequences; above-threshold F1 for detector scores). "
                   "auto: 1 with --calib, off without. none: every eligible layer sparse (damage still reported).")
@click.option("--max-error", default=10.0, show_default=True, type=float, metavar="PERCENT",
              help="Accuracy guard for outputs that are not class scores (regressions, boxes, feature maps): the "
                   "largest relative L2 error against the dense model, in percent.")
@click.option("--on-damage", type=click.Choice(["restore", "fail", "warn"]), default="restore", show_default=True,
              help="Over the budget: restore the most sensitive layers to dense until it holds, fail the build "
                   "(exit 1, naming the worst layers), or build it with a WARNING.")
@click.option("--output-kind", metavar="I=KIND,...",
              help="How output I's damage is measured: classes, sequence, scores (scores@0.3: another threshold) "
                   "or values (default: from its shape and values; a detector's box regressions count as values).")
@click.option("--auto-time-cap", default=1800.0, show_default=True, type=float, metavar="SECONDS",
              help="Safety cap on the time --method auto spends trying candidates; candidates past it are skipped "
                   "and the build says so.")
@click.option("--per-layer/--no-per-layer", default=False, show_default=True,
              help="--method auto over budget: give each layer the mask of whichever of the three best candidates "
                   "damages least with that layer alone sparse, and keep the mix if it measures better.")
@click.option("--auto-learned", type=click.Choice(sorted(n for n, cls in MASK_METHODS.items() if cls.learned)),
              default=None,
              help="--method auto over budget: also learn masks with this method (started from the best "
                   "heuristic's masks, --max-steps/--time-budget apply) and keep them if they measure less "
                   "damaging. Slow on a CPU: minutes to hours.")
@click.option("--budget-signal", type=click.Choice(["measured", "mp"]), default="measured", show_default=True,
              help="Layer sensitivity for --max-drop: measured (one calibration pass per layer) or the "
                   "Marchenko-Pastur spectral prior (no passes).")
@click.option("--min-weights", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Keep layers with fewer weights than this dense (too small to gain).")
@click.option("--lower-conv", type=click.Choice(["none", "im2col"]), default="none", show_default=True,
              help="Rewrite eligible Conv2d as im2col + GEMM with reduction axis ordered (kh, kw, cin).")
@click.option("--permute/--no-permute", default=None,
              help="Reorder channels so the masks keep more weight (function unchanged, no runtime cost). "
                   "Default: on when masks are applied for a target with sparse tensor cores.")
@click.option("--permute-effort", default=60.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              metavar="MILLIONS",
              help="Work limit of the permutation search per channel group, in millions of scored channel "
                   "re-splits x rows. Deterministic: the same model, options and --seed give the same channel "
                   "order on any machine. Most groups converge before it; larger = better orders for large "
                   "layers, slower.")
@click.option("--permute-budget", default=120.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              metavar="SECONDS",
              help="Safety cap on the wall time of the permutation search per channel group. Normally "
                   "--permute-effort stops the search first; if this cap binds, the build warns and reports it "
                   "(that channel order then depends on machine speed: the build is not reproducible).")
@click.option("--sparsify/--no-sparsify", default=None,
              help="Force masks on or off. Default: on for targets with sparse tensor cores.")
@click.option("--batch", "batch", metavar="MIN,OPT,MAX",
              help="TensorRT optimization profile for a dynamic batch (default 1,8,32), written into the "
                   "engine recipe of GPU targets.")
@click.option("--precision", type=click.Choice(["auto", "fp16", "bf16", "fp32", "int8", "fp8"]), default="auto",
              show_default=True, help="Engine precision (auto: the weights dtype). int8 with --calib: the build "
                                      "quantizes the sparse model itself (model.int8.onnx: TensorRT's Q/DQ input, or "
                                      "the ONNX Runtime INT8 fallback for --target cpu); without --calib int8/fp8 "
                                      "need a model quantized with Q/DQ nodes; fp8 needs l4/h100.")
@click.option("--int8-calibration", type=click.Choice(["percentile", "entropy", "minmax"]), default="percentile",
              show_default=True, help="How --precision int8 sets activation ranges on the calibration data.")
@click.option("--engine/--no-engine", "engine", default=True, show_default=True,
              help="Build the TensorRT engine now when this machine has the target's GPU and TensorRT.")
@click.option("--sparse-only-if-faster", is_flag=True,
              help="Leave layers dense that the (uncalibrated) speed model does not predict faster on the target.")
@click.option("--weights-dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              show_default=True, help="Dtype of the compressed weight file (auto: the target's precision).")
@click.option("--force", is_flag=True, help="Replace --output even if it is not a previous build.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for anything random.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="torch intra-op threads for the whole build (default: torch's own, one per core). On a shared "
                   "machine fewer threads than cores is often much faster; the report records the count.")
@click.pass_context
def build(ctx, **params):
    """Compile MODEL (.pt2, TorchScript, or a pickled module with --trust-pickle) to OUTPUT.

    Writes model.onnx (sparse weights, dense layout), weights.safetensors
    (compressed N:M weights), report.json, report.md and manifest.json; for
    GPU targets also engine/ (the recipe that builds the TensorRT engine on
    the target: sparsecompile engine OUTPUT).
    """
    from sparsecompile.build import build as run_build
    from sparsecompile.progress import Progress
    from sparsecompile.report import summary_lines

    options = build_options(params)
    from sparsecompile.build import SecondaryRank

    try:
        result = run_build(options, Progress(verbose=ctx.obj["verbose"]))
    except SecondaryRank:
        return  # torchrun: another rank learned the same masks; rank 0 writes and reports
    click.echo("\n".join(summary_lines(result.report)))
    click.echo(f"wrote {result.output}/ in {result.report['timings']['total']:.1f}s, peak memory "
               f"{result.report['resources']['peak_rss_mib']:.0f} MiB "
               f"(sparsecompile inspect {result.output} for the per-layer table)")


@main.command(context_settings=_CONTEXT)
@click.argument("target", metavar="BUILD_DIR|PACKAGE", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print report.json (a package: manifest.json) instead of the table.")
@click.option("--spectra", is_flag=True,
              help="Marchenko-Pastur spectra per layer: from a --spectra build, or computed for a model file.")
@click.option("--plot", type=click.Path(dir_okay=False), help="With --spectra on a model file: write a PNG (needs matplotlib).")
@click.option("--no-verify", is_flag=True,
              help="Skip checking the build's files against the SHA-256 hashes in its manifest.")
@click.option("--verify-key", type=click.Path(dir_okay=False), metavar="KEY.pub",
              help="For a package: require its manifest.sig to be this Ed25519 public key's signature.")
def inspect(target, as_json, spectra, plot, no_verify, verify_key):
    """Show what a build made sparse, what stayed dense and why; a package's manifest; or (--spectra) the
    weight spectra of a build or of a model file."""
    from pathlib import Path

    if verify_key and (spectra or not Path(target).is_file()):
        raise SparseCompileError(f"--verify-key applies to .scpkg packages (without --spectra); '{target}' is not one")
    if spectra:
        from sparsecompile.spectra import spectra_lines, spectra_of

        click.echo("\n".join(spectra_lines(spectra_of(target, plot, verify=not no_verify))))
        return
    if plot:
        raise SparseCompileError("--plot goes with --spectra")
    if Path(target).is_file():
        from sparsecompile.package.archive import open_package
        from sparsecompile.package.describe import describe_package

        package = open_package(target, verify_key=verify_key)
        click.echo(json.dumps(package.manifest, indent=2) if as_json else describe_package(package))
        return
    from sparsecompile.builddir import open_build
    from sparsecompile.report import format_report

    path, _ = open_build(target, verify=not no_verify)
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise SparseCompileError(f"cannot read '{path / 'report.json'}': {exc}") from None
    engine_json = path / "engine" / "engine.json"
    if as_json or not engine_json.exists():
        click.echo(json.dumps(report, indent=2) if as_json else format_report(report), nl=not as_json)
        return
    from sparsecompile.engine.run import engine_lines

    click.echo(format_report(report))
    click.echo("TensorRT engine (engine/engine.json):")
    click.echo("\n".join(engine_lines(json.loads(engine_json.read_text()))))


@main.command(context_settings=_CONTEXT)
@click.argument("target", metavar="BUILD_DIR|PACKAGE", type=click.Path())
@click.option("-i", "--input", "inputs", multiple=True, required=True, type=click.Path(dir_okay=False),
              help=".npy per model input (repeat in input order) or one .npz with an array per input.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write outputs: .npy for one output, .npz for several (default: print a summary).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads.")
@click.option("--allow-other-target", is_flag=True,
              help="Run a package on a machine it was not packaged for (CPU fallback).")
@click.option("--backend", type=click.Choice(list(RUN_BACKENDS)), default="ort", show_default=True,
              help="For a build: ONNX Runtime on the CPU, or torch on a GPU with 2:4 semi-structured sparse weights.")
@click.option("--no-verify", is_flag=True,
              help="Skip checking the build's files against the SHA-256 hashes in its manifest.")
@click.option("--verify-key", type=click.Path(dir_okay=False), metavar="KEY.pub",
              help="For a package: require its manifest.sig to be this Ed25519 public key's signature.")
def run(target, inputs, output, threads, allow_other_target, backend, no_verify, verify_key):
    """Run a build (ONNX Runtime on the CPU, or --backend torch-cuda) or a .scpkg package.

    A package is verified (every member's SHA-256) before anything runs, and
    picks its backend itself (TensorRT on its target GPU, else ONNX Runtime).
    """
    from pathlib import Path

    if Path(target).is_file():
        if backend != "ort":
            raise SparseCompileError("--backend applies to build directories; a package picks its own backend")
        from sparsecompile.runtime import run_package

        run_package(target, list(inputs), output, threads, allow_other_target, verify_key=verify_key)
        return
    if verify_key:
        raise SparseCompileError(f"--verify-key applies to .scpkg packages; '{target}' is not one")
    from sparsecompile.runtime import run_build_dir

    run_build_dir(target, list(inputs), output, threads, backend, verify=not no_verify)


@main.command(context_settings=_CONTEXT)
@click.argument("build_dir", type=click.Path())
@click.option("--edge", type=click.Choice(sorted(EDGE_NAMES)), metavar="TARGET",
              help=f"Device to ship to: {', '.join(sorted(EDGE_NAMES))}. Default: the build's target "
                   "(a cpu build: this machine's CPU architecture).")
@click.option("-o", "--output", required=True, type=click.Path(), help="The bundle to write, e.g. model.scpkg.")
@click.option("--note", help="Preprocessing note for the manifest (what inputs the model expects).")
@click.option("--force", is_flag=True, help="Overwrite an existing file that is not a package.")
@click.option("--sign-key", type=click.Path(dir_okay=False), metavar="KEY",
              help="Sign the manifest with this Ed25519 private key (sparsecompile keygen): adds manifest.sig.")
def package(build_dir, edge, output, note, force, sign_key):
    """Bundle a build into one verified .scpkg file for an edge device.

    \b
    The bundle holds the compressed weights, the ONNX graph without its
    weights, the build report, a manifest with a SHA-256 per member, and for
    GPU targets the trtexec recipe that builds the TensorRT engine there.
    """
    from sparsecompile.package.pack import package_build, size_lines
    from sparsecompile.progress import Progress

    result = package_build(build_dir, output, edge, force=force, note=note, progress=Progress(), sign_key=sign_key)
    click.echo("\n".join(size_lines(result)))


@main.command(context_settings=_CONTEXT)
@click.argument("build_dir", type=click.Path())
@click.option("--calib", required=True, type=click.Path(),
              help="Calibration inputs (.npy/.npz, a directory of images, or pkg.mod:fn) to certify on.")
@click.option("--samples", default=256, show_default=True, type=click.IntRange(min=1), help="At most this many samples.")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Write the full result as JSON.")
@click.option("--no-verify", is_flag=True,
              help="Skip checking the build's files against the SHA-256 hashes in its manifest.")
def certify(build_dir, calib, samples, json_out, no_verify):
    """Which predictions can the build's sparsification provably not change? (needs a --certify build)

    \b
    For each sample: the dense margin between the top two outputs against a
    sound upper bound on how far the build's changed weights can move them;
    the fraction guaranteed unchanged next to the fraction observed
    unchanged, and the layers that use up most of the bound. The bounds are
    loose on deep networks; a guarantee holds where it is given.
    """
    from sparsecompile.certificates import certificate_lines, certify_build
    from sparsecompile.progress import Progress

    result = certify_build(build_dir, calib, samples, Progress(), verify=not no_verify)
    click.echo("\n".join(certificate_lines(result)))
    if json_out:
        from pathlib import Path

        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_out}")


@main.command(context_settings=_CONTEXT)
@click.argument("build_dir", type=click.Path())
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="TensorRT timing cache to reuse and update (default: one per GPU and TensorRT version "
                   "under ~/.cache/sparsecompile/timing, shared by all builds).")
@click.option("--allow-other-gpu", is_flag=True, help="Build for this GPU even if it is not the build's target.")
@click.option("--no-verify", is_flag=True,
              help="Skip checking the build's files against the SHA-256 hashes in its manifest.")
def engine(build_dir, timing_cache, allow_other_gpu, no_verify):
    """Build the TensorRT engine of a GPU build, on the target machine.

    \b
    Needs a CUDA GPU of the build's target and TensorRT. Writes
    engine/model.TARGET.engine, build.log, layers.json (tactics) and
    engine.json: per layer, whether TensorRT picked a sparse kernel, found
    the layer eligible but kept dense kernels, or could not use sparsity.
    """
    from sparsecompile.engine.run import build_engine, engine_lines

    click.echo("\n".join(engine_lines(build_engine(build_dir, timing_cache, allow_other_gpu, verify=not no_verify))))


@main.command(context_settings=_CONTEXT)
@click.argument("package_path", metavar="PACKAGE", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="ONNX file to write, or an existing directory: model.onnx and, for GPU targets, engine/ (the recipe).")
@click.option("--verify-key", type=click.Path(dir_okay=False), metavar="KEY.pub",
              help="For a package: require its manifest.sig to be this Ed25519 public key's signature.")
def unpack(package_path, output, verify_key):
    """Write a package's ONNX model with its weights restored (for trtexec or other tools)."""
    from pathlib import Path

    from sparsecompile.package.runner import write_onnx

    written = write_onnx(package_path, output, verify_key=verify_key)
    click.echo(f"wrote {written}")
    if Path(output).is_dir() and (Path(output) / "engine" / "recipe.json").exists():
        click.echo(f"wrote {Path(output) / 'engine'}/ (on the target GPU: python {Path(output) / 'engine'}/build_engine.py, "
                   f"or sh {Path(output) / 'engine'}/trtexec.sh)")


@main.command(context_settings=_CONTEXT)
@click.argument("key_file", metavar="KEYFILE", type=click.Path(dir_okay=False))
def keygen(key_file):
    """Make an Ed25519 key pair for signing packages: KEYFILE (private, mode 0600) and KEYFILE.pub.

    \b
    Sign:   sparsecompile package build/ -o model.scpkg --sign-key KEYFILE
    Verify: sparsecompile run model.scpkg -i x.npy --verify-key KEYFILE.pub
    Needs the optional 'cryptography' package: pip install 'sparsecompile[sign]'.
    """
    from sparsecompile.package.signing import generate_key

    private_path, public_path, key_id = generate_key(key_file)
    click.echo(f"wrote {private_path} (private key, mode 0600: keep it secret) and {public_path} (public key: "
               f"give it to whoever runs the packages)")
    click.echo(f"key id {key_id}")


from sparsecompile.profile import profile_command  # noqa: E402 - registered after the commands defined here

main.add_command(profile_command)


if __name__ == "__main__":  # pragma: no cover
    main()
