"""User-facing errors: one line naming the problem and the fix, turned into exit code 2 by the CLI."""

from __future__ import annotations


class LayerexitError(Exception):
    """A problem with the user's input (model spec, file, config value), not a bug.

    The CLI prints ``str(err)`` on one line and exits with status 2, without a traceback.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)


class ModelSpecError(LayerexitError):
    """The --model value names nothing we can load."""


class InputFileError(LayerexitError):
    """A prompt/data file is missing, empty or malformed."""


class ConfigError(LayerexitError):
    """A config value is out of range, unknown, or inconsistent with the model."""
