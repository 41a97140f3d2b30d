"""docker-compose.yml, Dockerfile, .dockerignore and .env.example, checked against the code.

No Docker engine runs here, so nothing is built or started: these tests read
the files and hold them to what chatd and the NGINX template actually read.
chatd's environment is run through ``chatd.config.load`` exactly as ``chatd
serve`` would (image ENV, then the service's environment, then the image's
CMD flags); NGINX's template is rendered the way the official image's
entrypoint does it and checked with a real ``nginx -t``.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd import config as chatd_config
from chatd import crypto
from harness.nginx import TEMPLATE, NginxProcess, nginx_binary
from harness.nginx import render as harness_render
from harness.procs import free_port

yaml = pytest.importorskip(
    "yaml", reason="PyYAML is missing: it belongs in setup.cfg's test extras"
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"

#: Every environment name chatd reads (``CHATD_*`` and the plain aliases).
CHATD_ENV = {name for s in chatd_config.SETTINGS for name in s.env}
DEFAULTS = {s.name: s.default for s in chatd_config.SETTINGS}
#: Environment the official nginx image sets itself (its entrypoint
#: substitutes every defined variable, these included).
NGINX_IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOSTNAME": "0123456789ab",
    "HOME": "/root",
    "NGINX_VERSION": "1.27.5",
    "NJS_VERSION": "0.8.10",
    "NJS_RELEASE": "1~bookworm",
    "PKG_RELEASE": "1~bookworm",
    "DYNPKG_RELEASE": "1~bookworm",
}


# --- reading the files ----------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def chatd_services() -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile: the chatd replicas."""
    out = {}
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build.get("context", ".")).resolve()
        dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
        if dockerfile == DOCKERFILE.resolve():
            out[name] = svc
    return out


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


_INTERP = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, $NAME, ${NAME}, ${NAME:-x}, ${NAME:?err} ..."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        is_set = name in env
        non_empty = is_set and env[name] != ""
        present = non_empty if op and op.startswith(":") else is_set
        if op in ("?", ":?"):
            if not present:
                raise LookupError(f"compose stops: {name}: {arg}")
            return env[name]
        if op in ("-", ":-"):
            return env[name] if present else arg
        if op in ("+", ":+"):
            return arg if present else ""
        return env.get(name, "")

    return _INTERP.sub(sub, value)


def interpolated_names(node: Any) -> dict[str, str]:
    """{NAME: operator} for every variable compose takes from the shell or .env."""
    found: dict[str, str] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            found |= interpolated_names(k) | interpolated_names(v)
    elif isinstance(node, list):
        for v in node:
            found |= interpolated_names(v)
    elif isinstance(node, str):
        for m in _INTERP.finditer(node):
            name = m.group("braced") or m.group("named")
            if name:
                found[name] = m.group("op") or ""
    return found


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            out[name.strip()] = value.strip()
    return out


def generate_dotenv() -> dict[str, str]:
    """What a filled-in .env holds: values made by the commands .env.example gives."""
    return {name: run_generator(command) for name, command in generator_commands().items()}


@functools.cache
def _sample_dotenv() -> tuple[tuple[str, str], ...]:
    return tuple(generate_dotenv().items())


def sample_dotenv() -> dict[str, str]:
    """One filled-in .env for the whole module."""
    return dict(_sample_dotenv())


def generator_commands() -> dict[str, str]:
    """{NAME: the `python3 -c ...` command .env.example gives to generate it}."""
    commands: dict[str, str] = {}
    pending: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text.startswith(("python3 -c", "python -c")):
                pending.append(text)
        elif "=" in stripped:
            name = stripped.split("=", 1)[0].strip()
            if pending:
                commands[name] = pending[-1]
            pending = []
    return commands


