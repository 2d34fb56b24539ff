"""Offline checks of the Kubernetes manifests in k8s/ (issue 9).

- Ray resources (RayJob, RayService, RayCluster) validate against the KubeRay CRDs' ``openAPIV3Schema``
  with unknown fields rejected; the CRDs come from ``../shared/kuberay-crds`` (or ``$KUBERAY_CRDS_DIR``).
- Built-in kinds validate with ``kubernetes_validate`` in strict mode.
- Each RayService's ``serveConfigV2`` is exactly its Serve config and runs its image (``layerexit k8s render``'s table:
  rayservice-7b.yaml <- serve_configs/7b.yaml, vLLM image; rayservice-7b-exits.yaml <- 7b_exits.yaml, engine image).
- Every RayJob's entrypoint RUNS with ``--check`` (the job's own config and overrides load and validate, offline,
  in the container's environment); the RayServices' applications' args go through their backend's argument model.
- The training RayJobs' worker GPUs equal their entrypoint's ``scaling.num_workers``; ``render --gpus N`` changes
  both (and grad_accum, CPU, memory) and ``--check`` catches drift.
- Kustomize wiring (images, namespace, storage class) works.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from layerexit.config import with_base
from layerexit.deploy.k8s import RAYSERVICES, TRAIN_JOBS, check_rayservice_in_sync, k8s_app, render_rayservice
from layerexit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SERVE_7B = REPO / "serve_configs" / "7b.yaml"  # vLLM + the trained draft
SERVE_7B_EXITS = REPO / "serve_configs" / "7b_exits.yaml"  # our engine's exit policies
SERVE_13B_EXITS = REPO / "serve_configs" / "13b_exits.yaml"
RAYSERVICE = K8S / "rayservice-7b.yaml"
RAYSERVICE_EXITS = K8S / "rayservice-7b-exits.yaml"
TRAIN_JOB = K8S / "rayjob-train-lite.yaml"
DRAFT_JOB = K8S / "rayjob-train-draft-7b.yaml"
TUNE_JOB = K8S / "rayjob-tune-thresholds.yaml"
SECRET_EXAMPLE = K8S / "mlflow" / "secret.example.yaml"
K8S_VERSION = "1.33"  # a version kubernetes_validate ships schemas for (1.25 .. 1.37 in 1.37.0)
RAY_KINDS = {"RayJob", "RayService", "RayCluster"}
NOT_VALIDATED_KINDS = {"Kustomization"}
CRD_SOURCE = (
    "KubeRay CRD schemas come from ray-project/kuberay (helm-chart/kuberay-operator/crds, the same files as "
    "ray-operator/config/crd/bases): copy ray.io_rayjobs.yaml, ray.io_rayservices.yaml and "
    "ray.io_rayclusters.yaml into ../shared/kuberay-crds or point KUBERAY_CRDS_DIR at them"
)


# ----------------------------------------------------------------------------------------------- loading


def crds_dir() -> Path:
    env = os.environ.get("KUBERAY_CRDS_DIR")
    return Path(env) if env else REPO.parent / "shared" / "kuberay-crds"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are ~60k lines


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER) if d is not None]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def doc_id(path: Path, doc: dict[str, Any]) -> str:
    return f"{path.relative_to(K8S)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


RAY_DOCS = [(p, d) for p, d in all_docs() if d.get("kind") in RAY_KINDS]
BUILTIN_DOCS = [(p, d) for p, d in all_docs() if d.get("kind") not in RAY_KINDS | NOT_VALIDATED_KINDS]


def the_doc(path: Path, kind: str) -> dict[str, Any]:
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path} should hold exactly one {kind}"
    return docs[0]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(group name, pod template, pod count) for the head and every worker group of a Ray resource."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    yield "head", cluster["headGroupSpec"]["template"], 1
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"], group.get("replicas", group.get("minReplicas", 0))


def containers_of(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def all_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") in RAY_KINDS:
        return [c for _, t, _ in pod_templates(doc) for c in containers_of(t)]
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


# ------------------------------------------------------------------------------------ CRD validation


def strict_schema(node: Any) -> Any:
    """Copy of a CRD schema in which every object with ``properties`` rejects unknown fields.

    The API server prunes unknown fields silently; here they are errors, so a misspelt field fails the test.
    Objects marked ``x-kubernetes-preserve-unknown-fields`` or with their own ``additionalProperties`` stay
    as they are, as do objects without ``properties`` (e.g. the top-level ``metadata: {type: object}``,
    which ``test_ray_metadata_is_valid_object_meta`` checks separately).
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crd_schemas(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): strict openAPIV3Schema} for every served version of every CRD in ``directory``."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for crd in load_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    key = (f"{group}/{version['name']}", kind)
                    schemas[key] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    directory = crds_dir()
    if not directory.is_dir() or not list(directory.glob("*.yaml")):
        pytest.skip(f"no KubeRay CRDs at {directory}. {CRD_SOURCE}")
    schemas = load_crd_schemas(directory)
    if not schemas:
        pytest.skip(f"no CustomResourceDefinition in {directory}. {CRD_SOURCE}")
    return schemas


