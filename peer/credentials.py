"""Run credentials: a run CA, each peer's own key pair, and certificates for mutual TLS.

``peer keys new --run-id ID --out DIR`` writes ``DIR/ca.crt`` and ``DIR/ca.key``; copying DIR
to a machine is what admits that machine to the run. At start a peer loads the CA, makes (once)
its own key pair in its state dir, and issues itself a certificate signed by the run CA.

A peer's id is derived from its public key (the first 16 hex digits of the sha256 of its
SubjectPublicKeyInfo): nobody chooses an id, and nobody can claim an id with another key. The
receiver of a call derives the caller's id from the certificate the TLS handshake verified, and
never from a message field.

Every certificate names two DNS identities: ``peer`` (any member of the run) and
``<peer id>.peer`` (that member); a client that knows whom it calls checks the second one, so
the TLS handshake itself proves it reached that peer.

Key files are written 0600 and refused when group or world can read them.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peer.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
NODE_KEY = "node.key"
MEMBER_NAME = "peer"
"""The DNS name every member's certificate carries; ``<peer id>.peer`` names one member."""
_RUN_URN = "urn:peer:run:"
_CA_DAYS = 3650


def member_name(peer_id: str) -> str:
    return f"{peer_id}.{MEMBER_NAME}"


@dataclass(frozen=True)
class RunCA:
    run_id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Identity:
    """What TLS needs, PEM-encoded: our key and certificate, and the run CA to verify others."""

    peer_id: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


def peer_id_of_public_key(key: ec.EllipticCurvePublicKey) -> str:
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:16]


def peer_id_of_certificate(pem: bytes) -> str:
    """The peer id a (TLS-verified) certificate proves. Raises ValueError if it is unreadable."""
    return peer_id_of_public_key(x509.load_pem_x509_certificate(pem).public_key())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 (never briefly readable by others), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read_private(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} can be read by group or others (mode {stat.S_IMODE(mode):04o}); a run key "
                          f"must stay private: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key")
    return key


def create_run_credentials(run_id: str, out_dir: Path) -> Path:
    """Write a new run CA (``ca.crt``, ``ca.key`` 0600) into ``out_dir``; refuse to overwrite."""
    out_dir = Path(out_dir)
    if (out_dir / CA_KEY).exists() or (out_dir / CA_CERT).exists():
        raise ConfigError(f"{out_dir} already holds run credentials; remove them or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "peer"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"peer run {run_id}")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(_RUN_URN + run_id)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(out_dir / CA_KEY, _pem_key(key))
    (out_dir / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out_dir


def load_run_ca(directory: Path, run_id: str | None = None) -> RunCA:
    """Load the run CA from ``directory``; ConfigError naming what is wrong (missing files, a
    readable key, a key that does not match, or credentials of another run)."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if not path.exists():
            raise ConfigError(f"no {path.name} in {directory}: create run credentials with "
                              f"`peer keys new --run-id RUN --out {directory}`")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{cert_path} is not a PEM certificate: {exc}") from None
    key = _read_private(key_path)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ConfigError(f"{key_path} does not belong to {cert_path}")
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        ca_run = next(u[len(_RUN_URN):] for u in uris if u.startswith(_RUN_URN))
    except (x509.ExtensionNotFound, StopIteration):
        raise ConfigError(f"{cert_path} is not a peer run CA (no run id in it)") from None
    if run_id is not None and ca_run != run_id:
        raise ConfigError(f"the credentials in {directory} are for run {ca_run!r}, not {run_id!r}")
    return RunCA(ca_run, cert, key)


def _issue(ca: RunCA, key: ec.EllipticCurvePrivateKey) -> Identity:
    peer_id = peer_id_of_public_key(key.public_key())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(ca.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(MEMBER_NAME), x509.DNSName(member_name(peer_id))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Identity(peer_id, _pem_key(key), cert.public_bytes(serialization.Encoding.PEM), ca.cert_pem)


def node_identity(ca: RunCA, state_dir: Path) -> Identity:
    """This peer's identity: its key pair (made once, kept 0600 in ``state_dir``) with a
    certificate the run CA signs now."""
    state_dir = Path(state_dir)
    path = state_dir / NODE_KEY
    if path.exists():
        key = _read_private(path)
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(path, _pem_key(key))
    return _issue(ca, key)


def ephemeral_identity(ca: RunCA) -> Identity:
    """A throwaway identity for command-line tools (``peer status``): a member's rights to ask."""
    return _issue(ca, ec.generate_private_key(ec.SECP256R1()))


def verify_signed_by(cert_pem: bytes, ca: RunCA) -> bool:
    """Whether ``cert_pem`` was signed by the run CA (the TLS stack checks this on every
    connection; this is for tests and tools)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
