"""TLS for the instance: a private CA made at init, a server certificate at each serve.

Clients verify the server against the instance's own CA (sslmode=verify-full), so a
server on another address, or with another CA, is refused before any password is sent.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import time
from pathlib import Path

from .home import Home

CA_DAYS = 3650
SERVER_DAYS = 400
SSLMODE = "verify-full"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _pem_cert(cert) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(text: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def ensure_ca(home: Home) -> Path:
    """The instance's CA certificate, made once (key and certificate 0600 in secrets/)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert_path, key_path = home.ca_cert, home.ca_key
    if cert_path.is_file() and key_path.is_file():
        return cert_path
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = _name(f"pgjob CA for {home.path}"[:64])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    home.write(key_path, _pem_key(key))
    home.write(cert_path, _pem_cert(cert))
    return cert_path


def issue_server_cert(home: Home, *, address: str, node: str) -> tuple[str, str]:
    """(certificate, key) in PEM for this node: its address, node name and host name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    cert_path, key_path = home.ca_cert, home.ca_key
    ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    names = {node, socket.gethostname(), socket.getfqdn()} - {""}
    alt = [x509.DNSName(n) for n in sorted(names)]
    alt.append(x509.IPAddress(ipaddress.ip_address(address)))
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(node[:64] or address))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem_cert(cert), _pem_key(key)


def _issued_for(home: Home, address: str, node: str) -> dict:
    ca_text = home.ca_cert.read_bytes()
    return {"address": address, "node": node, "ca": hashlib.sha256(ca_text).hexdigest()}


def install_server_cert(home: Home, *, address: str, node: str) -> dict[str, object]:
    """Write this node's certificate into the data directory; the settings that use it.

    A certificate already issued for this address, node and CA, and good for a month
    more, is kept: a restart on the same node does not pay for a new key (nor for
    importing the crypto library, a good part of serve's start-up time).
    """
    wanted = _issued_for(home, address, node)
    issued = home.read_record(home.server_cert_record)
    fresh = issued.pop("not_after", 0) > time.time() + 30 * 86400
    if not (fresh and issued == wanted and home.server_key.is_file()):
        cert, key = issue_server_cert(home, address=address, node=node)
        home.write(home.server_cert, cert)
        home.write(home.server_key, key)
        home.write_record(home.server_cert_record,
                          {**wanted, "not_after": time.time() + SERVER_DAYS * 86400 - 600})
    return {"ssl": True, "ssl_cert_file": home.server_cert.name,
            "ssl_key_file": home.server_key.name,
            "ssl_min_protocol_version": "TLSv1.2"}
