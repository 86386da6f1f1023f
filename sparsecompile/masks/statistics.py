"""Calibration statistics of a layer's input, in the layer's GEMM column order.

A 2:4 group runs along the weight's reduction axis; ``gemm_matrix`` lays the
weight out as the GEMM uses it, ``[outputs, K]``. The statistics here are over
the matching *input columns* ``x_j`` (``j`` in ``0..K``), so that
``y[row] = sum_j W[row, j] * x_j``:

* convolution ``W[Cout, Cin, kh, kw]`` (``gemm_matrix``: ``[Cout, kh*kw*Cin]``,
  columns ordered ``(kh, kw, cin)``): ``x`` is the unfolded input patch, computed with
  the convolution's real stride, padding and dilation, reordered from
  ``unfold``'s ``(cin, kh, kw)`` to ``(kh, kw, cin)``;
* ``linear`` / right constant operand ``[K, N]``: ``x`` is the last axis of
  the activation;
* left constant operand ``[M, K]`` (``W @ x``): ``x`` is the activation's
  second-to-last axis.

``InputStatistics`` accumulates the squared column norms (Wanda's
``||x_j||``) and, when asked, the Gram matrix ``H = X^T X`` (the layer-wise
Hessian of ``||W X - W' X||^2`` up to a factor 2).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from sparsecompile.graph import CONV_OPS, conv_params

aten = torch.ops.aten


def gemm_matrix(weight: torch.Tensor, reduction_axis: int) -> torch.Tensor:
    """The weight as the GEMM sees it: ``[outputs, K]``, K ordered with the reduction axis fastest.

    Convolution ``[Cout, Cin, kh, kw]`` -> ``[Cout, kh*kw*Cin]`` ordered
    ``(kh, kw, cin)``; ``[K, N]`` operand -> ``[N, K]``; ``[O, I]`` -> itself.
    Groups of M consecutive columns are the same N:M groups as
    ``compress.gemm_view``'s (``Cin % M == 0``), but rows are whole output
    channels, so a row's error couples all its kernel positions.
    """
    moved = weight.movedim(reduction_axis, -1)
    return moved.reshape(moved.shape[0], -1)


def from_gemm_matrix(matrix: torch.Tensor, shape: tuple[int, ...], reduction_axis: int) -> torch.Tensor:
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(reduction_axis))
    return matrix.reshape(moved_shape).movedim(-1, reduction_axis)


def _is_weight_operand(arg, weight_target: str) -> bool:
    if not isinstance(arg, torch.fx.Node):
        return False
    if arg.op == "get_attr":
        return arg.target == weight_target
    return any(_is_weight_operand(a, weight_target) for a in arg.all_input_nodes)


def activation_input(node: torch.fx.Node, weight_target: str) -> tuple[torch.fx.Node, str]:
    """(activation node, kind) where kind is 'conv', 'last' (x[..., K]) or 'left' (W @ x)."""
    if node.target in CONV_OPS:
        return node.args[0], "conv"
    if node.target == aten.linear.default:
        return node.args[0], "last"
    if node.target == aten.addmm.default:
        return node.args[1], "last"
    left, right = node.args[0], node.args[1]
    if _is_weight_operand(right, weight_target):
        return left, "last"
    return right, "left"


def gemm_columns(node: torch.fx.Node, kind: str, x: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """Input samples as ``[S, K]`` rows whose columns match ``gemm_matrix(weight)``'s columns."""
    x = x.detach().float()
    if kind == "last":
        return x.reshape(-1, x.shape[-1])
    if kind == "left":
        return x.movedim(-2, -1).reshape(-1, x.shape[-2])
    p = conv_params(node)
    cin = weight_shape[1]
    kernel = list(weight_shape[2:])
    if len(kernel) == 1:  # conv1d as a conv2d over a height of 1
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = [1] + kernel, [1] + p["stride"], [0] + p["padding"], [1] + p["dilation"]
    else:
        stride, padding, dilation = p["stride"], p["padding"], p["dilation"]
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, cin*kh*kw, L]
    n, _, length = cols.shape
    positions = cols.shape[1] // cin
    cols = cols.reshape(n, cin, positions, length).permute(0, 3, 2, 1)  # [N, L, kh*kw, cin]
    return cols.reshape(n * length, positions * cin)


# Rows of one update that enter the Gram matrix. A convolution yields one row per output
# position per sample (hundreds of thousands); a seeded random subset estimates H well at a
# fraction of the O(rows * K^2) cost. Means and norms always use every row.
GRAM_ROWS_PER_UPDATE = 16384


# Rows summed in float32 before the partial sums are added in float64.
SUM_CHUNK_ROWS = 1024
# Column block of the Gram matrix: only blocks on and above the diagonal are multiplied.
GRAM_BLOCK = 1024


def _column_sums(values: torch.Tensor) -> torch.Tensor:
    """Float64 column sums of float32 ``values`` [S, K]: float32 within fixed chunks of rows, float64 across."""
    rows, columns = values.shape
    full = rows - rows % SUM_CHUNK_ROWS
    total = values[:full].reshape(-1, SUM_CHUNK_ROWS, columns).sum(1).double().sum(0)
    if full < rows:
        total += values[full:].sum(0).double()
    return total


