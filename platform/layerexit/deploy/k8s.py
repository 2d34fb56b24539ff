"""Keep the KubeRay manifests in step with what they deploy: ``layerexit k8s render``.

Each RayService carries its Serve config, verbatim, as ``spec.serveConfigV2`` (KubeRay hands that string to Ray
Serve); the Serve config file is the one source of truth (``serve run`` reads it locally). :data:`RAYSERVICES`
pairs them and names the image each runs:

    k8s/rayservice-7b.yaml        <- serve_configs/7b.yaml        (vLLM + the trained draft; image layerexit-vllm)
    k8s/rayservice-7b-exits.yaml  <- serve_configs/7b_exits.yaml  (our engine's exit policies; image layerexit)

:func:`render_rayservice` copies the file into the manifest (and sets the image) with a ruamel.yaml round trip, so
comments and layout in the rest of the manifest survive; :func:`check_rayservice_in_sync` tells whether they
drifted. The training RayJobs (:data:`TRAIN_JOBS`) get their GPU counts from ``--gpus`` (``deploy.k8s_gpus``).

Command line (registered as ``layerexit k8s``), from the repository root::

    layerexit k8s render                     # every RayService from its Serve config; RayJobs checked
    layerexit k8s render --gpus 8            # ... and the training RayJobs set to 8 GPUs (one pod)
    layerexit k8s render --gpus 8 --gpus-per-pod 4    # 2 worker pods x 4 GPUs
    layerexit k8s render --check [--gpus N]  # exit 1 if anything would change or disagrees, write nothing
    layerexit k8s render --serve-config serve_configs/7b.yaml --manifest k8s/rayservice-7b.yaml   # one pair
    python -m layerexit.deploy.k8s render --help
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import LiteralScalarString

from layerexit.deploy.manifests import _dump, _load_manifest, _round_trip_yaml
from layerexit.errors import ConfigError, InputFileError, LayerexitError

RAYSERVICE_KIND = "RayService"
SERVE_CONFIG_FIELD = "serveConfigV2"
VLLM_IMAGE = "layerexit-vllm:latest"  # the Dockerfile's `vllm` target: Ray Serve + vLLM
ENGINE_IMAGE = "layerexit:latest"  # the Dockerfile's `train` target: training, tuning, our engine


@dataclass(frozen=True)
class ServiceSource:
    """A RayService manifest, the Serve config it embeds and the image its pods run (paths from the repo root)."""

    manifest: Path
    serve_config: Path
    image: str | None = None  # None: leave the manifest's images as they are


RAYSERVICES = (
    ServiceSource(Path("k8s/rayservice-7b.yaml"), Path("serve_configs/7b.yaml"), VLLM_IMAGE),
    ServiceSource(Path("k8s/rayservice-7b-exits.yaml"), Path("serve_configs/7b_exits.yaml"), ENGINE_IMAGE),
)
# RayJobs that run jobs/train_lite.py: their worker GPUs and scaling.num_workers follow --gpus.
TRAIN_JOBS = (Path("k8s/rayjob-train-lite.yaml"), Path("k8s/rayjob-train-draft-7b.yaml"))
DEFAULT_SERVE_CONFIG = RAYSERVICES[0].serve_config
DEFAULT_MANIFEST = RAYSERVICES[0].manifest


def read_serve_config(serve_config_path: str | Path) -> str:
    """Return the Serve config file's text after checking it is a Serve config (a mapping with ``applications``).

    The text itself, not a re-dump, is what goes into the manifest: comments and key order stay as written.
    """
    path = Path(serve_config_path)
    if not path.is_file():
        raise InputFileError(f"Serve config {path} does not exist", "pass --serve-config serve_configs/<name>.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"Serve config {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("applications"), list) or not data["applications"]:
        raise ConfigError(
            f"Serve config {path} has no 'applications' list",
            "use the Ray Serve config-file format (proxy_location, http_options, applications: [...])",
        )
    if not text.endswith("\n"):
        text += "\n"
    return text


def _find_rayservice(docs: list[Any], manifest_path: Path) -> Any:
    """The single RayService document among ``docs``; an error naming the file if there is none or several."""
    found = [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") == RAYSERVICE_KIND]
    if len(found) != 1:
        raise ConfigError(
            f"{manifest_path} holds {len(found)} RayService documents, expected exactly 1",
            "point --manifest at the RayService manifest, e.g. k8s/rayservice-7b.yaml",
        )
    return found[0]


def _containers(service: Any) -> list[Any]:
    """Every container of the RayService's head and worker groups."""
    cluster = (service.get("spec") or {}).get("rayClusterConfig") or {}
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    return [c for g in groups for c in ((g.get("template") or {}).get("spec") or {}).get("containers") or []]


