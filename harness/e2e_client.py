"""An end-to-end device for tests and the load suite: the client's half of
issue 12 in Python (the web client's is ``web/js/e2e.js``).

:class:`E2EDevice` keeps what a device keeps (its keys, its epochs per
conversation, the epoch keys it opened, the device lists it fetched) and
does the pure work: plan an epoch's shares, encrypt, read a message.

The procedures that need the server (register the device, make and upload
an epoch, seal a send again after ``e2e_stale``, fetch what reading a
message needs) are said once, sans-I/O: generators that yield each
:class:`Request` and are sent its ``(status, body)``. The caller makes the
calls: :class:`AsyncE2E` for the tests (trio), :func:`run_steps` with the
Locust user's own session (``loadtest/locustfile.py``, gevent), so both
take the same steps and speak the same bytes (``docs/e2e-crypto.md``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chatd.core.e2e import MAX_SHARES_PER_PUT
from harness import e2e_crypto as ec
from harness.e2e_keys import KeyedDevice

#: Shares per ``PUT .../e2e/epochs/{epoch}`` (the server takes at most 256).
SHARES_PER_PUT = MAX_SHARES_PER_PUT
#: Rotation: a sending device starts a new epoch after this many messages.
MESSAGES_PER_EPOCH = 100
EPOCH_MAX_AGE_S = 7 * 24 * 3600


def _sender(frame: dict[str, Any]) -> str:
    """Who wrote a ``message`` frame or history item (``from``) or an edit (``by``)."""
    return frame.get("from") or frame.get("by") or ""


@dataclass
class Epoch:
    """This device's current epoch in one conversation."""

    id: str
    key: bytes
    count: int = 0
    created: float = field(default_factory=time.time)

    def due(self) -> bool:
        return self.count >= MESSAGES_PER_EPOCH or time.time() - self.created > EPOCH_MAX_AGE_S


