"""Run the CI learn test (tests/test_learns.py) several times in a row and record each
pass: its wall time and its margins over the test's thresholds.

    python bench/learn_test_passes.py [--runs 3] [--output bench/results/learn_test]

Why: the learn test is the one CI test that judges quality, so it must pass reliably and
fit CI's time. One green run says little about either; consecutive runs, each with how far
it cleared every threshold, do. The test writes its measurements to
$CONTROLFORGE_ARTIFACTS/learn_test.json; this script sets that folder per run, times the
whole pytest process (shard building, training, sampling, scoring) and gathers the records
into OUTPUT/passes.json. Time it on a quiet machine: the figure is for CI's 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(workdir: Path) -> dict:
    """One pytest run of the learn test; its record plus wall time and exit status."""
    env = {**os.environ, "CONTROLFORGE_ARTIFACTS": str(workdir)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_learns.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    record_file = workdir / "learn_test.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    return {"passed": done.returncode == 0, "exit_status": done.returncode, "seconds": round(seconds, 1), **record,
            **({} if done.returncode == 0 else {"output_tail": done.stdout[-3000:]})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "learn_test")
    args = parser.parse_args(argv)
    passes = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as workdir:
            result = run_once(Path(workdir))
        passes.append(result)
        margins = result.get("margins", {})
        print(f"run {i + 1}/{args.runs}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s; "
              + ", ".join(f"{k} {v:+.3f}" for k, v in margins.items()), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    summary = {"command": ["python", "bench/learn_test_passes.py", *(argv if argv is not None else sys.argv[1:])],
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "all_passed": all(p["passed"] for p in passes), "max_seconds": max(p["seconds"] for p in passes),
               "passes": passes}
    (args.output / "passes.json").write_text(json.dumps(summary, indent=1))
    print(f"{sum(p['passed'] for p in passes)}/{len(passes)} passed, slowest {summary['max_seconds']:.0f} s; "
          f"{args.output / 'passes.json'}")
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
