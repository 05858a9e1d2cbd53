"""The raybatch server's TLS certificate for a cluster's head: made once per cluster, on
the head, by ``raybatch cluster head-setup`` (in ``~/raybatch-tls``) and kept there, so
clients that trust it keep trusting it. The private key never leaves the head: Ray's
``file_mounts`` copy to every node, workers included (where job code runs as the same
Unix user), so ``raybatch cluster up`` reads only the certificate back from the head.

It is self-signed and is its own CA: clients verify the server with it
(``RAYBATCH_CA_CERT`` / ``--ca-cert``), which ``raybatch env`` prints. Its names are
the loopback addresses (the client reaches the head's server through an SSH tunnel to
127.0.0.1) plus any the caller adds (``head-setup``: the head's host name and addresses,
``local_names``, for when the server's port is opened on a network). The key is an EC
P-256 key (made in milliseconds), 0600."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path
from typing import Iterable

CERT_NAME = "server.pem"   # the certificate, and the CA clients verify the server with
KEY_NAME = "server.key"    # its private key (0600)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 3650


def pair(cert_path: Path, key_path: Path, hosts: Iterable[str] = (), days: int = VALID_DAYS) -> tuple[Path, Path]:
    """The certificate at ``cert_path`` and its key at ``key_path``: both made if either is
    missing, else kept (a re-run must not change what clients already trust). Either way the
    key is left 0600 (a directory it makes, 0700)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    cert_path, key_path = Path(cert_path), Path(key_path)
    for d in dict.fromkeys([key_path.parent, cert_path.parent]):
        if not d.is_dir():
            d.mkdir(mode=0o700, parents=True)
            os.chmod(d, 0o700)
    if cert_path.is_file() and key_path.is_file():
        if key_path.stat().st_mode & 0o077:
            os.chmod(key_path, 0o600)
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for h in dict.fromkeys([*LOOPBACK_NAMES, *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raybatch server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            # its own CA: what clients are given to verify the server with
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def local_names() -> list[str]:
    """This machine's host name(s) and non-loopback IP addresses (best effort: a name
    that cannot be resolved is left out), for the head's certificate."""
    names: list[str] = []
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in ("localhost", "localhost.localdomain"):
            names.append(name)
    addrs: list[str] = []
    try:
        addrs += [ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        pass
    try:  # the address of the default route (a UDP "connect" sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addrs.append(s.getsockname()[0])
    except OSError:
        pass
    for a in addrs:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:  # e.g. an IPv6 address with a %scope
            continue
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            names.append(str(ip))
    return list(dict.fromkeys(names))
