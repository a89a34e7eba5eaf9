"""The one exception hierarchy of dagfactory.

Every message a user can see names the file, field or task at fault and says what to do next,
so none of these should ever reach a user as a bare traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class DagfactoryError(Exception):
    """Base class: a problem a user can act on, with a message that says how."""


@dataclass(frozen=True)
class SpecProblem:
    """One problem found in one pipeline file, located as precisely as the YAML allows."""

    file: str
    message: str
    line: int = 0
    column: int = 0
    field: str = ""

    def __str__(self) -> str:
        """`FILE:LINE:COL: error: FIELD: MESSAGE` on one line, whatever characters it holds."""
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        field = f"{self.field}: " if self.field else ""
        return _one_line(f"{where}: error: {field}{self.message}")


def _one_line(text: str) -> str:
    """Escape line breaks and control characters, so one problem is always one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SpecError(DagfactoryError):
    """A pipeline file is not a valid spec; carries every problem found in it."""

    def __init__(self, problems: list[SpecProblem] | tuple[SpecProblem, ...]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def from_text(cls, text: str) -> SpecError:
        """A SpecError whose message is already formatted (e.g. kept in a DAG)."""
        error = cls([])
        error.args = (text,)
        return error


class WorkspaceError(DagfactoryError):
    """The pipeline's code could not be fetched, checked out or installed."""


class ClusterError(DagfactoryError):
    """A Dask cluster could not be started, reached or stopped."""


class EntrypointError(DagfactoryError):
    """The pipeline's entry point raised, or returned something that is not JSON."""


class ParamError(DagfactoryError):
    """A run was given a param value its pipeline does not declare or allow."""