def crd_errors(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"no served CRD version for apiVersion={key[0]} kind={key[1]} (have {sorted(schemas)})"]
    validator = jsonschema.Draft202012Validator(schemas[key])
    return [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def test_k8s_has_the_ray_resources() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in RAY_DOCS)
    assert ("RayJob", "layerexit-train-lite") in kinds
    assert ("RayJob", "layerexit-tune-thresholds") in kinds
    assert ("RayJob", "layerexit-train-draft-7b") in kinds
    assert ("RayService", "layerexit-7b") in kinds
    assert ("RayService", "layerexit-7b-exits") in kinds


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=[doc_id(p, d) for p, d in RAY_DOCS])
def test_ray_resource_validates_against_kuberay_crd(path: Path, doc: dict[str, Any], crd_schemas) -> None:
    assert doc["apiVersion"] == "ray.io/v1", "use ray.io/v1 (v1alpha1 is deprecated and goes away in KubeRay 1.9)"
    errors = crd_errors(doc, crd_schemas)
    assert not errors, f"{doc_id(path, doc)} does not match the KubeRay CRD:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    ("where", "bad_value"),
    [
        (("spec", "entrypointt"), "python x.py"),  # misspelt top-level field
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParamz"), {}),  # misspelt nested field
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resourcez"), {}),
        (("spec", "shutdownAfterJobFinishes"), "yes"),  # wrong type
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # must be a string
    ],
)
def test_crd_validator_rejects_bad_rayjob(where: tuple[Any, ...], bad_value: Any, crd_schemas) -> None:
    good = the_doc(TRAIN_JOB, "RayJob")
    assert not crd_errors(good, crd_schemas)
    bad = copy.deepcopy(good)
    node: Any = bad
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = bad_value
    assert crd_errors(bad, crd_schemas), f"validator accepted {where} = {bad_value!r}"


def test_crd_validator_rejects_missing_required_field(crd_schemas) -> None:
    bad = copy.deepcopy(the_doc(RAYSERVICE, "RayService"))
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in crd_errors(bad, crd_schemas))


def test_strict_schema_keeps_open_maps_open() -> None:
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
                "metadata": {"type": "object"},
            },
        }
    )
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"a": {"b": "x"}, "labels": {"any": "x"}, "free": {"z": 1}, "metadata": {"q": 1}})
    assert not validator.is_valid({"a": {"c": "x"}})
    assert not validator.is_valid({"zzz": 1})


# ------------------------------------------------------------------------- built-in kinds and metadata


try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - a dev extra (pip install -e .[dev])
    kubernetes_validate = None


def k8s_errors(doc: dict[str, Any]) -> str | None:
    if kubernetes_validate is None:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return f"{'.'.join(str(p) for p in err.path)}: {err.message}"
    return None


def test_k8s_has_the_builtin_resources() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in BUILTIN_DOCS}
    for expected in [
        ("PersistentVolumeClaim", "layerexit-shared"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("PersistentVolumeClaim", "mlflow-artifacts"),
        ("Deployment", "mlflow-postgres"),
        ("Service", "mlflow-postgres"),
        ("PersistentVolumeClaim", "mlflow-postgres-data"),
    ]:
        assert expected in kinds


@pytest.mark.parametrize(("path", "doc"), BUILTIN_DOCS, ids=[doc_id(p, d) for p, d in BUILTIN_DOCS])
def test_builtin_resource_validates(path: Path, doc: dict[str, Any]) -> None:
    assert k8s_errors(doc) is None, f"{doc_id(path, doc)}: {k8s_errors(doc)}"


def test_builtin_validator_rejects_unknown_field() -> None:
    bad = copy.deepcopy(the_doc(K8S / "mlflow" / "mlflow.yaml", "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert k8s_errors(bad) is not None


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=[doc_id(p, d) for p, d in RAY_DOCS])
def test_ray_metadata_is_valid_object_meta(path: Path, doc: dict[str, Any]) -> None:
    # CRD schemas leave metadata as a bare object; check it as Kubernetes ObjectMeta instead.
    assert k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}) is None
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**doc["metadata"], "lables": {"a": "b"}}}
    assert k8s_errors(bad) is not None


# ------------------------------------------------------------------------------- serveConfigV2 sync


