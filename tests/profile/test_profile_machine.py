"""``sparsecompile.profile.machine``: the peak-memory meter and the other-load probe."""

from __future__ import annotations

import numpy as np

from sparsecompile.profile import OtherLoad, RssMeter


def test_memory_and_load_probes():
    meter = RssMeter()
    meter.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    growth = meter.peak_growth_mb()
    del block
    if growth is not None:  # Linux
        assert 50 < growth < 200
    with OtherLoad() as load:
        sum(range(200_000))
    assert load.value is None or load.value >= 0
