"""The code interpreter's models (``e2b_code_interpreter.models``)."""

from ._code_models import (
    Context,
    Execution,
    ExecutionError,
    Logs,
    MIMEType,
    OutputHandler,
    OutputHandlerWithAsync,
    OutputMessage,
    Result,
    RunCodeLanguage,
    serialize_results,
)

__all__ = [
    "Context",
    "Execution",
    "ExecutionError",
    "Logs",
    "MIMEType",
    "OutputHandler",
    "OutputHandlerWithAsync",
    "OutputMessage",
    "Result",
    "RunCodeLanguage",
    "serialize_results",
]
