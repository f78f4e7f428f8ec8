"""The full run's stop signal with paper-mode validation, against its evaluation curve:
reads the replayed validation records beside this file (bench/revalidate.py, commands in
commands.txt) and the run's results.json, writes stop_signal.json."""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[2] / "bench")]
from reproduce import stop_signal  # noqa: E402

results = json.loads((HERE.parent / "results.json").read_text())
out = {seed: stop_signal(json.loads((HERE / f"s{seed}" / "controllability.json").read_text()), sd["curve"],
                         results["base"]["f1"]) for seed, sd in results["seeds"].items()}
(HERE / "stop_signal.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
