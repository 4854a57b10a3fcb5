"""Self-signed CA, server and client certificates for the TLS/mTLS tests (made with `cryptography`)."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class CertPaths(NamedTuple):
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    ca_key: Path  # to issue more certificates (tests that need a second client)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key, issuer_name, issuer_key, *, ca: bool, usage=None, sans=None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_certificates(directory: Path) -> CertPaths:
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client")}
    ca = _issue("semguard test CA", keys["ca"], _name("semguard test CA"), keys["ca"], ca=True)
    server = _issue("localhost", keys["server"], ca.subject, keys["ca"], ca=False,
                    usage=ExtendedKeyUsageOID.SERVER_AUTH,
                    sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _issue("semguard test client", keys["client"], ca.subject, keys["ca"], ca=False,
                    usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    out = {}
    for name, cert in (("ca", ca), ("server", server), ("client", client)):
        out[f"{name}_cert"] = directory / f"{name}.crt"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for name in ("server", "client", "ca"):
        out[f"{name}_key"] = directory / f"{name}.key"
        out[f"{name}_key"].write_bytes(keys[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return CertPaths(**out)
