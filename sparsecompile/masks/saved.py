"""Saved masks: ``--save-masks FILE`` writes a build's masks, ``--masks FILE`` applies them to another
checkpoint of the same architecture (e.g. after fine-tuning on new data).

The weights are untouched by masking, so a mask chosen once (by any method, learned ones
included) can be applied to an updated model without choosing again. That is the selling point of the
learned-mask paper. The file is safetensors, with no pickle:

* ``<weight>.mask``: the keep-mask, bit-packed (``numpy.packbits`` of the flattened bool mask);
* ``<weight>.reference``: the dense weight the mask was chosen on (fp32, in the build's channel
  order). It is what makes the update measurable: ``U = V - W`` for the new weight ``V``;
* a JSON header under ``"sparsecompile"``: format, version, pattern, the method and its settings,
  the source model's hash, per weight its shape and reduction axis, and the channel orders of the
  permuted groups (masks chosen on permuted channels only fit those channels).

For every reused layer the build reports the quantities of the Gumbel paper's Lemma 3.6, using the
induced infinity norm (:func:`inf_norm`, the largest sum of ``|w|`` feeding one output): ``||W||_inf`` of the weight the mask was chosen on, ``||U||_inf`` of the update,
and ``||V||_inf``. The lemma's stability bound for the masked, updated model grows with
``||W||_inf + ||U||_inf``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.fileio import atomic_write
from sparsecompile.masks.base import MaskContext, MaskMethod

FORMAT = "sparsecompile-masks"
VERSION = 1
METADATA_KEY = "sparsecompile"


def inf_norm(weight: torch.Tensor, reduction_axis: int) -> float:
    """Induced infinity norm of the layer's linear map: the largest sum of |w| feeding one output.

    For a convolution ``[Cout, Cin, kh, kw]`` (and a Linear ``[out, in]``) that is the largest sum over
    everything but the output channel; for a stored ``[K, N]`` matmul operand, the largest column sum.
    """
    magnitude = weight.detach().double().abs()
    if magnitude.dim() == 2:
        return float(magnitude.sum(dim=reduction_axis).max())
    return float(magnitude.flatten(1).sum(dim=1).max())


@dataclass
class SavedMasks:
    path: str
    masks: dict[str, torch.Tensor]
    references: dict[str, torch.Tensor]
    layers: dict[str, dict]  # weight target -> {"layer", "shape", "reduction_axis"}
    pattern: tuple[int, int]
    method: str
    options: dict = field(default_factory=dict)
    source_sha256: str | None = None
    permutations: dict[str, list[int]] = field(default_factory=dict)


def save_masks(path, masks: dict[str, torch.Tensor], layers: list, references: dict[str, torch.Tensor],
               pattern: tuple[int, int], method: str, options: dict, source_sha256: str | None,
               permutations: dict[str, list[int]]) -> None:
    from safetensors.torch import save_file

    by_target = {layer.weight_target: layer for layer in layers}
    tensors, entries = {}, {}
    for target, mask in sorted(masks.items()):
        layer = by_target[target]
        packed = np.packbits(mask.detach().cpu().numpy().astype(bool).ravel())
        tensors[f"{target}.mask"] = torch.from_numpy(packed)
        tensors[f"{target}.reference"] = references[target].detach().float().contiguous().clone()
        entries[target] = {"layer": layer.name, "shape": list(mask.shape), "reduction_axis": layer.reduction_axis}
    header = {"format": FORMAT, "version": VERSION, "pattern": f"{pattern[0]}:{pattern[1]}", "method": method,
              "options": options, "source_sha256": source_sha256, "weights": entries, "permutations": permutations}
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise SparseCompileError(f"--save-masks: directory '{directory}' does not exist")
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata={METADATA_KEY: json.dumps(header, allow_nan=False)}))


def load_masks(path) -> SavedMasks:
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SparseCompileError(f"--masks: '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            try:
                header = json.loads(raw) if raw else None
            except ValueError:
                header = None
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise SparseCompileError(f"--masks: '{path}' is not a sparsecompile masks file (made by --save-masks)")
            if header.get("version") != VERSION:
                raise SparseCompileError(f"--masks: '{path}' has masks format version {header.get('version')!r}; "
                                         f"this sparsecompile reads version {VERSION}")
            masks, references, layers = {}, {}, {}
            for target, entry in header["weights"].items():
                shape = tuple(entry["shape"])
                count = int(np.prod(shape))
                packed = handle.get_tensor(f"{target}.mask").numpy()
                bits = np.unpackbits(packed)[:count]
                if bits.size != count:
                    raise SparseCompileError(f"--masks: '{path}': the mask of '{target}' is truncated")
                masks[target] = torch.from_numpy(bits.astype(bool).reshape(shape))
                references[target] = handle.get_tensor(f"{target}.reference")
                layers[target] = entry
    except SparseCompileError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SparseCompileError(f"--masks: '{path}' is corrupt or truncated ({first})") from None
    n, m = (int(v) for v in header["pattern"].split(":"))
    return SavedMasks(path, masks, references, layers, (n, m), header.get("method", "?"), header.get("options", {}),
                      header.get("source_sha256"), header.get("permutations") or {})


def check_against(saved: SavedMasks, eligible: list, get_weight) -> None:
    """One clear error when the saved masks do not fit this model's eligible layers."""
    targets = {layer.weight_target: layer for layer in eligible}
    missing = sorted(set(targets) - set(saved.masks))
    if missing:
        raise SparseCompileError(f"--masks: no saved mask for layer '{targets[missing[0]].name}' (weight "
                                 f"'{missing[0]}'); the masks were saved for {len(saved.masks)} layer(s) of another "
                                 "model or with other --exclude/--min-weights settings")
    extra = sorted(set(saved.masks) - set(targets))
    if extra:
        raise SparseCompileError(f"--masks: the saved mask of '{extra[0]}' has no eligible layer in this model "
                                 "(renamed, removed or excluded?)")
    for target, layer in targets.items():
        shape = tuple(get_weight(target).shape)
        if tuple(saved.masks[target].shape) != shape:
            raise SparseCompileError(f"--masks: the mask of '{target}' has shape "
                                     f"{'x'.join(map(str, saved.masks[target].shape))} but this model's weight is "
                                     f"{'x'.join(map(str, shape))}")
        if saved.layers[target]["reduction_axis"] != layer.reduction_axis:
            raise SparseCompileError(f"--masks: '{target}' was masked along axis {saved.layers[target]['reduction_axis']}"
                                     f", this model reduces it along axis {layer.reduction_axis}")


