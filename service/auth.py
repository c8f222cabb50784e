"""Who may change things: every mutating endpoint needs a key, from LTD_API_KEY or a token file made at first start.

As Jupyter does, a service started without a configured key generates one (`secrets.token_urlsafe`), keeps it in a
file only its user can read, and reuses it on restart; `ltd` commands read it from there. Leaving mutations open
takes an explicit `no_auth`, allowed only on a loopback bind.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import stat
from pathlib import Path

from pydantic import SecretStr

from service.settings import Settings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': binds no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_or_create_token(path: Path) -> str:
    """The token in `path`, or a new random one written there with mode 0600 (its folder 0700) if none exists."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(f"token file {path} is readable by other users: chmod 600 {path}, or delete it "
                                  "to have a new token generated")
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def with_key(settings: Settings) -> Settings:
    """`settings` with the key the service will check: LTD_API_KEY, else the token file (made if absent).

    With `no_auth` the key stays None (mutations open) and a warning is logged at every start.
    """
    if settings.api_key is not None:
        return settings
    if settings.no_auth:
        log.warning("LTD_NO_AUTH: mutating endpoints (jobs, labelset delete, model upload) are open to anyone who "
                    "can reach this port; use it only for throwaway local work")
        return settings
    token = load_or_create_token(settings.token_file)
    log.info("mutating endpoints need X-API-Key: the token in %s", settings.token_file)
    return settings.model_copy(update={"api_key": SecretStr(token)})


def client_key(settings: Settings | None = None) -> str | None:
    """The key a client on this machine sends: LTD_API_KEY, else the service's token file, else None."""
    settings = settings or Settings()
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    path = Path(settings.token_file).expanduser()
    return path.read_text().strip() if path.is_file() else None
