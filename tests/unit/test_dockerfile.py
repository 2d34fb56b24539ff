"""The Dockerfile, without a Docker daemon (issue 15): what the k8s manifests run is what it builds.

- FROM is Ray's GPU image pinned to an exact Ray version: the project's Ray, and the manifests' ``rayVersion``;
  its Python (``-pyXY``) is one ``requires-python`` allows.
- The project is installed (``pip install .``, not editable: the image has no source checkout to point at) from
  the repository copied to /home/ray/layerexit, where the RayJob entrypoints ``cd``; every path the entrypoints
  and the Serve configs read is copied in; the pins name exact versions equal to the ones tested here.
- The image name agrees everywhere: the Dockerfile's build command, the manifests' ``image:``, and the build/push
  commands in docs/kubernetes.md and the kustomization's ``images:`` mapping.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCS = REPO / "docs" / "kubernetes.md"
K8S = REPO / "k8s"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
            buf = ""
    return out


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    assert DOCKERFILE.is_file(), "the manifests run an image built from ./Dockerfile"
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def args_defaults(parsed) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in parsed if op == "ARG" and "=" in a)


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], text)


def test_from_is_a_pinned_ray_gpu_image_matching_project_and_manifests(parsed) -> None:
    froms = [a for op, a in parsed if op == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", froms[0])
    assert m, f"FROM {froms[0]}: use rayproject/ray:<x.y.z>-py<XY>-gpu (an exact Ray version, no `latest`)"
    ray_version, py = m.group(1), f"{m.group(2)}.{m.group(3)}"
    assert ray_version == importlib.metadata.version("ray"), "the image's Ray must be the project's Ray"
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            cluster = (doc or {}).get("spec", {}).get("rayClusterSpec") or (doc or {}).get("spec", {}).get(
                "rayClusterConfig")
            if cluster:
                assert cluster["rayVersion"] == ray_version, path.name
    requires = SpecifierSet(importlib.metadata.metadata("layerexit")["Requires-Python"])
    assert py in requires, f"python {py} of the image is outside requires-python {requires}"


def test_project_is_installed_with_exact_pins_in_the_entrypoints_directory(parsed) -> None:
    workdirs = [a for op, a in parsed if op == "WORKDIR"]
    assert workdirs[-1] == "/home/ray/layerexit"
    runs = [expand(a, args_defaults(parsed)) for op, a in parsed if op == "RUN"]
    installs = [shlex.split(r.split("&&")[0]) for r in runs if "pip install" in r]
    assert installs, "no pip install"
    tokens = [t for cmd in installs for t in cmd]
    assert "." in tokens and "-e" not in tokens, "install the project itself with `pip install .`"
    pins = dict(t.split("==", 1) for t in tokens if "==" in t)
    for dist in ("torch", "transformers", "deepspeed", "mlflow"):
        assert pins.get(dist) == importlib.metadata.version(dist).split("+")[0], f"{dist} pin != tested version"
    assert pins.get("ray[train,serve,tune]") == importlib.metadata.version("ray")
    copied = {src.lstrip("./") for op, a in parsed if op == "COPY"
              for src in [t for t in a.split() if not t.startswith("--")][:-1]}
    for needed in ("platform", "pyproject.toml", "jobs", "tune", "serve_configs"):
        assert needed in copied, f"the image lacks {needed}/"


def test_image_name_agrees_in_dockerfile_manifests_docs_and_kustomization() -> None:
    build = re.search(r"docker build -t (\S+) \.", DOCKERFILE.read_text().splitlines()[0])
    assert build, "the Dockerfile opens with its build command"
    image = build.group(1)
    manifest_images = set()
    for path in K8S.glob("*.yaml"):
        manifest_images |= set(re.findall(r"image: (layerexit\S*)", path.read_text()))
    assert manifest_images == {image}, f"manifests run {manifest_images}, the Dockerfile builds {image}"
    docs = DOCS.read_text()
    assert f"docker build -t {image} ." in docs, "docs/kubernetes.md must give the Dockerfile's build command"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [entry] = [i for i in kustomization["images"] if i["name"] == image.split(":")[0]]
    pushed = f"{entry['newName']}:{entry['newTag']}"
    assert f"docker tag {image} {pushed}" in docs and f"docker push {pushed}" in docs
    assert f"docker build -t {image} ." in (K8S / "README.md").read_text()


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "mlflow.db", "outputs"):
        assert entry in ignored
