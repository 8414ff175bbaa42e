"""Throwaway PKI for the TLS tests, made at test time with the `openssl` command-line tool (never committed).

Two CAs: the trusted one signs a server certificate (SAN 127.0.0.1 and localhost) and a client certificate;
a rogue one signs a client certificate the server must not accept.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: KeyPair
    client: KeyPair
    rogue_ca: Path
    rogue_client: KeyPair


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", pair.key, "-out", pair.cert,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def _leaf(folder: Path, name: str, ca: KeyPair, usage: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    csr = folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", pair.key, "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-days", "2", "-extfile", ext, "-out", pair.cert,
    )  # fmt: skip
    return pair


def make_pki(folder: Path) -> Pki:
    """Create the CAs, keys and certificates under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "radai-test-ca")
    rogue = _ca(folder, "rogue-ca")
    return Pki(
        ca=ca.cert,
        server=_leaf(folder, "server", ca, "serverAuth"),
        client=_leaf(folder, "client", ca, "clientAuth"),
        rogue_ca=rogue.cert,
        rogue_client=_leaf(folder, "rogue-client", rogue, "clientAuth"),
    )
