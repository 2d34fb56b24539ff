"""The Dockerfile, without a Docker daemon: its two images install from the lock the tests run with.

- One base, Ray's GPU image at an exact Ray version: the locks' Ray and the manifests' ``rayVersion``; its Python
  (``-pyXY``) is one ``requires-python`` allows. Two targets build on it: ``train`` (layerexit:latest) and ``vllm``
  (layerexit-vllm:latest).
- Each target copies its lock before installing and installs with it as constraints (``-c``); every version a RUN
  line names equals its lock's pin; the project goes in with ``pip install .`` (``--no-deps`` in the vLLM image),
  never editable; every path the entrypoints and the Serve configs read is copied in.
- The locks agree where they must: the same torch in both images, the vLLM the Makefile locks is the one installed.
- The image names agree everywhere: the build commands opening the Dockerfile, the manifests' ``image:``, the
  build/tag/push commands in docs/kubernetes.md and k8s/README.md, and the kustomization's ``images:`` mapping.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from layerexit.envlock import canonical, public_version, read_lock

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCS = REPO / "docs" / "kubernetes.md"
K8S = REPO / "k8s"
LOCKS = {"train": "requirements/lock.txt", "vllm": "requirements/vllm-gpu.lock.txt",
         "tune": "requirements/vllm-gpu.lock.txt"}
IMAGES = {"train": "layerexit:latest", "vllm": "layerexit-vllm:latest", "tune": "layerexit-tune:latest"}
SERVED = {"layerexit:latest", "layerexit-vllm:latest"}  # what the k8s manifests run


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


def stages(parsed: list[tuple[str, str]], inherited: bool = True) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by stage name (``FROM x AS name``), each stage including its parents' unless
    ``inherited`` is false."""
    out: dict[str, list[tuple[str, str]]] = {}
    own: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    mine: list[tuple[str, str]] = []
    for op, args in parsed:
        if op == "FROM":
            image, _, name = args.partition(" AS ")
            current = list(out.get(image.strip(), [])) + [(op, args)]
            mine = [(op, args)]
            out[name.strip() or image.strip()] = current
            own[name.strip() or image.strip()] = mine
        else:
            current.append((op, args))
            mine.append((op, args))
    return out if inherited else own


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    assert DOCKERFILE.is_file(), "the manifests run images built from ./Dockerfile"
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    runs = [a for op, a in stage if op == "RUN"]
    return [shlex.split(part) for r in runs for part in r.split("&&") if "pip install" in part]


def test_one_pinned_ray_gpu_base_matching_locks_project_and_manifests(parsed) -> None:
    froms = [a for op, a in parsed if op == "FROM"]
    names = {f.partition(" AS ")[2] for f in froms}
    external = [f for f in froms if f.split()[0] not in names]
    assert len(external) == 1, f"one external base image, got {external}"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+) AS base", external[0])
    assert m, f"FROM {external[0]}: use rayproject/ray:<x.y.z>-py<XY>-gpu AS base (an exact Ray version)"
    ray_version, py = m.group(1), f"{m.group(2)}.{m.group(3)}"
    for lock in LOCKS.values():
        assert read_lock(REPO / lock)["ray"] == ray_version, f"{lock}: the image's Ray must be the lock's Ray"
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            cluster = (doc or {}).get("spec", {}).get("rayClusterSpec") or (doc or {}).get("spec", {}).get(
                "rayClusterConfig")
            if cluster:
                assert cluster["rayVersion"] == ray_version, path.name
    requires = SpecifierSet(importlib.metadata.metadata("layerexit")["Requires-Python"])
    assert py in requires, f"python {py} of the image is outside requires-python {requires}"
    assert set(stages(parsed)) >= {"base", *IMAGES}


