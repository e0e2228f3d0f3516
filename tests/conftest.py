import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_harness import AgentProcess  # noqa: E402


@pytest.fixture
def agent_proc(tmp_path):
    agent = AgentProcess(tmp_path)
    yield agent
    agent.stop()


@pytest.fixture
async def agent(agent_proc):
    """A protocol connection to a fresh real agent subprocess."""
    conn = await agent_proc.connect()
    yield conn
    await conn.close()
