"""The environment lock: parsing, drift detection, and this environment matching requirements/lock.txt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerexit.envlock import compare, freeze, installed, pins_from_report, read_lock

REPO = Path(__file__).resolve().parents[2]


def test_the_test_environment_is_the_locked_one() -> None:
    """`make test` runs on exactly the lock's versions (what CI and the training image install)."""
    drift = compare(read_lock(REPO / "requirements" / "lock.txt"), installed())
    assert not drift, drift.report("requirements/lock.txt")


def test_every_lock_is_exact_pins_only() -> None:
    for path in (REPO / "requirements").glob("*.txt"):
        pins = read_lock(path)
        assert {"torch", "ray", "transformers"} <= set(pins), path.name


def test_drift_names_changed_unlocked_and_missing_packages_and_ignores_local_labels() -> None:
    lock = {"torch": "2.13.0", "transformers": "5.24.0", "ray": "2.60.0", "torchvision": "0.28.0"}
    env = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "ray": "2.60.0", "leftpad": "1.0", "pip": "26.3"}
    drift = compare(lock, env, allow_missing=frozenset({"torchvision"}))
    assert drift.changed == [("transformers", "5.24.0", "5.25.0")]
    assert drift.unlocked == [("leftpad", "1.0")]
    assert drift.missing == []
    assert compare(lock, env).missing == [("torchvision", "0.28.0")]
    text = drift.report("requirements/lock.txt")
    assert "transformers: locked 5.24.0, installed 5.25.0" in text and "make lock" in text
    assert not compare({"torch": "2.13.0"}, {"torch": "2.13.0+cpu"})


def test_freeze_drops_local_labels_and_tooling_and_reads_back(tmp_path) -> None:
    lines = freeze({"torch": "2.13.0+cpu", "pip": "26.3", "layerexit": "0.1.0", "numpy": "2.4.6"})
    assert lines == ["numpy==2.4.6", "torch==2.13.0"]
    path = tmp_path / "lock.txt"
    path.write_text("# header\n" + "\n".join(lines) + "\n")
    assert read_lock(path) == {"numpy": "2.4.6", "torch": "2.13.0"}


def test_a_range_in_the_lock_is_refused_with_its_line(tmp_path) -> None:
    path = tmp_path / "lock.txt"
    path.write_text("numpy==2.4.6\ntransformers>=5.24\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: 'transformers>=5.24' is not an exact"):
        read_lock(path)
    with pytest.raises(FileNotFoundError, match="make lock"):
        read_lock(tmp_path / "absent.txt")


def test_pins_from_a_pip_report() -> None:
    report = {"install": [{"metadata": {"name": "Ray", "version": "2.60.0"}},
                          {"metadata": {"name": "nvidia_nccl_cu13", "version": "2.29.7"}}]}
    assert pins_from_report(json.loads(json.dumps(report))) == {"ray": "2.60.0", "nvidia-nccl-cu13": "2.29.7"}


def test_check_command_fails_naming_the_package(tmp_path) -> None:
    lock = (REPO / "requirements" / "lock.txt").read_text().replace("\ntransformers==", "\ntransformers==0.0.1.dev0+")
    drifted = tmp_path / "lock.txt"
    drifted.write_text(lock)
    run = subprocess.run([sys.executable, "-m", "layerexit.envlock", "check", str(drifted)],
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "transformers: locked 0.0.1.dev0+" in run.stderr and "make lock" in run.stderr
    ok = subprocess.run([sys.executable, "-m", "layerexit.envlock", "check", str(REPO / "requirements/lock.txt")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
