"""Limited X.509 proxies, checked with a throw-away CA and real openssl runs."""

from __future__ import annotations

import re
import stat
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmrunner import runner
from lmrunner.errors import CommandError, ProxyError
from lmrunner.proxy import make_limited_proxy, proxy_not_after

pytestmark = pytest.mark.allow_subprocess

NAME = "atlas-prod"
# Escaped '/' and '+', a backslash, a comma, a non-ASCII letter and a multi-valued RDN.
USER_SUBJECT = r"/DC=org/DC=test/O=Test\/Grid, Inc./L=Genève/OU=a\+b=c\\d/CN=Test User+UID=tuser"
PRINTABLE_SUBJECT = "/C=UK/O=eScience/OU=Manchester/L=HEP/CN=test user"
PEM_RE = re.compile(r"-----BEGIN ([A-Z ]+)-----\n.+?\n-----END \1-----", re.S)
DUMP = "sep_comma_plus,oid,dump_all,dump_der"

CONFIG = """\
[req]
distinguished_name = dn
string_mask = {mask}
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[user_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment, dataEncipherment
"""


@dataclass(frozen=True)
class Pki:
    ca_pem: Path
    ca_key: Path
    user_pem: Path
    user_key: Path
    printable_pem: Path  # same key as user_pem, a PrintableString-only subject

    @property
    def user_not_after(self) -> int:
        return proxy_not_after(self.user_pem.read_text())


def openssl(*args: str | Path, input_text: str | None = None) -> str:
    return runner.run(["openssl", *args], input_text=input_text).stdout


