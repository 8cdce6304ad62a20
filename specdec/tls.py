"""TLS and mutual TLS for every hop, from PEM files named by flags.

Servers: a certificate and key; with a client CA they also demand client certificates (mTLS).
Clients (the coordinator towards the tiers, the CLI towards the coordinator): a CA to trust and,
for mTLS, their own certificate and key. Nothing set means plaintext (loopback, tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import grpc
from grpc import aio


def _read(path: str) -> bytes:
    return Path(path).expanduser().read_bytes()


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    if not cert and not key:
        if client_ca:
            raise ValueError("a client CA (mutual TLS) needs the server's own certificate and key too")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both a certificate and its key")
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(client_ca) if client_ca else None,
        require_client_auth=bool(client_ca),
    )


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key, and the other way round")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca) if ca else None,
        private_key=_read(key) if key else None,
        certificate_chain=_read(cert) if cert else None,
    )


def open_channel(address: str, credentials: grpc.ChannelCredentials | None, options: Sequence = ()) -> aio.Channel:
    if credentials is None:
        return aio.insecure_channel(address, options=list(options))
    return aio.secure_channel(address, credentials, options=list(options))


def redact_url(url: str) -> str:
    """A URL safe to log: the password (redis://user:secret@host) replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
