"""`petals keygen` and `petals member add|revoke`: the swarm owner's tools for a members-only swarm.

The owner key is an ordinary petals key file (the format of petalsd's --identity); its peer id
names the swarm (`--swarm-owner`). `member add` signs a certificate for one peer id and writes it
as a one-line file; `member revoke` adds the peer to the owner's revocation list, keeps the signed
list next to the owner key (`OWNER_KEY.revocations`: the owner's record of what it revoked, and
where the next seq comes from) and stores it in the swarm's DHT, joining as the owner (who needs
no certificate). Daemons re-read the list every record period and keep it stored.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import trio

from petals_protocol.errors import PetalsError
from petals_protocol.membership import (
    Membership,
    RevocationList,
    certificate_to_text,
    decode_certificate,
    decode_revocations,
    issue_certificate,
    revocations_key,
    sign_revocations,
)
from petals_protocol.p2p.admission import AdmissionGate, load_gate
from petals_protocol.p2p.dht import find_revocations, put_record, start_dht
from petals_protocol.p2p.host import make_host, running_host
from petals_protocol.p2p.identity import (
    ed25519_private_key,
    ephemeral_identity,
    load_or_create_identity,
    peer_id,
    peer_id_bytes,
)
from petals_protocol.signing import peer_id_from_text

DAY = 86400.0


class OwnerKeyError(PetalsError):
    """The owner key file named on the command line is missing."""


def keygen(path: Path) -> int:
    """Create an Ed25519 key file (an owner key, or a daemon's or client's --identity); print its peer id."""
    existed = path.exists()
    key_pair = load_or_create_identity(path)
    if existed:
        print(f"petals: {path} exists; not overwritten. Its peer id:", file=sys.stderr)
    print(peer_id(key_pair).to_base58())
    return 0


def add(owner_key: Path, member: str, *, days: float, output: Path | None) -> int:
    """Sign a certificate for `member`, valid `days` from now; write it to `output` (or stdout)."""
    owner = _load_owner(owner_key)
    now = time.time()
    blob = issue_certificate(ed25519_private_key(owner), peer_id_from_text(member), issued_at=now,
                             lifetime=days * DAY)
    cert = decode_certificate(blob, owner=peer_id_bytes(owner), now=now)
    text = certificate_to_text(blob)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    print(cert.describe(), file=sys.stderr)
    return 0


def revoke(owner_key: Path, member: str, *, initial_peers: list[str], members_only: bool = True) -> int:
    """Revoke every certificate issued to `member` so far; store the new list in the DHT.
    `members_only` False: the swarm is open (its daemons show certificates only for clients that
    choose daemons by issuer), so the owner joins without the membership exchange."""
    owner = _load_owner(owner_key)
    owner_id = peer_id_bytes(owner)
    saved = owner_key.with_name(owner_key.name + ".revocations")
    local = decode_revocations(saved.read_bytes(), owner=owner_id) if saved.exists() else None
    revoked_peer = peer_id_from_text(member)
    seq, count, stored = trio.run(_publish, owner, initial_peers, local, revoked_peer, saved, members_only)
    print(f"revoked {member}: revocation list seq {seq}, {count} peers revoked, stored by {stored} daemons "
          "(each re-reads it every record period and closes that peer's connections)", file=sys.stderr)
    return 0


async def _publish(owner, initial_peers: list[str], local: RevocationList | None, revoked_peer: bytes,  # noqa: ANN001
                   saved: Path, members_only: bool) -> tuple[int, int, int]:
    """Join the swarm as its owner, merge the DHT's list with ours, add the peer, save and store."""
    owner_id = peer_id_bytes(owner)
    gate = AdmissionGate(Membership(owner=owner_id), owner_id) if members_only else None
    host = make_host(owner, admission=gate)
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]), trio.open_nursery() as nursery:
        dht = await start_dht(host, nursery, server=False, bootstrap=initial_peers)
        lists = [decode_revocations(blob, owner=owner_id) for blob in await find_revocations(dht, owner_id)]
        known = [r for r in (local, *lists) if r is not None]
        revoked: dict[bytes, float] = {}
        for r in sorted(known, key=lambda r: r.seq):
            revoked.update(r.revoked)
        revoked[revoked_peer] = time.time()
        newest = RevocationList(owner=owner_id, seq=max([r.seq for r in known], default=0) + 1, revoked=revoked)
        blob = sign_revocations(ed25519_private_key(owner), newest)
        saved.write_bytes(blob)  # before storing: the owner's copy must never lag the swarm's
        stored = await put_record(dht, revocations_key(owner_id), blob)
        nursery.cancel_scope.cancel()
    return newest.seq, len(revoked), stored


def client_identity(identity: str | Path | None, swarm_owner: str | None,
                    member_certificate: str | Path | None) -> tuple[Any, AdmissionGate | None]:
    """A client's key pair (from `identity`, else a new one) and, in a members-only swarm, its
    admission gate: what from_pretrained, `petals swarm` and `petals serve` join with.
    NotAMember (with what to do) when the certificate does not fit; ValueError for a certificate
    without an owner."""
    key_pair = load_or_create_identity(Path(identity)) if identity is not None else ephemeral_identity()
    if swarm_owner is None:
        if member_certificate is not None:
            raise ValueError("member_certificate needs swarm_owner (the peer id of the swarm's owner)")
        return key_pair, None
    gate = load_gate(swarm_owner, Path(member_certificate) if member_certificate else None, peer_id_bytes(key_pair))
    return key_pair, gate


def _load_owner(path: Path):  # noqa: ANN202 - a libp2p KeyPair
    if not path.exists():
        raise OwnerKeyError(f"owner key {path} does not exist (create it with `petals keygen {path}`)")
    return load_or_create_identity(path)
