"""The device directory's registration rule: ids, key sizes, the self-signature."""

import pytest

from chatd.core.devices import check_registration
from chatd.core.errors import BadRequest
from harness.e2e_keys import KeyedDevice, b64url


def test_a_self_signed_registration_passes():
    d = KeyedDevice("alice", device="laptop-0001")
    reg = check_registration("alice", d.device, d.registration())
    assert (reg.device, reg.sig_key, reg.dh_key) == ("laptop-0001", d.sig_key, d.dh_key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(self_sig=b64url(bytes(64))), "does not verify"),
        (lambda b: b.update(dh_key=KeyedDevice("x").dh_key), "does not verify"),
        (lambda b: b.update(sig_key=b64url(bytes(31))), "bytes"),
        (lambda b: b.update(dh_key="not base64!"), "base64url"),
        (lambda b: b.pop("self_sig"), "base64url"),
        (lambda b: b.update(name="x" * 65), "name"),
        (lambda b: b.update(name="tab\there"), "name"),
    ],
)
def test_bad_registrations_are_refused(change, message):
    d = KeyedDevice("alice", device="laptop-0001")
    body = d.registration()
    change(body)
    with pytest.raises(BadRequest, match=message):
        check_registration("alice", d.device, body)


def test_the_signature_binds_the_user_and_the_device():
    d = KeyedDevice("alice", device="laptop-0001")
    body = d.registration()
    with pytest.raises(BadRequest, match="does not verify"):
        check_registration("mallory", d.device, body)
    with pytest.raises(BadRequest, match="does not verify"):
        check_registration("alice", "laptop-0002", body)


@pytest.mark.parametrize("device", ["short", "x" * 65, "has space1", "dot.ted.id", 7, None])
def test_device_ids(device):
    with pytest.raises(BadRequest, match="device id"):
        check_registration("alice", device, KeyedDevice("alice").registration())
