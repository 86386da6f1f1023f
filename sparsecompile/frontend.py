"""Load a user's model into one ATen-level ``torch.fx.GraphModule``.

Every input kind goes through ``torch.export`` so the passes see a single
graph dialect: ATen ops (``aten.conv2d``, ``aten.batch_norm``,
``aten.linear``, ``aten.addmm`` ...) whose weights are ``get_attr`` nodes
named after the original parameters (``layer1.0.conv1.weight``).

Accepted inputs, safest first:

* ``.pt2`` archives from ``torch.export.save``. ``torch.export.load``
  silently retries ``torch.load(weights_only=False)`` (arbitrary code) when a
  weights-only load fails; we force weights-only loading for the whole call
  unless the user passed ``--trust-pickle``.
* TorchScript archives (``torch.jit.save``), converted with torch's
  TorchScript-to-export converter.
* ``--model-factory pkg.mod:fn`` plus ``--weights`` (a state dict loaded
  with ``weights_only=True``, or a ``.safetensors`` file).
* Pickled whole modules, only with ``--trust-pickle``: unpickling runs code.

The batch dimension (dim 0 of every input) is exported as dynamic when the
model allows it, so calibration can run in large batches and the ONNX graph
has a symbolic batch; otherwise the model stays static and calibration runs
in chunks of the example batch size.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import file_sha256


@dataclass
class LoadedModel:
    module: torch.fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    source: str
    source_kind: str  # "pt2" | "torchscript" | "factory" | "pickle"
    source_sha256: str | None
    dynamic_batch: bool
    notes: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.example_inputs[0].shape[0]) if self.example_inputs else 1


def parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise SparseCompileError(
            f"--input-shape '{text}' is not a comma-separated list of positive integers (e.g. 1,3,224,224)"
        )
    return dims


@contextlib.contextmanager
def _weights_only_torch_load(enabled: bool):
    """Force every ``torch.load`` inside the block to be weights-only."""
    if not enabled:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, to point at the user's line."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if "site-packages/torch" not in f.filename and "/sparsecompile/" not in f.filename
    ]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {frame.filename}:{frame.lineno}: {frame.line})"


def _classify_file(path: Path) -> str:
    """Guess the archive kind from its contents, not its extension."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head[:1] == b"\x80":  # pickle protocol marker (legacy torch.save)
            return "pickle"
        if head[:2] == b"PK":  # zip magic but is_zipfile failed: truncated
            return "truncated"
        return "unknown"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "truncated"
    stems = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if any(s.startswith("serialized_exported_program") or s.startswith("models/") for s in stems) or any(
        "archive_format" in s for s in stems
    ):
        return "pt2"
    if "constants.pkl" in stems or any(s.startswith("code/") for s in stems):
        return "torchscript"
    if "data.pkl" in stems:
        return "pickle"
    return "unknown"


