"""The code-interpreter template (numpy, pandas, matplotlib warmed) builds and serves E2B-style cells."""

import base64

from agent_harness import collect
from forkd_runtime import load_spec


async def test_code_interpreter_template_plots_and_renders_dataframes(template_store, process_backend):
    template_store.build(load_spec("code-interpreter"), progress=lambda m: print(m, flush=True))
    snap = await process_backend.prepare("code-interpreter")
    assert snap.meta["warm"]["marker"]
    (child,) = await process_backend.spawn(snap, 1)
    conn = child.conn

    async def cell(code: str) -> dict:
        out = conn.open_inbound()
        result = await conn.request("code.run", {"code": code, "stream": out.id})
        await collect(out)
        return result

    # pandas and matplotlib were imported by the warm parent: the cell only uses them.
    r = await cell("import sys\n'pandas' in sys.modules and 'matplotlib.pyplot' in sys.modules")
    assert r["results"][0]["text"] == "True"
    r = await cell("import pandas as pd\npd.DataFrame({'a': [1, 2, 3]})")
    assert "<table" in r["results"][0]["html"]
    r = await cell("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()")
    png = base64.b64decode(r["results"][0]["png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    r = await cell("1/0")
    assert r["error"]["name"] == "ZeroDivisionError"