@pytest.mark.parametrize("target", sorted(LOCKS))
def test_each_image_installs_from_its_lock_in_the_entrypoints_directory(parsed, target: str) -> None:
    stage = stages(parsed)[target]
    assert [a for op, a in stage if op == "WORKDIR"][-1] == "/home/ray/layerexit"
    lock_path = LOCKS[target]
    copies = [a for op, a in stage if op == "COPY"]
    own = stages(parsed, inherited=False)[target]  # this target's own installs (tune builds on train)
    first_install = next(i for i, (op, a) in enumerate(own) if op == "RUN" and "pip install" in a)
    copied_before = [a for op, a in own[:first_install] if op == "COPY"]
    assert any(lock_path in a for a in copied_before), f"{target}: COPY {lock_path} before installing"
    installs = pip_installs(own)
    lock = read_lock(REPO / lock_path)
    with_deps = [cmd for cmd in installs if "--no-deps" not in cmd]
    assert with_deps, f"{target}: no pip install"
    for cmd in with_deps:  # every install that resolves dependencies is constrained by the lock
        assert "-c" in cmd and cmd[cmd.index("-c") + 1] == lock_path, f"{target}: `{shlex.join(cmd)}` lacks -c {lock_path}"
    tokens = [t for cmd in installs for t in cmd]
    assert "." in tokens or target == "tune", "install the project itself with `pip install .`"
    assert "-e" not in tokens, "never an editable install: the image has no checkout to point at"
    for token in tokens:
        if "==" in token:
            name, version = token.split("==", 1)
            name = canonical(name.split("[", 1)[0])
            assert lock.get(name) == version, f"{target}: {token} but {lock_path} pins {name}=={lock.get(name)}"
    copied = {src.lstrip("./") for a in copies for src in [t for t in a.split() if not t.startswith("--")][:-1]}
    for needed in ("platform", "pyproject.toml", "jobs", "tune", "serve_configs"):
        assert needed in copied, f"the {target} image lacks {needed}/"


def test_locks_agree_on_torch_and_the_locked_vllm_is_the_installed_one(parsed) -> None:
    train, vllm = read_lock(REPO / LOCKS["train"]), read_lock(REPO / LOCKS["vllm"])
    assert public_version(train["torch"]) == vllm["torch"], "both images run one torch"
    makefile = (REPO / "Makefile").read_text()
    locked_vllm = re.search(r"^VLLM_GPU_PKG := vllm==(\S+)", makefile, re.M).group(1)
    assert vllm["vllm"] == locked_vllm
    assert f'"vllm=={locked_vllm}"' in " ".join(a for op, a in stages(parsed)["vllm"] if op == "RUN")


def test_image_names_agree_in_dockerfile_manifests_docs_and_kustomization(parsed) -> None:
    head = DOCKERFILE.read_text().splitlines()[:len(IMAGES)]
    built = {m.group(1): m.group(2) for line in head
             for m in [re.search(r"docker build --target (\w+) -t (\S+) \.", line)] if m}
    assert built == IMAGES, "the Dockerfile opens with the build command of each image"
    manifest_images = set()
    for path in K8S.glob("*.yaml"):
        manifest_images |= set(re.findall(r"image: (layerexit\S*)", path.read_text()))
    assert manifest_images == SERVED, f"manifests run {manifest_images}"
    docs = DOCS.read_text()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for target, image in IMAGES.items():
        if image not in SERVED:
            assert f"docker build --target {target} -t {image} ." in (REPO / "docs" / "gpu.md").read_text()
            continue
        build = f"docker build --target {target} -t {image} ."
        assert build in docs, f"docs/kubernetes.md must give `{build}`"
        assert build in (K8S / "README.md").read_text(), f"k8s/README.md must give `{build}`"
        [entry] = [i for i in kustomization["images"] if i["name"] == image.split(":")[0]]
        pushed = f"{entry['newName']}:{entry['newTag']}"
        assert f"docker tag {image} {pushed}" in docs and f"docker push {pushed}" in docs


def test_dockerignore_keeps_local_state_out_and_the_lock_in() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".venv-vllm", "mlflow.db", "outputs"):
        assert entry in ignored
    for needed in ("requirements", "benchmarks"):  # the locks; the device check (benchmarks/gpu_check.py)
        assert not any(e.startswith(needed) for e in ignored), f"the images need {needed}/"


def test_the_tune_image_gives_the_draft_search_its_vllm_python(parsed) -> None:
    own = stages(parsed, inherited=False)["tune"]
    env = " ".join(a for op, a in own if op == "ENV")
    venv = re.search(r"LAYEREXIT_VLLM_PYTHON=(\S+)/bin/python", env)
    assert venv, "confirm.python: auto finds vLLM through LAYEREXIT_VLLM_PYTHON"
    runs = " ".join(a for op, a in own if op == "RUN")
    assert f"python -m venv {venv.group(1)}" in runs and f"{venv.group(1)}/bin/pip install" in runs
