"""``from forkd.code_interpreter import Sandbox``: the drop-in for ``from e2b_code_interpreter import Sandbox``.

The same classes as ``forkd.Sandbox`` / ``forkd.AsyncSandbox``, created by default from the
``code-interpreter`` template (Python with numpy, pandas and matplotlib imported in the warm parent), as
E2B's code interpreter is. Build it once with ``forkd template build code-interpreter``, or start the
gateway with ``forkd serve --pool code-interpreter=4``, which builds it.
"""

from __future__ import annotations

from ._code_models import Context, Execution, ExecutionError, Logs, Result
from ._sandbox import AsyncSandbox as _AsyncSandbox
from ._sync import Sandbox as _Sandbox

__all__ = ["AsyncSandbox", "Sandbox", "Context", "Execution", "ExecutionError", "Logs", "Result", "TEMPLATE"]

TEMPLATE = "code-interpreter"


class AsyncSandbox(_AsyncSandbox):
    default_template = TEMPLATE


class Sandbox(_Sandbox):
    default_template = TEMPLATE
