"""HTTPS under a filtered steal, without sockets: recognising a ClientHello (server name, ALPN
offer) from real ones made by Python's ssl, split anywhere, and the checks of the certificate
and key a session gives (`mirrord._tls`), with certificates from a test CA (trustme)."""

from __future__ import annotations

import ssl

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord._tls import TlsMaterialError, check_pem_pair, client_context, server_context
from mirrord.agent._incoming_tls import (
    NEED_MORE,
    NOT_TLS,
    ClientHello,
    StealTls,
    parse_client_hello,
)


def client_hello(server_name: str | None, alpn: list[str]) -> bytes:
    """The first flight of a real TLS client (Python's ssl over memory BIOs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pair(ca: trustme.CA) -> tuple[str, str]:
    cert = ca.issue_cert("pod.test", "127.0.0.1")
    return cert.cert_chain_pems[0].bytes().decode(), cert.private_key_pem.bytes().decode()


def test_a_client_hello_gives_its_server_name_and_alpn_offer() -> None:
    hello = parse_client_hello(client_hello("api.pod.test", ["h2", "http/1.1"]))
    assert hello == ClientHello(server_name="api.pod.test", alpn=("h2", "http/1.1"))
    assert parse_client_hello(client_hello(None, [])) == ClientHello(server_name=None, alpn=())
    # an IP address is not sent as a server name (RFC 6066)
    assert parse_client_hello(client_hello("10.0.0.7", ["http/1.1"])) == ClientHello(
        server_name=None, alpn=("http/1.1",)
    )


def test_every_prefix_of_a_client_hello_needs_more() -> None:
    data = client_hello("pod.test", ["h2"])
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]) is NEED_MORE, cut
    assert isinstance(parse_client_hello(data + b"more"), ClientHello)


def test_a_client_hello_split_over_two_records_is_read() -> None:
    data = client_hello("pod.test", ["http/1.1"])
    handshake = data[5:]
    cut = 40
    records = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2) + part
        for part in (handshake[:cut], handshake[cut:])
    )
    assert parse_client_hello(records) == ClientHello(server_name="pod.test", alpn=("http/1.1",))
    assert parse_client_hello(records[: 5 + cut + 3]) is NEED_MORE


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert record
        b"\x16\x03\x03\x00\x04\x02\x00\x00\x00",  # a ServerHello, not a client's
        b"\x16\x02\x00\x00\x04\x01\x00\x00\x00",  # not TLS 1.x
        b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03",  # a ClientHello too short to parse
    ],
)
def test_bytes_that_are_not_a_client_hello_are_left_alone(data: bytes) -> None:
    assert parse_client_hello(data) is NOT_TLS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_after_a_handshake_record_header_never_raise(tail: bytes) -> None:
    result = parse_client_hello(b"\x16\x03\x01" + tail)
    assert result is NOT_TLS or result is NEED_MORE or isinstance(result, ClientHello)


def test_a_good_pair_serves_and_a_client_trusting_the_ca_connects(
    ca: trustme.CA, pair: tuple[str, str]
) -> None:
    cert, key = pair
    check_pem_pair(cert, key)
    server = server_context(cert, key, ("h2",))
    client = client_context(("h2", "http/1.1"), trust_roots_pem=ca.cert_pem.bytes().decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname="pod.test")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # a bounded ping-pong of the handshake flights
        for obj in (cli, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert cli.selected_alpn_protocol() == "h2"
    assert srv.selected_alpn_protocol() == "h2"


def test_bad_material_is_refused_with_what_to_fix(ca: trustme.CA, pair: tuple[str, str]) -> None:
    cert, key = pair
    other_key = ca.issue_cert("other.test").private_key_pem.bytes().decode()
    cases = {
        "the key does not belong to the certificate": (cert, other_key),
        "the certificate is not PEM": ("hello", key),
        "the key is not PEM": (cert, cert),
        "the certificate is empty": ("", key),
    }
    for message, (c, k) in cases.items():
        with pytest.raises(TlsMaterialError, match=message):
            check_pem_pair(c, k)
    # a key with a passphrase: refused without a prompt
    encrypted = serialization.load_pem_private_key(key.encode(), None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    with pytest.raises(TlsMaterialError, match="encrypted with a passphrase"):
        check_pem_pair(cert, encrypted.decode())
    with pytest.raises(TlsMaterialError, match="trust roots cannot be loaded"):
        client_context(trust_roots_pem="-----BEGIN CERTIFICATE-----\nnope\n")


def test_the_port_is_served_with_its_first_certificate_each_channel_keeps_its_delivery(
    ca: trustme.CA, pair: tuple[str, str]
) -> None:
    cert, key = pair
    other = ca.issue_cert("other.test")
    tls = StealTls()
    alice, bob = object(), object()
    assert tls.subscribe(alice, 8443, {"cert_pem": cert, "key_pem": key}) == []
    wire = {
        "cert_pem": other.cert_chain_pems[0].bytes().decode(),
        "key_pem": other.private_key_pem.bytes().decode(),
        "delivery": {"protocol": "tcp"},
    }
    (warning,) = tls.subscribe(bob, 8443, wire)
    assert "different TLS certificate" in warning
    first = tls.for_port(8443)
    assert first is not None and first.cert_pem == cert
    assert tls.delivery(alice, 8443).tls and not tls.delivery(bob, 8443).tls
    assert cert not in repr(first) and key not in repr(first)  # never shown
    tls.drop(alice, 8443)
    second = tls.for_port(8443)
    assert second is not None and second.cert_pem == wire["cert_pem"]
    tls.drop(bob, 8443)
    assert tls.for_port(8443) is None
    with pytest.raises(TlsMaterialError, match="does not belong"):
        tls.subscribe(alice, 8443, {"cert_pem": cert, "key_pem": wire["key_pem"]})
    with pytest.raises(TlsMaterialError, match="protocol"):
        tls.subscribe(alice, 8443, {"cert_pem": cert, "key_pem": key, "delivery": {"protocol": 1}})
    assert tls.for_port(8443) is None  # nothing kept of a refused one
