"""Digests of a build's output, to check that a refactor changes no byte of it.

    python bench/output_digest.py OUT_DIR            # builds the bundled example and a
                                                     # 9-condition build (random weights), prints digests
    python bench/output_digest.py OUT_DIR --compare OTHER.json

The listing records absolute paths: run both checkouts with the same OUT_DIR (move the
first run aside before the second).

Each shard tar is hashed whole; stats and the manifest are hashed without their
timing and version fields (seconds, wall clock, package versions), which differ run
to run. Random-weight networks: checks bytes, not quality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

VOLATILE = {"seconds", "wall_seconds", "versions", "started", "finished", "stage_seconds", "output", "input"}


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def digest(out: Path) -> dict[str, str]:
    found = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.name in ("report.html", "preview.png") or "report" in path.parts[-2:-1]:
            continue
        rel = str(path.relative_to(out))
        if path.suffix == ".json":
            data = json.dumps(_scrub(json.loads(path.read_text())), sort_keys=True).encode()
        else:
            data = path.read_bytes()
        found[rel] = hashlib.sha256(data).hexdigest()
    return found


def build_both(root: Path) -> dict[str, dict[str, str]]:
    from annotator_weights import KINDS, write_random_weights
    from conftest import write_real_photos
    from tiny_models import make_tiny_dpt, make_tiny_upernet

    from pipeline.build import run_build
    from pipeline.config import BuildConfig, load_config

    import os
    import shutil

    quiet = lambda *_: None  # noqa: E731
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # relative inputs: a sample's `source` is then the same whichever checkout runs this
    shutil.copytree(ROOT / "examples/photos", "example-photos", dirs_exist_ok=True)
    example = load_config(ROOT / "datasets/example.yaml", {"output": "example", "executor": "local",
                                                           "input": ["example-photos"]})
    run_build(example, log=quiet)

    weights = Path("weights")  # relative: the params recorded in each json are then the same
    for kind in KINDS:
        write_random_weights(kind, weights)
    upernet = make_tiny_upernet(Path("upernet"))
    common = {"weights": str(weights), "detect_resolution": 64}
    nine = ["canny", "mlsd", "hed", "scribble", "openpose", "seg", "depth", "normal", "lineart"]
    params = {"mlsd": common, "hed": common, "scribble": common, "lineart": common,
              "openpose": {**common, "hands": True, "face": True}, "seg": {"weights": str(upernet)},
              "depth": common, "normal": common}
    write_real_photos(Path("photos"), ["astronaut", "coffee", "chelsea", "rocket"])
    cfg = BuildConfig(input=["photos"], output="nine", conditions=nine, resolution=64,
                      min_size=64, caption_model="none", executor="local", samples_per_shard=2, preview=0,
                      report_samples=0, annotator_params=params)
    run_build(cfg, log=quiet)
    return {"example": digest(Path("example")), "nine": digest(Path("nine"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=lambda p: Path(p).resolve(), help="digests.json of another run: exit 1 if any differs")
    args = parser.parse_args()
    args.out = args.out.resolve()
    found = build_both(args.out)
    (args.out / "digests.json").write_text(json.dumps(found, indent=1, sort_keys=True))
    for build, files in found.items():
        print(f"{build}: {len(files)} files")
    if args.compare:
        other = json.loads(args.compare.read_text())
        differ = [f"{b}/{f}" for b in sorted(set(found) | set(other))
                  for f in sorted(set(found.get(b, {})) | set(other.get(b, {})))
                  if found.get(b, {}).get(f) != other.get(b, {}).get(f)]
        print("identical" if not differ else "DIFFER: " + ", ".join(differ))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
