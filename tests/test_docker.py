"""The Dockerfiles: linted with hadolint, and they install the package and smoke-test it.

No Docker engine exists where these tests run, so the images are never built here (docker/README.md says so).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"
FILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dockerfile_installs_and_smoke_tests(path):
    text = path.read_text()
    instructions = [line.split(None, 1)[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert instructions.count("FROM") == 1
    assert "torch==2.13.0" in text
    assert re.search(r"pip install --no-cache-dir \. && sparsecompile --help", text)
    assert 'ENTRYPOINT ["sparsecompile"]' in text
    if path.name.endswith("gpu"):
        assert re.search(r"nvcr\.io/nvidia/tensorrt:\d+\.\d+-py3", text)
    else:
        assert "python:3" in text and "whl/cpu" in text and "USER 1000" in text


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint is installed with the test extras only on x86-64 Linux")
def test_hadolint_finds_no_warnings():
    result = subprocess.run(["hadolint", "--no-color", "--failure-threshold", "warning", *map(str, FILES)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
