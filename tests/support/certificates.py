"""Certificates for TLS listener tests: issued by a trustme authority, written where
`gateway.tls` reads them, and the certificate a server shows a new connection."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme
from http_wire import RawClient, RawResponse, request


def issue(authority: trustme.CA) -> trustme.LeafCert:
    """A server certificate for `localhost` and 127.0.0.1."""
    return authority.issue_cert("localhost", "127.0.0.1")


def write_certificate(certificate: trustme.LeafCert, cert_path: Path, key_path: Path) -> None:
    """Write the chain and the key, each file replaced in one step."""
    for path, pems in (
        (cert_path, certificate.cert_chain_pems),
        (key_path, [certificate.private_key_pem]),
    ):
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(b"".join(pem.bytes() for pem in pems))
        partial.replace(path)


def der(certificate: trustme.LeafCert) -> bytes:
    """The leaf certificate in DER, as `getpeercert(binary_form=True)` gives it."""
    return ssl.PEM_cert_to_DER_cert(certificate.cert_chain_pems[0].bytes().decode())


def client_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


def shown_certificate(client: RawClient) -> bytes:
    """The certificate the server presented on this connection (DER)."""
    certificate = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert isinstance(certificate, bytes)
    return certificate


async def tls_get(
    port: int, context: ssl.SSLContext, path: str, *, server_hostname: str = "localhost"
) -> tuple[bytes, RawResponse]:
    """GET `path` over a new TLS connection: the certificate shown, and the response.

    An empty `server_hostname` connects to the IP address, which sends no server name."""
    async with await RawClient.open(
        port, ssl_context=context, server_hostname=server_hostname
    ) as client:
        await client.send(request("GET", path))
        return shown_certificate(client), await client.response()