@dataclass
class E2EDevice:
    username: str
    keys: KeyedDevice = field(default=None)  # type: ignore[assignment]
    #: conversation -> this device's current epoch there.
    epochs: dict[str, Epoch] = field(default_factory=dict)
    #: (conversation, epoch) -> key: opened shares and this device's own.
    known: dict[tuple[str, str], bytes] = field(default_factory=dict)
    #: username -> their device list as the server gave it.
    directory: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    guard: ec.ReplayGuard = field(default_factory=ec.ReplayGuard)

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = KeyedDevice(self.username)

    @property
    def device(self) -> str:
        return self.keys.device

    def plan_epoch(
        self, conversation: str, devices: Mapping[str, list[dict[str, Any]]]
    ) -> tuple[str, list[dict[str, Any]]]:
        """A new epoch for ``conversation`` sealed to every active device in
        ``devices`` (member -> device list) but this one; (epoch id, the PUT
        bodies, in chunks). It becomes current once the caller stored them."""
        epoch_id, key = ec.new_epoch_id(), ec.new_epoch_key()
        shares = {
            d["device"]: ec.seal_share(
                d["dh_key"],
                conversation=conversation,
                epoch=epoch_id,
                sender=self.username,
                sender_device=self.device,
                recipient_device=d["device"],
                epoch_key=key,
            )
            for member_devices in devices.values()
            for d in member_devices
            if d.get("removed_ts") is None and d["device"] != self.device
        }
        items = sorted(shares.items())
        bodies = [
            {"device": self.device, "shares": dict(items[i : i + SHARES_PER_PUT])}
            for i in range(0, max(len(items), 1), SHARES_PER_PUT)
        ]
        self.known[(conversation, epoch_id)] = key
        return epoch_id, bodies

    def use_epoch(self, conversation: str, epoch_id: str) -> None:
        """The planned epoch was stored: send under it from now on."""
        self.epochs[conversation] = Epoch(epoch_id, self.known[(conversation, epoch_id)])

    def encrypt(self, conversation: str, body: str, *, edit_of: str | None = None) -> dict:
        """The ``e2e`` object of a message (or an edit of ``edit_of``) under
        the current epoch of ``conversation`` (KeyError if there is none)."""
        epoch = self.epochs[conversation]
        epoch.count += 1
        plaintext = (
            {"t": "edit", "id": edit_of, "body": body} if edit_of else {"t": "msg", "body": body}
        )
        return ec.encrypt(
            epoch.key,
            self.keys.sign,
            conversation=conversation,
            sender=self.username,
            device=self.device,
            epoch=epoch.id,
            plaintext=plaintext,
        )

    def epochs_to_fetch(self, frames: list[dict[str, Any]]) -> list[str]:
        """The epochs of these ``message`` frames whose key this device lacks."""
        need = {
            f["e2e"]["epoch"]
            for f in frames
            if "e2e" in f and (f["conversation"], f["e2e"]["epoch"]) not in self.known
        }
        return sorted(need)

    def take_shares(self, conversation: str, shares: list[dict[str, Any]]) -> None:
        """Open the shares ``GET .../e2e/shares`` returned for this device
        (a share that does not open is left out: its messages say so)."""
        for s in shares:
            if s["to"] != self.device:
                continue
            try:
                self.known[(conversation, s["epoch"])] = ec.open_share(
                    self.keys.dh,
                    s["share"],
                    conversation=conversation,
                    epoch=s["epoch"],
                    sender=s["sender"],
                    sender_device=s["device"],
                    recipient_device=self.device,
                )
            except ec.DecryptError:
                pass

    def read(self, frame: dict[str, Any], *, edit_of: str | None = None) -> str:
        """The body of a ``message`` (or ``edited``) frame or history item
        carrying ``e2e``: raises DecryptError with the reason it cannot be
        shown. The sender's device list must be in :attr:`directory`."""
        e2e, conversation, sender = frame["e2e"], frame["conversation"], _sender(frame)
        sig_key = next(
            (
                d["sig_key"]
                for d in self.directory.get(sender, [])
                if d["device"] == e2e.get("device")
            ),
            None,
        )
        key = self.known.get((conversation, str(e2e.get("epoch"))))
        # None for either: decrypt reports it in the spec's order.
        plaintext = ec.decrypt(key, sig_key, e2e, conversation=conversation, sender=sender)
        if edit_of is None and frame.get("edited_ts") is not None and plaintext.get("t") == "edit":
            # An edited message's latest version is its last edit's object.
            edit_of = frame["id"]
        body = ec.check_kind(plaintext, edit_of=edit_of)
        if edit_of is None:
            self.guard.check(e2e["device"], e2e["epoch"], e2e["iv"], frame["id"])
        return body


# -- the procedures: sans-I/O, so that trio (AsyncE2E) and gevent (the
# Locust user's session) run the same steps ------------------------------------------


@dataclass(frozen=True)
class Request:
    """One HTTP call a procedure needs; the caller makes it (with its
    token) and sends the procedure back ``(status, body)``."""

    method: str
    path: str
    #: The route, its variable parts as ``[name]``: what Locust's stats group by.
    name: str
    json: Any = None


T = TypeVar("T")
#: A procedure: yields the calls it needs, is sent each one's ``(status,
#: body)``, returns its result. Run it with :func:`run_steps` or :meth:`AsyncE2E.run`.
Steps = Generator[Request, tuple[int, Any], T]


def _request(method: str, route: str, json: Any = None, **parts: str) -> Request:
    name = re.sub(r"\{(\w+)\}", r"[\1]", route.partition("?")[0])
    return Request(method, route.format(**parts), name, json)


def _expect(status: int, body: Any, ok: tuple[int, ...], what: str) -> None:
    if status not in ok:
        raise AssertionError(f"{what}: {status} {body}")


def register_steps(dev: E2EDevice) -> Steps[None]:
    """Register the device's keys in the directory."""
    put = _request("PUT", "/api/e2e/devices/{device}", dev.keys.registration(), device=dev.device)
    status, body = yield put
    _expect(status, body, (200, 201), "device registration")


