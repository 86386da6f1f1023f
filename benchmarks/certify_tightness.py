"""How tight are the certificates? Recompute them on ``--certify`` builds and print one row per build.

    python benchmarks/certify_tightness.py BUILD:CALIB [BUILD:CALIB ...] [--samples N] [--json OUT]

Each BUILD is a directory made by ``sparsecompile build ... --certify``; CALIB the calibration file to
certify on (normally the one the build used). Prints certified %, observed-unchanged %, certified /
observed-unchanged, the share each bound certifies on its own (global l2 chain, elementwise Taylor box,
back-substituted class margins), median looseness (bound / actual output change), the medians of the two
l2 bounds, the median certified margin, the self-check counters and the seconds spent.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="+", help="BUILD_DIR:CALIB_FILE")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from sparsecompile.certificates import certify_build

    rows = []
    for pair in args.pairs:
        build, calib = pair.split(":", 1)
        start = time.perf_counter()
        result = certify_build(build, calib, samples=args.samples)
        seconds = time.perf_counter() - start
        s = result["summary"]
        certified, unchanged = s.get("certified_fraction") or 0.0, s.get("observed_unchanged_fraction") or 0.0
        check = s.get("self_check", {})
        row = {
            "build": build, "samples": s["samples"], "certified_pct": 100 * certified,
            "observed_unchanged_pct": 100 * unchanged,
            "certified_over_unchanged": certified / unchanged if unchanged else None,
            "certified_but_changed": s.get("certified_but_changed"),
            "median_looseness": s.get("median_looseness"), "median_actual_change": s.get("median_actual_change"),
            "median_global_bound": (s.get("bounds") or {}).get("median_global_l2"),
            "median_taylor_bound": (s.get("bounds") or {}).get("median_taylor_l2"),
            "certified_by": {k: v for k, v in (s.get("certified_by") or {}).items() if k != "note"},
            "median_margin": s.get("median_margin"), "median_certified_margin": s.get("median_certified_margin"),
            "crown_concretised": s.get("crown_concretised"), "crown_errors": s.get("crown_errors"),
            "violations": check.get("violations"), "box_violations": check.get("box_violations"),
            "seconds": seconds, "not_certifiable": s.get("not_certifiable"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
