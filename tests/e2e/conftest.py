import os
import uuid

import pytest

from harness.client import Api
from harness.procs import ChatdProcess, shared_secrets

MONGO_URL = os.environ.get("CHATD_TEST_MONGO_URL", "")

#: Every shared-server scenario runs once per store: SQLite (the embedded
#: default), MongoStore on mongomock (a real chatd process, but the database
#: is an in-process imitation — labelled so), and a real MongoDB when
#: CHATD_TEST_MONGO_URL is set.
STORES = [
    pytest.param("sqlite"),
    pytest.param("mongomock", marks=pytest.mark.mongomock),
    pytest.param(
        "mongo",
        marks=pytest.mark.skipif(
            not MONGO_URL, reason="set CHATD_TEST_MONGO_URL for a real MongoDB"
        ),
    ),
]


@pytest.fixture(scope="module", params=STORES)
def server(request, tmp_path_factory):
    """One real `chatd serve` for the module (tests use their own usernames)."""
    data = tmp_path_factory.mktemp("chatd")
    if request.param == "sqlite":
        proc = ChatdProcess(data)
    elif request.param == "mongomock":
        proc = ChatdProcess(
            data,
            module="harness.mongomock_serve",
            args=["--store", "mongo"],
            env=shared_secrets(data),
        )
    else:
        db = f"chatd_e2e_{uuid.uuid4().hex[:12]}"
        base = MONGO_URL.rstrip("/")
        proc = ChatdProcess(
            data, args=["--store", "mongo", "--mongo-uri", f"{base}/{db}"], env=shared_secrets(data)
        )
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, proc.logs()[-4000:]


@pytest.fixture
async def api(server):
    client = Api(server.http_url)
    yield client
    await client.aclose()
