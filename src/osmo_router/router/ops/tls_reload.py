"""The router's certificate, loaded again when its files change (a renewed certificate without a restart).

cert-manager renews a Kubernetes TLS secret in place, and the kubelet swaps the mounted files; a router
that loaded them once served the old certificate until it was restarted, and once that expired every
client and agent failed their handshake. So the files are looked at every `--tls-reload-interval`
(their modification time, size and inode: the kubelet swaps a symlink) and, when they changed, each
port's TLS context is made again from them; handshakes from then on use the new one, connections
already up keep theirs. A set that does not load (the key written before the certificate, a
half-written file) is logged and tried again at the next look; the old one stays in use meanwhile.

The listening sockets keep the context they were started with, so the new one is put in place at
each handshake by the old one's `sni_callback` (OpenSSL calls it for every ClientHello, with or
without a server name; setting `SSLObject.context` there switches the certificate, the trusted client
CAs and ALPN for that connection). A fresh context rather than loading the files into the old one:
`load_verify_locations` only adds, so a client CA removed from --tls-client-ca (a compromised CA
rotated out) stayed trusted until the router restarted. With `--grpc-server grpcio`, gRPC core asks
for the current set at each handshake (`grpc.dynamic_ssl_server_credentials`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

import grpc

from osmo_router.router.config import RouterConfig

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int] | None, ...]


class TlsReloader:
    """Watches the configured certificate, key and client CA, and loads them again into the tracked contexts."""

    def __init__(self, config: RouterConfig, load: Callable[[str, str, str | None], ssl.SSLContext]) -> None:
        """`load(cert, key, client_ca)` makes a fresh context from the files (it raises if they do not load)."""
        self._cert, self._key, self._client_ca = config.tls_cert, config.tls_key, config.tls_client_ca
        self._interval = config.tls_reload_interval
        self._load = load
        self._served: list[_ServedContext] = []
        self._loaded = self._stamp()  # what the contexts hold now
        self._failed: Stamp | None = None  # the files' state that did not load (logged once)
        self._task: asyncio.Task[None] | None = None
        #: How many times a changed certificate was loaded.
        self.reloads = 0

    def track(self, context: ssl.SSLContext, rebuild: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        """Serve `rebuild()`'s context in place of `context` once the files change; returns `context`.

        `rebuild` makes the same kind of context (ALPN, verify mode) from the files as they are now.
        """
        self._served.append(_ServedContext(context, rebuild))
        return context

    def grpcio_credentials(self) -> grpc.ServerCredentials:
        """Credentials for grpcio's server that follow the files (gRPC core asks at each handshake)."""
        served = [self._stamp()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            now = self._stamp()
            if now == served[0]:
                return None
            try:
                files = self._read_files()
                self._load(self._cert, self._key, self._client_ca)  # checks the pair before it is served
                if self._read_files() != files:
                    return None  # changed while checked: the next handshake looks again
            except (OSError, ssl.SSLError, ValueError) as err:
                self._report_failure(now, err)
                return None
            served[0] = now
            self._report_reload()
            return self._grpcio_configuration(files)

        return grpc.dynamic_ssl_server_credentials(
            self._grpcio_configuration(self._read_files()),
            fetch,
            require_client_authentication=self._client_ca is not None,
        )

    def _read_files(self) -> tuple[bytes, bytes, bytes | None]:
        """The certificate, key and client CA as they are now."""
        with open(self._cert, "rb") as cert, open(self._key, "rb") as key:
            pair = cert.read(), key.read()
        if self._client_ca is None:
            return (*pair, None)
        with open(self._client_ca, "rb") as ca:
            return (*pair, ca.read())

    @staticmethod
    def _grpcio_configuration(files: tuple[bytes, bytes, bytes | None]) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = files
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def start(self) -> None:
        """Look at the files every interval (0: never), from now on."""
        if self._interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        """Stop looking."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.check()
            except Exception:  # never the end of the watch: the next look tries again
                log.exception("looking at the TLS files failed")

    def check(self) -> bool:
        """Load the files into the tracked contexts if they changed and load; True when they were."""
        now = self._stamp()
        if now == self._loaded or not self._served:
            return False
        try:
            fresh = [served.rebuild() for served in self._served]  # every port's loads, or nothing changes
        except (OSError, ssl.SSLError, ValueError) as err:
            self._report_failure(now, err)
            return False
        for served, context in zip(self._served, fresh, strict=True):
            served.current = context
        self._loaded = now
        self._report_reload()
        return True

    def _report_reload(self) -> None:
        self.reloads += 1
        self._failed = None
        log.info(
            "TLS certificate %s loaded again (its files changed): new handshakes use it",
            self._cert,
            extra={"fields": {"event": "tls reloaded", "cert": self._cert}},
        )

    def _report_failure(self, stamp: Stamp, err: Exception) -> None:
        if stamp == self._failed:
            return  # said once per state of the files
        self._failed = stamp
        log.warning(
            "TLS certificate %s or key %s changed but does not load (%s): still serving the previous one",
            self._cert,
            self._key,
            err,
            extra={"fields": {"event": "tls reload failed", "cert": self._cert}},
        )

    def _stamp(self) -> Stamp:
        """The files' modification time, size and inode (None for one that is not there)."""
        stamps: list[tuple[int, int, int] | None] = []
        for path in (self._cert, self._key, self._client_ca):
            if path is None:
                continue
            try:
                info = os.stat(path)
            except OSError:
                stamps.append(None)
                continue
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stamps)


class _ServedContext:
    """A listening socket's TLS context and the one its handshakes use now (see the module docstring)."""

    def __init__(self, base: ssl.SSLContext, rebuild: Callable[[], ssl.SSLContext]) -> None:
        self.rebuild = rebuild
        self.current = base
        self._base = base
        base.sni_callback = self._switch
        # No TLS session resumption: a resumed session skips the client certificate check, and its
        # ticket is sealed with the listening context's keys, which a reload does not replace; so a
        # session of a client CA since removed from --tls-client-ca got in again for the ticket's
        # lifetime (2 hours). Our clients (grpc, aiohttp) make long-lived connections and never resume.
        base.num_tickets = 0  # TLS 1.3
        base.options |= ssl.OP_NO_TICKET  # TLS 1.2

    def _switch(self, connection: Any, _server_name: str | None, _context: ssl.SSLContext) -> None:
        # `connection` is the handshake's SSLObject (or SSLSocket); typeshed types it SSLObject only.
        current = self.current
        if current is not self._base:
            connection.context = current
