"""GPU counts of the training RayJobs in ``k8s/``, set by one flag: ``layerexit k8s render --gpus N``.

A training RayJob (``python jobs/train_lite.py --config ...`` in its ``spec.entrypoint``) runs one Ray Train worker
per GPU, so these must agree, and :func:`render_train_job` writes them together:

- the worker pods' ``nvidia.com/gpu`` (requests = limits) times the pods (``replicas``/``minReplicas``/
  ``maxReplicas``): ``N`` GPUs, ``--gpus-per-pod`` per pod (default: all ``N`` in one pod, on one node's NVLink);
- the entrypoint's ``scaling.num_workers=N`` override;
- ``optim.grad_accum=G`` when the job's config fixes ``optim.global_batch_size`` (= micro_batch_size x G x N), so
  the global batch stays what the recipe says;
- the worker pods' CPU and memory, scaled with their GPUs at the per-GPU share the manifest has (32 CPUs for 4 GPUs
  stays 8 per GPU), and the group name ``gpu-<per pod>x``.

Edits are ruamel.yaml round trips: comments, key order and the folded entrypoint's line breaks stay.
:func:`train_job_problems` lists where a manifest disagrees with itself (``render --check``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.scalarstring import DoubleQuotedScalarString, FoldedScalarString, SingleQuotedScalarString

from layerexit.errors import ConfigError

TRAIN_SCRIPT = "jobs/train_lite.py"
GPU = "nvidia.com/gpu"
NUM_WORKERS = "scaling.num_workers"
GRAD_ACCUM = "optim.grad_accum"
_QUANTITY = re.compile(r"^(\d+)(m|Ki|Mi|Gi|Ti)?$")
_GROUP_NAME = re.compile(r"^gpu-\d+x$")


# ------------------------------------------------------------------------------------------------- entrypoint


@dataclass
class Entrypoint:
    """A RayJob entrypoint as lines of tokens (the folded scalar's lines) and the span of its training command."""

    lines: list[list[str]]
    folded: bool
    start: tuple[int, int]  # (line, token) of `python`
    end: tuple[int, int]  # (line, token) of the command's last token

    @classmethod
    def parse(cls, value: Any, manifest: Path) -> Entrypoint:
        text = str(value)
        folds = list(getattr(value, "fold_pos", None) or []) if isinstance(value, FoldedScalarString) else []
        parts, begin = [], 0
        for pos in folds:
            parts.append(text[begin:pos])
            begin = pos + 1
        parts.append(text[begin:])
        lines = [p.split() for p in parts]
        flat = [(li, ti, tok) for li, line in enumerate(lines) for ti, tok in enumerate(line)]
        starts = [i for i in range(1, len(flat)) if flat[i][2] == TRAIN_SCRIPT and flat[i - 1][2] == "python"]
        if len(starts) != 1:
            raise ConfigError(f"{manifest}: spec.entrypoint runs `python {TRAIN_SCRIPT}` {len(starts)} times",
                              "a training RayJob runs one `python jobs/train_lite.py --config ...` command")
        first = starts[0] - 1
        last = first
        while last + 1 < len(flat) and flat[last + 1][2] != "&&":
            last += 1
        entry = cls(lines, isinstance(value, FoldedScalarString), flat[first][:2], flat[last][:2])
        if any(q in tok for tok in entry.command() for q in "'\"\\$`"):
            raise ConfigError(f"{manifest}: the training command in spec.entrypoint quotes or expands shell words",
                              "write it as plain words: python jobs/train_lite.py --config <yaml> key=value ...")
        return entry

    def _positions(self) -> list[tuple[int, int]]:
        out, (l0, t0), (l1, t1) = [], self.start, self.end
        for li in range(l0, l1 + 1):
            for ti in range(len(self.lines[li])):
                if (li, ti) >= (l0, t0) and (li, ti) <= (l1, t1):
                    out.append((li, ti))
        return out

    def command(self) -> list[str]:
        """``python jobs/train_lite.py --config X key=value ...``"""
        return [self.lines[li][ti] for li, ti in self._positions()]

    def config_and_overrides(self, manifest: Path) -> tuple[str, list[str]]:
        argv = self.command()[2:]
        if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
            raise ConfigError(f"{manifest}: the training command has no --config", "add --config jobs/configs/<x>.yaml")
        return argv[argv.index("--config") + 1], [a for a in argv if "=" in a and not a.startswith("-")]

    def set_override(self, key: str, value: Any) -> None:
        """Replace ``key=...`` in the command, or add ``key=value`` on a line of its own after it."""
        token = f"{key}={value}"
        for li, ti in self._positions():
            if self.lines[li][ti].startswith(f"{key}="):
                self.lines[li][ti] = token
                return
        li, ti = self.end
        rest = self.lines[li][ti + 1:]
        del self.lines[li][ti + 1:]
        self.lines[li + 1:li + 1] = [[token]] + ([rest] if rest else [])
        self.end = (li + 1, 0)

    def value(self) -> Any:
        lines = [" ".join(line) for line in self.lines if line]
        text = " ".join(lines)
        if not self.folded:
            return text
        out = FoldedScalarString(text)
        folds, pos = [], 0
        for line in lines[:-1]:
            pos += len(line)
            folds.append(pos)
            pos += 1
        out.fold_pos = folds
        return out


# --------------------------------------------------------------------------------------------- pods, quantities


def _worker_group(doc: Any, manifest: Path) -> Any:
    groups = (doc["spec"].get("rayClusterSpec") or {}).get("workerGroupSpecs") or []
    if len(groups) != 1:
        raise ConfigError(f"{manifest}: a training RayJob needs exactly 1 worker group, found {len(groups)}",
                          "keep one GPU worker group (its pods hold the GPUs; --gpus-per-pod sets how many each)")
    return groups[0]


def _gpu_container(group: Any, manifest: Path) -> Any:
    found = [c for c in group["template"]["spec"]["containers"]
             if GPU in ((c.get("resources") or {}).get("limits") or {})]
    if len(found) != 1:
        raise ConfigError(f"{manifest}: worker group {group.get('groupName')} needs one container with {GPU} limits, "
                          f"found {len(found)}", f"give the ray-worker container resources.limits.{GPU}")
    return found[0]


def _pods(group: Any) -> int:
    return int(group.get("replicas", group.get("minReplicas", 1)))


def _quantity(value: Any, what: str, manifest: Path) -> tuple[int, str]:
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ConfigError(f"{manifest}: {what} {value!r} is not a whole Kubernetes quantity",
                          "write it as an integer with an optional unit (32, 500m, 256Gi)")
    return int(match.group(1)), match.group(2) or ""


def _like(old: Any, text: str) -> Any:
    """``text`` in the scalar style ``old`` was written in (quoted stays quoted, numbers stay numbers)."""
    if isinstance(old, DoubleQuotedScalarString):
        return DoubleQuotedScalarString(text)
    if isinstance(old, SingleQuotedScalarString):
        return SingleQuotedScalarString(text)
    return int(text) if isinstance(old, int) else text


def _scale(resources: Any, per_pod_before: int, per_pod: int, manifest: Path, where: str) -> None:
    for key in ("cpu", "memory"):
        if key not in resources:
            continue
        amount, unit = _quantity(resources[key], f"{where}.{key}", manifest)
        if amount % per_pod_before:
            raise ConfigError(f"{manifest}: {where}.{key} {resources[key]} is not a whole share per GPU "
                              f"({per_pod_before} GPUs per pod)", f"make {key} a multiple of {per_pod_before}")
        resources[key] = _like(resources[key], f"{amount // per_pod_before * per_pod}{unit}")


# ------------------------------------------------------------------------------------------------ the job


@dataclass
class TrainJobGpus:
    """What a training RayJob asks for and runs with."""

    gpus: int  # over all worker pods
    per_pod: int
    pods: int
    num_workers: int  # the job's scaling.num_workers (override, else its config's)
    cpus_per_pod: float | None
    cpus_per_worker: float


def _job_doc(docs: list[Any], manifest: Path) -> Any:
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayJob"]
    if len(found) != 1:
        raise ConfigError(f"{manifest} holds {len(found)} RayJob documents, expected exactly 1",
                          "point --manifest at a training RayJob, e.g. k8s/rayjob-train-lite.yaml")
    return found[0]


def _train_config(entry: Entrypoint, manifest: Path, repo: Path, drop: tuple[str, ...] = ()):
    from layerexit.config import load_config
    from layerexit.training.config import TrainConfig

    config, overrides = entry.config_and_overrides(manifest)
    path = repo / config
    if not path.is_file():
        raise ConfigError(f"{manifest}: the entrypoint's --config {config} does not exist under {repo.resolve()}",
                          "run `layerexit k8s render` from the repository root")
    kept = [o for o in overrides if not o.startswith(tuple(f"{k}=" for k in drop))]
    try:
        return load_config(TrainConfig, path, kept)
    except ConfigError as err:
        raise ConfigError(f"{manifest}: the entrypoint's config does not load: {err.problem}", err.fix) from None


def read_train_job(manifest: str | Path, repo: str | Path = ".") -> TrainJobGpus:
    """The GPUs a training RayJob's worker pods hold and the workers its entrypoint runs."""
    from layerexit.deploy.manifests import _load_manifest, _round_trip_yaml

    manifest, repo = Path(manifest), Path(repo)
    doc = _job_doc(_load_manifest(manifest, _round_trip_yaml()), manifest)
    group = _worker_group(doc, manifest)
    container = _gpu_container(group, manifest)
    per_pod = int(container["resources"]["limits"][GPU])
    cfg = _train_config(Entrypoint.parse(doc["spec"]["entrypoint"], manifest), manifest, repo)
    cpu = (container["resources"].get("requests") or {}).get("cpu")
    cpus = None
    if cpu is not None:
        amount, unit = _quantity(cpu, "cpu", manifest)
        cpus = amount / 1000 if unit == "m" else float(amount)
    return TrainJobGpus(_pods(group) * per_pod, per_pod, _pods(group), cfg.scaling.num_workers, cpus,
                        cfg.scaling.cpus_per_worker)


def grad_accum_for(cfg, gpus: int, manifest: Path) -> int | None:
    """``optim.grad_accum`` that keeps ``optim.global_batch_size`` on ``gpus`` workers (None: the config sets none)."""
    total = cfg.optim.global_batch_size
    if total is None:
        return None
    micro = cfg.optim.micro_batch_size
    if total % (micro * gpus):
        valid = [n for n in range(1, 129) if total % (micro * n) == 0]
        raise ConfigError(f"--gpus {gpus}: {manifest} trains with optim.global_batch_size={total} = micro_batch_size "
                          f"{micro} x grad_accum x workers, which {gpus} workers cannot keep",
                          f"use --gpus in {valid}, or change the batch in the job's config")
    return total // (micro * gpus)


def render_train_job(manifest: str | Path, gpus: int, gpus_per_pod: int | None = None, *, repo: str | Path = ".",
                     write: bool = True) -> str:
    """Set a training RayJob to ``gpus`` GPUs (``gpus_per_pod`` per worker pod, default all in one) and return the
    manifest text; see the module docstring for what changes. ``write=False`` only returns it."""
    from layerexit.deploy.manifests import _dump, _load_manifest, _round_trip_yaml

    manifest, repo = Path(manifest), Path(repo)
    per_pod = gpus_per_pod or gpus
    if gpus < 1 or per_pod < 1:
        raise ConfigError(f"--gpus {gpus} / --gpus-per-pod {per_pod}: both must be at least 1")
    if gpus % per_pod:
        raise ConfigError(f"--gpus-per-pod {per_pod} does not divide --gpus {gpus}",
                          f"use a per-pod count in {[p for p in range(1, gpus + 1) if gpus % p == 0]}")
    rt = _round_trip_yaml()
    docs = _load_manifest(manifest, rt)
    doc = _job_doc(docs, manifest)
    group = _worker_group(doc, manifest)
    container = _gpu_container(group, manifest)
    before = int(container["resources"]["limits"][GPU])
    pods = gpus // per_pod
    for key in ("replicas", "minReplicas", "maxReplicas"):
        if key in group or key == "replicas":
            group[key] = pods
    if _GROUP_NAME.match(str(group.get("groupName", ""))):
        group["groupName"] = f"gpu-{per_pod}x"
    for side in ("requests", "limits"):
        resources = container["resources"].get(side)
        if resources is None:
            continue
        _scale(resources, before, per_pod, manifest, f"resources.{side}")
        resources[GPU] = per_pod
    entry = Entrypoint.parse(doc["spec"]["entrypoint"], manifest)
    base = _train_config(entry, manifest, repo, drop=(NUM_WORKERS, GRAD_ACCUM))
    entry.set_override(NUM_WORKERS, gpus)
    accum = grad_accum_for(base, gpus, manifest)
    if accum is not None:
        entry.set_override(GRAD_ACCUM, accum)
    doc["spec"]["entrypoint"] = entry.value()
    cfg = _train_config(entry, manifest, repo)  # what the job will load: still valid
    cpu = (container["resources"].get("requests") or {}).get("cpu")
    if cpu is not None:
        amount, unit = _quantity(cpu, "cpu", manifest)
        if (amount / 1000 if unit == "m" else amount) < cfg.scaling.cpus_per_worker * per_pod:
            raise ConfigError(f"{manifest}: a worker pod with {cpu} CPUs cannot hold {per_pod} workers x "
                              f"scaling.cpus_per_worker={cfg.scaling.cpus_per_worker:g}",
                              "give the worker container more CPUs per GPU or lower scaling.cpus_per_worker")
    rendered = _dump(docs, rt)
    if write and rendered != manifest.read_text(encoding="utf-8"):
        manifest.write_text(rendered, encoding="utf-8")
    return rendered


def train_job_problems(manifest: str | Path, *, repo: str | Path = ".", gpus: int | None = None,
                       gpus_per_pod: int | None = None) -> list[str]:
    """Where a training RayJob disagrees with itself (worker GPUs vs ``scaling.num_workers``, requests vs limits,
    CPUs per worker), or, with ``gpus``, with what ``render --gpus`` would write. Empty: consistent."""
    from layerexit.deploy.manifests import _load_manifest, _round_trip_yaml

    manifest = Path(manifest)
    try:
        job = read_train_job(manifest, repo)
    except ConfigError as err:  # e.g. an entrypoint whose overrides no longer add up to the global batch
        return [str(err)]
    problems = []
    doc = _job_doc(_load_manifest(manifest, _round_trip_yaml()), manifest)
    resources = _gpu_container(_worker_group(doc, manifest), manifest)["resources"]
    if str((resources.get("requests") or {}).get(GPU)) != str(resources["limits"][GPU]):
        problems.append(f"{manifest}: {GPU} requests {(resources.get('requests') or {}).get(GPU)} != limits "
                        f"{resources['limits'][GPU]}")
    if job.gpus != job.num_workers:
        problems.append(f"{manifest}: the worker pods hold {job.gpus} GPUs ({job.pods} x {job.per_pod}) but the job "
                        f"runs scaling.num_workers={job.num_workers}; run `layerexit k8s render --gpus N`")
    if job.cpus_per_pod is not None and job.cpus_per_pod < job.cpus_per_worker * job.per_pod:
        problems.append(f"{manifest}: a worker pod's {job.cpus_per_pod:g} CPUs cannot hold {job.per_pod} workers x "
                        f"scaling.cpus_per_worker={job.cpus_per_worker:g}")
    if gpus is not None and not problems:
        if render_train_job(manifest, gpus, gpus_per_pod, repo=repo, write=False) != manifest.read_text("utf-8"):
            problems.append(f"{manifest}: not rendered for --gpus {gpus}"
                            + (f" --gpus-per-pod {gpus_per_pod}" if gpus_per_pod else "")
                            + f" (it has {job.gpus}: {job.pods} x {job.per_pod}); run `layerexit k8s render "
                            f"--gpus {gpus}`")
    return problems


def describe(manifest: str | Path, repo: str | Path = ".") -> str:
    """One line: ``4 GPUs (1 pod x 4), scaling.num_workers=4``."""
    job = read_train_job(manifest, repo)
    return f"{job.gpus} GPUs ({job.pods} pod{'s' if job.pods != 1 else ''} x {job.per_pod}), " \
           f"scaling.num_workers={job.num_workers}"