def test_render_table_pairs_each_rayservice_with_its_serve_config_and_image() -> None:
    table = {(REPO / s.manifest, REPO / s.serve_config, s.image) for s in RAYSERVICES}
    assert table == {(RAYSERVICE, SERVE_7B, "layerexit-vllm:latest"),
                     (RAYSERVICE_EXITS, SERVE_7B_EXITS, "layerexit:latest")}
    rayservices = {p for p, d in RAY_DOCS if d["kind"] == "RayService"}
    assert rayservices == {m for m, _, _ in table}, "every RayService is rendered from a Serve config"
    backends = {yaml.safe_load(s.read_text())["applications"][0]["import_path"] for _, s, _ in table}
    assert backends == {"layerexit.serving.vllm_backend:build_app", "layerexit.serving.app:build_app"}


@pytest.mark.parametrize("source", RAYSERVICES, ids=lambda s: s.manifest.name)
def test_rayservice_serve_config_is_its_serve_config(source) -> None:
    manifest, serve = REPO / source.manifest, REPO / source.serve_config
    embedded = the_doc(manifest, "RayService")["spec"]["serveConfigV2"]
    assert embedded == serve.read_text(encoding="utf-8"), (
        f"{source.manifest} is out of date: run `layerexit k8s render`"
    )
    assert yaml.safe_load(embedded) == yaml.safe_load(serve.read_text(encoding="utf-8"))
    assert check_rayservice_in_sync(serve, manifest, source.image)
    assert {c["image"] for c in all_containers(the_doc(manifest, "RayService"))} == {source.image}


@pytest.mark.parametrize("source", RAYSERVICES, ids=lambda s: s.manifest.name)
def test_render_is_a_fixed_point(source) -> None:
    manifest = REPO / source.manifest
    rendered = render_rayservice(REPO / source.serve_config, manifest, write=False, image=source.image)
    assert rendered == manifest.read_text(encoding="utf-8")


def test_render_sets_the_image_and_check_sees_a_wrong_one(tmp_path: Path) -> None:
    manifest = tmp_path / "rs.yaml"
    manifest.write_text(RAYSERVICE.read_text().replace("image: layerexit-vllm:latest", "image: layerexit:latest"))
    assert check_rayservice_in_sync(SERVE_7B, manifest)  # the config alone is in sync...
    assert not check_rayservice_in_sync(SERVE_7B, manifest, "layerexit-vllm:latest")  # ...the image is not
    render_rayservice(SERVE_7B, manifest, image="layerexit-vllm:latest")
    assert manifest.read_text() == RAYSERVICE.read_text()


@pytest.fixture
def scratch(tmp_path: Path) -> tuple[Path, Path]:
    serve, manifest = tmp_path / "7b_exits.yaml", tmp_path / "rayservice.yaml"
    shutil.copy(SERVE_7B_EXITS, serve)
    shutil.copy(RAYSERVICE_EXITS, manifest)
    return serve, manifest


def without_serve_config(path: Path) -> dict[str, Any]:
    doc = the_doc(path, "RayService")
    doc["spec"].pop("serveConfigV2")
    return doc


def test_render_follows_an_edited_serve_config_and_keeps_comments(scratch: tuple[Path, Path]) -> None:
    serve, manifest = scratch
    before = manifest.read_text(encoding="utf-8")
    serve.write_text(serve.read_text().replace("28: 0.7}", "28: 0.6}") + "# a trailing comment\n")
    assert not check_rayservice_in_sync(serve, manifest)

    rendered = render_rayservice(serve, manifest)

    assert manifest.read_text(encoding="utf-8") == rendered
    assert check_rayservice_in_sync(serve, manifest)
    embedded = the_doc(manifest, "RayService")["spec"]["serveConfigV2"]
    assert embedded == serve.read_text()
    assert yaml.safe_load(embedded)["applications"][0]["deployments"][0]["user_config"]["thresholds"][28] == 0.6
    # Everything else is untouched: same data, same comments.
    assert without_serve_config(manifest) == without_serve_config(RAYSERVICE_EXITS)
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#") and "serve" not in line]
    assert comments and all(line in rendered for line in comments)


def test_render_inserts_a_missing_serve_config(scratch: tuple[Path, Path]) -> None:
    serve, manifest = scratch
    doc = the_doc(manifest, "RayService")
    doc["spec"].pop("serveConfigV2")
    manifest.write_text("# header comment\n" + yaml.safe_dump(doc, sort_keys=False))
    assert not check_rayservice_in_sync(serve, manifest)
    render_rayservice(serve, manifest)
    assert check_rayservice_in_sync(serve, manifest)
    assert manifest.read_text().startswith("# header comment\n")