def iso(unix: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def subject(pem: Path, nameopt: str = "RFC2253", which: str = "-subject") -> str:
    return (
        openssl("x509", "-in", pem, "-noout", "-nameopt", nameopt, which)
        .split("=", 1)[1]
        .rstrip("\n")
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    (d / "utf8.cnf").write_text(CONFIG.format(mask="utf8only"))
    (d / "pkix.cnf").write_text(CONFIG.format(mask="pkix"))
    pki = Pki(d / "ca.pem", d / "ca.key", d / "user.pem", d / "user.key", d / "printable.pem")
    openssl("req", "-x509", "-config", d / "utf8.cnf", "-extensions", "ca_ext", "-newkey",
            "rsa:2048", "-noenc", "-keyout", pki.ca_key, "-out", pki.ca_pem,
            "-subj", "/C=UK/O=Test Grid/CN=Test CA", "-days", "3")  # fmt: skip
    openssl("req", "-new", "-config", d / "utf8.cnf", "-utf8", "-newkey", "rsa:2048", "-noenc",
            "-keyout", pki.user_key, "-out", d / "user.csr", "-subj", USER_SUBJECT)  # fmt: skip
    openssl("req", "-new", "-config", d / "pkix.cnf", "-key", pki.user_key,
            "-out", d / "printable.csr", "-subj", PRINTABLE_SUBJECT)  # fmt: skip
    for csr, pem in ((d / "user.csr", pki.user_pem), (d / "printable.csr", pki.printable_pem)):
        openssl("x509", "-req", "-in", csr, "-CA", pki.ca_pem, "-CAkey", pki.ca_key,
                "-set_serial", "2", "-days", "2", "-extfile", d / "utf8.cnf",
                "-extensions", "user_ext", "-out", pem)  # fmt: skip
    return pki


def split(text: str, into: Path) -> tuple[Path, str, str]:
    """The proxy cert (written to ``into``), its key and the chain; checks nothing else is there."""
    blocks = list(PEM_RE.finditer(text))
    assert [m.group(1) for m in blocks] == ["CERTIFICATE", "PRIVATE KEY", "CERTIFICATE"]
    parts = [m.group(0) + "\n" for m in blocks]
    assert "".join(parts) == text
    into.write_text(parts[0])
    return into, parts[1], parts[2]


def test_rfc3820_proxy_verifies_and_is_limited(pki: Pki, tmp_path: Path) -> None:
    now = int(time.time())
    text = make_limited_proxy(pki.user_pem, pki.user_key, not_after=now + 3600, name=NAME, now=now)
    proxy, key, chain = split(text, tmp_path / "proxy.pem")
    assert chain == pki.user_pem.read_text()

    verified = openssl("verify", "-allow_proxy_certs", "-CAfile", pki.ca_pem,
                       "-untrusted", pki.user_pem, proxy)  # fmt: skip
    assert verified == f"{proxy}: OK\n"
    assert subject(proxy) == f"CN={NAME}," + subject(pki.user_pem)
    assert subject(proxy, which="-issuer") == subject(pki.user_pem)

    info = openssl("x509", "-in", proxy, "-noout", "-text")
    assert re.search(
        r"Proxy Certificate Information: critical\n\s+Path Length Constraint: infinite\n"
        r"\s+Policy Language: 1\.3\.6\.1\.4\.1\.3536\.1\.1\.1\.9\n",
        info,
    )
    assert re.search(
        r"Key Usage: critical\n\s+Digital Signature, Key Encipherment, Key Agreement\n", info
    )
    assert "Public Key Algorithm: rsaEncryption\n" in info
    assert "Public-Key: (2048 bit)" in info
    assert "Signature Algorithm: sha256WithRSAEncryption" in info
    assert int(openssl("x509", "-in", proxy, "-noout", "-serial").split("=")[1], 16) > 0

    assert proxy_not_after(text) == now + 3600
    not_before = openssl("x509", "-in", proxy, "-noout", "-dateopt", "iso_8601", "-startdate")
    assert not_before == f"notBefore={iso(now).replace('T', ' ')}\n"
    assert openssl("pkey", "-pubout", input_text=key) == openssl(
        "x509", "-in", proxy, "-noout", "-pubkey"
    )


def test_legacy_proxy_has_limited_proxy_cn_and_no_proxy_cert_info(pki: Pki, tmp_path: Path) -> None:
    text = make_limited_proxy(
        pki.user_pem, pki.user_key, not_after=int(time.time()) + 600, name=NAME, legacy=True
    )
    proxy, _, chain = split(text, tmp_path / "proxy.pem")
    assert chain == pki.user_pem.read_text()
    assert subject(proxy) == "CN=limited proxy," + subject(pki.user_pem)
    assert subject(proxy, which="-issuer") == subject(pki.user_pem)
    info = openssl("x509", "-in", proxy, "-noout", "-text")
    assert "Proxy Certificate Information" not in info
    assert re.search(
        r"Key Usage: critical\n\s+Digital Signature, Key Encipherment, Key Agreement\n", info
    )
    # OpenSSL only knows RFC 3820 proxies: a legacy one looks like a certificate issued by a
    # non-CA. Those must be the only complaints (a bad signature would be reported as well).
    done = runner.run(
        ["openssl", "verify", "-allow_proxy_certs", "-CAfile", pki.ca_pem,
         "-untrusted", pki.user_pem, proxy],
        ok_codes=(0, 2),
    )  # fmt: skip
    if done.returncode != 0:
        complaints = set(
            re.findall(r"error \d+ at \d+ depth lookup: (.+)", done.stdout + done.stderr)
        )
        assert complaints == {
            "invalid CA certificate",
            "key usage does not include certificate signing",
        }


def test_cert_and_key_in_one_file(pki: Pki, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_text(pki.user_key.read_text() + pki.user_pem.read_text())  # key first
    text = make_limited_proxy(both, both, not_after=int(time.time()) + 600, name=NAME)
    proxy, key, chain = split(text, tmp_path / "proxy.pem")  # the user's key is not handed out
    assert chain == pki.user_pem.read_text()
    assert key != pki.user_key.read_text()
    verified = openssl("verify", "-allow_proxy_certs", "-CAfile", pki.ca_pem,
                       "-untrusted", pki.user_pem, proxy)  # fmt: skip
    assert verified == f"{proxy}: OK\n"


@pytest.mark.parametrize("which", ["utf8", "printable"])
def test_subject_is_copied_byte_for_byte(pki: Pki, tmp_path: Path, which: str) -> None:
    cert = pki.user_pem if which == "utf8" else pki.printable_pem
    text = make_limited_proxy(cert, pki.user_key, not_after=int(time.time()) + 600, name=NAME)
    proxy, _, _ = split(text, tmp_path / "proxy.pem")
    tag = "0C" if which == "utf8" else "13"  # UTF8String, PrintableString
    expected = subject(cert, DUMP) + f",2.5.4.3=#{tag}{len(NAME):02X}{NAME.encode().hex().upper()}"
    assert subject(proxy, DUMP) == expected


def expect_error(message: str, cert: Path, key: Path, **kwargs: Any) -> ProxyError:
    kwargs.setdefault("not_after", int(time.time()) + 600)
    with pytest.raises(ProxyError) as caught:
        make_limited_proxy(cert, key, name=NAME, **kwargs)
    assert str(caught.value) == message
    assert "\n" not in message
    return caught.value


def test_missing_cert_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    err = expect_error(f"{missing}: cannot read: No such file or directory", missing, pki.user_key)
    assert isinstance(err.__cause__, FileNotFoundError)


def test_cert_file_without_a_certificate(pki: Pki) -> None:
    expect_error(f"{pki.user_key}: no certificate found", pki.user_key, pki.user_key)


def test_key_file_without_a_key(pki: Pki) -> None:
    expect_error(f"{pki.user_pem}: no private key found", pki.user_pem, pki.user_pem)


def test_encrypted_key(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    openssl("pkey", "-in", pki.user_key, "-aes256", "-passout", "pass:secret", "-out", encrypted)
    message = f"{encrypted}: private key is encrypted; an unencrypted key is needed"
    expect_error(message, pki.user_pem, encrypted)


def test_key_that_does_not_match(pki: Pki) -> None:
    message = f"{pki.ca_key}: private key does not match the certificate in {pki.user_pem}"
    expect_error(message, pki.user_pem, pki.ca_key)


def test_certificate_ending_before_not_after(pki: Pki) -> None:
    end = pki.user_not_after
    message = (
        f"{pki.user_pem}: certificate expires at {iso(end)}, "
        f"before the proxy's not_after {iso(end + 1)}"
    )
    expect_error(message, pki.user_pem, pki.user_key, not_after=end + 1)


def test_expired_certificate(pki: Pki) -> None:
    end = pki.user_not_after
    message = f"{pki.user_pem}: certificate expired at {iso(end)}"
    expect_error(message, pki.user_pem, pki.user_key, now=end, not_after=end + 60)


def test_not_after_not_after_now(pki: Pki) -> None:
    now = int(time.time())
    message = f"{pki.user_pem}: proxy not_after {iso(now)} is not after now {iso(now)}"
    expect_error(message, pki.user_pem, pki.user_key, now=now, not_after=now)


def test_openssl_failure(pki: Pki) -> None:
    message = (
        f"{pki.user_pem}: openssl x509 failed: cannot execute: "
        "[Errno 2] No such file or directory: '/nonexistent/openssl'"
    )
    err = expect_error(message, pki.user_pem, pki.user_key, openssl="/nonexistent/openssl")
    assert isinstance(err.__cause__, CommandError)


def test_proxy_not_after_without_a_certificate() -> None:
    with pytest.raises(ProxyError, match=r"^PEM text: openssl x509 failed: "):
        proxy_not_after("no certificate here")


def test_temporary_directory_is_private_and_always_removed(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    key_files: set[str] = set()
    real_run = runner.run

    def checking_run(argv: Sequence[str | Path], **kwargs: Any) -> runner.Completed:
        for workdir in scratch.iterdir():
            assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
            for path in workdir.iterdir():
                if "PRIVATE KEY" in path.read_text():
                    assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
                    key_files.add(path.name)
        return real_run(argv, **kwargs)

    monkeypatch.setattr(runner, "run", checking_run)
    not_after = int(time.time()) + 600
    make_limited_proxy(pki.user_pem, pki.user_key, not_after=not_after, name=NAME)
    assert key_files == {"user.key", "proxy.key"}
    assert list(scratch.iterdir()) == []

    with pytest.raises(ProxyError, match="does not match"):  # fails inside the directory
        make_limited_proxy(pki.user_pem, pki.ca_key, not_after=not_after, name=NAME)
    assert list(scratch.iterdir()) == []
