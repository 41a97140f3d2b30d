"""One frozen configuration, from flags, then the environment, then defaults.

Every setting is a row of :data:`SETTINGS`; the CLI flags, the environment
names and ``docs/configuration.md`` all come from that table. An unknown
``CHATD_*`` environment variable is an error (a typo must not silently fall
back to a default); ``CHATD_TEST_*`` is left to the test suite.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatd.net.clientip import parse_networks


class ConfigError(Exception):
    """The configuration is invalid; the message says which setting and why."""


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    env: tuple[str, ...]
    help: str
    flag: bool = True  # also a command-line flag (secrets are environment-only)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "127.0.0.1", ("CHATD_HOST",), "Address both listeners bind to."),
    Setting(
        "http_port", int, 8080, ("CHATD_HTTP_PORT", "PORT"), "HTTP API port (0: any free port)."
    ),
    Setting(
        "ws_port", int, 8081, ("CHATD_WS_PORT",), "WebSocket port, path /ws (0: any free port)."
    ),
    Setting(
        "data_dir",
        Path,
        Path("chatd-data"),
        ("CHATD_DATA_DIR",),
        "Directory for the SQLite store and the generated secrets.",
    ),
    Setting(
        "node_id",
        str,
        "",
        ("CHATD_NODE_ID",),
        "This replica's name, shown in 'ready' (default: <hostname>-<http port>).",
    ),
    Setting(
        "store",
        str,
        "",
        ("CHATD_STORE",),
        "Store: sqlite or mongo (default: mongo when a Mongo URI is set, else sqlite).",
    ),
    Setting(
        "broker",
        str,
        "",
        ("CHATD_BROKER",),
        "Broker: memory or redis (default: redis when a Redis URL is set, else memory).",
    ),
    Setting(
        "redis_url", str, "", ("CHATD_REDIS_URL", "REDIS_URL"), "Redis URL for the redis broker."
    ),
    Setting(
        "redis_mode",
        str,
        "auto",
        ("CHATD_REDIS_MODE",),
        "auto, standalone, cluster or sentinel (auto: a redis+sentinel:// URL means"
        " sentinel, else ask the server).",
    ),
    Setting(
        "mongo_uri", str, "", ("CHATD_MONGO_URI", "MONGO_URI"), "MongoDB URI for the mongo store."
    ),
    Setting(
        "jwt_secret",
        str,
        "",
        ("CHATD_JWT_SECRET", "JWT_SECRET"),
        "HS256 secret for tokens (default: generated into the data dir).",
        flag=False,
    ),
    Setting("token_ttl", int, 3600, ("CHATD_TOKEN_TTL",), "Token lifetime in seconds."),
    Setting(
        "refresh_ttl",
        int,
        30 * 86_400,
        ("CHATD_REFRESH_TTL",),
        "Refresh-token lifetime in seconds (a family ends this long after its last use).",
    ),
    Setting(
        "edit_window",
        int,
        48 * 3600,
        ("CHATD_EDIT_WINDOW",),
        "How long (seconds) after sending a message its sender may edit it.",
    ),
    Setting(
        "keys",
        str,
        "",
        ("CHATD_KEYS",),
        "Encryption keyring 'kid:base64key,...' (default: the key file).",
        flag=False,
    ),
    Setting(
        "active_key",
        str,
        "",
        ("CHATD_ACTIVE_KEY",),
        "Key id that seals new messages (default: the keyring's own choice).",
        flag=False,
    ),
    Setting(
        "key_file",
        Path,
        None,
        ("CHATD_KEY_FILE",),
        "Keyring file (default: <data dir>/keys.json, created on first run).",
    ),
    Setting(
        "web_dir",
        Path,
        None,
        ("CHATD_WEB_DIR",),
        "Static web client served at / (default: the repository's web/).",
    ),
    Setting(
        "public_ws_url",
        str,
        "",
        ("CHATD_PUBLIC_WS_URL",),
        "WebSocket URL the web client uses, e.g. /ws behind a proxy (default: this host, ws port).",
    ),
    Setting(
        "allowed_origins",
        str,
        "",
        ("CHATD_ALLOWED_ORIGINS",),
        "More web origins whose pages may open a WebSocket, comma-separated"
        " (* for any); the page's own origin and this HTTP listener's always may.",
    ),
    Setting(
        "rate",
        float,
        30.0,
        ("CHATD_RATE",),
        "Sends per second per account, across its devices and replicas; also sends and"
        " typing frames per connection (0: unlimited).",
    ),
    Setting(
        "burst",
        float,
        60.0,
        ("CHATD_BURST",),
        "Frames an account (and a connection) may send at once.",
    ),
    Setting(
        "login_per_ip",
        float,
        30.0,
        ("CHATD_LOGIN_PER_IP",),
        "Login attempts per minute per client address, shared by the replicas (0: no limit).",
    ),
    Setting(
        "login_per_user",
        float,
        60.0,
        ("CHATD_LOGIN_PER_USER",),
        "Login attempts per minute per username, shared by the replicas (0: no limit).",
    ),
    Setting(
        "register_per_ip",
        float,
        10.0,
        ("CHATD_REGISTER_PER_IP",),
        "Registrations per minute per client address, shared by the replicas (0: no limit).",
    ),
    Setting(
        "max_sockets_per_user",
        int,
        10,
        ("CHATD_MAX_SOCKETS_PER_USER",),
        "Live WebSockets an account may hold, on all replicas together (0: no cap).",
    ),
    Setting(
        "max_sockets_per_ip",
        int,
        100,
        ("CHATD_MAX_SOCKETS_PER_IP",),
        "Live WebSockets per client address on one replica (0: no cap).",
    ),
    Setting(
        "outbox_kib",
        int,
        1024,
        ("CHATD_OUTBOX_KIB",),
        "KiB queued for one slow device before it is closed (4008; it loses nothing owed).",
    ),
    Setting(
        "outbox_total_mib",
        int,
        256,
        ("CHATD_OUTBOX_TOTAL_MIB",),
        "MiB queued for all slow devices together; past it the slowest are closed (0: none).",
    ),
    Setting(
        "socket_sndbuf_kib",
        int,
        0,
        ("CHATD_SOCKET_SNDBUF_KIB",),
        "Kernel send buffer per WebSocket in KiB (0: the kernel's autotuning, up to"
        " net.ipv4.tcp_wmem's max per socket).",
    ),
    Setting(
        "trusted_proxies",
        str,
        "",
        ("CHATD_TRUSTED_PROXIES",),
        "Addresses/networks of proxies whose X-Forwarded-For names the client (comma-separated).",
    ),
    Setting(
        "commit_window",
        float,
        5.0,
        ("CHATD_COMMIT_WINDOW",),
        "Milliseconds a store write waits for others to share its commit (0: none).",
    ),
    Setting(
        "resync_concurrency",
        int,
        8,
        ("CHATD_RESYNC_CONCURRENCY",),
        "Users whose owed items are re-read from the store at once after Redis lost live delivery.",
    ),
    Setting(
        "resync_jitter",
        float,
        1.0,
        ("CHATD_RESYNC_JITTER",),
        "Seconds (at most, at random) a resync waits first, so replicas do not all start at once.",
    ),
    Setting(
        "auth_timeout",
        float,
        10.0,
        ("CHATD_AUTH_TIMEOUT",),
        "Seconds a new WebSocket has to send 'auth'.",
    ),
    Setting(
        "shutdown_grace",
        float,
        5.0,
        ("CHATD_SHUTDOWN_GRACE",),
        "Seconds connections get to finish on SIGTERM/SIGINT.",
    ),
    Setting(
        "count_task_steps",
        int,
        0,
        ("CHATD_COUNT_TASK_STEPS",),
        "1: count trio task steps into chatd_task_steps_total (a benchmark measure; ~1% CPU).",
    ),
    Setting("log_level", str, "info", ("CHATD_LOG_LEVEL",), "debug, info, warning or error."),
    Setting("log_format", str, "json", ("CHATD_LOG_FORMAT",), "json (one object a line) or text."),
)

_BY_NAME = {s.name: s for s in SETTINGS}
_KNOWN_ENV = {name for s in SETTINGS for name in s.env if name.startswith("CHATD_")}
_LOG_LEVELS = ("debug", "info", "warning", "error")
#: chatd.broker.topology.Mode's values (a test keeps them equal).
REDIS_MODES = ("auto", "standalone", "cluster", "sentinel")


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    http_port: int = 8080
    ws_port: int = 8081
    data_dir: Path = Path("chatd-data")
    node_id: str = ""
    store: str = ""
    broker: str = ""
    redis_url: str = ""
    redis_mode: str = "auto"
    mongo_uri: str = ""
    jwt_secret: str = dataclasses.field(default="", repr=False)
    token_ttl: int = 3600
    refresh_ttl: int = 30 * 86_400
    edit_window: int = 48 * 3600
    keys: str = dataclasses.field(default="", repr=False)
    active_key: str = ""
    key_file: Path | None = None
    web_dir: Path | None = None
    public_ws_url: str = ""
    allowed_origins: str = ""
    rate: float = 30.0
    burst: float = 60.0
    login_per_ip: float = 30.0
    login_per_user: float = 60.0
    register_per_ip: float = 10.0
    max_sockets_per_user: int = 10
    max_sockets_per_ip: int = 100
    outbox_kib: int = 1024
    outbox_total_mib: int = 256
    socket_sndbuf_kib: int = 0
    trusted_proxies: str = ""
    commit_window: float = 5.0
    resync_concurrency: int = 8
    resync_jitter: float = 1.0
    auth_timeout: float = 10.0
    shutdown_grace: float = 5.0
    count_task_steps: int = 0
    log_level: str = "info"
    log_format: str = "json"

    @property
    def store_kind(self) -> str:
        return self.store or ("mongo" if self.mongo_uri else "sqlite")

    @property
    def broker_kind(self) -> str:
        return self.broker or ("redis" if self.redis_url else "memory")

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def node(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{self.http_port}"

    @property
    def key_path(self) -> Path:
        return self.key_file or self.data_dir / "keys.json"

    @property
    def secret_path(self) -> Path:
        return self.data_dir / "jwt.secret"


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    try:
        if setting.type is Path:
            return Path(raw) if str(raw) else None
        if setting.type is int:
            return int(raw)
        if setting.type is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{raw}' is not a valid {setting.type.__name__}") from None


def load(env: Mapping[str, str], flags: Mapping[str, Any] | None = None) -> Config:
    """Build the config: a flag beats the environment, which beats the default.

    Raises ConfigError for unknown CHATD_* variables, unknown flag names and
    invalid values.
    """
    flags = dict(flags or {})
    unknown_env = sorted(
        k
        for k in env
        if k.startswith("CHATD_") and not k.startswith("CHATD_TEST_") and k not in _KNOWN_ENV
    )
    if unknown_env:
        raise ConfigError(f"unknown setting(s) in the environment: {', '.join(unknown_env)}")
    unknown_flags = sorted(k for k in flags if k not in _BY_NAME)
    if unknown_flags:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown_flags)}")

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value = setting.default
        for name in reversed(setting.env):  # the first name listed wins
            if env.get(name, "") != "":
                value = _convert(setting, env[name], name)
        if flags.get(setting.name) is not None:
            value = _convert(setting, flags[setting.name], "--" + setting.name.replace("_", "-"))
        values[setting.name] = value
    config = Config(**values)
    validate(config)
    return config


def validate(config: Config) -> None:
    for name in ("http_port", "ws_port"):
        port = getattr(config, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name}: {port} is not a port number")
    if config.http_port and config.http_port == config.ws_port:
        raise ConfigError("http_port and ws_port must differ")
    if config.token_ttl < 10:
        raise ConfigError("token_ttl must be at least 10 seconds")
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
    if config.log_format not in ("json", "text"):
        raise ConfigError("log_format must be json or text")
    if config.rate < 0 or config.burst < 1:
        raise ConfigError("rate must be >= 0 and burst >= 1")
    if config.count_task_steps not in (0, 1):
        raise ConfigError("count_task_steps must be 0 or 1")
    if not 0 <= config.commit_window <= 1000:
        raise ConfigError("commit_window must be 0-1000 ms")
    for origin in config.origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"allowed_origins: {origin!r} is not an origin (https://host[:port])")
    try:
        parse_networks(config.trusted_proxies.split(","))
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from None
    if config.socket_sndbuf_kib < 0:
        raise ConfigError("socket_sndbuf_kib must be >= 0 (0: the kernel's autotuning)")
    if config.outbox_kib < 16 or config.outbox_total_mib < 0:
        raise ConfigError("outbox_kib must be >= 16 and outbox_total_mib >= 0")
    if config.max_sockets_per_user < 0 or config.max_sockets_per_ip < 0:
        raise ConfigError("socket caps must be >= 0 (0: no cap)")
    if min(config.login_per_ip, config.login_per_user, config.register_per_ip) < 0:
        raise ConfigError("login and register limits must be >= 0 (0: no limit)")
    if config.redis_mode not in REDIS_MODES:
        raise ConfigError(f"redis_mode must be one of {', '.join(REDIS_MODES)}")
    if config.resync_concurrency < 1 or not 0 <= config.resync_jitter <= 600:
        raise ConfigError("resync_concurrency must be >= 1 and resync_jitter 0-600 s")
    if config.edit_window < 0:
        raise ConfigError("edit_window must be >= 0 seconds (0: no edits)")
    if config.auth_timeout <= 0 or config.shutdown_grace < 0:
        raise ConfigError("auth_timeout must be > 0 and shutdown_grace >= 0")
    if config.jwt_secret and len(config.jwt_secret) < 16:
        raise ConfigError("JWT secret must be at least 16 characters")


#: The shortest JWT secret chatd serve accepts when replicas share it.
SHARED_SECRET_BYTES = 32


def require_shared_secrets(config: Config) -> None:
    """``chatd serve`` with a Redis broker or a MongoDB store runs beside
    other replicas, which must check each other's tokens and open each
    other's messages: a secret or keyring generated per replica would split
    logins and make stored bodies unreadable elsewhere. So those deployments
    must name both: a JWT secret of at least 32 bytes and a keyring
    (``CHATD_KEYS``, or ``--key-file`` on storage every replica shares).
    Raises ConfigError with one line that says what is missing."""
    if config.broker_kind != "redis" and config.store_kind != "mongo":
        return
    missing = []
    if len(config.jwt_secret.encode()) < SHARED_SECRET_BYTES:
        missing.append(f"CHATD_JWT_SECRET of at least {SHARED_SECRET_BYTES} bytes")
    if not config.keys and config.key_file is None:
        missing.append("CHATD_KEYS (or --key-file on storage every replica shares)")
    if missing:
        shared = " and ".join(
            w
            for w, used in (
                ("Redis", config.broker_kind == "redis"),
                ("MongoDB", config.store_kind == "mongo"),
            )
            if used
        )
        raise ConfigError(
            f"with {shared} every replica must share its secrets: set {' and '.join(missing)}"
        )


def settings_table() -> str:
    """The configuration table in Markdown (docs/configuration.md embeds it)."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-") if s.flag else "(environment only)"
        default = "" if s.default in (None, "") else str(s.default)
        env = ", ".join(f"`{e}`" for e in s.env)
        lines.append(f"| `{flag}` | {env} | {default or '—'} | {s.help} |")
    return "\n".join(lines)
