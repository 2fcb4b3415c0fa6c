"""The project's TLS material: a private CA and the server certificates it signs.

Made with the `cryptography` package (no openssl shell-outs, so nothing secret is ever on a
command line). Keys are ECDSA P-256: every client and server of the stack speaks it, and its
handshakes cost a fraction of RSA's. The CA key stays in secrets/ and is never mounted into a
container; only the CA certificate, and each server's own key and certificate, are.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
# Certificates are made valid from a little in the past, so that a clock a few minutes behind
# in a container does not reject a certificate made a second ago.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class KeyPair:
    """A PEM private key and the PEM certificate for it."""

    key: bytes
    cert: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - BACKDATE).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def make_ca(common_name: str, days: int = VALID_DAYS) -> KeyPair:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    return KeyPair(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_cert(ca: KeyPair, hosts: list[str], days: int = VALID_DAYS,
                     client: bool = False) -> KeyPair:
    """A server certificate for `hosts` (DNS names or IP addresses), signed by `ca`; with
    `client`, one its holder may also present as a client (the members of etcd and of
    Patroni's cluster, to each other)."""
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH] + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    cert = _validity(builder, days).sign(ca_key, hashes.SHA256())
    return KeyPair(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def expires(cert_pem: bytes) -> datetime.datetime:
    """When a PEM certificate stops being valid (UTC)."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def signed_by(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """Whether the CA of `ca_cert_pem` (the first certificate in it) signed `cert_pem`."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_cert_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issuer(cert_pem: bytes) -> str:
    """The common name of the CA that issued a PEM certificate (its first one)."""
    names = x509.load_pem_x509_certificate(cert_pem).issuer.get_attributes_for_oid(
        NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def pinned_context(cert_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly the server certificate `cert_pem` (the first one
    of the file, never the CAs after it), whichever names it was issued for: how the
    orchestrator checks that its port is served by the stack's own proxy, whose certificate
    may be the operator's, for a host name other than 127.0.0.1."""
    leaf = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.PEM)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the certificate itself is what is trusted
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a server certificate as anchor
    context.load_verify_locations(cadata=leaf.decode())
    return context
