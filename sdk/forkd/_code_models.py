"""The code interpreter's data classes (``e2b_code_interpreter.models``).

Constructors accept and ignore unknown keyword arguments, as E2B's do, so that
results from a newer agent never break an older SDK.
"""

from __future__ import annotations

import json as _json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .protocol import RESULT_FORMATS

__all__ = [
    "OutputMessage",
    "ExecutionError",
    "MIMEType",
    "Result",
    "Logs",
    "Execution",
    "Context",
    "RunCodeLanguage",
    "OutputHandler",
    "OutputHandlerWithAsync",
    "serialize_results",
]

T = TypeVar("T")
OutputHandler = Callable[[T], Any]
OutputHandlerWithAsync = Callable[[T], Any] | Callable[[T], Awaitable[Any]]
RunCodeLanguage = Literal["python", "javascript", "typescript", "r", "java", "bash"] | str


@dataclass
class OutputMessage:
    """A piece of output of a cell (``timestamp`` in nanoseconds since the epoch)."""

    line: str
    timestamp: int
    error: bool = False

    def __str__(self) -> str:
        return self.line


@dataclass
class ExecutionError:
    """The exception a cell raised: class name, ``str(exc)`` and the formatted traceback."""

    name: str
    value: str
    traceback: str

    def __init__(self, name: str, value: str, traceback: str, **kwargs: Any) -> None:
        self.name = name
        self.value = value
        self.traceback = traceback

    def to_json(self) -> str:
        return _json.dumps({"name": self.name, "value": self.value, "traceback": self.traceback})


class MIMEType(str):
    """A MIME type."""


_FORMATS = RESULT_FORMATS


@dataclass
class Result:
    """One displayed object or the cell's value, in every format it has.

    ``png``, ``jpeg`` and ``pdf`` are base64 strings. ``chart`` is the raw
    ``e2b/chart`` map when a bundle provides one (forkd does not extract charts).
    """

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: dict | None = None
    javascript: str | None = None
    data: dict | None = None
    chart: Any = None
    is_main_result: bool = False
    extra: dict | None = None

    def __init__(
        self,
        text: str | None = None,
        html: str | None = None,
        markdown: str | None = None,
        svg: str | None = None,
        png: str | None = None,
        jpeg: str | None = None,
        pdf: str | None = None,
        latex: str | None = None,
        json: dict | None = None,
        javascript: str | None = None,
        data: dict | None = None,
        chart: Any = None,
        is_main_result: bool = False,
        extra: dict | None = None,
        **kwargs: Any,
    ) -> None:
        self.text = text
        self.html = html
        self.markdown = markdown
        self.svg = svg
        self.png = png
        self.jpeg = jpeg
        self.pdf = pdf
        self.latex = latex
        self.json = json
        self.javascript = javascript
        self.data = data
        self.chart = chart or None
        self.is_main_result = is_main_result
        self.extra = extra

    def __getitem__(self, item: str) -> Any:
        return getattr(self, item)

    def formats(self) -> Iterable[str]:
        """The formats this result has (``extra`` keys included)."""
        found = [name for name in _FORMATS if getattr(self, name)]
        if self.extra:
            found.extend(self.extra)
        return found

    def __str__(self) -> str:
        return self.__repr__()

    def __repr__(self) -> str:
        if self.text:
            return f"Result({self.text})"
        return "Result(Formats: " + ", ".join(self.formats()) + ")"

    # IPython display hooks, so a Result shows itself in a notebook.
    def _repr_html_(self) -> str | None:
        return self.html

    def _repr_markdown_(self) -> str | None:
        return self.markdown

    def _repr_svg_(self) -> str | None:
        return self.svg

    def _repr_png_(self) -> str | None:
        return self.png

    def _repr_jpeg_(self) -> str | None:
        return self.jpeg

    def _repr_pdf_(self) -> str | None:
        return self.pdf

    def _repr_latex_(self) -> str | None:
        return self.latex

    def _repr_json_(self) -> dict | None:
        return self.json

    def _repr_javascript_(self) -> str | None:
        return self.javascript


@dataclass(repr=False)
class Logs:
    """What a cell printed, as the chunks it printed them in."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def __init__(
        self, stdout: list[str] | None = None, stderr: list[str] | None = None, **kwargs: Any
    ) -> None:
        self.stdout = stdout or []
        self.stderr = stderr or []

    def __repr__(self) -> str:
        return f"Logs(stdout: {self.stdout}, stderr: {self.stderr})"

    def to_json(self) -> str:
        return _json.dumps({"stdout": self.stdout, "stderr": self.stderr})


def serialize_results(results: list[Result]) -> list[dict[str, Any]]:
    out = []
    for result in results:
        d = {key: result[key] for key in result.formats() if key in _FORMATS}
        d["text"] = result.text
        out.append(d)
    return out


@dataclass(repr=False)
class Execution:
    """The outcome of ``run_code``: results, logs, error and execution count."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None

    def __init__(
        self,
        results: list[Result] | None = None,
        logs: Logs | None = None,
        error: ExecutionError | None = None,
        execution_count: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.results = results or []
        self.logs = logs or Logs()
        self.error = error
        self.execution_count = execution_count

    def __repr__(self) -> str:
        return f"Execution(Results: {self.results}, Logs: {self.logs}, Error: {self.error})"

    @property
    def text(self) -> str | None:
        """The text of the cell's main result (its last expression), if any."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None

    def to_json(self) -> str:
        return _json.dumps(
            {
                "results": serialize_results(self.results),
                "logs": self.logs.to_json(),
                "error": self.error.to_json() if self.error else None,
            }
        )


@dataclass
class Context:
    """A code context: its own interpreter state, language and working directory."""

    id: str
    language: str
    cwd: str

    def __init__(self, context_id: str, language: str, cwd: str, **kwargs: Any) -> None:
        self.id = context_id
        self.language = language
        self.cwd = cwd

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Context:
        return cls(context_id=data["id"], language=data["language"], cwd=data["cwd"])
