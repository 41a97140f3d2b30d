"""The docs show what the code does: the configuration table is generated."""

from pathlib import Path

import pytest

from chatd.config import settings_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_settings_table_is_current(doc):
    text = (ROOT / doc).read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table().strip(), (
        f"{doc} is out of date: paste the output of `chatd config` between the markers"
    )


def test_every_wire_code_is_documented():
    from chatd.core.errors import WIRE_CODES

    protocol = (ROOT / "docs" / "protocol.md").read_text()
    for code in WIRE_CODES:
        assert f"`{code}`" in protocol, code
