import pytest

from chatd.testing.client import Api
from chatd.testing.procs import ChatdProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real `chatd serve` for the module (tests use their own usernames)."""
    proc = ChatdProcess(tmp_path_factory.mktemp("chatd")).start()
    yield proc
    code = proc.stop()
    assert code == 0, proc.logs()[-4000:]


@pytest.fixture
async def api(server):
    client = Api(server.http_url)
    yield client
    await client.aclose()
