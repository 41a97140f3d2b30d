"""Thin I/O adapters: WebSocket (trio-websocket) and HTTP (Starlette on hypercorn)."""