def render_rayservice(serve_config_path: str | Path, manifest_path: str | Path, *, write: bool = True,
                      image: str | None = None) -> str:
    """Put the Serve config's text into the RayService's ``spec.serveConfigV2`` and return the manifest text.

    Args:
        serve_config_path: the Ray Serve config file (``serve_configs/7b.yaml``).
        manifest_path: the manifest holding exactly one RayService (``k8s/rayservice-7b.yaml``).
        write: write the result back to ``manifest_path`` (only when it changed). ``False`` just returns it.
        image: the image every container of the RayService runs (``layerexit-vllm:latest``); None leaves them.

    Returns:
        The full manifest text after rendering. Everything but ``serveConfigV2`` (and the images) keeps its comments
        and layout.
    """
    manifest = Path(manifest_path)
    text = read_serve_config(serve_config_path)
    rt = _round_trip_yaml()
    docs = _load_manifest(manifest, rt)
    service = _find_rayservice(docs, manifest)
    spec = service.get("spec")
    if not isinstance(spec, CommentedMap):
        raise ConfigError(f"the RayService in {manifest} has no 'spec' mapping")
    block = LiteralScalarString(text)
    if SERVE_CONFIG_FIELD in spec:
        spec[SERVE_CONFIG_FIELD] = block
    else:
        spec.insert(0, SERVE_CONFIG_FIELD, block)
    if image is not None:
        for container in _containers(service):
            container["image"] = image
    rendered = _dump(docs, rt)
    if write and rendered != manifest.read_text(encoding="utf-8"):
        manifest.write_text(rendered, encoding="utf-8")
    return rendered


def embedded_serve_config(manifest_path: str | Path) -> str | None:
    """The ``spec.serveConfigV2`` string of the manifest's RayService, or ``None`` when it has none."""
    manifest = Path(manifest_path)
    docs = _load_manifest(manifest, _round_trip_yaml())
    value = (_find_rayservice(docs, manifest).get("spec") or {}).get(SERVE_CONFIG_FIELD)
    return None if value is None else str(value)


def rayservice_images(manifest_path: str | Path) -> set[str]:
    """The images the manifest's RayService runs."""
    manifest = Path(manifest_path)
    docs = _load_manifest(manifest, _round_trip_yaml())
    return {str(c.get("image")) for c in _containers(_find_rayservice(docs, manifest))}


def check_rayservice_in_sync(serve_config_path: str | Path, manifest_path: str | Path,
                             image: str | None = None) -> bool:
    """True when the RayService's ``serveConfigV2`` is exactly the Serve config file's text (and, with ``image``,
    every container runs that image)."""
    if embedded_serve_config(manifest_path) != read_serve_config(serve_config_path):
        return False
    return image is None or rayservice_images(manifest_path) == {image}


def _sources(serve_config: Path | None, manifest: Path | None) -> tuple[list[ServiceSource], list[Path]]:
    """The RayServices and training RayJobs one ``render`` call covers: all of the tables, or the one manifest."""
    if manifest is None:
        if serve_config is not None:
            raise ConfigError("--serve-config needs --manifest (the RayService to render it into)",
                              "pass both, or neither to render every manifest in the tables")
        return list(RAYSERVICES), list(TRAIN_JOBS)
    known = {s.manifest: s for s in RAYSERVICES}
    if manifest in TRAIN_JOBS or (serve_config is None and manifest not in known and _is_rayjob(manifest)):
        if serve_config is not None:
            raise ConfigError(f"--serve-config: {manifest} is a RayJob, which embeds no Serve config",
                              "drop --serve-config (a RayJob takes --gpus)")
        return [], [manifest]
    if serve_config is None:
        if manifest not in known:
            raise ConfigError(f"--manifest {manifest} is not in the render table", "pass its --serve-config too")
        return [known[manifest]], []
    image = known[manifest].image if manifest in known and known[manifest].serve_config == serve_config else None
    return [ServiceSource(manifest, serve_config, image)], []


def _is_rayjob(manifest: Path) -> bool:
    docs = _load_manifest(manifest, _round_trip_yaml())
    return any(isinstance(d, dict) and d.get("kind") == "RayJob" for d in docs)


