"""The dashboard's login: credentials from the environment or a file, and wrong logins slowed down per client.

Gradio checks the password; `LoginThrottle` (an ASGI middleware in front of it) counts each client's
wrong logins and, past `FREE_TRIES` within `WINDOW_S`, answers 429 without checking anything for a
lock-out that doubles with each further wrong login (`BOOMERANG_LOGIN_LOCKOUT_S`, default 2 s, at most
5 minutes). A right login clears the count.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from boomerang.errors import BoomerangError

FREE_TRIES = 5
WINDOW_S = 300.0
MAX_LOCKOUT_S = 300.0


def parse_credentials(text: str, where: str) -> tuple[str, str]:
    """USER:PASSWORD (the first line of a file, or an environment value) as (user, password)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    user, sep, password = line.partition(":")
    if not sep or not user.strip() or not password:
        raise BoomerangError(f"{where} must hold USER:PASSWORD (a user name, a colon, a password); "
                             f"got {'nothing' if not line else 'no colon' if not sep else 'an empty user or password'}")
    return user.strip(), password


def credentials(*, auth: str | None, auth_file: str | None) -> tuple[str, str] | None:
    """The login to require: --auth-file, else --auth (visible to other users in the process list), else
    BOOMERANG_AUTH; None when none is set."""
    if auth_file:
        try:
            text = Path(auth_file).expanduser().read_text()
        except OSError as exc:
            raise BoomerangError(f"cannot read --auth-file {auth_file}: {exc.strerror}") from None
        return parse_credentials(text, f"--auth-file {auth_file}")
    if auth:
        return parse_credentials(auth, "--auth")
    env = os.environ.get("BOOMERANG_AUTH")
    return parse_credentials(env, "BOOMERANG_AUTH") if env else None


class LoginThrottle:
    """ASGI middleware: per client address, wrong logins past FREE_TRIES lock the client out for a while."""

    def __init__(self, app, lockout_s: float | None = None):
        self.app = app
        self.lockout_s = float(os.environ.get("BOOMERANG_LOGIN_LOCKOUT_S", "2")) if lockout_s is None else lockout_s
        self.failures: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.locked_for(client)
        if wait > 0:
            body = json.dumps({"detail": f"Too many wrong logins from this address: wait {wait:.0f} s."}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(int(wait) + 1).encode())]})
            return await send({"type": "http.response.body", "body": body})

        async def watch(message):
            if message["type"] == "http.response.start":
                self.record(client, ok=message["status"] < 400)
            await send(message)

        await self.app(scope, receive, watch)

    def record(self, client: str, *, ok: bool) -> None:
        with self.lock:
            if ok:
                self.failures.pop(client, None)
            else:
                now = time.monotonic()
                self.failures[client] = [t for t in self.failures.get(client, []) if now - t < WINDOW_S] + [now]

    def locked_for(self, client: str) -> float:
        """Seconds this client must still wait (0: it may try)."""
        with self.lock:
            now = time.monotonic()
            recent = [t for t in self.failures.get(client, []) if now - t < WINDOW_S]
            if len(recent) < FREE_TRIES:
                return 0.0
            lockout = min(MAX_LOCKOUT_S, self.lockout_s * 2 ** (len(recent) - FREE_TRIES))
            return max(0.0, recent[-1] + lockout - now)
