"""Peak-memory measurement shared by the benchmarks: Linux /proc RSS counters and one-mode-per-process runs.

Each benchmark mode runs in a fresh Python process (so one mode's allocator state cannot inflate another's
peak); inside it, ``reset_peak_rss`` right before the measured work makes VmHWM that work's peak.
"""

from __future__ import annotations

import json
import subprocess
import sys


def rss_kib(field: str = "VmRSS") -> int:
    """A memory counter of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS; returns the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return rss_kib("VmRSS")


def run_mode_in_subprocess(script: str, mode: str, args: list[str]) -> dict:
    """Run ``script --one MODE ARGS`` in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, script, "--one", mode, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)
