"""Edge bundles (``.scpkg``): :func:`package_build` writes one, :func:`load` runs one.

* ``edges.py``: edge targets and host detection.
* ``archive.py``: the deterministic zip container and its verified reader.
* ``weights.py``: split the ONNX graph from its (compressed) weights and back.
* ``pack.py``: ``sparsecompile package``.
* ``runner.py``: ``sparsecompile run model.scpkg`` and ``sparsecompile.load``.
* ``describe.py``: ``sparsecompile inspect model.scpkg``.
* ``signing.py``: optional Ed25519 signatures (``keygen``, ``--sign-key``, ``--verify-key``).
"""

from sparsecompile.package.archive import PACKAGE_FORMAT, PACKAGE_VERSION, open_package
from sparsecompile.package.edges import EDGE_TARGETS, get_edge
from sparsecompile.package.pack import package_build
from sparsecompile.package.runner import PackageRunner, load, write_onnx

__all__ = ["EDGE_TARGETS", "PACKAGE_FORMAT", "PACKAGE_VERSION", "PackageRunner", "get_edge", "load",
           "open_package", "package_build", "write_onnx"]