k8s_app = typer.Typer(
    help="Kubernetes (KubeRay) manifests: keep k8s/ in step with the project's Serve configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@k8s_app.callback()
def _k8s_group() -> None:
    """Kubernetes (KubeRay) manifests: keep k8s/ in step with the project's Serve configs."""


def _check(services: list[ServiceSource], jobs: list[Path], gpus: int | None, gpus_per_pod: int | None) -> None:
    """``render --check``: report every manifest that would change or disagrees with itself; exit 1 if any."""
    from layerexit.deploy.k8s_gpus import describe, train_job_problems

    drift: list[str] = []
    for s in services:
        if check_rayservice_in_sync(s.serve_config, s.manifest, s.image):
            typer.echo(f"{s.manifest} is in sync with {s.serve_config}")
        else:
            what = "spec.serveConfigV2" + (f" or its image ({s.image})" if s.image else "")
            drift.append(f"{s.manifest}: {what} differs from {s.serve_config}; run `layerexit k8s render "
                         f"--serve-config {s.serve_config} --manifest {s.manifest}` and commit the result")
    for job in jobs:
        problems = train_job_problems(job, gpus=gpus, gpus_per_pod=gpus_per_pod)
        drift += problems
        if not problems:
            typer.echo(f"{job} is consistent ({describe(job)})")
    for line in drift:
        typer.echo(line, err=True)
    if drift:
        raise typer.Exit(1)


@k8s_app.command("render")
def render(
    serve_config: Annotated[Optional[Path], typer.Option(
        "--serve-config", help="One Serve config to render (with --manifest); default: every pair in the table "
        "(k8s/rayservice-7b.yaml <- serve_configs/7b.yaml, k8s/rayservice-7b-exits.yaml <- "
        "serve_configs/7b_exits.yaml).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(
        "--manifest", help="One manifest to render: a RayService (spec.serveConfigV2 is rewritten) or a training "
        "RayJob (--gpus applies); default: every manifest in the table.")] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", min=1, help="GPUs of the training RayJobs (rayjob-train-lite.yaml, rayjob-train-draft-7b.yaml): "
        "worker pods' nvidia.com/gpu requests = limits, replicas, CPU and memory per GPU, and the entrypoint's "
        "scaling.num_workers=N (+ optim.grad_accum keeping optim.global_batch_size). Default: leave them; they are "
        "still checked to agree.")] = None,
    gpus_per_pod: Annotated[Optional[int], typer.Option(
        "--gpus-per-pod", min=1, help="With --gpus: GPUs per worker pod (default: all in one pod, one node's "
        "NVLink); --gpus 16 --gpus-per-pod 8 is 2 pods x 8.")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if a manifest differs from its Serve config or "
                                           "image, a RayJob's GPUs disagree with its scaling.num_workers, or (with "
                                           "--gpus) a RayJob is not rendered for N GPUs.")
    ] = False,
) -> None:
    """Render the KubeRay manifests from their sources: each RayService's serveConfigV2 (and image) from its Serve
    config, the training RayJobs' GPU counts from --gpus. Run it from the repository root; comments are kept."""
    from layerexit.deploy.k8s_gpus import describe, render_train_job, train_job_problems

    try:
        if gpus_per_pod is not None and gpus is None:
            raise ConfigError("--gpus-per-pod needs --gpus", "pass --gpus N (the total) with it")
        services, jobs = _sources(serve_config, manifest)
        if check:
            _check(services, jobs, gpus, gpus_per_pod)
            return
        # Everything is rendered before anything is written: one bad input leaves every file as it was.
        outputs: list[tuple[Path, str, str]] = []
        for s in services:
            rendered = render_rayservice(s.serve_config, s.manifest, image=s.image, write=False)
            outputs.append((s.manifest, rendered, f"serveConfigV2 from {s.serve_config}"
                            + (f", image {s.image}" if s.image else "")))
        drift: list[str] = []
        for job in jobs:
            if gpus is None:
                drift += train_job_problems(job)
                outputs.append((job, job.read_text(encoding="utf-8"), ""))
            else:
                outputs.append((job, render_train_job(job, gpus, gpus_per_pod, write=False), ""))
        for path, rendered, what in outputs:
            state = "unchanged" if rendered == path.read_text(encoding="utf-8") else "updated"
            if state == "updated":
                path.write_text(rendered, encoding="utf-8")
            typer.echo(f"{path} {state} ({what or describe(path)})")
        for line in drift:
            typer.echo(line, err=True)
        if drift:
            raise typer.Exit(1)
    except LayerexitError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


if __name__ == "__main__":
    k8s_app()