def devices_steps(dev: E2EDevice, user: str) -> Steps[list[dict[str, Any]]]:
    """Fetch ``user``'s device list into the device's :attr:`~E2EDevice.directory`."""
    status, body = yield _request("GET", "/api/users/{name}/devices", name=user)
    _expect(status, body, (200,), f"devices of {user}")
    dev.directory[user] = body["devices"]
    return body["devices"]


def new_epoch_steps(dev: E2EDevice, conversation: str, members: list[str]) -> Steps[str]:
    """Make, upload and use a new epoch for ``conversation``: its key
    sealed to every device of ``members`` (this device's user among them)."""
    devices = {}
    for member in members:
        devices[member] = yield from devices_steps(dev, member)
    epoch_id, bodies = dev.plan_epoch(conversation, devices)
    route = "/api/conversations/{id}/e2e/epochs/{epoch}"
    for body in bodies:
        status, answer = yield _request("PUT", route, body, id=conversation, epoch=epoch_id)
        _expect(status, answer, (200, 201), "epoch upload")
    dev.use_epoch(conversation, epoch_id)
    return epoch_id


def reseal_steps(
    dev: E2EDevice, frame: dict[str, Any], text: str, members: list[str]
) -> Steps[dict[str, Any]]:
    """After ``e2e_stale`` on the ``send`` frame ``frame`` (of ``text``):
    the conversation's devices changed, so a new epoch, and the frame sealed
    again under it, its cid kept (the server stores the message once)."""
    conversation = frame["conversation"]
    yield from new_epoch_steps(dev, conversation, members)
    return {**frame, "e2e": dev.encrypt(conversation, text)}


def read_steps(dev: E2EDevice, frame: dict[str, Any], *, edit_of: str | None = None) -> Steps[str]:
    """Fetch what reading ``frame`` needs (this device's share of its
    epoch, the sender's devices when they are new), then read it
    (:meth:`E2EDevice.read`)."""
    conversation = frame["conversation"]
    missing = dev.epochs_to_fetch([frame])
    if missing:
        route = "/api/conversations/{id}/e2e/shares?epochs={epochs}"
        status, body = yield _request("GET", route, id=conversation, epochs=",".join(missing))
        if status == 200:
            dev.take_shares(conversation, body["shares"])
    known = {d["device"] for d in dev.directory.get(_sender(frame), [])}
    if frame["e2e"].get("device") not in known:
        yield from devices_steps(dev, _sender(frame))
    return dev.read(frame, edit_of=edit_of)


def run_steps(steps: Steps[T], call: Callable[[Request], tuple[int, Any]]) -> T:
    """Run a procedure with a blocking ``call`` (the Locust user's)."""
    try:
        request = next(steps)
        while True:
            request = steps.send(call(request))
    except StopIteration as done:
        return done.value


Call = Callable[..., Awaitable[tuple[int, Any]]]


class AsyncE2E:
    """:class:`E2EDevice` with the HTTP calls made through ``call(method,
    path, json=...)`` -> (status, body) (e.g. ``Api.call`` with a token)."""

    def __init__(self, device: E2EDevice, call: Call) -> None:
        self.dev = device
        self.call = call

    async def run(self, steps: Steps[T]) -> T:
        """Run a procedure, its calls through :attr:`call`."""
        try:
            request = next(steps)
            while True:
                kw = {} if request.json is None else {"json": request.json}
                request = steps.send(await self.call(request.method, request.path, **kw))
        except StopIteration as done:
            return done.value

    async def register(self) -> None:
        await self.run(register_steps(self.dev))

    async def new_epoch(self, conversation: str, members: list[str]) -> str:
        """Make, upload and use a new epoch for ``conversation``."""
        return await self.run(new_epoch_steps(self.dev, conversation, members))

    async def read(self, frame: dict[str, Any], *, edit_of: str | None = None) -> str:
        """Fetch what reading ``frame`` needs (shares, the sender's devices), then read it."""
        return await self.run(read_steps(self.dev, frame, edit_of=edit_of))
