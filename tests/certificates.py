"""The test certificate: self-signed for ``localhost`` and ``127.0.0.1``.

`make_certificate` runs the openssl command line tool, once per test session
(the ``certificate`` fixture in `tests/conftest.py`). Without the tool the TLS
tests fail, saying so: they never skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest


class Certificate(NamedTuple):
    """Paths of a PEM certificate and its key; unpacks as ``certfile, keyfile``."""

    certfile: str
    keyfile: str


def make_certificate(folder: Path) -> Certificate:
    """Write a self-signed certificate and its unencrypted key into ``folder``."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test certificate", pytrace=False)
    certificate = Certificate(str(folder / "cert.pem"), str(folder / "key.pem"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        + ["-keyout", certificate.keyfile, "-out", certificate.certfile],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return certificate
