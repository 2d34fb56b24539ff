"""Keep the KubeRay RayService manifest in step with the Serve config it deploys.

``serve_configs/7b.yaml`` is the one source of truth for the 7B Serve application: ``serve run`` reads it
locally, and ``k8s/rayservice-7b.yaml`` carries the same text, verbatim, as its ``spec.serveConfigV2``
string (KubeRay hands that string to Ray Serve). :func:`render_rayservice` copies the file into the
manifest with a ruamel.yaml round trip, so comments and layout in the rest of the manifest survive;
:func:`check_rayservice_in_sync` tells whether the two have drifted (a unit test and ``--check`` use it).

Command line (the lead registers ``k8s_app`` as ``layerexit k8s``)::

    layerexit k8s render                 # rewrite k8s/rayservice-7b.yaml from serve_configs/7b.yaml
    layerexit k8s render --check         # exit 1 if they differ, write nothing
    python -m layerexit.deploy.k8s render --help
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError as RuamelYAMLError
from ruamel.yaml.scalarstring import LiteralScalarString

from layerexit.errors import ConfigError, InputFileError, LayerexitError

DEFAULT_SERVE_CONFIG = Path("serve_configs/7b.yaml")
DEFAULT_MANIFEST = Path("k8s/rayservice-7b.yaml")
RAYSERVICE_KIND = "RayService"
SERVE_CONFIG_FIELD = "serveConfigV2"


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


def _round_trip_yaml() -> YAML:
    """A ruamel.yaml round-trip loader/dumper laid out like the manifests in k8s/ (2-space maps, indented lists)."""
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096  # never re-wrap long lines (entrypoints, args)
    return rt


def _find_rayservice(docs: list[Any], manifest_path: Path) -> Any:
    """The single RayService document among ``docs``; an error naming the file if there is none or several."""
    found = [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") == RAYSERVICE_KIND]
    if len(found) != 1:
        raise ConfigError(
            f"{manifest_path} holds {len(found)} RayService documents, expected exactly 1",
            "point --manifest at the RayService manifest, e.g. k8s/rayservice-7b.yaml",
        )
    return found[0]


def _load_manifest(manifest_path: Path, rt: YAML) -> list[Any]:
    if not manifest_path.is_file():
        raise InputFileError(f"manifest {manifest_path} does not exist", "pass --manifest k8s/rayservice-7b.yaml")
    try:
        return [doc for doc in rt.load_all(manifest_path.read_text(encoding="utf-8")) if doc is not None]
    except RuamelYAMLError as err:
        raise ConfigError(f"manifest {manifest_path} is not valid YAML: {err}") from err


def render_rayservice(serve_config_path: str | Path, manifest_path: str | Path, *, write: bool = True) -> str:
    """Put the Serve config's text into the RayService's ``spec.serveConfigV2`` and return the manifest text.

    Args:
        serve_config_path: the Ray Serve config file (``serve_configs/7b.yaml``).
        manifest_path: the manifest holding exactly one RayService (``k8s/rayservice-7b.yaml``).
        write: write the result back to ``manifest_path`` (only when it changed). ``False`` just returns it.

    Returns:
        The full manifest text after rendering. Everything but ``serveConfigV2`` keeps its comments and layout.
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
    out = io.StringIO()
    if len(docs) == 1:
        rt.dump(docs[0], out)
    else:
        rt.dump_all(docs, out)
    rendered = out.getvalue()
    if write and rendered != manifest.read_text(encoding="utf-8"):
        manifest.write_text(rendered, encoding="utf-8")
    return rendered


def embedded_serve_config(manifest_path: str | Path) -> str | None:
    """The ``spec.serveConfigV2`` string of the manifest's RayService, or ``None`` when it has none."""
    manifest = Path(manifest_path)
    docs = _load_manifest(manifest, _round_trip_yaml())
    value = (_find_rayservice(docs, manifest).get("spec") or {}).get(SERVE_CONFIG_FIELD)
    return None if value is None else str(value)


def check_rayservice_in_sync(serve_config_path: str | Path, manifest_path: str | Path) -> bool:
    """True when the RayService's ``serveConfigV2`` is exactly the Serve config file's text."""
    return embedded_serve_config(manifest_path) == read_serve_config(serve_config_path)


k8s_app = typer.Typer(
    help="Kubernetes (KubeRay) manifests: keep k8s/ in step with the project's Serve configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@k8s_app.callback()
def _k8s_group() -> None:
    """Kubernetes (KubeRay) manifests: keep k8s/ in step with the project's Serve configs."""


@k8s_app.command("render")
def render(
    serve_config: Annotated[
        Path, typer.Option("--serve-config", help="Ray Serve config file, the source of truth.")
    ] = DEFAULT_SERVE_CONFIG,
    manifest: Annotated[
        Path, typer.Option("--manifest", help="RayService manifest whose spec.serveConfigV2 is (re)written.")
    ] = DEFAULT_MANIFEST,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the manifest differs from the Serve config.")
    ] = False,
) -> None:
    """Copy the Serve config into the RayService manifest's serveConfigV2 (comments elsewhere are kept)."""
    try:
        if check:
            if not check_rayservice_in_sync(serve_config, manifest):
                typer.echo(
                    f"{manifest}: spec.serveConfigV2 differs from {serve_config}; "
                    f"run `layerexit k8s render --serve-config {serve_config} --manifest {manifest}` and commit the result",
                    err=True,
                )
                raise typer.Exit(1)
            typer.echo(f"{manifest} is in sync with {serve_config}")
            return
        before = manifest.read_text(encoding="utf-8") if manifest.is_file() else None
        rendered = render_rayservice(serve_config, manifest)
        state = "unchanged" if rendered == before else "updated"
        typer.echo(f"{manifest} {state} (serveConfigV2 from {serve_config})")
    except LayerexitError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


if __name__ == "__main__":
    k8s_app()
