"""The listener's pure decisions (chatd.net.ws_listen), without sockets."""

import errno

import pytest

from chatd.net.ws_listen import AddressCap, on_accept_error


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (errno.EMFILE, "pause"),
        (errno.ENFILE, "pause"),
        (errno.ENOMEM, "pause"),
        (errno.ENOBUFS, "pause"),
        (errno.ECONNABORTED, "skip"),
        (errno.EPROTO, "skip"),
        (errno.EPERM, "skip"),
        (errno.EBADF, "raise"),
        (errno.EINVAL, "raise"),
        (None, "raise"),
    ],
)
def test_on_accept_error(code, action):
    assert on_accept_error(code) == action


#: (per_ip, steps, live after): a step is ("admit", address, admitted) or
#: ("leave", address, None).
CAP_CASES = [
    (0, [("admit", "a", True)] * 5, {"a": 5}),
    (2, [("admit", "a", True), ("admit", "a", True), ("admit", "a", False)], {"a": 2}),
    (1, [("admit", "a", True), ("admit", "b", True), ("admit", "b", False)], {"a": 1, "b": 1}),
    (1, [("admit", "a", True), ("leave", "a", None), ("admit", "a", True)], {"a": 1}),
    (2, [("admit", "a", True), ("admit", "a", True), ("leave", "a", None)], {"a": 1}),
    # The last one to leave takes its address out; a stray leave is harmless.
    (2, [("admit", "a", True), ("leave", "a", None)], {}),
    (2, [("leave", "a", None)], {}),
]


@pytest.mark.parametrize(("per_ip", "steps", "live"), CAP_CASES)
def test_address_cap(per_ip, steps, live):
    cap = AddressCap(per_ip)
    for step, address, admitted in steps:
        if step == "admit":
            assert cap.admit(address) is admitted
        else:
            cap.leave(address)
    assert cap.live == live
