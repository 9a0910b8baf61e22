"""Who may do what: the socket a request came in on, or its bearer token.

- The read-write unix socket (0600, root's): the peer's uid (SO_PEERCRED) must be root
  or the daemon's own; role ``rw``.
- The read-only unix socket (0666): anyone; role ``ro``.
- TCP (TLS, or plain HTTP on loopback for the web page): an ``Authorization: Bearer
  TOKEN`` header naming a token of the tokens file (or one of the web page's, made at
  start); its role is the token's. No token or an unknown one: 401.
- A download ticket (``?ticket=``) instead of the header, for one GET of one volume's
  bytes: a browser's link cannot carry a header. A read-write caller asks for it; it is
  good once, for a minute, and only for the path it names.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass

from virtstore.errors import InvalidArgument
from virtstore.server.http import HTTPError, Request

log = logging.getLogger("virtstored")
ROLES = ("ro", "rw")
TICKET_TTL = 60
# The only requests a ticket stands in for: a volume's bytes.
TICKET_PATH = re.compile(r"/v1/pools/[^/?#]+/volumes/[^/?#]+/download")


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


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token_file(path: str, token: str) -> None:
    """The token alone, readable by the daemon's user only (the file is made anew)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Authenticator:
    def __init__(self, tokens: dict[bytes, Token] | None, *, redeemed_dir: str) -> None:
        self.tokens = tokens or {}
        self.own_uid = os.geteuid()
        self._ticket_key = os.urandom(32)  # tickets die with the daemon
        self._lock = threading.Lock()
        # Worker processes share the key (made before they fork) but not memory: a
        # ticket is spent by creating a file named after it, which only one process can.
        self._redeemed_dir = redeemed_dir
        import shutil

        shutil.rmtree(redeemed_dir, ignore_errors=True)
        os.mkdir(redeemed_dir, 0o700)

    def _spend(self, mac: str, expiry: int, now: float) -> bool:
        """Whether the ticket ``mac`` was unspent (it is spent now)."""
        with self._lock:
            for entry in os.listdir(self._redeemed_dir):
                if int(entry.split("-", 1)[0]) < now:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self._redeemed_dir, entry))
            try:
                os.close(os.open(os.path.join(self._redeemed_dir, f"{expiry}-{mac}"),
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return False
            return True

    def add_token(self, token: str, role: str, name: str) -> None:
        self.tokens[_digest(token)] = Token(name, role)

    def _mac(self, expiry: int, name: str, path: str) -> str:
        msg = f"{expiry}\n{name}\n{path}".encode()
        return hmac.new(self._ticket_key, msg, hashlib.sha256).hexdigest()

    def ticket(self, req: Request, path: str) -> str:
        """A ticket for one GET of ``path`` (a volume's download) by ``req``'s caller."""
        if not TICKET_PATH.fullmatch(path):
            raise InvalidArgument("a ticket is only for a volume's download: "
                                  "/v1/pools/POOL/volumes/VOLUME/download")
        name = req.who.split("@", 1)[0]
        expiry = int(time.time()) + TICKET_TTL
        who = base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")
        return f"{expiry}.{who}.{self._mac(expiry, name, path)}"

    def _redeem(self, req: Request, ticket: str) -> str:
        try:
            expiry_s, who, mac = ticket.split(".")
            name = base64.urlsafe_b64decode(who + "=" * (-len(who) % 4)).decode()
            expiry = int(expiry_s)
        except (ValueError, UnicodeDecodeError):
            expiry, name, mac = 0, "", ""
        now = time.time()
        good = (expiry >= now and TICKET_PATH.fullmatch(req.raw_path) is not None
                and hmac.compare_digest(mac, self._mac(expiry, name, req.raw_path)))
        if good:
            good = self._spend(mac, expiry, now)
        if not good:
            log.warning("authentication failed: bad or used ticket from %s for %s %s",
                        req.peer.addr, req.method, req.raw_path)
            raise HTTPError(401, "auth-failed", "authentication failed: the download "
                            "ticket is unknown, expired or used")
        req.who = f"ticket:{name}@{req.peer.addr}"
        return "rw"

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
        if not auth and "ticket" in req.query and req.method == "GET":
            return self._redeem(req, req.query.pop("ticket"))
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
