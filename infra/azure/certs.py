"""The scale set's HTTPS certificate: one name in front of many instances, so one certificate for all.

Per-instance ACME cannot work behind a load balancer (each instance would order the same name and
answer the others' challenges at random), and Caddy's own authority on each instance would give every
instance another root. So deploy-azure makes a small CA and a server certificate for the deployment's
DNS name here (the CA's root saved on this machine like a single VM's, the key never leaving it but to
the instances' protected settings), or takes the user's own (`--tls-cert`, `--tls-key`: PEM files,
e.g. from a public CA for a custom name). Either way the instances get them like the other secrets.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest a browser accepts for a server certificate it is told to trust


class CertificateError(ValueError):
    """A certificate or key that cannot serve the deployment; the message says which and why."""


@dataclass(frozen=True)
class ServerCertificate:
    """A server certificate chain and key in PEM; `ca` is the root to trust ("" for the user's own)."""

    cert: str
    key: str = field(repr=False)
    ca: str = ""
    generated: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"cert": self.cert, "key": self.key, "ca": self.ca}


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def generate(fqdn: str, now: datetime.datetime | None = None) -> ServerCertificate:
    """A new CA (P-256, name constrained to `fqdn`, so its root can vouch for nothing else) and a server
    certificate for `fqdn` signed by it. The CA's key is dropped once the certificate is signed."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"qwen-box CA for {fqdn}"[:64])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.NameConstraints([x509.DNSName(fqdn)], None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(fqdn[:64]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return ServerCertificate(
        cert=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key=key_pem,
        ca=ca.public_bytes(serialization.Encoding.PEM).decode(),
        generated=True,
    )


def load_given(cert_pem: str, key_pem: str, fqdn: str) -> ServerCertificate:
    """The user's certificate chain and key, checked: both PEM, the key matches, the name is covered
    (a wildcard one level deep counts) and it has not expired."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError:
        raise CertificateError("--tls-cert is not a PEM certificate (chain)") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise CertificateError("--tls-key is not an unencrypted PEM private key") from None
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, public) != leaf.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise CertificateError("--tls-key is not the key of --tls-cert's first certificate")
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [n.lower() for n in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns = []
    wildcard = "*." + fqdn.split(".", 1)[-1]
    if fqdn.lower() not in dns and wildcard.lower() not in dns:
        raise CertificateError(f"--tls-cert is for {', '.join(dns) or 'no DNS name'}, not {fqdn}")
    if leaf.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise CertificateError(f"--tls-cert expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    return ServerCertificate(cert=cert_pem.strip() + "\n", key=key_pem.strip() + "\n")
