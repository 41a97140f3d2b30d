"""End-to-end: devices, epochs, their shares, and the checks of an ``e2e`` send.

The service never sees an end-to-end message's text: it keeps each
device's public keys, each epoch's key shares (one per device), and checks
that an ``e2e`` object names the sending connection's device and an epoch
shared with exactly the conversation's active devices (the rules are in
:mod:`chatd.core.e2e`).
"""

from __future__ import annotations

from typing import Any

from chatd.core import e2e as e2e_rules
from chatd.core.devices import MAX_DEVICES, check_device_id, check_registration
from chatd.core.envelope import DevicesEnvelope, encode
from chatd.core.errors import BadRequest, Conflict, Forbidden, NotFound
from chatd.core.model import Conversation, Device
from chatd.hub import Connection
from chatd.ports import Routed
from chatd.service.base import log
from chatd.service.conversations import ConversationsMixin


def e2e_required(cid: str | None) -> BadRequest:
    """The refusal of a plain ``body`` in an end-to-end conversation."""
    reason = e2e_rules.E2E_REQUIRED
    return BadRequest(e2e_rules.REFUSED[reason], cid=cid, reason=reason)


def e2e_off(cid: str | None) -> BadRequest:
    """The refusal of an end-to-end ``edit`` in a plain conversation."""
    reason = e2e_rules.E2E_OFF
    return BadRequest(e2e_rules.REFUSED[reason], cid=cid, reason=reason)


class EndToEndMixin(ConversationsMixin):
    """End-to-end devices, epochs and shares, and the checks of an ``e2e`` send."""

    async def register_device(self, user: str, device: str, body: dict[str, Any]) -> bool:
        """Register one of ``user``'s devices (public keys, self-signed);
        True when it is new. Keys never change: other keys under a taken id
        are a Conflict. Contacts hear that the user's devices changed."""
        reg = check_registration(user, device, body)
        outcome = await self.store.put_device(
            Device(
                user,
                reg.device,
                reg.sig_key,
                reg.dh_key,
                reg.name,
                reg.self_sig,
                self.clock.now_ms(),
            ),
            MAX_DEVICES,
        )
        if outcome == "conflict":
            raise Conflict(f"device '{reg.device}' is registered with other keys or was removed")
        if outcome == "full":
            raise BadRequest(f"at most {MAX_DEVICES} devices per account")
        if outcome == "created":
            log.info("device registered", extra={"user": user, "device": reg.device})
            await self._devices_changed(user)
        return outcome == "created"

    async def remove_device(self, user: str, device: str) -> None:
        """Tombstone one of the caller's own devices (its id stays taken)."""
        check_device_id(device)
        if not await self.store.remove_device(user, device, self.clock.now_ms()):
            raise NotFound("no such device")
        log.info("device removed", extra={"user": user, "device": device})
        await self._devices_changed(user)

    async def user_devices(self, caller: str, name: str) -> dict[str, Any]:
        """A user's devices (removed ones too), for the user and their contacts."""
        name = (await self._visible_user(caller, name)).username
        return {
            "username": name,
            "devices": [
                {
                    "device": d.device,
                    "sig_key": d.sig_key,
                    "dh_key": d.dh_key,
                    "name": d.name,
                    "self_sig": d.self_sig,
                    "created_ts": d.created_ts,
                    "removed_ts": d.removed_ts,
                }
                for d in await self.store.devices(name)
            ],
        }

    async def active_device(self, user: str, device: str) -> bool:
        """Is ``device`` one of ``user``'s devices, not removed?"""
        return any(
            d.device == device and d.removed_ts is None for d in await self.store.devices(user)
        )

    async def _devices_changed(self, user: str) -> None:
        """Tell the user's contacts and the user's own devices (not owed)."""
        env = DevicesEnvelope(user)
        payload = encode(env)
        people = [user, *await self.store.contacts(user)]
        await self._route([Routed(p, "devices", payload, False, None, env) for p in people])

    async def put_epoch(self, user: str, id: str, epoch: object, body: dict[str, Any]) -> bool:
        """Add shares of ``user``'s epoch ``epoch`` in conversation ``id``
        (True when the epoch is new). The sending device is the caller's,
        active; every share goes to an active device of a member (not the
        sending one). Conflict: the epoch is another device's, or a device
        already has a different share of it."""
        conv = await self.member_conversation(user, id)
        epoch = e2e_rules.check_epoch_id(epoch)
        device = check_device_id(body.get("device"))
        shares = e2e_rules.check_shares(body.get("shares"), sender_device=device)
        if not await self.active_device(user, device):
            raise Forbidden("'device' must be one of your active devices")
        strangers = sorted(set(shares) - set(await self.store.active_devices(conv.members)))
        if strangers:
            raise BadRequest(
                "shares only go to active devices of this conversation's members",
                unknown=strangers,
            )
        outcome = await self.store.put_epoch(
            conv.id, epoch, user, device, shares, self.clock.now_ms()
        )
        if outcome == "conflict":
            raise Conflict("that epoch is another device's, or a device has another share of it")
        return outcome == "created"

    async def epoch_shares(self, user: str, id: str, epochs: str | None) -> dict[str, Any]:
        """The shares of ``epochs`` addressed to the caller's devices (active
        or removed: a removed device's old shares are its own business)."""
        conv = await self.member_conversation(user, id)
        names = e2e_rules.check_epoch_list(epochs)
        mine = [d.device for d in await self.store.devices(user)]
        return {
            "shares": [
                {
                    "epoch": s.epoch,
                    "sender": s.sender,
                    "device": s.device,
                    "to": s.to,
                    "share": s.share,
                }
                for s in await self.store.epoch_shares(conv.id, names, mine)
            ]
        }

    async def _check_e2e(
        self, conn: Connection, conv: Conversation, sealed: dict[str, Any], cid: str | None
    ) -> None:
        """An end-to-end ``e2e`` object may be sent on ``conn`` in ``conv``:
        it names the connection's own (active) device, and its epoch is that
        device's and has a share for every active device of every member but
        the sending one, and for no other (``e2e_stale`` with ``missing`` and
        ``extra`` otherwise: the client rotates and sends again). One store
        read (:meth:`~chatd.ports.Store.epoch_check`): the epoch and the
        members' devices as they are now (devices change on any replica, so
        neither is cached)."""
        device = conn.device
        if device is None or sealed["device"] != device:
            raise Forbidden(
                "'e2e.device' must be this connection's device (name it in 'auth')", cid=cid
            )
        check = await self.store.epoch_check(conv.id, sealed["epoch"], conv.members)
        epoch, active = check.epoch, check.active
        if device not in active:
            raise Forbidden("this device was removed", cid=cid)
        if epoch is not None and (epoch.user, epoch.device) != (conn.user, device):
            raise Forbidden("that epoch is another device's", cid=cid)
        missing, extra = e2e_rules.coverage(epoch.recipients if epoch else (), active, device)
        if epoch is None or missing or extra:
            raise BadRequest(
                "the epoch's key is not shared with exactly the conversation's devices:"
                " start a new epoch and send again",
                cid=cid,
                reason="e2e_stale",
                missing=missing,
                extra=extra,
            )
