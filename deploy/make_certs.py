"""Generate the key material for a pemma (Flower 1.42) deployment.

Three kinds of files, each written with the permissions it needs (private keys 0600):

``ca``
    A local certificate authority: ``ca.crt`` (give it to every hospital, it is public)
    and ``ca.key`` (keep it on the coordinator, offline if possible).
``server``
    The SuperLink's TLS certificate ``server.pem`` and key ``server.key``, signed by the
    CA. Subject Alternative Names always include ``localhost`` and ``127.0.0.1`` (the
    SuperLink's own ServerApp process connects to it on loopback) plus every ``--dns`` and
    ``--ip`` given: the names hospitals put after ``--superlink``.
``supernode-key``
    One SuperNode's authentication key pair, ECDSA P-384 in OpenSSH format, exactly what
    ``ssh-keygen -t ecdsa -b 384 -N "" -f NAME`` writes: ``NAME`` (private, stays at the
    hospital, passed to ``flower-supernode --auth-supernode-private-key``) and
    ``NAME.pub`` (public, sent to the coordinator for ``flwr supernode register``).

Usage (see deploy/DEPLOYMENT.md)::

    python deploy/make_certs.py ca --out certs
    python deploy/make_certs.py server --ca-dir certs --out certs --dns superlink.example.org
    python deploy/make_certs.py supernode-key --out keys --name hospital-a

Only the ``cryptography`` package (installed with flwr) is needed; nothing here imports
flwr or pemma, so the script also runs on a machine that has neither.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_DNS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class SuperNodeKeyFiles:
    private: Path
    public: Path


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        # Create with 0600 from the start: never a moment where the key is world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(out_dir: Path, common_name: str = "pemma federation CA", days: int = 825) -> CaFiles:
    """Write ``ca.crt`` and ``ca.key`` into ``out_dir``."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    files = CaFiles(cert=out_dir / "ca.crt", key=out_dir / "ca.key")
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.key, _pem_private(key), private=True)
    return files


def make_server_cert(
    ca_dir: Path,
    out_dir: Path,
    dns_names: tuple[str, ...] | list[str] = (),
    ip_addresses: tuple[str, ...] | list[str] = (),
    days: int = 397,
) -> ServerFiles:
    """Write ``server.pem`` / ``server.key`` signed by the CA in ``ca_dir``.

    The certificate is valid for localhost/127.0.0.1/::1 and every extra name given.
    """
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    dns = list(dict.fromkeys([*LOOPBACK_DNS, *dns_names]))
    ips = list(dict.fromkeys([*LOOPBACK_IPS, *ip_addresses]))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    common_name = dns_names[0] if dns_names else "localhost"

    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    files = ServerFiles(cert=out_dir / "server.pem", key=out_dir / "server.key")
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.key, _pem_private(key), private=True)
    return files


def make_supernode_key(out_dir: Path, name: str) -> SuperNodeKeyFiles:
    """Write the SuperNode key pair ``NAME`` (private) and ``NAME.pub`` (public).

    ECDSA P-384, OpenSSH encoding: the private key is what
    ``flower-supernode --auth-supernode-private-key`` loads, the public key what
    ``flwr supernode register`` expects.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    files = SuperNodeKeyFiles(private=out_dir / name, public=out_dir / f"{name}.pub")
    _write(files.private, private, private=True)
    _write(files.public, public + f" {name}\n".encode(), private=False)
    return files


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_certs.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("ca", help="create a local certificate authority (ca.crt, ca.key)")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--name", default="pemma federation CA", help="CA common name")
    a.add_argument("--force", action="store_true", help="overwrite an existing CA")

    s = sub.add_parser("server", help="create the SuperLink TLS certificate (server.pem, server.key)")
    s.add_argument("--ca-dir", type=Path, required=True, help="folder holding ca.crt and ca.key")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--dns", action="append", default=[], help="extra DNS name (repeatable)")
    s.add_argument("--ip", action="append", default=[], help="extra IP address (repeatable)")

    k = sub.add_parser("supernode-key", help="create a SuperNode authentication key pair")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--name", required=True, help="file name, e.g. the hospital's short name")
    k.add_argument("--force", action="store_true", help="overwrite an existing key")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "ca":
        if (args.out / "ca.key").exists() and not args.force:
            print(f"{args.out / 'ca.key'} exists; refusing to overwrite (use --force)", file=sys.stderr)
            return 1
        f = make_ca(args.out, args.name)
        print(f"CA certificate: {f.cert}\nCA private key: {f.key}  (keep secret)")
    elif args.cmd == "server":
        f2 = make_server_cert(args.ca_dir, args.out, args.dns, args.ip)
        print(f"server certificate: {f2.cert}\nserver private key: {f2.key}  (keep secret)")
    else:
        if (args.out / args.name).exists() and not args.force:
            print(f"{args.out / args.name} exists; refusing to overwrite (use --force)", file=sys.stderr)
            return 1
        f3 = make_supernode_key(args.out, args.name)
        print(f"private key: {f3.private}  (stays on this machine)\npublic key:  {f3.public}  (send to the coordinator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
