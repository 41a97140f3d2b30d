"""The HTTP API's answers and errors."""

import pytest

pytestmark = pytest.mark.e2e


async def test_register_and_login(api, names):
    name = names("Dave")
    status, body = await api.register(name, "long enough")
    assert (status, body) == (201, {"username": name.lower()})
    status, body = await api.register(name.lower(), "long enough")
    assert status == 409 and body["error"]["code"] == "conflict"
    status, body = await api.call(
        "POST", "/api/login", json={"username": name, "password": "long enough"}
    )
    assert status == 200 and body["expires_in"] == 3600 and body["token"].count(".") == 2
    for creds in (
        {"username": name, "password": "wrong pass"},
        {"username": names("ghost"), "password": "long enough"},
        {"username": "!!", "password": "long enough"},
    ):
        status, body = await api.call("POST", "/api/login", json=creds)
        assert status == 401 and body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "body",
    [
        {"username": "ab", "password": "long enough"},
        {"username": "bad name", "password": "long enough"},
        {"username": "fine_name", "password": "short"},
        {"username": "fine_name"},
        {"password": "long enough"},
        {"username": 5, "password": "long enough"},
    ],
)
async def test_register_validation(api, body):
    status, resp = await api.call("POST", "/api/register", json=body)
    assert status == 400 and resp["error"]["code"] == "bad_request" and resp["error"]["message"]


async def test_errors_are_json_everywhere(api):
    for method, path, kwargs, status_expected in [
        ("POST", "/api/register", {"content": b"{not json"}, 400),
        ("POST", "/api/register", {"content": b"[1]"}, 400),
        ("POST", "/api/register", {"content": b"x" * 70_000}, 413),
        ("GET", "/api/nothing-here", {}, 404),
        ("DELETE", "/api/register", {}, 405),
        ("GET", "/api/conversations", {}, 401),
        ("GET", "/api/conversations", {"headers": {"Authorization": "Bearer nope"}}, 401),
        ("GET", "/api/conversations", {"headers": {"Authorization": "Basic x"}}, 401),
    ]:
        status, body = await api.call(method, path, **kwargs)
        assert status == status_expected, (path, body)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body


async def test_create_group_errors(api, names):
    token = await api.user(names("gina"))
    other = names("otto")
    await api.user(other)
    for body, status_expected in [
        ({"members": [], "title": "x"}, 400),
        ({"members": "otto", "title": "x"}, 400),
        ({"members": ["bad name"], "title": "x"}, 400),
        ({"members": [other], "title": 5}, 400),
        ({"members": [other], "title": "t" * 101}, 400),
        ({"members": [names("nobody")], "title": "x"}, 404),
    ]:
        status, resp = await api.call("POST", "/api/conversations", token, json=body)
        assert status == status_expected, (body, resp)
    status, resp = await api.call("POST", "/api/conversations", token, json={"members": [other]})
    assert status == 201 and resp["id"].startswith("g:") and resp["title"] is None


async def test_health_and_readiness(api):
    status, body = await api.call("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    status, body = await api.call("GET", "/readyz")
    assert status == 200 and body["checks"] == {"store": "ok", "broker": "ok"}
    status, body = await api.call("GET", "/api/info")
    assert status == 200 and body["ws_path"] == "/ws" and body["ws_port"] > 0
    assert body["edit_window"] == 48 * 3600  # the default of --edit-window


async def test_api_errors_even_with_the_web_client_served(api, server):
    """The web client is mounted at /, but /api/* is always the API."""
    for method, path, expected in [
        ("GET", "/api/login", 405),
        ("DELETE", "/api/conversations", 405),
        ("POST", "/api/no/such/thing", 404),
        ("GET", "/api/nope", 404),
    ]:
        status, body = await api.call(method, path)
        assert status == expected, (method, path, body)
        assert set(body) == {"error"}
    resp = await api.http.request("GET", "/api/login")
    assert resp.headers["allow"] == "POST"


async def test_login_with_non_strings_is_401(api):
    for body in ({"username": 5, "password": "x" * 9}, {"username": "abc"}, {}):
        status, resp = await api.call("POST", "/api/login", json=body)
        assert status == 401 and resp["error"]["code"] == "unauthorized"
