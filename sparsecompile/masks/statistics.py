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

A stride-1 convolution's Gram is block-Toeplitz up to window edges
    With the zero-padded input ``xp`` and kernel positions ``p = (a, b)`` (dilation ``d``), the
    unfolded row at output position ``(i, j)`` holds ``xp[:, i + a d_h, j + b d_w]``, so the block
    ``H[(p1, :), (p2, :)] = sum_{n, i, j} xp[n, :, i + a1 d_h, j + b1 d_w] xp[n, :, i + a2 d_h, j + b2 d_w]^T``
    depends on ``p2 - p1`` (the lag) except for *which* window of positions it sums over. So
    ``conv_windows`` keeps the padded input and ``_add_lagged_gram`` forms, per lag, the
    channel products at every input position once (float32 over the batch), and takes each
    block as a float64 window sum of them: ``kh*kw`` lags instead of
    ``(kh*kw)^2 / 2`` position pairs (CREPE's conv2, 64 taps of 128 channels: ~30x fewer
    products). Same sum, another order: equal to the unfolded ``X^T X`` up to rounding
    (``tests/masks/test_statistics.py``), and used only where that Gram takes every row.
"""

from __future__ import annotations

import math

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
    # Channels last, then every window as a strided view read once: the rows of unfold's output,
    # already in (kh, kw, cin) order, without unfold's (cin, kh, kw) layout and a transposing copy.
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])).permute(0, 2, 3, 1).contiguous()
    n, height, width, channels = padded.shape
    if channels != cin:
        raise ValueError(f"the convolution input has {channels} channels, its weight {cin}")
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    row = width * cin
    windows = padded.as_strided((n, out_h, out_w, kernel[0], kernel[1], cin),
                                (height * row, stride[0] * row, stride[1] * cin, dilation[0] * row, dilation[1] * cin, 1))
    return windows.reshape(n * out_h * out_w, kernel[0] * kernel[1] * cin)


class ConvWindows:
    """A convolution's zero-padded input in the layout of its stride-1 windows, for ``_add_lagged_gram``.

    ``padded``: ``[B, C, Hp, Wp]`` float32 (kernel-size-1 axes already reduced to the positions the
    convolution reads and folded into ``B``); ``kernel``/``dilation``: per spatial axis; ``output``:
    the number of output positions per axis.
    """

    def __init__(self, padded: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int],
                 output: tuple[int, int]):
        self.padded, self.kernel, self.dilation, self.output = padded, kernel, dilation, output

    def lags(self) -> list[tuple[int, int]]:
        """Kernel-position offsets ``p2 - p1`` with ``p2`` at or after ``p1`` in (kh, kw) order."""
        kh, kw = self.kernel
        return [(dh, dw) for dh in range(kh) for dw in range(-(kw - 1), kw) if dh > 0 or dw >= 0]

    def products(self) -> int:
        """Multiply-adds ``_add_lagged_gram`` spends."""
        batch, channels = self.padded.shape[:2]
        return sum(math.prod(self._region(lag)[2]) for lag in self.lags()) * batch * channels * channels

    def _region(self, lag):
        """Starts of the first operand's positions, starts of the kernel positions, and the region's size."""
        region, first = [], []
        for axis in range(2):
            k, d, out, shift = self.kernel[axis], self.dilation[axis], self.output[axis], lag[axis]
            lo, hi = max(0, -shift), k - max(0, shift)  # kernel positions p1 on this axis with p1 + shift inside
            first.append((lo, hi))
            region.append((hi - 1) * d + out - lo * d)
        return first, (first[0][0] * self.dilation[0], first[1][0] * self.dilation[1]), region


def conv_windows(node: torch.fx.Node, kind: str, x: torch.Tensor, weight_shape: tuple[int, ...]) -> ConvWindows | None:
    """The input of a convolution whose Gram ``_add_lagged_gram`` can form, or None.

    Needs stride 1 along every axis the kernel spans (a kernel-size-1 axis may have any stride)
    and one group, in one or two spatial dimensions.
    """
    if kind != "conv":
        return None
    p = conv_params(node)
    kernel = list(weight_shape[2:])
    if len(kernel) not in (1, 2) or p["transposed"] or p["groups"] != 1 or x.dim() != len(kernel) + 2 \
            or x.shape[1] != weight_shape[1]:
        return None
    stride, padding, dilation = p["stride"], p["padding"], p["dilation"]
    x = x.detach().float()
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = [1] + kernel, [1] + stride, [0] + padding, [1] + dilation
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    output = []
    for axis in range(2):
        size = padded.shape[2 + axis]
        out = (size - dilation[axis] * (kernel[axis] - 1) - 1) // stride[axis] + 1
        if out <= 0 or (kernel[axis] > 1 and stride[axis] != 1):
            return None
        output.append(out)
        if kernel[axis] == 1:  # the positions the convolution reads, folded into the batch below
            index = [slice(None)] * 4
            index[2 + axis] = slice(0, (out - 1) * stride[axis] + 1, stride[axis])
            padded = padded[tuple(index)]
    batch, channels, height, width = padded.shape
    if kernel[1] == 1:
        padded = padded.permute(0, 3, 1, 2).reshape(batch * width, channels, height, 1)
        output[1] = 1
    elif kernel[0] == 1:
        padded = padded.permute(0, 2, 1, 3).reshape(batch * height, channels, 1, width)
        output[0] = 1
    return ConvWindows(padded, (kernel[0], kernel[1]), (dilation[0], dilation[1]), (output[0], output[1]))


def _add_lagged_gram(gram: torch.Tensor, windows: ConvWindows) -> None:
    """``gram += X^T X`` for the unfolded rows ``X`` of ``windows`` (columns ordered (kh, kw, cin)), by lag.

    Per lag: the float32 channel products at every first-operand position (summed over the batch),
    then each kernel-position pair's window sum of them in float64 (a product with a 0/1 window
    matrix: exact sums, no prefix-sum cancellation), added to the blocks on that lag's block
    diagonal (a strided view of ``gram``) and, transposed, to the mirrored ones.
    """
    x = windows.padded
    batch, channels = x.shape[:2]
    kh, kw = windows.kernel
    blocks = gram.view(kh, kw, channels, kh, kw, channels)
    left = x.permute(2, 3, 1, 0).contiguous()  # [H, W, C, B]: one position's channels x batch, contiguous
    right = x.permute(2, 3, 0, 1).contiguous()  # [H, W, B, C]
    for lag in windows.lags():
        (a_range, b_range), (h0, w0), (rh, rw) = windows._region(lag)
        sh, sw = h0 + lag[0] * windows.dilation[0], w0 + lag[1] * windows.dilation[1]
        products = torch.bmm(left[h0:h0 + rh, w0:w0 + rw].reshape(rh * rw, channels, batch),
                             right[sh:sh + rh, sw:sw + rw].reshape(rh * rw, batch, channels))
        products = products.double().reshape(rh, rw * channels * channels)
        sums = _window_matrix(a_range, h0, windows.dilation[0], windows.output[0], rh) @ products
        sums = sums.reshape(-1, rw, channels * channels).transpose(0, 1).reshape(rw, -1)
        sums = _window_matrix(b_range, w0, windows.dilation[1], windows.output[1], rw) @ sums
        sums = sums.reshape(len(range(*b_range)), len(range(*a_range)), channels, channels).permute(2, 3, 1, 0)
        blocks.diagonal(lag[0], 0, 3).diagonal(lag[1], 0, 2).add_(sums)  # [c1, c2, a1, b1] at (p1, p1 + lag)
        if lag != (0, 0):
            blocks.diagonal(-lag[0], 0, 3).diagonal(-lag[1], 0, 2).add_(sums.transpose(0, 1))


def _window_matrix(positions: tuple[int, int], first: int, dilation: int, length: int, size: int) -> torch.Tensor:
    """``[kernel positions, size]`` float64 0/1 rows: position ``a`` sums ``length`` entries from ``a * dilation - first``."""
    starts = torch.arange(*positions) * dilation - first
    index = torch.arange(size)
    return ((index[None, :] >= starts[:, None]) & (index[None, :] < starts[:, None] + length)).double()


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


def _gram_products(rows: int, columns: int) -> int:
    """Multiply-adds ``_add_gram`` spends on ``rows`` x ``columns`` samples."""
    if columns <= GRAM_BLOCK:
        return rows * columns * columns
    return sum(rows * (min(start + GRAM_BLOCK, columns) - start) * (columns - start)
               for start in range(0, columns, GRAM_BLOCK))


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

    def add_input(self, node: torch.fx.Node, kind: str, x: torch.Tensor, weight_shape: tuple[int, ...],
                  reference: torch.Tensor | None = None) -> None:
        """Add the layer input ``x`` (``reference``: the dense model's) as :meth:`update` does with its columns,
        the Gram of a stride-1 convolution by lag (``conv_windows``) where that is the cheaper way."""
        cols = gemm_columns(node, kind, x, weight_shape)
        windows = conv_windows(node, kind, x, weight_shape) if self.gram is not None else None
        self.update(cols, None if reference is None else gemm_columns(node, kind, reference, weight_shape),
                    windows=windows)

    def update(self, cols: torch.Tensor, reference: torch.Tensor | None = None,
               windows: ConvWindows | None = None) -> None:
        """Add samples ``cols`` [S, K]; ``reference``: the same samples' columns in the dense model.

        Products and partial sums run in float32 over chunks of ``SUM_CHUNK_ROWS`` rows; the
        chunks are added in float64, so no float64 copy of the whole input is made. The chunking
        is fixed, so the same inputs give the same bytes. ``windows``: the convolution input
        ``cols`` was unfolded from; when every row enters the Gram and the lagged sum
        (``_add_lagged_gram``) takes under half the direct product's multiply-adds, the Gram is
        summed that way (equal up to rounding; the choice depends on shapes only).
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
            if sample is cols and windows is not None and 2 * windows.products() < _gram_products(*cols.shape):
                _add_lagged_gram(self.gram, windows)
            else:
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