def run_generator(command: str) -> str:
    argv = shlex.split(command)
    assert argv[0] in ("python", "python3") and argv[1] == "-c", command
    out = subprocess.run(
        [sys.executable, *argv[1:]], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    instructions = dockerfile_instructions()
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            for token in shlex.split(args):
                name, sep, value = token.partition("=")
                assert sep, f"ENV {args}: use NAME=value"
                env[name] = value
    return env


def image_command(svc: dict[str, Any] | None = None) -> list[str]:
    """ENTRYPOINT + CMD (or the service's command override)."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for word, args in final_stage():
        if word == "ENTRYPOINT":
            entrypoint = exec_form(args)
        elif word == "CMD":
            cmd = exec_form(args)
    if svc is not None and "entrypoint" in svc:
        assert isinstance(svc["entrypoint"], list), "use a list for entrypoint"
        entrypoint = svc["entrypoint"]
    if svc is not None and "command" in svc:
        assert isinstance(svc["command"], list), "use a list for command"
        cmd = svc["command"]
    return entrypoint + cmd


def serve_flags(argv: list[str]) -> dict[str, str]:
    """The `chatd serve --name value` flags of a command line."""
    assert argv[:2] == ["chatd", "serve"], f"the container must run `chatd serve`: {argv}"
    flags: dict[str, str] = {}
    rest = argv[2:]
    while rest:
        opt = rest.pop(0)
        assert opt.startswith("--"), f"unexpected argument {opt!r} in {argv}"
        if "=" in opt:
            opt, value = opt.split("=", 1)
        else:
            value = rest.pop(0)
        flags[opt[2:].replace("-", "_")] = value
    return flags


def effective_config(
    svc: dict[str, Any], dotenv: dict[str, str] | None = None
) -> chatd_config.Config:
    """The configuration `chatd serve` builds inside that service's container."""
    env = image_env()
    dotenv = sample_dotenv() if dotenv is None else dotenv
    env.update({k: interpolate(v, dotenv) for k, v in environment(svc).items()})
    return chatd_config.load(env, serve_flags(image_command(svc)))


_UPSTREAM = re.compile(r"server\s+([^\s:;]+):(\d+)([^;]*);")


def upstreams(lines: str) -> list[tuple[str, int]]:
    found = [(host, int(port)) for host, port, _ in _UPSTREAM.findall(lines)]
    rest = _UPSTREAM.sub("", lines).strip()
    assert not rest, f"not a 'server host:port;' line: {rest!r}"
    return found


_IMAGE_SUBST = re.compile(r"\$(\{)?(\w*)(?(1)\})")


def render_like_the_nginx_image(template: str, env: dict[str, str]) -> str:
    """The official image's 20-envsubst-on-templates.sh: every *defined*
    variable, as $NAME or ${NAME}, is substituted; anything else stays."""
    return _IMAGE_SUBST.sub(lambda m: env.get(m.group(2), m.group(0)), template)


def nginx_env() -> dict[str, str]:
    return {k: interpolate(v, sample_dotenv()) for k, v in environment(services()["nginx"]).items()}


def parse_volume(spec: str | dict[str, Any]) -> tuple[str, str, bool]:
    """(source, target, read_only) of a short or long volume spec."""
    if isinstance(spec, dict):
        return spec.get("source", ""), spec["target"], bool(spec.get("read_only"))
    parts = spec.split(":")
    mode = parts[2] if len(parts) > 2 else ""
    return parts[0], parts[1], "ro" in mode.split(",")


def parse_volume_list(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return [parse_volume(v) for v in svc.get("volumes", [])]


# --- chatd replicas -------------------------------------------------------


def test_there_are_at_least_two_chatd_replicas():
    assert len(chatd_services()) >= 2, sorted(services())


@pytest.mark.parametrize("name", sorted(chatd_services()))
def test_chatd_services_set_only_settings_chatd_reads(name):
    svc = chatd_services()[name]
    unknown = sorted(set(environment(svc)) - CHATD_ENV)
    assert not unknown, f"{name} sets variables chatd does not read: {unknown}"
    # And the whole environment is accepted by chatd's own loader, values too.
    config = effective_config(svc)
    assert config.store_kind == "mongo" and config.broker_kind == "redis"
    assert config.host == "0.0.0.0", "NGINX reaches the replicas over the compose network"
    assert config.jwt_secret and config.keys, "secrets come from .env"


def test_image_env_sets_only_settings_chatd_reads():
    chatd_like = {k for k in image_env() if k.startswith("CHATD_")}
    assert chatd_like <= CHATD_ENV, sorted(chatd_like - CHATD_ENV)


def test_each_replica_has_its_own_node_id():
    ids = {name: environment(svc).get("CHATD_NODE_ID") for name, svc in chatd_services().items()}
    assert all(ids.values()), f"every replica names itself: {ids}"
    assert len(set(ids.values())) == len(ids), f"node ids must differ: {ids}"
    for name, svc in chatd_services().items():
        assert effective_config(svc).node == ids[name]


def test_replicas_share_secrets_from_dotenv():
    for var in ("JWT_SECRET", "CHATD_KEYS"):
        raw = {environment(svc).get(var) for svc in chatd_services().values()}
        assert len(raw) == 1, f"every replica must use the same {var}: {raw}"
        [value] = raw
        assert value and var in interpolated_names(value), f"{var} must come from .env: {value}"
    configs = [effective_config(s) for s in chatd_services().values()]
    assert len({(c.jwt_secret, c.keys) for c in configs}) == 1


def test_replicas_depend_on_the_redis_and_mongo_they_use():
    for name, svc in chatd_services().items():
        config = effective_config(svc)
        hosts = {
            re.match(r"^[a-z]+://(?:[^@/]*@)?([^:/]+)", url).group(1)
            for url in (config.redis_url, config.mongo_uri)
        }
        assert hosts <= set(services()), f"{name}: {hosts} are not services"
        assert hosts <= set(svc.get("depends_on") or {}), f"{name} must wait for {hosts}"


def test_public_ws_url_is_the_template_websocket_location():
    for name, svc in chatd_services().items():
        url = effective_config(svc).public_ws_url
        assert url, f"{name}: behind NGINX the page must use NGINX's WebSocket path"
        assert re.search(rf"location\s*=\s*{re.escape(url)}\s*\{{", TEMPLATE.read_text()), url


def test_compose_file_validates_against_the_compose_spec():
    """The closest thing to `docker compose config` without Docker: the
    compose-spec JSON schema, which check-jsonschema ships (no download)."""
    exe = shutil.which("check-jsonschema")
    if importlib.util.find_spec("check_jsonschema") is not None:
        cmd = [sys.executable, "-m", "check_jsonschema"]
    elif exe is not None:
        cmd = [exe]
    else:
        pytest.skip("check-jsonschema is not installed (it carries the compose-spec schema)")
    result = subprocess.run(
        [*cmd, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- NGINX ----------------------------------------------------------------


def test_nginx_variables_are_exactly_the_template_placeholders():
    placeholders = set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text()))
    assert set(environment(services()["nginx"])) == placeholders


def test_nginx_values_render_like_the_tested_harness():
    env = nginx_env()
    for name, value in environment(services()["nginx"]).items():
        assert "$" not in value, f"{name}: compose would interpolate '$' in {value!r}"
        # The template names its placeholders in # comments too: a value with a
        # line break would spill out of the comment into the configuration.
        assert "\n" not in value, f"{name}: keep it on one line"
    template = TEMPLATE.read_text()
    rendered = render_like_the_nginx_image(template, {**NGINX_IMAGE_ENV, **env})
    # Nothing but the ${...} placeholders was touched: NGINX's own $variables
    # (and any $NAME the image defines) came through unchanged.
    assert rendered == harness_render(template, env)
    assert not re.search(r"\$\{\w+\}", rendered)


def test_nginx_upstreams_name_each_replica_at_its_ports():
    env = nginx_env()
    replicas = chatd_services()
    for var, port_of in (
        ("CHATD_HTTP_UPSTREAMS", lambda c: c.http_port),
        ("CHATD_WS_UPSTREAMS", lambda c: c.ws_port),
    ):
        found = upstreams(env[var])
        hosts = [h for h, _ in found]
        assert sorted(hosts) == sorted(replicas), f"{var} must list every replica once: {hosts}"
        for host, port in found:
            assert port == port_of(effective_config(replicas[host])), (var, host, port)
    # The replicas keep chatd's defaults, which the image exposes.
    for name, svc in replicas.items():
        c = effective_config(svc)
        assert (c.http_port, c.ws_port) == (DEFAULTS["http_port"], DEFAULTS["ws_port"]), name


def test_nginx_renders_the_template_into_an_included_directory():
    nginx = services()["nginx"]
    assert str(nginx["image"]).split(":")[0] in ("nginx", "docker.io/library/nginx")
    vols = parse_volume_list(nginx)
    template_mounts = [
        (s, t) for s, t, ro in vols if (ROOT / s).resolve() == TEMPLATE.resolve() and ro
    ]
    assert template_mounts, "mount nginx/templates/chatd.conf.template read-only"
    [(_, target)] = template_mounts
    assert target.startswith("/etc/nginx/templates/") and target.endswith(".conf.template")
    # The image's default.conf also listens on 80: conf.d must be replaced.
    out_dir = environment(nginx).get("NGINX_ENVSUBST_OUTPUT_DIR", "/etc/nginx/conf.d")
    replaced = "/etc/nginx/conf.d" in (nginx.get("tmpfs") or []) or any(
        t == "/etc/nginx/conf.d" for _, t, _ in vols
    )
    assert out_dir == "/etc/nginx/conf.d" and replaced


def test_nginx_serves_the_mounted_web_client_and_publishes_its_port():
    nginx = services()["nginx"]
    env = environment(nginx)
    web = [
        (s, t)
        for s, t, ro in parse_volume_list(nginx)
        if t == env["CHATD_WEB_ROOT"] and ro and not s.startswith("/")
    ]
    assert web, f"CHATD_WEB_ROOT={env['CHATD_WEB_ROOT']} must be a read-only mount of web/"
    [(source, _)] = web
    assert (ROOT / source / "index.html").is_file()
    published = [str(p).rsplit(":", 1) for p in nginx.get("ports", [])]
    assert ["80", env["NGINX_PORT"]] in published, nginx.get("ports")


def test_nginx_depends_on_every_replica():
    assert set(services()["nginx"].get("depends_on") or {}) >= set(chatd_services())


def test_rendered_config_passes_nginx_t(tmp_path):
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (scripts/install-system-deps installs it)")
    env = nginx_env()
    # chatd1, chatd2 ... resolve only on the compose network: nginx -t looks
    # upstream hosts up, so each replica becomes a loopback address of its own.
    loopback = {name: f"127.0.0.{i}" for i, name in enumerate(sorted(chatd_services()), 1)}
    for var in ("CHATD_HTTP_UPSTREAMS", "CHATD_WS_UPSTREAMS"):
        env[var] = _UPSTREAM.sub(
            lambda m: f"server {loopback[m.group(1)]}:{m.group(2)}{m.group(3)};", env[var]
        )
    proc = NginxProcess(tmp_path, http_upstreams=[], ws_upstreams=[], extra=env)
    conf = proc.write_config()  # the harness's process wrapper (pid, logs, temp paths)
    rendered = render_like_the_nginx_image(TEMPLATE.read_text(), {**NGINX_IMAGE_ENV, **env})
    (tmp_path / "chatd.conf").write_text(rendered)
    assert f"listen {env['NGINX_PORT']};" in rendered
    check = subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# --- health gates ---------------------------------------------------------


def has_healthcheck(name: str) -> bool:
    svc = services()[name]
    check = svc.get("healthcheck")
    if check is not None:
        return not check.get("disable") and check.get("test") not in (None, ["NONE"])
    return name in chatd_services() and any(w == "HEALTHCHECK" for w, _ in final_stage())


def test_every_depends_on_waits_for_health():
    for name, svc in services().items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use depends_on with conditions"
        for dep, cond in deps.items():
            assert dep in services(), f"{name} depends on unknown {dep}"
            assert (cond or {}).get("condition") == "service_healthy", f"{name} -> {dep}"
            assert has_healthcheck(dep), f"{dep} has no health check to wait for"


def test_redis_and_mongo_have_health_checks_and_mongo_a_named_volume():
    svcs = services()
    assert str(svcs["redis"]["image"]).startswith("redis:7")
    assert str(svcs["mongo"]["image"]).startswith("mongo:7")
    assert has_healthcheck("redis") and has_healthcheck("mongo")
    named = set(compose().get("volumes") or {})
    mongo_vols = [(s, t) for s, t, _ in parse_volume_list(svcs["mongo"])]
    assert any(s in named and t == "/data/db" for s, t in mongo_vols), mongo_vols


# --- Dockerfile -----------------------------------------------------------


def test_dockerfile_base_user_and_command():
    stage = final_stage()
    instructions = dockerfile_instructions()
    args = {
        m.group(1): m.group(2)
        for w, a in instructions
        if w == "ARG" and (m := re.match(r"(\w+)=(\S+)", a))
    }
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
        for w, a in instructions
        if w == "FROM"
    ]
    assert bases and set(bases) == {"python:3.11-slim"}, bases
    users = [a for w, a in stage if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as a non-root user"
    flags = serve_flags(image_command())
    assert flags.get("host") == "0.0.0.0"
    volumes = [json.loads(a) for w, a in stage if w == "VOLUME"]
    assert [image_env()["CHATD_DATA_DIR"]] in volumes, "the data dir is a volume"
    copies = [a.split() for w, a in stage if w == "COPY" and not a.startswith("--")]
    assert ["web", image_env()["CHATD_WEB_DIR"]] in copies, "the web client is in the image"


def test_dockerfile_exposes_chatd_default_ports():
    exposed = {int(p.split("/")[0]) for w, a in final_stage() if w == "EXPOSE" for p in a.split()}
    assert exposed == {DEFAULTS["http_port"], DEFAULTS["ws_port"]}


def healthcheck_argv() -> list[str]:
    [args] = [a for w, a in final_stage() if w == "HEALTHCHECK"]
    _, _, cmd = args.partition("CMD ")
    return exec_form(cmd)


@pytest.fixture
def healthz_stub() -> Iterator[tuple[int, list[str]]]:
    """A local HTTP server answering /healthz; yields (port, paths requested)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(env: dict[str, str]) -> int:
    argv = healthcheck_argv()
    assert argv[0] == "python", "slim has python, not curl"
    return subprocess.run([sys.executable, *argv[1:]], env=env, timeout=20).returncode


def test_dockerfile_healthcheck_asks_healthz_on_the_http_port(healthz_stub):
    port, seen = healthz_stub
    code = " ".join(healthcheck_argv())
    assert f"'{DEFAULTS['http_port']}'" in code, "falls back to chatd's default HTTP port"
    assert run_healthcheck({"CHATD_HTTP_PORT": str(port)}) == 0
    assert seen == ["/healthz"]
    assert run_healthcheck({"PORT": str(port)}) == 0, "PORT is chatd's other name for it"
    assert run_healthcheck({"CHATD_HTTP_PORT": str(free_port())}) != 0, "down must fail"


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go filepath.Match plus '**')."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent
    directories decides; a '!' pattern re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_out_and_what_is_copied_in():
    for secret in (".env", ".venv/bin/python", ".git/config", "dist/chatd", "chatd-data/x"):
        assert dockerignored(secret), f"{secret} would be sent to the Docker daemon"
    assert dockerignored("chatd/__pycache__/config.cpython-311.pyc")
    for word, args in dockerfile_instructions():
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for src in sources:
                sample = next((ROOT / src).rglob("*.py"), None) if (ROOT / src).is_dir() else None
                rel = str(sample.relative_to(ROOT)) if sample else src
                assert not dockerignored(rel), f"COPY {src} but .dockerignore drops {rel}"


# --- .env -----------------------------------------------------------------


def test_env_example_names_exactly_what_compose_reads_from_dotenv():
    wanted = interpolated_names(compose())
    example = env_example()
    assert set(example) == set(wanted), f".env.example {sorted(example)} vs compose {wanted}"
    for name, op in wanted.items():
        assert op in (":?", "?"), f"{name}: compose must stop when .env lacks it"
        assert example[name] == "", f".env.example must not hold a real {name}"
    name, svc = next(iter(chatd_services().items()))
    with pytest.raises(LookupError):  # an unfilled .env stops compose
        effective_config(svc, dotenv=example)


def test_dotenv_is_git_ignored():
    result = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, timeout=10
    )
    if result.returncode == 128:
        pytest.skip("not a git work tree")
    assert result.returncode == 0, ".env must be git-ignored"


def test_env_example_generators_make_values_chatd_accepts(tmp_path):
    commands = generator_commands()
    assert set(commands) == set(env_example()), "give a command for every value"
    values = generate_dotenv()
    assert values != generate_dotenv(), "fresh random values each time"
    config = chatd_config.load(values)
    assert config.jwt_secret == values["JWT_SECRET"] and len(config.jwt_secret) >= 32
    ring = crypto.load_keyring(config.keys, None, tmp_path / "keys.json", create=False)
    assert set(ring.keys) == {"k1"} and ring.active == "k1"
