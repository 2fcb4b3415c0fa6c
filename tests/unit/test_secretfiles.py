"""Which server certificates `ensure_secrets` makes, in a secrets/ folder of the test's own:
the project CA's are made when missing or left from an earlier CA, an operator's own (another
CA's) is kept as it is, and the orchestrator's checks trust exactly the proxy's."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from orchestrate import certs, secretfiles
from orchestrate.stack import CA_CERT, PROXY_CERT, describe_stack

TLS = describe_stack(tls=True)


@pytest.fixture(autouse=True)
def own_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(secretfiles, "ROOT", tmp_path)
    return tmp_path


def read(name: str) -> bytes:
    return secretfiles.secret_path(name).read_bytes()


def test_the_proxy_certificate_is_made_by_the_project_ca_for_this_host() -> None:
    created = secretfiles.ensure_secrets(TLS)
    assert {PROXY_CERT.cert, PROXY_CERT.key} <= set(created)
    assert certs.signed_by(read(PROXY_CERT.cert), read(CA_CERT))
    assert not secretfiles.operators_own(PROXY_CERT)


def test_a_certificate_left_from_an_earlier_ca_is_made_anew() -> None:
    """A CA rotated while the stack ran without TLS renewed the stack's certificates, not the
    proxy's: the next `up --tls` must not serve one that ca.crt no longer vouches for."""
    secretfiles.ensure_secrets(TLS)
    earlier = certs.make_server_cert(certs.make_ca(secretfiles.CA_NAME), list(PROXY_CERT.hosts))
    secretfiles.write_secret(PROXY_CERT.cert, earlier.cert)
    secretfiles.write_secret(PROXY_CERT.key, earlier.key)
    assert secretfiles.ensure_secrets(TLS) == [PROXY_CERT.key, PROXY_CERT.cert]
    assert certs.signed_by(read(PROXY_CERT.cert), read(CA_CERT))


def test_the_operators_own_certificate_is_kept_as_it_is() -> None:
    secretfiles.ensure_secrets(TLS)
    own = certs.make_server_cert(certs.make_ca("Operator Root CA"), ["api.example.org"])
    secretfiles.write_secret(PROXY_CERT.cert, own.cert)
    secretfiles.write_secret(PROXY_CERT.key, own.key)
    assert secretfiles.ensure_secrets(TLS) == []
    assert read(PROXY_CERT.cert) == own.cert and secretfiles.operators_own(PROXY_CERT)
    expiring = secretfiles.expiring_certificates(TLS, certs.expires(own.cert))
    assert any(f"secrets/{PROXY_CERT.cert}" in line and "your own" in line for line in expiring)


def handshake(server_pair: certs.KeyPair, context: ssl.SSLContext, tmp_path: Path) -> bool:
    """Whether a client with `context` completes a TLS handshake with a server presenting
    `server_pair`."""
    (tmp_path / "s.crt").write_bytes(server_pair.cert)
    (tmp_path / "s.key").write_bytes(server_pair.key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            connection, _ = listener.accept()
            try:
                server.wrap_socket(connection, server_side=True).close()
            except (ssl.SSLError, OSError):
                connection.close()
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                context.wrap_socket(raw, server_hostname="127.0.0.1").close()
            return True
        except ssl.SSLError:
            return False
        finally:
            thread.join(timeout=5)


def test_the_orchestrators_checks_trust_exactly_the_proxys_certificate(tmp_path: Path) -> None:
    """Whichever names it was issued for (an operator's, for a public name), and nothing else,
    not even another certificate of the same CA."""
    operator_ca = certs.make_ca("Operator Root CA")
    own = certs.make_server_cert(operator_ca, ["api.example.org"])
    secretfiles.write_secret(PROXY_CERT.cert, own.cert + operator_ca.cert)  # its chain after it
    context = secretfiles.port_context(TLS.service("proxy").ports[0])
    assert context is not None
    assert handshake(own, context, tmp_path)
    assert not handshake(certs.make_server_cert(operator_ca, ["127.0.0.1"]), context, tmp_path)
    assert secretfiles.port_context(describe_stack().service("proxy").ports[0]) is None