def update_norms(saved: SavedMasks, target: str, weight: torch.Tensor, reduction_axis: int) -> dict:
    """Lemma 3.6's quantities for one layer: ||W||_inf (masks chosen on it), ||U||_inf (update), ||V||_inf."""
    reference = saved.references[target].to(weight.dtype)
    return {"norm_inf_chosen_on": inf_norm(reference, reduction_axis),
            "norm_inf_update": inf_norm(weight - reference, reduction_axis),
            "norm_inf_now": inf_norm(weight, reduction_axis),
            "relative_update": float((weight - reference).norm() / reference.norm().clamp_min(1e-30))}


class SavedMaskMethod(MaskMethod):
    """Returns the saved mask of each layer (through the ordinary top-N selection of its 0/1 scores)."""

    name = "saved"
    description = "masks from --masks FILE"

    def __init__(self, saved: SavedMasks):
        super().__init__(*saved.pattern)
        self.saved = saved

    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        return self.saved.masks[layer.weight_target].to(torch.float32)

    def permutation_importance(self, weight: torch.Tensor, layer) -> torch.Tensor:
        # Only for the report's kept-|w| figures: saved channel orders are replayed, never searched.
        return weight.detach().abs()


class FixedMasks(MaskMethod):
    """Returns given masks (and, when given, the updated weights that went with them) unchanged:
    re-fitting statistics correction around masks already chosen."""

    name = "fixed"
    description = "masks chosen earlier in the same build"

    def __init__(self, masks: dict[str, torch.Tensor], n: int = 2, m: int = 4,
                 weights: dict[str, torch.Tensor] | None = None):
        super().__init__(n, m)
        self.masks, self.weights = masks, weights
        self.can_update_weights = weights is not None

    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        return self.masks[layer.weight_target].to(torch.float32)

    def select_and_update(self, weight: torch.Tensor, layer, context: MaskContext):
        mask = self.select(weight, layer, context)
        return mask, (self.weights[layer.weight_target] if self.weights is not None else weight)
