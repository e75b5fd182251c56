"""Generate what a local TLS + SuperNode-authenticated Flower deployment needs, with `cryptography`.

    python -m server.deploy_keys OUT_DIR --nodes 3 [--host 127.0.0.1]

writes
    OUT_DIR/ca.crt, ca.key             a private certificate authority (self-signed, 1 year)
    OUT_DIR/superlink.crt, .key        the SuperLink's TLS certificate for `--host` (and localhost)
    OUT_DIR/supernode-<i>, .pub        one EC (NIST P-384) key pair per SuperNode, in the OpenSSH
                                       format `flower-supernode --auth-supernode-private-key` and
                                       `flwr supernode register` read
Private keys are written with mode 0600. See docs/deployment.md for the whole procedure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(out: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedzoodip local CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),  # fmt: skip
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "ca.key", _pem_key(key))
    return cert, key


def make_server_cert(
    out: Path, host: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    if host != "127.0.0.1":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    (out / "superlink.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "superlink.key", _pem_key(key))


def make_supernode_keys(out: Path, index: int) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format (what Flower's SuperNode authentication reads)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = out / f"supernode-{index}"
    _write_private(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub = out / f"supernode-{index}.pub"
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n"
    )
    return priv, pub


def generate(out_dir: str | Path, *, nodes: int, host: str = "127.0.0.1") -> Path:
    """Write the CA, the SuperLink certificate and `nodes` SuperNode key pairs into `out_dir`."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; refusing to overwrite keys")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca, ca_key = make_ca(out, now)
    make_server_cert(out, host, ca, ca_key, now)
    for i in range(nodes):
        make_supernode_keys(out, i)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    print(generate(args.out_dir, nodes=args.nodes, host=args.host))


if __name__ == "__main__":
    main()