def _add_gram(gram: torch.Tensor, sample: torch.Tensor) -> None:
    """``gram += sample^T sample`` (float32 products): blocks on and above the diagonal, mirrored below it."""
    columns = sample.shape[1]
    if columns <= GRAM_BLOCK:
        gram += (sample.T @ sample).double()
        return
    for start in range(0, columns, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, columns)
        block = (sample[:, start:stop].T @ sample[:, start:]).double()  # rows start:stop, columns start:
        gram[start:stop, start:] += block
        if stop < columns:
            gram[stop:, start:stop] += block[:, stop - start:].T


class InputStatistics:
    """Running sums over input columns: count, ``sum x_j^2`` and optionally ``X^T X``."""

    def __init__(self, columns: int, hessian: bool, weight_matrix: torch.Tensor | None = None):
        self.count = 0
        self.gram_count = 0
        self.sums = torch.zeros(columns, dtype=torch.float64)
        self.sq_norms = torch.zeros(columns, dtype=torch.float64)
        self.gram = torch.zeros(columns, columns, dtype=torch.float64) if hessian else None
        # With reference (dense-model) inputs: sum of (x_ref - x) and X^T (X_ref - X), for the upstream error.
        self.shift_sums: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        # Given the layer's [rows, K] weight, the cross term is only ever needed as W C^T: accumulate that
        # ([rows, K], from (D W^T)^T X) instead of the [K, K] C, rows/K of the work (64x less for K = 8192).
        self.weight_matrix = weight_matrix.detach().float() if weight_matrix is not None else None
        self.linear_sum: torch.Tensor | None = None

    def update(self, cols: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Add samples ``cols`` [S, K]; ``reference``: the same samples' columns in the dense model.

        Products and partial sums run in float32 over chunks of ``SUM_CHUNK_ROWS`` rows; the
        chunks are added in float64, so no float64 copy of the whole input is made. The chunking
        is fixed, so the same inputs give the same bytes.
        """
        cols = cols.float()
        self.count += cols.shape[0]
        self.sums += _column_sums(cols)
        self.sq_norms += _column_sums(cols * cols)
        if reference is not None:
            shift_sum = _column_sums(reference.float() - cols)
            self.shift_sums = shift_sum if self.shift_sums is None else self.shift_sums + shift_sum
        if self.gram is not None:
            sample = cols
            ref_sample = reference.float() if reference is not None else None
            if cols.shape[0] > GRAM_ROWS_PER_UPDATE:
                # Random rows, not a stride: a stride aliases with the image width and keeps
                # picking the same (often zero-padded) columns.
                generator = torch.Generator().manual_seed(self.gram_count + cols.shape[0])
                rows = torch.randperm(cols.shape[0], generator=generator)[:GRAM_ROWS_PER_UPDATE]
                sample = sample[rows]
                ref_sample = ref_sample[rows] if ref_sample is not None else None
            self.gram_count += sample.shape[0]
            _add_gram(self.gram, sample)  # fp32 products, fp64 accumulation across updates
            if ref_sample is not None and self.weight_matrix is not None:
                product = (((ref_sample - sample) @ self.weight_matrix.T).T @ sample).double()
                self.linear_sum = product if self.linear_sum is None else self.linear_sum + product
            elif ref_sample is not None:
                product = (sample.T @ (ref_sample - sample)).double()
                self.cross = product if self.cross is None else self.cross + product

    @property
    def column_norms(self) -> torch.Tensor:
        return self.sq_norms.sqrt()

    def hessian(self, centered: bool = False) -> torch.Tensor:
        """``X^T X / S``; centered: the input covariance, the error left once a bias absorbs the mean shift."""
        second_moment = self.gram / max(self.gram_count, 1)
        if not centered:
            return second_moment
        mean = self.sums / max(self.count, 1)
        return second_moment - torch.outer(mean, mean)

    def upstream_linear(self, weight_matrix: torch.Tensor, centered: bool = False) -> torch.Tensor | None:
        """``W C^T`` (row ``r``: ``C w_r``) for the ``[rows, K]`` weight, or None without reference inputs.

        From the accumulated ``[rows, K]`` product when the statistics were given this weight,
        else from the full ``C`` (:meth:`upstream_cross`).
        """
        if self.linear_sum is None:
            cross = self.upstream_cross(centered)
            return None if cross is None else weight_matrix.double() @ cross.T
        linear = self.linear_sum / max(self.gram_count, 1)
        if centered:  # C - mean shift_mean^T, seen through W: subtract (W shift_mean) mean^T
            mean = self.sums / max(self.count, 1)
            shift = self.shift_sums / max(self.count, 1)
            linear = linear - torch.outer(weight_matrix.double() @ shift, mean)
        return linear

    def upstream_cross(self, centered: bool = False) -> torch.Tensor | None:
        """``C = E[x (x_ref - x)^T]`` (centered: the covariance), or None without reference inputs.

        For a row ``w`` whose pruned part is ``d``, the error against the *dense* output is
        ``e = w.(x_ref - x) + d.x``, so ``E[e^2] = const + 2 d.(C w) + d^T H d``.
        """
        if self.cross is None:
            return None
        cross = self.cross / max(self.gram_count, 1)
        if not centered:
            return cross
        mean = self.sums / max(self.count, 1)
        return cross - torch.outer(mean, self.shift_sums / max(self.count, 1))
