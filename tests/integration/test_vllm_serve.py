"""The vLLM backend for real: SmolLM2 on CPU through vLLM (``.venv-vllm``) under Ray Serve LLM, with an early-exit
draft made by ``layerexit export-draft``, deployed with ``.venv-vllm/bin/serve run`` from
serve_configs/smollm2_vllm.yaml (the same file, with the test's draft, ports and a short max_model_len) on a
``ray start --head`` of .venv-vllm, and queried with the official ``openai`` client from this (main) venv.

- chat (streaming and not) and completions answer, through vLLM's own OpenAI serving code;
- vLLM's speculative-decoding counters reach Ray's Prometheus export and show accepted draft tokens;
- greedy tokens with the draft equal those without it in fp32 (vLLM's offline ``LLM`` in .venv-vllm,
  ``python -m layerexit.serving.vllm_check``).

One Ray cluster (its own ports and temp dir) for the module, stopped at the end by its process group. vLLM runs
eager (``enforce_eager``) so it starts in about a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve_configs" / "smollm2_vllm.yaml"
VLLM_VENV = REPO / ".venv-vllm"
VLLM_BIN = VLLM_VENV / "bin"
MODEL = "smollm2"
DRAFT_LAYER = 24
START_DEADLINE_S = 360
SPEC_METRIC = re.compile(r"^ray_vllm_spec_decode_num_(accepted_tokens|draft_tokens|drafts)_total\{[^}]*\}\s+(\S+)",
                         re.M)

if not (VLLM_BIN / "serve").exists():
    pytest.skip(f"no {VLLM_VENV}: run `make vllm-env` (`make test` builds it)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0, alive=None):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if alive is not None:
            alive()
        try:
            last = predicate()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - keep polling until the deadline
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


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
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it may outlive the test
        except ProcessLookupError:
            pass
        for pid in cluster_processes(Path(kw["cwd"])) if "cwd" in kw else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.returncode, output


def vllm_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS"))}
    env.update(PATH=f"{VLLM_BIN}:{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_metrics_report_interval_ms="1000", RAY_USAGE_STATS_ENABLED="0", VLLM_CPU_KVCACHE_SPACE="1",
               RAY_AUTH_MODE="disabled")  # `ray start --head` turns token auth on by default in Ray 2.60
    return env


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, smollm2_path) -> Path:
    """SmolLM2's first 24 layers + final norm + head, exported by the real CLI (main venv)."""
    out = tmp_path_factory.mktemp("draft") / f"smollm2-l{DRAFT_LAYER}"
    cli = Path(sys.executable).with_name("layerexit")
    proc = subprocess.run([str(cli), "export-draft", "smollm2", "--layer", str(DRAFT_LAYER), "--out", str(out),
                           "--measure", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["layer"] == DRAFT_LAYER and info["num_layers"] == DRAFT_LAYER
    return out


class Cluster:
    """A Ray head of .venv-vllm on free ports, in its own process group and temp dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # Unix socket paths are limited to ~107 bytes: keep Ray's temp dir short.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="lxv-", dir="/tmp"))
        self.gcs_port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.env = vllm_env(tmp)
        ports = {"--port": self.gcs_port, "--metrics-export-port": self.metrics_port,
                 "--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
                 "--dashboard-port": free_port()}
        cmd = [str(VLLM_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "false",
               "--disable-usage-stats", "--temp-dir", str(self.ray_tmp)]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        self.log = open(tmp / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=tmp,
                                     start_new_session=True)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"ray start exited with {self.proc.returncode}: {self.logs()}")

    def serve_run(self, config: dict) -> None:
        path = self.tmp / "smollm2_vllm.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))

        def submitted():
            proc = subprocess.run([str(VLLM_BIN / "serve"), "run", "--address", self.gcs, "--non-blocking",
                                   str(path)], capture_output=True, text=True, timeout=180, env=self.env, cwd=self.tmp)
            if proc.returncode != 0 and "Could not find any running Ray instance" not in proc.stderr + proc.stdout:
                raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode == 0

        wait_until(submitted, 120, "serve run to submit the config", interval=2, alive=self.alive)

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
        for pid in cluster_processes(self.tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=300)

    def spec_counters(self) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for name, value in SPEC_METRIC.findall(text):
            out[name] = out.get(name, 0.0) + float(value)
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, draft_dir):
    tmp = tmp_path_factory.mktemp("vllm-serve")
    config = yaml.safe_load(CONFIG.read_text())
    c = Cluster(tmp)
    try:
        config["http_options"].update(port=c.http_port, request_timeout_s=300)  # 2 shared cores: slow steps
        args = config["applications"][0]["args"]
        args.update(draft=str(draft_dir), max_model_len=512)
        started = time.monotonic()
        c.serve_run(config)
        wait_until(lambda: httpx.get(c.base + "/v1/models", timeout=10).status_code == 200, START_DEADLINE_S,
                   "the vLLM app to serve /v1/models", interval=2, alive=c.alive)
        c.start_s = time.monotonic() - started
        print(f"vLLM app up after {c.start_s:.0f} s")
        yield c
    except AssertionError as err:
        raise AssertionError(f"{err}\n{c.logs()}") from None
    finally:
        c.stop()


# Runs first, before the cluster exists: the two share 2 cores.
def test_greedy_tokens_with_the_draft_equal_those_without_it_fp32(draft_dir, tmp_path) -> None:
    out = tmp_path / "check.json"
    cmd = [str(VLLM_BIN / "python"), "-m", "layerexit.serving.vllm_check", "--model", "smollm2", "--draft",
           str(draft_dir), "--num-speculative-tokens", "3", "--dtype", "float32", "--compare", "--batch", "--limit", "3",
           "--max-tokens", "16", "--max-model-len", "512", "--json", str(out)]
    code, output = run_group(cmd, timeout=780, env=vllm_env(tmp_path), cwd=tmp_path)
    assert code == 0, output[-5000:]
    report = json.loads(out.read_text())
    assert report["prompts"] == 3 and report["identical"] == 3, report
    spec = report["with_draft"]["spec_decode"]
    assert spec["accepted_tokens"] > 0 and spec["draft_tokens"] > 0
    assert all(len(t) > 0 for t in report["without_draft"]["token_ids"])
    print(f"fp32 identity: 3/3 identical; spec decode {spec}")


def test_models_lists_the_served_name(cluster) -> None:
    models = cluster.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completions_non_streaming_and_streaming(cluster) -> None:
    client = cluster.client()
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("length", "stop")

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert streamed == text  # greedy: the same answer either way


def test_completions(cluster) -> None:
    reply = cluster.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                                temperature=0)
    assert reply.choices[0].text.strip() and reply.usage.completion_tokens > 0


def test_speculative_counters_reach_ray_prometheus_export(cluster) -> None:
    client = cluster.client()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 10."}],
                                   max_tokens=8, temperature=0)

    def accepted():
        counters = cluster.spec_counters()
        return counters if counters.get("accepted_tokens", 0) > 0 else None

    counters = wait_until(accepted, 60, "ray_vllm_spec_decode_num_accepted_tokens_total > 0", interval=2)
    assert counters["draft_tokens"] >= counters["accepted_tokens"] > 0
    assert counters["drafts"] > 0
    print(f"spec decode over the serve test: {counters} (acceptance "
          f"{counters['accepted_tokens'] / counters['draft_tokens']:.2f})")
