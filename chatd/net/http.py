"""The HTTP adapter: a small Starlette app served by hypercorn's trio worker.

Every route is a thin shell: read the request, call the service, shape the
JSON. Every error, including unknown routes and wrong methods, answers
``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from chatd import __version__
from chatd.core.errors import HTTP_CODES, BadRequest, ChatError, TooLarge, Unauthorized
from chatd.core.model import Conversation, GroupAction
from chatd.net.clientip import Network, client_ip
from chatd.service import ChatService

log = logging.getLogger("chatd.http")

MAX_BODY = 64 * 1024


def error_response(status: int, code: str, message: str, **extra: object) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"code": code, "message": message, **extra}
    return JSONResponse({"error": body}, status, headers=headers)


async def _chat_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ChatError):  # Starlette routes only ChatErrors here
        raise TypeError(f"not a ChatError: {exc!r}")
    response = error_response(exc.http_status, exc.code, exc.message, **exc.extra)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):
        raise TypeError(f"not an HTTPException: {exc!r}")
    code = HTTP_CODES.get(exc.status_code, "internal" if exc.status_code >= 500 else "bad_request")
    response = error_response(exc.status_code, code, str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


async def _crash(request: Request, exc: Exception) -> Response:
    log.error("request failed", exc_info=exc, extra={"path": request.url.path})
    return error_response(500, "internal", "internal error")


async def _json(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise TooLarge(f"request body is over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise TooLarge(f"request body is over {MAX_BODY} bytes")
    try:
        obj = json.loads(body)
    except ValueError:
        raise BadRequest("request body must be JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"'{name}' must be an integer") from None


def _conversation_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "kind": conv.kind,
        "members": list(conv.members),
        "title": conv.title,
        "admins": list(conv.admins),
        "e2e": conv.e2e,
    }


def create_app(
    service: ChatService,
    *,
    web_dir: Path | None,
    http_port: int,
    ws_port: int,
    public_ws_url: str | None = None,
    trusted_proxies: tuple[Network, ...] = (),
) -> SecurityHeaders:
    async def caller(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token")
        return (await service.authenticate(token.strip())).user

    def bearer(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token")
        return token.strip()

    async def logout(request: Request) -> Response:
        await service.logout(bearer(request))
        return Response(status_code=204)

    def address(request: Request) -> str:
        peer = request.client.host if request.client is not None else ""
        return client_ip(peer, request.headers.get("x-forwarded-for"), trusted_proxies)

    async def register(request: Request) -> Response:
        body = await _json(request)
        await service.limit("register", address(request), None)
        name = await service.register(body.get("username"), body.get("password"))
        return JSONResponse({"username": name}, 201)

    async def login(request: Request) -> Response:
        body = await _json(request)
        username = body.get("username")
        await service.limit("login", address(request), username)
        token, ttl, refresh = await service.login(username, body.get("password"))
        return JSONResponse({"token": token, "expires_in": ttl, "refresh_token": refresh})

    async def refresh(request: Request) -> Response:
        body = await _json(request)
        token, ttl, refresh_token = await service.refresh(body.get("refresh_token"))
        return JSONResponse({"token": token, "expires_in": ttl, "refresh_token": refresh_token})

    async def conversations(request: Request) -> Response:
        user = await caller(request)
        if request.method == "POST":
            body = await _json(request)
            if "to" in body:
                # A one-to-one conversation: made (or found) now; it becomes
                # end-to-end at its first end-to-end message.
                if body.get("e2e") not in (None, False) or "members" in body:
                    raise BadRequest(
                        "'to' goes alone: a one-to-one conversation becomes end-to-end"
                        " at its first end-to-end message"
                    )
                conv = await service.open_dm(user, body["to"])
                return JSONResponse(_conversation_json(conv))
            conv = await service.create_group(
                user, body.get("members"), body.get("title"), body.get("e2e", False)
            )
            return JSONResponse(_conversation_json(conv), 201)
        return JSONResponse({"conversations": await service.conversations(user)})

    async def conversation(request: Request) -> Response:
        """PATCH {title}: rename a group."""
        user = await caller(request)
        body = await _json(request)
        if "title" not in body:
            raise BadRequest("'title' is required (null clears it)")
        return JSONResponse(
            await service.change_group(
                user, request.path_params["id"], GroupAction.RENAME, title=body["title"]
            )
        )

    async def add_members(request: Request) -> Response:
        """POST {members}: add members (POST .../admins: make admins)."""
        user = await caller(request)
        body = await _json(request)
        action = GroupAction.PROMOTE if request.url.path.endswith("/admins") else GroupAction.ADD
        return JSONResponse(
            await service.change_group(
                user, request.path_params["id"], action, users=body.get("members")
            )
        )

    async def remove_member(request: Request) -> Response:
        """DELETE .../members/{name}: remove a member, or leave (your own
        name); DELETE .../admins/{name}: unmake an admin."""
        user = await caller(request)
        name = request.path_params["name"]
        id = request.path_params["id"]
        if "/admins/" in request.url.path:
            return JSONResponse(await service.change_group(user, id, GroupAction.DEMOTE, [name]))
        if name.lower() == user:
            return JSONResponse(await service.change_group(user, id, GroupAction.LEAVE))
        return JSONResponse(await service.change_group(user, id, GroupAction.REMOVE, [name]))

    async def messages(request: Request) -> Response:
        user = await caller(request)
        out = await service.history(
            user,
            request.path_params["id"],
            _int_param(request, "before"),
            _int_param(request, "limit"),
        )
        return JSONResponse({"messages": out})

    async def e2e_device(request: Request) -> Response:
        """PUT: register one of the caller's devices; DELETE: remove it."""
        user = await caller(request)
        device = request.path_params["device"]
        if request.method == "DELETE":
            await service.remove_device(user, device)
            return Response(status_code=204)
        created = await service.register_device(user, device, await _json(request))
        return JSONResponse({"device": device}, 201 if created else 200)

    async def e2e_epoch(request: Request) -> Response:
        """PUT {device, shares}: an epoch's key sealed to devices (in chunks)."""
        user = await caller(request)
        created = await service.put_epoch(
            user,
            request.path_params["id"],
            request.path_params["epoch"],
            await _json(request),
        )
        return JSONResponse({"epoch": request.path_params["epoch"]}, 201 if created else 200)

    async def e2e_shares(request: Request) -> Response:
        """GET ?epochs=a,b: the shares addressed to the caller's devices."""
        user = await caller(request)
        return JSONResponse(
            await service.epoch_shares(
                user, request.path_params["id"], request.query_params.get("epochs")
            )
        )

    async def user_devices(request: Request) -> Response:
        user = await caller(request)
        return JSONResponse(await service.user_devices(user, request.path_params["name"]))

    async def user_info(request: Request) -> Response:
        user = await caller(request)
        return JSONResponse(await service.user_info(user, request.path_params["name"]))

    async def info(request: Request) -> Response:
        # How the web client finds the WebSocket: ``ws_url`` when the operator
        # set one (behind a proxy: "/ws"); otherwise the page compares its own
        # port with ``http_port`` to tell a direct visit from a proxied one.
        return JSONResponse(
            {
                "node": service.node,
                "version": __version__,
                "http_port": http_port,
                "ws_port": ws_port,
                "ws_path": "/ws",
                "ws_url": public_ws_url or None,
                "edit_window": service.edit_window_ms // 1000,
            }
        )

    async def metrics(request: Request) -> Response:
        # Prometheus text format; unauthenticated like /healthz (the NGINX
        # config in nginx/ does not expose it: scrape the replicas directly).
        if not service.metrics.enabled:
            return error_response(503, "unavailable", "metrics need the prometheus-client package")
        body, content_type = await service.metrics_text()
        return Response(body, 200, headers={"Content-Type": content_type})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": service.node})

    async def readyz(request: Request) -> Response:
        ready = await service.readiness()
        if ready.ok:
            return JSONResponse({"status": "ready", "checks": ready.checks})
        failing = ", ".join(f"{k} {v}" for k, v in ready.checks.items() if v != "ok")
        return JSONResponse(
            {
                "error": {"code": "unavailable", "message": f"not ready: {failing}"},
                "status": "unavailable",
                "checks": ready.checks,
            },
            503,
        )

    # Everything under /api is answered by the API (JSON errors, 405 with
    # Allow), never by the static web client mounted at /.
    api = Mount(
        "/api",
        routes=[
            Route("/register", register, methods=["POST"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/refresh", refresh, methods=["POST"]),
            Route("/conversations", conversations, methods=["GET", "POST"]),
            Route("/conversations/{id}/messages", messages, methods=["GET"]),
            Route("/conversations/{id}", conversation, methods=["PATCH"]),
            Route("/conversations/{id}/members", add_members, methods=["POST"]),
            Route("/conversations/{id}/members/{name}", remove_member, methods=["DELETE"]),
            Route("/conversations/{id}/admins", add_members, methods=["POST"]),
            Route("/conversations/{id}/admins/{name}", remove_member, methods=["DELETE"]),
            Route("/conversations/{id}/e2e/epochs/{epoch}", e2e_epoch, methods=["PUT"]),
            Route("/conversations/{id}/e2e/shares", e2e_shares, methods=["GET"]),
            Route("/users/{name}", user_info, methods=["GET"]),
            Route("/users/{name}/devices", user_devices, methods=["GET"]),
            Route("/e2e/devices/{device}", e2e_device, methods=["PUT", "DELETE"]),
            Route("/info", info, methods=["GET"]),
        ],
    )
    routes: list[Any] = [
        api,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if web_dir is not None and (web_dir / "index.html").is_file():
        routes.append(Mount("/", StaticFiles(directory=web_dir, html=True), name="web"))

    def counted(handler: Any) -> Any:
        async def answer(request: Request, exc: Exception) -> Response:
            response = await handler(request, exc)
            code = HTTP_CODES.get(response.status_code, "internal")
            service.metrics.http_error(code)
            return response

        return answer

    app = Starlette(
        routes=routes,
        exception_handlers={
            ChatError: counted(_chat_error),
            HTTPException: counted(_http_error),
            Exception: counted(_crash),
        },
    )
    return SecurityHeaders(app, ws_port=ws_port, public_ws_url=public_ws_url)


def content_security_policy(
    host: str | None, ws_port: int | None, public_ws_url: str | None
) -> str:
    """The page may run only its own scripts and styles (no inline script),
    load images from itself, connect only to itself and to its WebSocket
    (``public_ws_url`` when absolute; else this host's WebSocket port), and
    be framed by nobody."""
    connect = ["'self'"]
    if public_ws_url and public_ws_url.startswith(("ws://", "wss://")):
        scheme, _, rest = public_ws_url.partition("://")
        connect.append(f"{scheme}://{rest.split('/', 1)[0]}")
    elif not public_ws_url and host and ws_port:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host.count(":") > 1 and not host.startswith("["):
            name = f"[{host}]"  # a bare IPv6 address
        connect += [f"ws://{name}:{ws_port}", f"wss://{name}:{ws_port}"]
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {' '.join(connect)}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders:
    """ASGI middleware: every response carries the Content-Security-Policy
    (see :func:`content_security_policy`), ``X-Content-Type-Options:
    nosniff``, ``Referrer-Policy: same-origin`` and ``X-Frame-Options: DENY``
    (for browsers without ``frame-ancestors``)."""

    def __init__(self, app: Any, *, ws_port: int | None, public_ws_url: str | None) -> None:
        self.app = app
        self.ws_port = ws_port
        self.public_ws_url = public_ws_url

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        extra = [
            (
                b"content-security-policy",
                content_security_policy(host, self.ws_port, self.public_ws_url).encode(),
            ),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"x-frame-options", b"DENY"),
        ]

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
