"""Limited X.509 proxies for the user_data of logical machines.

A machinetype with ``user_data_proxy: true`` gets a short-lived *limited* proxy, signed by the
machinetype's own certificate and key, embedded in its user_data, so the logical machine can
authenticate as that identity until its shutdown time without ever seeing the long-lived key
(Vac's ``makeX509Proxy``). The proxy is RFC 3820 style (a critical ``proxyCertInfo`` with the
limited-proxy policy language) or, with ``legacy=True``, old Globus style (``CN=limited proxy``).

lmrunner has no crypto dependency, so the work is done by the ``openssl`` command line (3.0+),
always through :func:`lmrunner.runner.run`. ``openssl ca`` signs, because it is the only 3.0
command that sets notBefore/notAfter to the second. Private keys only ever live in 0600 files
inside a 0700 temporary directory that is always removed; they never appear in argv or logs.
"""

from __future__ import annotations

import calendar
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmrunner import runner
from lmrunner.errors import CommandError, ProxyError

LIMITED_PROXY_OID = "1.3.6.1.4.1.3536.1.1.1.9"
_CN_OID = "2.5.4.3"
_TIMEOUT = 60.0
_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_KEY_RE = re.compile(
    r"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.S
)
# Names printed as OID=#<hex DER of the value>: unambiguous whatever the value contains.
_NAMEOPT = "sep_comma_plus,oid,dump_all,dump_der"
_STRING_CODECS = {0x0C: "utf-8", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}  # others: 8-bit

_CONFIG = """\
[req]
distinguished_name = empty
string_mask = {string_mask}
[empty]
[ca]
default_ca = proxy_ca
[proxy_ca]
database = index.txt
new_certs_dir = .
serial = serial
policy = anything
unique_subject = no
[anything]
commonName = optional
[rfc3820]
keyUsage = critical, digitalSignature, keyEncipherment, keyAgreement
proxyCertInfo = critical, language:{oid}
[legacy]
keyUsage = critical, digitalSignature, keyEncipherment, keyAgreement
"""

Rdn = tuple[tuple[str, int, str], ...]
"""One relative distinguished name: (OID, ASN.1 string tag, text) per attribute."""


@dataclass(frozen=True, slots=True)
class _CertInfo:
    subject: tuple[Rdn, ...]
    not_after: int
    public_key: str


def make_limited_proxy(
    cert_file: Path,
    key_file: Path,
    *,
    not_after: int,
    name: str,
    legacy: bool = False,
    bits: int = 2048,
    now: int | None = None,
    openssl: str = "openssl",
) -> str:
    """Make a limited proxy of a certificate, valid from now until ``not_after``.

    Args:
        cert_file: PEM file with the certificate, possibly followed by its chain (and the key).
        key_file: PEM file with the certificate's unencrypted private key (may be ``cert_file``).
        not_after: Unix time the proxy expires (the logical machine's shutdown time).
        name: the extra ``CN`` of an RFC 3820 proxy's subject (the machinetype name).
        legacy: make a legacy Globus proxy (``CN=limited proxy``, no proxyCertInfo) instead.
        bits: size of the proxy's new RSA key.
        now: Unix time used as notBefore (default: the current time).
        openssl: the openssl program.

    Returns:
        PEM text: the proxy certificate, its unencrypted private key, then the certificates of
        ``cert_file``. The caller must write it with mode 0600.

    Raises:
        ProxyError: a file is unreadable or lacks a certificate or key, the key does not match,
            the certificate does not last until ``not_after``, or openssl fails.
    """
    now = int(time.time()) if now is None else now
    if not_after <= now:
        raise ProxyError(
            f"{cert_file}: proxy not_after {_iso(not_after)} is not after now {_iso(now)}"
        )
    chain = _CERT_RE.findall(_read(cert_file))
    if not chain:
        raise ProxyError(f"{cert_file}: no certificate found")
    key = _KEY_RE.search(_read(key_file))
    if key is None:
        raise ProxyError(f"{key_file}: no private key found")
    if "ENCRYPTED" in key.group(0):  # also catches the old "Proc-Type: 4,ENCRYPTED" header
        raise ProxyError(f"{key_file}: private key is encrypted; an unencrypted key is needed")
    user = _describe(openssl, chain[0], cert_file)
    if user.not_after <= now:
        raise ProxyError(f"{cert_file}: certificate expired at {_iso(user.not_after)}")
    if user.not_after < not_after:
        raise ProxyError(
            f"{cert_file}: certificate expires at {_iso(user.not_after)}, "
            f"before the proxy's not_after {_iso(not_after)}"
        )

    cn = "limited proxy" if legacy else name
    workdir = Path(tempfile.mkdtemp(prefix="lmrunner-proxy-"))  # mode 0700
    try:
        _write_private(workdir / "user.key", key.group(0) + "\n")
        (workdir / "user.pem").write_text(chain[0] + "\n")
        user_public = _openssl([openssl, "pkey", "-in", "user.key", "-pubout"], key_file, workdir)
        if user_public != user.public_key:
            raise ProxyError(
                f"{key_file}: private key does not match the certificate in {cert_file}"
            )
        # Printable-else-UTF8 reproduces the usual grid DNs byte for byte; an issuer already
        # using UTF8String gets UTF8String throughout.
        utf8 = any(tag == 0x0C for rdn in user.subject for _, tag, _ in rdn)
        config = _CONFIG.format(
            string_mask="utf8only" if utf8 else "MASK:0x2002", oid=LIMITED_PROXY_OID
        )
        (workdir / "openssl.cnf").write_text(config)
        (workdir / "index.txt").write_text("")
        # Random, positive, 63 bits; openssl wants an even number of hex digits.
        (workdir / "serial").write_text(f"{secrets.randbits(63) | 1:016X}\n")
        subject = (*user.subject, ((_CN_OID, 0, cn),))
        _openssl(
            [openssl, "req", "-new", "-config", "openssl.cnf", "-utf8", "-subj", _subj(subject),
             "-newkey", f"rsa:{bits}", "-noenc", "-keyout", "proxy.key", "-out", "proxy.csr"],
            cert_file, workdir,
        )  # fmt: skip
        _openssl(
            [openssl, "ca", "-batch", "-config", "openssl.cnf", "-preserveDN", "-notext",
             "-md", "sha256", "-cert", "user.pem", "-keyfile", "user.key",
             "-startdate", _asn1_time(now), "-enddate", _asn1_time(not_after),
             "-extensions", "legacy" if legacy else "rfc3820",
             "-in", "proxy.csr", "-out", "proxy.pem"],
            cert_file, workdir,
        )  # fmt: skip
        proxy = (workdir / "proxy.pem").read_text()
        # openssl silently skips attribute types it does not know; never hand out such a proxy.
        if _plain(_describe(openssl, proxy, cert_file).subject) != _plain(subject):
            raise ProxyError(f"{cert_file}: openssl could not copy the certificate subject")
        proxy_key = (workdir / "proxy.key").read_text()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return proxy.strip() + "\n" + proxy_key.strip() + "\n" + "\n".join(chain) + "\n"


