"""Thin I/O adapters: WebSocket (our own, on trio sockets) and HTTP (Starlette on hypercorn)."""
