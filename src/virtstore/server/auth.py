"""Who may do what: the socket a request came in on, or its bearer token.

- The read-write unix socket (0600, root's): the peer's uid (SO_PEERCRED) must be root
  or the daemon's own; role ``rw``.
- The read-only unix socket (0666): anyone; role ``ro``.
- TCP (always TLS): an ``Authorization: Bearer TOKEN`` header naming a token of the
  tokens file; its role is the token's. No token or an unknown one: 401.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass

from virtstore.errors import InvalidArgument
from virtstore.server.http import HTTPError, Request

log = logging.getLogger("virtstored")
ROLES = ("ro", "rw")


@dataclass(frozen=True)
class Token:
    name: str
    role: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def load_tokens(path: str) -> dict[bytes, Token]:
    """``TOKEN ROLE [NAME]`` lines; '#' starts a comment. Kept by their SHA-256 only, so a
    lookup compares digests rather than the secret itself."""
    tokens: dict[bytes, Token] = {}
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("tokens file %s is readable by others (mode %o): make it 0600",
                    path, stat.S_IMODE(st.st_mode))
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) not in (2, 3) or words[1] not in ROLES:
                raise InvalidArgument(f"{path}:{lineno}: expected 'TOKEN ro|rw [NAME]'")
            if len(words[0]) < 16:
                raise InvalidArgument(f"{path}:{lineno}: a token must be at least 16 "
                                      "characters")
            digest = _digest(words[0])
            name = words[2] if len(words) == 3 else f"token-{digest.hex()[:8]}"
            if digest in tokens:
                raise InvalidArgument(f"{path}:{lineno}: the same token is listed twice")
            tokens[digest] = Token(name, words[1])
    return tokens


class Authenticator:
    def __init__(self, tokens: dict[bytes, Token] | None = None) -> None:
        self.tokens = tokens or {}
        self.own_uid = os.geteuid()

    def authenticate(self, req: Request) -> str:
        """The request's role (``ro``/``rw``); sets ``req.who`` for the audit log."""
        peer = req.peer
        if peer.listener == "unix-rw":
            req.who = f"uid:{peer.uid}(pid {peer.pid})"
            if peer.uid == 0 or peer.uid == self.own_uid:
                return "rw"
            log.warning("authentication failed: uid %s (pid %s) on the read-write socket",
                        peer.uid, peer.pid)
            raise HTTPError(403, "forbidden", "the read-write socket is for root only")
        if peer.listener == "unix-ro":
            req.who = f"uid:{peer.uid}(pid {peer.pid}, read-only)"
            return "ro"
        cert = f" cert:{peer.cert_subject}" if peer.cert_subject else ""
        auth = req.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        token = self.tokens.get(_digest(value.strip())) if scheme.lower() == "bearer" else None
        if token is None:
            why = "no token" if not auth else "unknown token"
            log.warning("authentication failed: %s from %s%s for %s %s", why, peer.addr, cert,
                        req.method, req.raw_path)
            raise HTTPError(401, "auth-failed", f"authentication failed: {why}",
                            headers=(("WWW-Authenticate", 'Bearer realm="virtstored"'),))
        req.who = f"token:{token.name}@{peer.addr}{cert}"
        return token.role

    def role_of(self, req: Request) -> str:
        try:
            return self.authenticate(req)
        except HTTPError:
            return "none"
