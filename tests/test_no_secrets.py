"""No secret is committed: the tracked tree holds no private key, no
keyring, no token and no filled-in secret setting (.env.example holds
placeholders only). The scanner is checked on planted secrets first."""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # kid:base64(32 bytes), the CHATD_KEYS form
    "keyring": re.compile(r"\bk\w*:[A-Za-z0-9+/]{43}="),
    "secret setting": re.compile(
        r"\b(?:CHATD_)?(?:JWT_SECRET|KEYS)\s*[=:]\s*['\"]?(?!\$\{)[A-Za-z0-9_\-+/=:]{16,}",
        re.IGNORECASE,
    ),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"),
    "AWS key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
}


def findings(text: str) -> list[str]:
    return [name for name, pattern in PATTERNS.items() if pattern.search(text)]


def tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


@pytest.mark.parametrize(
    "planted",
    [
        "-----BEGIN PRIVATE KEY-----\nMIIE...",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "CHATD_KEYS=k1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "JWT_SECRET=" + secrets.token_urlsafe(48),
        "jwt_secret: '" + secrets.token_urlsafe(24) + "'",
        "token = 'ghp_" + "a" * 36 + "'",
        "AKIA" + "ABCDEFGHIJKLMNOP",
    ],
)
def test_the_scanner_finds_planted_secrets(planted):
    assert findings(f"some text\n{planted}\nmore text")


def test_the_scanner_leaves_placeholders_alone():
    for text in (
        "JWT_SECRET=",
        "JWT_SECRET: ${JWT_SECRET:?set JWT_SECRET in .env}",
        'secret = "x" * 32',
        "CHATD_KEYS=k1:...,k2:...",
    ):
        assert findings(text) == [], text


def test_no_secret_in_the_tracked_tree():
    found = {}
    for path in tracked_files():
        if path == Path(__file__) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images
        if hits := findings(text):
            found[str(path.relative_to(ROOT))] = hits
    assert found == {}


def test_env_example_holds_placeholders_only():
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            assert value == "", f".env.example sets {name}"