def test_render_refuses_a_manifest_without_rayservice(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    shutil.copy(TRAIN_JOB, manifest)
    with pytest.raises(ConfigError, match="RayService"):
        render_rayservice(SERVE_7B_EXITS, manifest)


def test_render_refuses_a_file_that_is_not_a_serve_config(scratch: tuple[Path, Path]) -> None:
    serve, manifest = scratch
    serve.write_text("just: a mapping\n")
    with pytest.raises(ConfigError, match="applications"):
        render_rayservice(serve, manifest)


def test_render_cli_check_fails_on_drift_and_render_fixes_it(scratch: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    serve, manifest = scratch
    runner = CliRunner()
    args = ["render", "--serve-config", str(serve), "--manifest", str(manifest)]
    ok = runner.invoke(k8s_app, [*args, "--check"])
    assert ok.exit_code == 0, ok.output

    serve.write_text(serve.read_text().replace("kv: recompute", "kv: propagate"))
    drift = runner.invoke(k8s_app, [*args, "--check"])
    assert drift.exit_code == 1
    assert "layerexit k8s render" in drift.output and "differs" in drift.output
    assert "kv: recompute" in manifest.read_text()  # --check writes nothing

    fixed = runner.invoke(k8s_app, args)
    assert fixed.exit_code == 0, fixed.output
    assert runner.invoke(k8s_app, [*args, "--check"]).exit_code == 0
    assert "kv: propagate" in manifest.read_text()


def test_render_cli_reports_a_missing_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        k8s_app, ["render", "--serve-config", str(tmp_path / "nope.yaml"), "--manifest", str(RAYSERVICE)]
    )
    assert result.exit_code == 2
    assert "nope.yaml" in result.output


# ----------------------------------------------------------------------------------------- serve configs


@pytest.mark.parametrize("path", [SERVE_7B_EXITS, SERVE_13B_EXITS], ids=["7b_exits", "13b_exits"])
def test_serve_config_is_a_ray_serve_config_with_its_command(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# serve run serve_configs/{path.name}"
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(text))
    deployment = config.applications[0].deployments[0]
    assert deployment.ray_actor_options.num_gpus == 1
    assert deployment.user_config["policy"] == "confidence"


def test_serve_config_thresholds_are_the_papers() -> None:
    def thresholds(path: Path) -> dict[int, float]:
        app = yaml.safe_load(path.read_text())["applications"][0]
        return app["deployments"][0]["user_config"]["thresholds"]

    paper_7b = {8: 0.95, 12: 0.95, 16: 0.9, 20: 0.9, 24: 0.8, 28: 0.7}
    assert thresholds(SERVE_7B_EXITS) == paper_7b
    assert thresholds(SERVE_13B_EXITS) == {**paper_7b, 32: 0.7, 36: 0.65}


# -------------------------------------------------------------------------------------- RayJob contents


def entrypoint_command(doc: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(directory the entrypoint cd's into, argv of its python command) for a RayJob's ``spec.entrypoint``."""
    workdir, argv = None, []
    for part in doc["spec"]["entrypoint"].split("&&"):
        tokens = shlex.split(part)
        if tokens[:1] == ["cd"]:
            workdir = tokens[1]
        elif tokens[:1] == ["python"]:
            argv = tokens
    assert argv, f"{doc['metadata']['name']}: no `python ...` command in the entrypoint"
    return workdir, argv


def container_env(doc: dict[str, Any]) -> dict[str, str]:
    """Plain ``value`` env vars of the head container (where a RayJob's entrypoint runs)."""
    [head] = containers_of(next(t for g, t, _ in pod_templates(doc) if g == "head"))
    return {e["name"]: e["value"] for e in head.get("env", []) if "value" in e}


RAYJOBS = [(p, d) for p, d in RAY_DOCS if d["kind"] == "RayJob"]


@pytest.mark.parametrize(("path", "doc"), RAYJOBS, ids=[doc_id(p, d) for p, d in RAYJOBS])
def test_rayjob_entrypoint_runs_with_check(path: Path, doc: dict[str, Any]) -> None:
    """The job's own command, overrides included, plus --check: config loads and validates, nothing starts."""
    workdir, argv = entrypoint_command(doc)
    assert workdir == "/home/ray/layerexit", "the image puts the repository at /home/ray/layerexit (Dockerfile)"
    script = REPO / argv[1]
    assert script.is_file() and script.parent.name == "jobs", f"{argv[1]} is not a job script"
    env = {**os.environ, **container_env(doc), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, *argv[1:], "--check"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{path.name}: `{' '.join(argv)} --check` failed:\n{result.stderr[-2000:]}"
    assert "is valid" in result.stdout


def test_rayjob_check_fails_on_a_bad_override() -> None:
    """The same command with a misspelt override exits non-zero and names the key (what the old manifest did)."""
    _, argv = entrypoint_command(the_doc(TRAIN_JOB, "RayJob"))
    result = subprocess.run([sys.executable, *argv[1:], "storage_path=/mnt/x", "--check"], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "storage_path" in result.stderr and "unknown key" in result.stderr


def serve_applications(manifest: Path = RAYSERVICE_EXITS) -> list[dict[str, Any]]:
    serve = yaml.safe_load(the_doc(manifest, "RayService")["spec"]["serveConfigV2"])
    return serve["applications"]


def test_rayservice_applications_build_through_build_app() -> None:
    """Every application's args pass ``build_app``'s argument model (and build an Application, starting nothing);
    every deployment's user_config passes the exit-config model replicas apply in reconfigure()."""
    ray = pytest.importorskip("ray")
    from ray.serve import Application

    from layerexit.serving.app import _coerce_cli_args, build_app
    from layerexit.serving.config import exit_config_from_user_config, parse_serve_args

    apps = serve_applications()
    assert apps
    for app in apps:
        assert app["import_path"] == "layerexit.serving.app:build_app", app["name"]
        args = parse_serve_args(_coerce_cli_args(app.get("args") or {}), source=f"{app['name']} args")
        assert isinstance(build_app(app.get("args") or {}), Application)
        for deployment in app.get("deployments", []):
            if deployment.get("user_config") is not None:
                exit_config_from_user_config(deployment["user_config"])
            ongoing = deployment.get("max_ongoing_requests")
            assert ongoing is None or ongoing >= args.max_batch_size, f"{app['name']}: a replica cannot hold a batch"
    assert not ray.is_initialized(), "validating the Serve config must not start Ray"


def test_vllm_rayservice_applications_pass_the_vllm_argument_model() -> None:
    """The vLLM RayService's args pass ``VllmServeArgs`` (build_app itself needs vLLM, which the main .venv lacks: the
    layerexit-vllm image has it) and serve the registered model with the draft it ships."""
    from layerexit.serving.vllm_config import parse_vllm_args

    apps = serve_applications(RAYSERVICE)
    assert apps
    for app in apps:
        assert app["import_path"] == "layerexit.serving.vllm_backend:build_app", app["name"]
        args = parse_vllm_args(app["args"], f"{app['name']} args")
        assert args.device == "cuda" and args.draft_kind == "model" and args.draft_shipped
        assert args.model.startswith("models:/") and args.draft == "shipped"
    with pytest.raises(ConfigError, match="num_speculative_token"):
        parse_vllm_args({**apps[0]["args"], "num_speculative_token": 3})


def test_rayservice_validation_rejects_a_bad_arg() -> None:
    from layerexit.serving.app import build_app

    args = {**serve_applications()[0]["args"], "max_batch_sise": 16}
    with pytest.raises(ConfigError, match="max_batch_sise"):
        build_app(args)


def test_train_job_shape() -> None:
    doc = the_doc(TRAIN_JOB, "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "checkpoint.storage_path=/mnt/shared/ray-results" in entrypoint_command(doc)[1]
    gpus = {name: (template, pods) for name, template, pods in pod_templates(doc)}
    head_template, _ = gpus.pop("head")
    for c in containers_of(head_template):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    total = 0
    for name, (template, pods) in gpus.items():
        for c in containers_of(template):
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) == int(requests["nvidia.com/gpu"])
            total += pods * int(limits["nvidia.com/gpu"])
        tolerations = template["spec"].get("tolerations", [])
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations, name
    assert total == 4, "the paper fine-tunes on 4 GPUs"


@pytest.mark.parametrize(("path", "doc"), RAY_DOCS, ids=[doc_id(p, d) for p, d in RAY_DOCS])
def test_ray_pods_share_storage_and_mlflow(path: Path, doc: dict[str, Any]) -> None:
    claims = {d["metadata"]["name"] for _, d in all_docs() if d["kind"] == "PersistentVolumeClaim"}
    services = {d["metadata"]["name"]: d for _, d in all_docs() if d["kind"] == "Service"}
    assert 5000 in [p["port"] for p in services["mlflow"]["spec"]["ports"]]
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == importlib.metadata.version("ray"), "image Ray version != project's Ray"
    for group, template, _ in pod_templates(doc):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
        for c in containers_of(template):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == "http://mlflow:5000", f"{group}/{c['name']}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if doc["kind"] == "RayJob" or group != "head":
                assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == "layerexit-shared"


@pytest.mark.parametrize("manifest", [RAYSERVICE, RAYSERVICE_EXITS], ids=lambda p: p.name)
def test_rayservice_autoscales_gpu_workers(manifest: Path) -> None:
    doc = the_doc(manifest, "RayService")
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    [group] = cluster["workerGroupSpecs"]
    assert 1 <= group["minReplicas"] < group["maxReplicas"]
    [worker] = containers_of(group["template"])
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
    if app["import_path"].startswith("layerexit.serving.vllm_backend"):
        # Ray Serve LLM: one vLLM engine per replica on tensor_parallel_size GPUs (a placement group)
        gpus_per_replica = app["args"].get("tensor_parallel_size", 1)
        deployment = app["args"]["deployment_config"]
    else:
        deployment = app["deployments"][0]
        gpus_per_replica = deployment["ray_actor_options"]["num_gpus"]
    assert gpus_per_replica <= gpus_per_pod
    max_serve_replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas"))
    assert max_serve_replicas * gpus_per_replica <= group["maxReplicas"] * gpus_per_pod


# --------------------------------------------------------------------------------- secrets, kustomize


def test_no_real_secrets_and_referenced_keys_exist() -> None:
    secrets = [(p, d) for p, d in all_docs() if d["kind"] == "Secret"]
    assert [p for p, _ in secrets] == [SECRET_EXAMPLE], "Secrets with values belong outside the repo"
    example = secrets[0][1]
    assert all(v in {"CHANGE-ME", "mlflow"} for v in example["stringData"].values())
    for path, doc in all_docs():
        for c in all_containers(doc):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["name"] == example["metadata"]["name"], f"{path.name}: {ref}"
                    assert ref["key"] in example["stringData"], f"{path.name}: {ref}"


def kustomize_resources(directory: Path) -> set[Path]:
    """Files a kustomization pulls in, following sub-directories that hold their own kustomization."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    found: set[Path] = set()
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory / 'kustomization.yaml'} lists missing {entry}"
        found |= kustomize_resources(target) if target.is_dir() else {target}
    return found


def test_kustomization_covers_every_manifest_but_the_secret_example() -> None:
    included = kustomize_resources(K8S)
    expected = {p.resolve() for p in manifest_files() if p != SECRET_EXAMPLE}
    assert included == expected
    assert SECRET_EXAMPLE.resolve() not in included


def test_kustomization_sets_namespace_and_every_image() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"]
    image_names = {i["name"] for i in kustomization["images"]}
    for path, doc in all_docs():
        assert "namespace" not in doc.get("metadata", {}), f"{path.name}: leave the namespace to kustomize"
        for c in all_containers(doc):
            assert c["image"].rsplit(":", 1)[0] in image_names, f"{path.name}: {c['image']} not settable"


def uncomment_storage_patches(text: str) -> str:
    out, active = [], False
    for line in text.splitlines():
        if line.startswith("# patches:"):
            active = True
        if active and line.startswith("#"):
            line = line[2:] if line.startswith("# ") else line[1:]
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kubectl kustomize builds k8s/)")
def test_kubectl_kustomize_builds_with_image_namespace_and_storage_class(tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    kz = tree / "kustomization.yaml"
    kz.write_text(uncomment_storage_patches(kz.read_text()))
    result = subprocess.run(["kubectl", "kustomize", str(tree)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    settings = yaml.safe_load(kz.read_text())
    pushed = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in settings["images"] if "newName" in i}
    assert {d["kind"] for d in built} >= {"RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim"}
    for doc in built:
        assert doc["metadata"]["namespace"] == settings["namespace"]
        for c in all_containers(doc):
            assert not c["image"].startswith("layerexit:"), f"{doc['kind']}: image placeholder left"
        if doc["kind"] in RAY_KINDS:
            want = pushed["layerexit-vllm" if doc["metadata"]["name"] == "layerexit-7b" else "layerexit"]
            assert {c["image"] for c in all_containers(doc)} == {want}
        if doc["kind"] == "PersistentVolumeClaim":
            assert doc["spec"].get("storageClassName"), doc["metadata"]["name"]
    rayservice = next(d for d in built if d["kind"] == "RayService")
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_7B.read_text())


# ------------------------------------------------------------------------------------ the draft RayJob


def test_draft_job_trains_the_eagle3_draft_the_vllm_rayservice_serves() -> None:
    """The RayJob trains jobs/configs/llama2_7b_eagle3.yaml on the model rayjob-train-lite registers, builds its teacher
    cache on the GPUs, and registers the model serve_configs/7b.yaml (rayservice-7b) serves with its shipped draft."""
    from layerexit.training import load_train_config

    doc = the_doc(DRAFT_JOB, "RayJob")
    assert doc["spec"]["suspend"] is True, "applied suspended: it trains on the model rayjob-train-lite registers"
    _, train = entrypoint_command(doc)
    assert train[1:4] == ["jobs/train_lite.py", "--config", "jobs/configs/llama2_7b_eagle3.yaml"]
    cfg = load_train_config(REPO / train[3], [a for a in train[4:] if "=" in a], check=False)
    lite = load_train_config(REPO / "jobs/configs/llama2_7b_lite.yaml", check=False)
    assert cfg.model.spec == f"models:/{lite.registered_model_name}@{lite.mlflow.alias}"  # trains on train-lite's model
    assert cfg.recipe == "eagle3" and cfg.distill.cache_gpus > 0 and cfg.scaling.use_gpu
    assert "export-draft" not in doc["spec"]["entrypoint"], "vLLM reads the model's eagle3/ directly"
    served = yaml.safe_load(the_doc(RAYSERVICE, "RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert served["model"] == f"models:/{cfg.registered_model_name}@{cfg.mlflow.alias}"
    assert served["draft"] == "shipped"


def test_every_alias_is_the_one_the_configs_register() -> None:
    """The manifests and docs name alias `trained` (MLflow reserves `latest`)."""
    for path in [*K8S.rglob("*.yaml"), K8S / "README.md", REPO / "docs" / "kubernetes.md"]:
        text = path.read_text()
        assert "alias `latest`" not in text and "@latest" not in text, path
    for path in (REPO / "jobs" / "configs").glob("llama2_*.yaml"):
        assert with_base(yaml.safe_load(path.read_text()), path)["mlflow"]["alias"] == "trained"  # base: resolved


# ------------------------------------------------------------------------------------ GPU counts (--gpus)


def worker_gpus(path: Path) -> tuple[int, int, dict[str, Any]]:
    """(GPUs over all worker pods, GPUs per pod, the worker container's resources) of a training RayJob."""
    doc = the_doc(path, "RayJob")
    [group] = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    [worker] = containers_of(group["template"])
    resources = worker["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    per_pod = int(resources["limits"]["nvidia.com/gpu"])
    return group["replicas"] * per_pod, per_pod, resources


def overrides_of(path: Path) -> dict[str, str]:
    _, argv = entrypoint_command(the_doc(path, "RayJob"))
    return dict(a.split("=", 1) for a in argv if "=" in a)


def test_training_jobs_are_the_render_tables() -> None:
    trains = {p for p, d in RAYJOBS if "jobs/train_lite.py" in d["spec"]["entrypoint"]}
    assert trains == {REPO / j for j in TRAIN_JOBS} == {TRAIN_JOB, DRAFT_JOB}


@pytest.mark.parametrize("path", [TRAIN_JOB, DRAFT_JOB], ids=lambda p: p.name)
def test_committed_training_jobs_have_as_many_workers_as_gpus(path: Path) -> None:
    from layerexit.deploy.k8s_gpus import train_job_problems

    gpus, _, _ = worker_gpus(path)
    assert int(overrides_of(path)["scaling.num_workers"]) == gpus == 4
    assert train_job_problems(path, repo=REPO) == []
    assert train_job_problems(path, repo=REPO, gpus=4) == []  # rendered for --gpus 4 exactly


@pytest.fixture
def repo_copy(tmp_path: Path, monkeypatch) -> Path:
    """k8s/, serve_configs/ and jobs/configs/ in a scratch repository root (the CLI's working directory)."""
    shutil.copytree(K8S, tmp_path / "k8s")
    shutil.copytree(REPO / "serve_configs", tmp_path / "serve_configs")
    shutil.copytree(REPO / "jobs" / "configs", tmp_path / "jobs" / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_render_gpus_rewrites_limits_and_num_workers_together(repo_copy: Path, capsys) -> None:
    from typer.testing import CliRunner

    from layerexit.training import load_train_config

    runner = CliRunner()
    result = runner.invoke(k8s_app, ["render", "--gpus", "8"])
    assert result.exit_code == 0, result.output
    for job in TRAIN_JOBS:
        path = repo_copy / job
        gpus, per_pod, resources = worker_gpus(path)
        over = overrides_of(path)
        assert (gpus, per_pod) == (8, 8) and int(over["scaling.num_workers"]) == 8
        assert resources["limits"]["cpu"] == "64" and resources["limits"]["memory"] == "512Gi"  # 8 CPUs, 64Gi / GPU
        assert resources["requests"] == resources["limits"]
        _, argv = entrypoint_command(the_doc(path, "RayJob"))
        cfg = load_train_config(REPO / argv[3], [a for a in argv[4:] if "=" in a], check=False)
        assert cfg.scaling.num_workers == 8
        if cfg.optim.global_batch_size is not None:  # llama2_7b_lite: the paper's 128 stays 128
            assert cfg.train_batch_size == cfg.optim.global_batch_size == 128 and cfg.optim.grad_accum == 4
    # The rendered entrypoints still run: the job's own --check accepts them.
    for job in TRAIN_JOBS:
        _, argv = entrypoint_command(the_doc(repo_copy / job, "RayJob"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
        done = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:], "--check"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    # Comments and layout elsewhere are kept: only the counted lines changed.
    before, after = TRAIN_JOB.read_text().splitlines(), (repo_copy / TRAIN_JOB.relative_to(REPO)).read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    counted = ("nvidia.com/gpu", "scaling.num_workers", "optim.grad_accum", "groupName: gpu-")
    assert len(before) == len(after) and len(changed) == 5, changed
    assert all(any(key in a and key in b for key in counted) for a, b in changed), changed
    assert runner.invoke(k8s_app, ["render", "--check", "--gpus", "8"]).exit_code == 0
    assert runner.invoke(k8s_app, ["render", "--check"]).exit_code == 0  # consistent at 8 as well
    assert runner.invoke(k8s_app, ["render", "--check", "--gpus", "4"]).exit_code == 1
    back = runner.invoke(k8s_app, ["render", "--gpus", "4"])
    assert back.exit_code == 0 and (repo_copy / TRAIN_JOB.relative_to(REPO)).read_text() == TRAIN_JOB.read_text()


def test_render_gpus_per_pod_splits_over_pods(repo_copy: Path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(k8s_app, ["render", "--gpus", "8", "--gpus-per-pod", "2"])
    assert result.exit_code == 0, result.output
    doc = the_doc(repo_copy / TRAIN_JOB.relative_to(REPO), "RayJob")
    [group] = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"], group["groupName"]) == (4, 4, 4, "gpu-2x")
    gpus, per_pod, resources = worker_gpus(repo_copy / TRAIN_JOB.relative_to(REPO))
    assert (gpus, per_pod, resources["limits"]["cpu"], resources["limits"]["memory"]) == (8, 2, "16", "128Gi")
    assert int(overrides_of(repo_copy / TRAIN_JOB.relative_to(REPO))["scaling.num_workers"]) == 8


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "6"], "--gpus 6: k8s/rayjob-train-lite.yaml trains with optim.global_batch_size=128"),
    (["--gpus", "8", "--gpus-per-pod", "3"], "--gpus-per-pod 3 does not divide --gpus 8"),
    (["--gpus-per-pod", "2"], "--gpus-per-pod needs --gpus"),
])
def test_render_gpus_refuses_counts_it_cannot_keep_and_writes_nothing(repo_copy: Path, args, message) -> None:
    from typer.testing import CliRunner

    before = {p: p.read_text() for p in (repo_copy / "k8s").glob("*.yaml")}
    result = CliRunner().invoke(k8s_app, ["render", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert {p: p.read_text() for p in (repo_copy / "k8s").glob("*.yaml")} == before


def test_check_catches_gpus_edited_by_hand(repo_copy: Path) -> None:
    """Someone gives the worker pod 8 GPUs (and their CPUs and memory) and forgets the entrypoint: --check and plain
    render fail naming --gpus; `render --gpus 8` completes the edit (scaling.num_workers, grad_accum)."""
    from typer.testing import CliRunner

    path = repo_copy / TRAIN_JOB.relative_to(REPO)
    path.write_text(path.read_text().replace('{cpu: "32", memory: 256Gi, nvidia.com/gpu: 4}',
                                             '{cpu: "64", memory: 512Gi, nvidia.com/gpu: 8}'))
    runner = CliRunner()
    drift = runner.invoke(k8s_app, ["render", "--check"])
    assert drift.exit_code == 1
    assert "the worker pods hold 8 GPUs (1 x 8) but the job runs scaling.num_workers=4" in drift.output
    assert "layerexit k8s render --gpus N" in drift.output
    assert runner.invoke(k8s_app, ["render"]).exit_code == 1  # without --gpus it cannot tell which is meant
    assert runner.invoke(k8s_app, ["render", "--gpus", "8"]).exit_code == 0
    assert runner.invoke(k8s_app, ["render", "--check"]).exit_code == 0
    assert overrides_of(path)["optim.grad_accum"] == "4"


def test_check_catches_workers_edited_by_hand(repo_copy: Path) -> None:
    from typer.testing import CliRunner

    path = repo_copy / DRAFT_JOB.relative_to(REPO)
    path.write_text(path.read_text().replace("scaling.num_workers=4", "scaling.num_workers=2"))
    drift = CliRunner().invoke(k8s_app, ["render", "--check"])
    assert drift.exit_code == 1
    assert "rayjob-train-draft-7b.yaml: the worker pods hold 4 GPUs (1 x 4) but the job runs scaling.num_workers=2" \
        in drift.output
    lite = repo_copy / TRAIN_JOB.relative_to(REPO)  # here the global batch no longer adds up: also drift
    lite.write_text(lite.read_text().replace("scaling.num_workers=4", "scaling.num_workers=2"))
    drift = CliRunner().invoke(k8s_app, ["render", "--check"])
    assert drift.exit_code == 1 and "optim.global_batch_size=128" in drift.output


def test_check_covers_every_rayservice(repo_copy: Path) -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    assert runner.invoke(k8s_app, ["render", "--check"]).exit_code == 0
    serve = repo_copy / "serve_configs" / "7b_exits.yaml"
    serve.write_text(serve.read_text().replace("kv: recompute", "kv: propagate"))
    drift = runner.invoke(k8s_app, ["render", "--check"])
    assert drift.exit_code == 1 and "k8s/rayservice-7b-exits.yaml: spec.serveConfigV2" in drift.output
    assert "rayservice-7b.yaml:" not in drift.output.replace("rayservice-7b-exits.yaml", "")
    fixed = runner.invoke(k8s_app, ["render"])
    assert fixed.exit_code == 0 and "k8s/rayservice-7b-exits.yaml updated" in fixed.output
    assert "k8s/rayservice-7b.yaml unchanged" in fixed.output
    assert runner.invoke(k8s_app, ["render", "--check"]).exit_code == 0
