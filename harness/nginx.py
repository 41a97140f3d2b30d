"""Run a real ``nginx`` with the repository's own config, for tests.

The chatd part of the configuration is ``nginx/templates/chatd.conf.template``
exactly as shipped, rendered with local upstream ports; around it goes only
the process-level wrapper every nginx needs (pid file, error log and temp
paths in a scratch directory, foreground mode), which the Docker image
provides itself in production.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "nginx" / "templates" / "chatd.conf.template"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def requires_nginx():  # pragma: no cover - a marker factory
    """A pytest skip marker for tests that run a real nginx (make test installs it)."""
    import pytest

    return pytest.mark.skipif(
        nginx_binary() is None, reason="nginx is not installed (make test does)"
    )


def render(template: str, values: dict[str, str]) -> str:
    """Substitute ``${NAME}`` like envsubst; an unknown name is an error."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise KeyError(f"the nginx template needs {m.group(1)}")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, template)


def upstream_lines(addresses: list[str]) -> str:
    # Fail fast: a replica that refuses connections is skipped for 2 s.
    return "\n    ".join(f"server {a} max_fails=1 fail_timeout=2s;" for a in addresses)


_WRAPPER = """\
worker_processes 1;
daemon off;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    include {mime};
    default_type application/octet-stream;
    access_log {access_log};
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/chatd.conf;
}}
"""


@dataclass
class NginxProcess:
    workdir: Path
    http_upstreams: list[str]
    ws_upstreams: list[str]
    web_root: Path = ROOT / "web"
    port: int = 0
    proc: subprocess.Popen | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: Log every request to ``workdir/access.log`` (off: the benchmarks
    #: would pay for it).
    access_log: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def write_config(self) -> Path:
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        chatd_conf = render(
            TEMPLATE.read_text(),
            {
                "NGINX_PORT": f"127.0.0.1:{self.port}",
                "CHATD_HTTP_UPSTREAMS": upstream_lines(self.http_upstreams),
                "CHATD_WS_UPSTREAMS": upstream_lines(self.ws_upstreams),
                "CHATD_WEB_ROOT": str(self.web_root),
                **self.extra,
            },
        )
        (self.workdir / "chatd.conf").write_text(chatd_conf)
        mime = "/etc/nginx/mime.types"
        main = _WRAPPER.format(
            dir=self.workdir,
            mime=mime if os.path.exists(mime) else str(self.workdir / "chatd.conf"),
            user="user root;" if os.geteuid() == 0 else "",
            access_log=f"{self.workdir}/access.log" if self.access_log else "off",
        )
        path = self.workdir / "nginx.conf"
        path.write_text(main)
        return path

    def start(self) -> NginxProcess:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (make test installs it)")
        conf = self.write_config()
        check = subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "stderr.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                wait_http(self.url + "/healthz", 0.5, self.proc)
                return self
            except TimeoutError:
                continue
        raise TimeoutError("nginx did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def error_log(self) -> str:
        p = self.workdir / "error.log"
        return p.read_text() if p.exists() else ""