def proxy_not_after(pem: str) -> int:
    """Return the notAfter of the first certificate in a PEM text as a Unix time.

    Raises:
        ProxyError: the text holds no certificate openssl can read.
    """
    return _describe("openssl", pem, "PEM text").not_after


def _describe(openssl: str, pem: str, source: Path | str) -> _CertInfo:
    out = _openssl(
        [openssl, "x509", "-noout", "-nameopt", _NAMEOPT, "-dateopt", "iso_8601",
         "-subject", "-enddate", "-pubkey"],
        source, input_text=pem,
    )  # fmt: skip
    fields = {
        key: value
        for key, _, value in (line.partition("=") for line in out.splitlines())
        if key in ("subject", "notAfter")
    }
    rdns = fields["subject"].split(",") if fields["subject"] else []
    subject = tuple(
        tuple((oid, *_decode(value)) for oid, value in (a.split("=#") for a in rdn.split("+")))
        for rdn in rdns
    )
    not_after = calendar.timegm(time.strptime(fields["notAfter"], "%Y-%m-%d %H:%M:%SZ"))
    return _CertInfo(subject, not_after, out[out.index("-----BEGIN PUBLIC KEY-----") :])


def _decode(hex_der: str) -> tuple[int, str]:
    """(tag, text) of a DER-encoded ASN.1 string given as hex."""
    der = bytes.fromhex(hex_der)
    header = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    return der[0], der[header:].decode(_STRING_CODECS.get(der[0], "latin-1"))


def _subj(subject: tuple[Rdn, ...]) -> str:
    """The name in the ``-subj /type=value/...`` syntax, '+' joining multi-valued RDNs."""
    return "".join(
        "/" + "+".join(f"{oid}=" + re.sub(r"([/+\\])", r"\\\1", text) for oid, _, text in rdn)
        for rdn in subject
    )


def _plain(subject: tuple[Rdn, ...]) -> list[list[tuple[str, str]]]:
    """The subject without string types: validators compare names canonically (RFC 5280)."""
    return [[(oid, text) for oid, _, text in rdn] for rdn in subject]


def _openssl(
    argv: list[str], source: Path | str, cwd: Path | None = None, *, input_text: str | None = None
) -> str:
    try:
        return runner.run(argv, timeout=_TIMEOUT, input_text=input_text, cwd=cwd).stdout
    except CommandError as err:
        lines = err.stderr.strip().splitlines()
        detail = lines[-1] if lines else str(err)
        raise ProxyError(f"{source}: openssl {argv[1]} failed: {detail}") from err


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        raise ProxyError(f"{path}: cannot read: {err.strerror}") from err


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text)


def _iso(unix: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def _asn1_time(unix: int) -> str:
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(unix))