def check_readable(path: Path, what: str = "model file") -> None:
    if not path.exists():
        raise SparseCompileError(f"{what} '{path}' does not exist")
    if path.is_dir():
        raise SparseCompileError(f"{what} '{path}' is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise SparseCompileError(f"{what} '{path}' is not readable (check its permissions)")
    if path.stat().st_size == 0:
        raise SparseCompileError(f"{what} '{path}' is empty")


def _random_inputs(shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


def _batch_dims(example_inputs) -> tuple | None:
    if not example_inputs or any(t.dim() == 0 for t in example_inputs):
        return None
    if len({int(t.shape[0]) for t in example_inputs}) != 1:
        return None
    # AUTO: export picks the range the model allows (or keeps it static) instead of failing.
    return tuple({0: torch.export.Dim.AUTO} for _ in example_inputs)


def _has_dynamic_batch(ep) -> bool:
    from torch.export.graph_signature import InputKind

    user_inputs = {spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[0], torch.SymInt):
                # A SymInt can still be specialized to a constant expression.
                if value.shape[0].node.expr.free_symbols:
                    return True
    return False


def export_module(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]):
    """Export ``module`` to an ExportedProgram, trying a dynamic batch first.

    Returns ``(exported_program, dynamic_batch)``.
    """
    try:
        module.eval()
    except NotImplementedError:  # ExportedProgram.module() graphs are already inference graphs
        pass
    dims = _batch_dims(example_inputs)
    if dims is not None:
        # torch.export specializes size-1 dims, so export with batch >= 2.
        widened = tuple(t.expand(2, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t for t in example_inputs)
        try:
            with torch.no_grad():
                ep = torch.export.export(module, widened, dynamic_shapes=dims)
            if _has_dynamic_batch(ep):
                return ep, True
        except Exception:  # noqa: BLE001 - fall back to a static batch below
            pass
    try:
        with torch.no_grad():
            return torch.export.export(module, tuple(example_inputs)), False
    except Exception as exc:  # noqa: BLE001 - torch raises many types here
        raise SparseCompileError(
            f"could not trace the model with torch.export: {type(exc).__name__}: {_first_line(exc)}"
            f"{_user_frame(exc)}; make the model export-friendly (see torch.export docs) or pass a .pt2"
        ) from None


def _input_names(ep, count: int) -> list[str]:
    from torch.export.graph_signature import InputKind

    names = [
        spec.arg.name for spec in ep.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and hasattr(spec.arg, "name")
    ]
    return names if len(names) == count else [f"input_{i}" for i in range(count)]


# Members of a .pt2 whose loading runs code: torch.export.load hands ``opaque_obj_*``
# constants to plain ``pickle.loads`` and ``custom_obj_*`` ones to the TorchScript object
# unpickler (weights-only mode covers neither), and AOTInductor members are compiled
# native libraries that it loads into the process.
_PT2_CODE_MEMBER_PREFIXES = ("opaque_obj_", "custom_obj_")
_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")
_MAX_CONFIG_BYTES = 64 << 20


def verify_zip_members(path: Path) -> None:
    """Refuse a zip whose members fail their CRC (a flipped bit in a weight would load silently)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise SparseCompileError(f"'{path}' is a corrupt zip archive: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - zlib.error and friends from a damaged stream
        raise SparseCompileError(f"'{path}' is a corrupt zip archive ({type(exc).__name__}: {_first_line(exc)})") from None
    if bad is not None:
        raise SparseCompileError(f"'{path}' is corrupt: member '{bad}' fails its CRC check (the file was altered or damaged)")


def code_members_of_pt2(path: Path) -> list[str]:
    """Members of a ``.pt2`` archive that ``torch.export.load`` would run code to load.

    Read from the zip directory and the payload configs (JSON) only: nothing is
    deserialized. Pickled *tensors* are not listed: they load through the
    weights-only unpickler, which :func:`load_pt2` forces for the whole call.
    """
    found: dict[str, str] = {}  # member -> why
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename
            base = name.rsplit("/", 1)[-1]
            if base.startswith(_PT2_CODE_MEMBER_PREFIXES):
                found.setdefault(name, "pickled Python object")
            elif "/aotinductor/" in f"/{name}" or base.endswith(_NATIVE_SUFFIXES):
                found[name] = "compiled native code"
            elif base.endswith("_config.json") and "/data/" in f"/{name}":
                if info.file_size > _MAX_CONFIG_BYTES:
                    found[name] = f"payload config of {info.file_size} bytes"
                    continue
                try:
                    config = json.loads(archive.read(info)).get("config", {})
                except (ValueError, AttributeError):
                    continue  # not a payload config; torch.export.load rejects a broken one itself
                if not isinstance(config, dict):
                    continue
                folder = name.rsplit("/", 1)[0]
                for fqn, meta in config.items():
                    if not isinstance(meta, dict) or not meta.get("use_pickle"):
                        continue
                    member = f"{folder}/{meta.get('path_name', '?')}"
                    if meta.get("tensor_meta") is None and not str(meta.get("path_name", "")).startswith(("tensor_", "weight_")):
                        found[member] = f"pickled Python object '{fqn}'"
    return [f"{member} ({why})" for member, why in sorted(found.items())]


def load_pt2(path: Path, trust_pickle: bool):
    """``torch.export.load`` of ``path``, refusing (unless trusted) anything whose loading runs code.

    The archive is inspected first: member CRCs, then pickled non-tensor constants and
    native libraries (see :func:`code_members_of_pt2`). Every ``torch.load`` inside
    the call is forced to weights-only, since ``torch.export.load`` retries
    ``weights_only=False`` when a weights-only load fails.
    """
    path = Path(path)
    verify_zip_members(path)
    if not trust_pickle:
        try:
            risky = code_members_of_pt2(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SparseCompileError(f"'{path}' is not a readable .pt2 archive: {_first_line(exc)}") from None
        if risky:
            more = f" and {len(risky) - 1} more" if len(risky) > 1 else ""
            raise SparseCompileError(
                f"'{path}' holds members that only load by running code: {risky[0]}{more}; "
                "nothing was loaded. Re-run with --trust-pickle only if you trust where the file came from"
            )
    try:
        with _weights_only_torch_load(not trust_pickle):
            return torch.export.load(str(path))
    except SparseCompileError:
        raise
    except Exception as exc:  # noqa: BLE001
        message = _first_line(exc)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Unpickler" in str(exc):
            raise SparseCompileError(
                f"'{path}' contains pickled objects that only load by running code; "
                "re-run with --trust-pickle if you trust where the file came from"
            ) from None
        raise SparseCompileError(
            f"'{path}' is a .pt2 archive but could not be loaded ({type(exc).__name__}: {message}); "
            "is it truncated or from an incompatible torch version?"
        ) from None


def _example_inputs_of(ep) -> tuple[torch.Tensor, ...] | None:
    example = getattr(ep, "example_inputs", None)
    if not example:
        return None
    args, kwargs = example
    if kwargs:
        return None
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple(a.detach().clone() for a in args)


def import_callable(spec: str, flag: str):
    """Import ``package.module:function`` (from the current directory too) for ``flag``."""
    if ":" not in spec:
        raise SparseCompileError(f"{flag} '{spec}' must look like 'package.module:function'")
    module_name, function_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, SyntaxError, ...
        raise SparseCompileError(
            f"cannot import '{module_name}' for {flag}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise SparseCompileError(f"'{module_name}' has no callable '{function_name}' (from {flag})")
    return factory


def _load_state_dict(path: Path) -> dict:
    check_readable(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise SparseCompileError(f"cannot read safetensors weights '{path}': {_first_line(exc)}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SparseCompileError(
            f"cannot load weights '{path}' as a plain state dict (weights_only=True): {_first_line(exc)}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SparseCompileError(f"weights file '{path}' does not hold a state dict of tensors")
    return state


def load_model(
    path: str | os.PathLike | None = None,
    *,
    factory: str | None = None,
    weights: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    calib_example: tuple[torch.Tensor, ...] | None = None,
) -> LoadedModel:
    """Load a model from any accepted source and export it to ATen FX.

    Example inputs come from ``input_shapes`` (``--input-shape``), else from
    the ``.pt2`` archive's own example inputs, else from ``calib_example``
    (the calibration data's first batch).
    """
    explicit_inputs = _random_inputs(input_shapes) if input_shapes else None
    notes: list[str] = []
    sha = None
    program = None  # the loaded ExportedProgram of a .pt2
    inputs_from_archive = False

    if factory is not None:
        if path is not None:
            raise SparseCompileError("pass either a model file or --model-factory, not both")
        build_fn = import_callable(factory, "--model-factory")
        try:
            module = build_fn()
        except Exception as exc:  # noqa: BLE001
            raise SparseCompileError(
                f"--model-factory '{factory}' raised {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        if not isinstance(module, torch.nn.Module):
            raise SparseCompileError(f"--model-factory '{factory}' returned {type(module).__name__}, not an nn.Module")
        if weights is not None:
            state = _load_state_dict(Path(weights))
            try:
                result = module.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shape mismatches
                detail = next((line.strip() for line in str(exc).splitlines() if "mismatch" in line), _first_line(exc))
                raise SparseCompileError(f"weights '{weights}' do not match the factory's model: {detail}") from None
            problems = list(result.missing_keys) + list(result.unexpected_keys)
            if problems:
                raise SparseCompileError(
                    f"weights '{weights}' do not match the factory's model: "
                    f"missing {list(result.missing_keys)[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
                )
            sha = file_sha256(weights)
        else:
            notes.append("no --weights given: the factory's own initial weights are used")
        kind, source = "factory", factory
    else:
        if path is None:
            raise SparseCompileError("no model given: pass a model file or --model-factory")
        if weights is not None:
            raise SparseCompileError("--weights is only used with --model-factory")
        path = Path(path)
        check_readable(path)
        sha = file_sha256(path)
        kind, source = _classify_file(path), str(path)
        if kind == "truncated":
            raise SparseCompileError(f"'{path}' looks like a zip archive but is truncated or corrupt")
        if kind == "unknown":
            raise SparseCompileError(
                f"'{path}' is not a model sparsecompile can read: expected a torch.export .pt2 archive, "
                "a TorchScript archive, or (with --trust-pickle) a pickled nn.Module"
            )
        module = None
        if kind == "pt2":
            program = load_pt2(path, trust_pickle)
            if explicit_inputs is None:
                explicit_inputs = _example_inputs_of(program)
                inputs_from_archive = explicit_inputs is not None
            module = program.module()
        elif kind == "torchscript":
            module = _load_torchscript(path, explicit_inputs if explicit_inputs is not None else calib_example)
        elif kind == "pickle":
            module = _load_pickled_module(path, trust_pickle)

    if explicit_inputs is None:
        explicit_inputs = calib_example
    if explicit_inputs is None:
        raise SparseCompileError(
            "cannot tell the model's input shapes: pass --input-shape (e.g. --input-shape 1,3,224,224) or --calib"
        )
    example_inputs = tuple(explicit_inputs)
    if not inputs_from_archive:  # the archive's own example inputs ran when it was exported
        _check_runs(module, example_inputs)
    if program is not None and _batch_dims(example_inputs) is not None and _has_dynamic_batch(program):
        # Already an ATen graph with a dynamic batch: exporting ep.module() again gives the same graph
        # (same nodes, names and parameters) at the cost of a full trace.
        ep, dynamic, graph_module = program, True, module
    else:
        ep, dynamic = export_module(module, example_inputs)
        graph_module = ep.module()
    if not dynamic:
        notes.append(f"batch size is static ({int(example_inputs[0].shape[0])}): the model did not export with a dynamic batch")
    for parameter in graph_module.parameters():
        parameter.requires_grad_(False)  # an inference compiler never trains
    return LoadedModel(
        module=graph_module,
        example_inputs=example_inputs,
        input_names=_input_names(ep, len(example_inputs)),
        source=source,
        source_kind=kind,
        source_sha256=sha,
        dynamic_batch=dynamic,
        notes=notes,
    )


def _check_runs(module, example_inputs) -> None:
    """Run once so that wrong input shapes fail with the model's own message."""
    try:
        with torch.no_grad():
            module(*example_inputs)
    except Exception as exc:  # noqa: BLE001
        shapes = ", ".join("x".join(map(str, t.shape)) + f" {str(t.dtype).replace('torch.', '')}" for t in example_inputs)
        raise SparseCompileError(
            f"the model does not run on inputs of shape {shapes}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _load_torchscript(path: Path, example_inputs):
    # torch.jit.load runs no Python: its unpickler is TorchScript's own and rebuilds only
    # tensors and TorchScript objects. The archive's TorchScript code does run when the
    # model is called (any registered torch operator, no Python), so native libraries are refused.
    verify_zip_members(path)
    with zipfile.ZipFile(path) as archive:
        native = [n for n in archive.namelist() if n.endswith(_NATIVE_SUFFIXES)]
    if native:
        raise SparseCompileError(f"TorchScript archive '{path}' holds compiled native code ('{native[0]}'); refused")
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise SparseCompileError(f"cannot load TorchScript archive '{path}': {_first_line(exc)}") from None
    if example_inputs is None:
        raise SparseCompileError(
            "TorchScript archives carry no input shapes: pass --input-shape (e.g. --input-shape 1,3,224,224) or --calib"
        )
    try:
        from torch._export.converter import TS2EPConverter

        with torch.no_grad():
            ep = TS2EPConverter(scripted, tuple(example_inputs)).convert()
        return ep.module()
    except Exception as exc:  # noqa: BLE001
        raise SparseCompileError(
            f"cannot convert TorchScript archive '{path}' to an FX graph ({type(exc).__name__}: {_first_line(exc)}); "
            "export the original model with torch.export.save(torch.export.export(model, example_inputs), 'model.pt2') "
            "and pass the .pt2 instead"
        ) from None


def _load_pickled_module(path: Path, trust_pickle: bool):
    if not trust_pickle:
        # A weights-only load is safe: it tells a state dict (helpful hint) from a pickled module.
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise SparseCompileError(
                f"'{path}' is a pickled Python object and unpickling it runs arbitrary code; "
                "re-run with --trust-pickle only if you trust its source, or export it with torch.export.save"
            ) from None
        if isinstance(state, dict):
            raise SparseCompileError(
                f"'{path}' is a state dict, not a model: pass --model-factory pkg.module:function --weights {path}"
            )
        raise SparseCompileError(f"'{path}' holds a {type(state).__name__}, not a model")
    try:
        module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise SparseCompileError(f"cannot unpickle '{path}': {type(exc).__name__}: {_first_line(exc)}") from None
    if isinstance(module, dict):
        raise SparseCompileError(
            f"'{path}' is a state dict, not a model: pass --model-factory pkg.module:function --weights {path}"
        )
    if not isinstance(module, torch.nn.Module):
        raise SparseCompileError(f"'{path}' unpickled to a {type(module).__name__}, not an nn.Module")
    return module
