"""TLS towards NATS: the client context busway connects with, and what a failed handshake means.

The context is built once, at start-up, from `[nats] tls_ca`, `tls_cert`, `tls_key`: a file
that cannot be read or is not PEM is a ConfigError naming the key, before anything connects.
A handshake that fails while connecting is explained by `handshake_failure` in the terms an
operator acts on (the server's certificate is signed by a CA busway does not trust, it does
not carry the name busway expects, the server refused busway's client certificate), rather
than as OpenSSL's text alone.

TLS is *required* once configured: nats-py upgrades to TLS only when the server's INFO asks
for it, so a server (or anything between) that does not ask would get the CONNECT, password
included, in clear. `busway._nats.internals.require_tls` refuses such a server instead.

For its own embedded server with TLS, busway trusts exactly that server's certificate unless
`[nats] tls_ca` names a CA: the certificate file is the trust anchor (OpenSSL's partial-chain
mode), the name check stays on.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from busway._config.model import NatsConfig
from busway._errors import ConfigError

__all__ = ["handshake_failure", "is_handshake_failure", "tls_options", "wants_tls"]


def wants_tls(config: NatsConfig) -> bool:
    """Whether busway must speak TLS to its NATS servers (any `tls_*` key, a `tls://` URL,
    or an embedded server with a certificate)."""
    if config.servers is None:
        return config.embedded.tls
    return (
        any(value is not None for value in (config.tls_ca, config.tls_cert, config.tls_server_name))
        or config.tls_handshake_first
        or any(url.startswith(("tls://", "wss://")) for url in config.servers)
    )


def tls_options(config: NatsConfig, resolve: Callable[[str], Path]) -> dict[str, Any]:
    """nats-py's TLS options for `config` (none without TLS); ConfigError for a bad file."""
    if not wants_tls(config):
        return {}
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    ca = config.tls_ca
    key = "tls_ca"
    if ca is None and config.servers is None:
        ca, key = config.embedded.tls_cert, "embedded.tls_cert"
        # The embedded server's own certificate is the anchor, whoever signed it.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if ca is not None:
        path = _readable(resolve(ca), key)
        try:
            context.load_verify_locations(cafile=str(path))
        except ssl.SSLError as exc:
            raise _bad_file(key, path, f"no PEM certificate in it ({exc.reason})") from None
    if config.tls_cert is not None and config.tls_key is not None:
        cert = _readable(resolve(config.tls_cert), "tls_cert")
        private = _readable(resolve(config.tls_key), "tls_key")
        try:
            context.load_cert_chain(str(cert), str(private))
        except ssl.SSLError as exc:
            why = (
                "the key does not belong to the certificate"
                if "KEY_VALUES_MISMATCH" in str(exc)
                else f"not a PEM certificate and unencrypted private key ({exc.reason})"
            )
            raise _bad_file("tls_cert", cert, f"{why} (tls_key {private})") from None
    options: dict[str, Any] = {"tls": context}
    if config.tls_server_name is not None:
        options["tls_hostname"] = config.tls_server_name
    if config.tls_handshake_first:
        options["tls_handshake_first"] = True
    return options


def _readable(path: Path, key: str) -> Path:
    try:
        with path.open("rb"):
            return path
    except OSError as exc:
        raise _bad_file(key, path, f"cannot read it: {exc.strerror}") from None


def _bad_file(key: str, path: Path, why: str) -> ConfigError:
    return ConfigError(f"[nats] {key} file {path}: {why}", path=f"$.nats.{key}")


def is_handshake_failure(exc: BaseException) -> bool:
    """True if `exc` is a failed TLS handshake: retrying the same server cannot help."""
    return isinstance(exc, ssl.SSLError) or "certificate" in str(exc).lower()


def handshake_failure(exc: BaseException, config: NatsConfig) -> str:
    """What a failed TLS handshake means and which `[nats]` key fixes it, in one sentence."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if exc.verify_code in (62, 64) or "mismatch" in reason.lower():
            return (
                f"the server's certificate does not carry the name busway expects ({reason}): "
                "set [nats] tls_server_name to a name in its certificate, or fix the certificate"
            )
        if exc.verify_code == 10:
            return f"the server's certificate has expired ({reason})"
        return (
            f"the server's certificate is not signed by a CA busway trusts ({reason}): set "
            "[nats] tls_ca to the CA file that signed it"
        )
    text = str(exc)
    lowered = text.lower()
    if "certificate required" in lowered or "certificate_required" in lowered:
        return (
            "the server requires a client certificate (mTLS) and busway presented none: set "
            "[nats] tls_cert and tls_key"
        )
    if any(word in lowered for word in ("unknown ca", "bad certificate", "certificate unknown")):
        which = "busway's" if config.tls_cert is not None else "no"
        return (
            f"the server refused {which} client certificate ({text}): [nats] tls_cert must be "
            "signed by a CA the server trusts"
        )
    return f"the TLS handshake failed: {text or type(exc).__name__}"
