"""Which model files to trust: integrity (always) and authenticity (when configured).

Every model file carries a SHA-256 of its own content, and an export's sidecar the SHA-256 of its graph
file. Those detect damage, not forgery: whoever edits a model (say, its threshold to 1e9, so that
every image reads "normal") can recompute the hash. Authenticity needs something an editor does not
have, and is checked on load once a policy is configured:

* a **trust key**: Ed25519 public keys (``IMAGING_AD_TRUST_KEYS``, files separated by ``os.pathsep``).
  ``imaging-ad sign MODEL --key PRIVATE_KEY`` writes ``MODEL.sig``; a model loads only with a valid
  signature from one of these keys. For an export the signature covers the graph file and its sidecar
  (whose ``model_sha256`` must name the graph file), so neither can be swapped or edited.
* a **list of trusted hashes** (``IMAGING_AD_TRUSTED_HASHES``: files in ``sha256sum`` format, or JSON
  such as the demo's ``weights/registry.json``, whose ``"sha256"`` fields are read): a model loads when
  its file's SHA-256 is listed (for an export: its sidecar's, which names the graph file's).

Ed25519 rather than an HMAC key: verifying needs only the public key, so a machine that runs models
cannot also forge them, and one published key serves any number of sites. Without a policy, loading
checks integrity only, and the CLI and the demo say so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imaging_ad.io.checksum import file_sha256

KEYS_ENV = "IMAGING_AD_TRUST_KEYS"
HASHES_ENV = "IMAGING_AD_TRUSTED_HASHES"
SIGNATURE_SUFFIX = ".sig"
SIGNATURE_FORMAT = "imaging_ad.signature"
SIGNATURE_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")

INTEGRITY_ONLY = (
    "integrity checked (the model's SHA-256 checksums), authenticity NOT checked: a checksum detects damage, "
    "not a deliberate edit, since an editor can recompute it. To accept only models you trust, set "
    f"{KEYS_ENV} (public keys; sign models with `imaging-ad sign`) or {HASHES_ENV} (lists of trusted SHA-256)"
)


class UntrustedModelError(ValueError):
    """A model file refused by the configured trust policy; the message says why and what to do."""


@dataclass(frozen=True)
class TrustedKey:
    key_id: str  # first 16 hex digits of the SHA-256 of the raw public key
    key: Any  # cryptography's Ed25519PublicKey
    source: str


@dataclass(frozen=True)
class TrustPolicy:
    """Keys and hashes a model must match to load. An empty policy checks integrity only."""

    keys: tuple[TrustedKey, ...] = ()
    hashes: frozenset[str] = frozenset()
    hash_sources: tuple[str, ...] = field(default=())

    @property
    def configured(self) -> bool:
        return bool(self.keys or self.hashes)

    @classmethod
    def from_files(
        cls, keys: Iterable[str | os.PathLike] = (), hash_lists: Iterable[str | os.PathLike] = ()
    ) -> TrustPolicy:
        """A policy from public key files and trusted-hash list files (missing files are an error)."""
        loaded = tuple(load_public_key(path) for path in keys)
        hashes: set[str] = set()
        sources = []
        for path in hash_lists:
            hashes |= read_hash_list(path)
            sources.append(str(path))
        return cls(loaded, frozenset(hashes), tuple(sources))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrustPolicy:
        """The policy ``IMAGING_AD_TRUST_KEYS`` and ``IMAGING_AD_TRUSTED_HASHES`` configure (empty if unset)."""
        environ = os.environ if environ is None else environ
        return cls.from_files(_split(environ.get(KEYS_ENV, "")), _split(environ.get(HASHES_ENV, "")))

    def with_hashes(self, hashes: Iterable[str], source: str) -> TrustPolicy:
        """This policy, also trusting ``hashes`` (e.g. the demo's model registry)."""
        extra = {h.lower() for h in hashes if isinstance(h, str) and _SHA256.match(h)}
        return replace(self, hashes=self.hashes | extra, hash_sources=(*self.hash_sources, source))

    def describe(self) -> str:
        if not self.configured:
            return INTEGRITY_ONLY
        parts = []
        if self.keys:
            parts.append(
                f"signed by one of {len(self.keys)} trusted key(s) ({', '.join(k.key_id for k in self.keys)})"
            )
        if self.hashes:
            parts.append(f"listed among {len(self.hashes)} trusted SHA-256 ({', '.join(self.hash_sources)})")
        return "authenticity checked: only models " + " or ".join(parts) + " are loaded"


# ----------------------------------------------------------------------------------------------- checking


def verify_model(
    path: str | os.PathLike, policy: TrustPolicy | None = None, sidecar: str | os.PathLike | None = None
) -> str:
    """Check ``path`` (and an export's ``sidecar``) against ``policy`` (default: from the environment).

    Returns what was established ("signed by key …", "listed as trusted", or the integrity-only note);
    raises :class:`UntrustedModelError` when a policy is configured and the files do not satisfy it."""
    policy = TrustPolicy.from_env() if policy is None else policy
    if not policy.configured:
        return INTEGRITY_ONLY
    path = Path(path)
    files = _covered(path, sidecar)
    digests = {f.name: file_sha256(f) for f in files}
    if sidecar is not None:
        _check_sidecar_names_model(path, Path(sidecar), digests[path.name])
    # the hash that identifies the whole model: the sidecar's for an export (it names the graph file's)
    identity = digests[files[-1].name]
    if identity in policy.hashes:
        return f"{files[-1].name} is listed as trusted ({', '.join(policy.hash_sources)})"
    signature = signature_path(path)
    problem = None
    if policy.keys:
        if signature.is_file():
            try:
                return _check_signature(signature, digests, policy)
            except UntrustedModelError as exc:
                problem = str(exc)
        else:
            problem = f"it has no signature ({signature.name} is missing)"
    reasons = [problem] if problem else []
    if policy.hashes:
        reasons.append(f"the SHA-256 {identity[:16]}… of {files[-1].name} is not in the trusted list")
    advice = []
    if policy.keys:
        advice.append(
            "sign it with `imaging-ad sign MODEL --key PRIVATE_KEY` (a key whose public half is trusted)"
        )
    if policy.hashes:
        advice.append(f"add its SHA-256 to a list in {HASHES_ENV}")
    raise UntrustedModelError(
        f"{path}: refused, the model is not trusted: {'; '.join(reasons)}. Authenticity is required because "
        f"{policy.describe()}. If you trust this file, {' or '.join(advice)}."
    )


def trust_note(policy: TrustPolicy | None = None) -> str:
    """One sentence for users: what loading a model established under ``policy`` (default: environment)."""
    policy = TrustPolicy.from_env() if policy is None else policy
    return policy.describe()


def _check_signature(signature: Path, digests: dict[str, str], policy: TrustPolicy) -> str:
    from cryptography.exceptions import InvalidSignature

    try:
        document = json.loads(signature.read_text(encoding="utf-8"))
        payload = _payload(document)
        raw = base64.b64decode(document["signature"], validate=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UntrustedModelError(f"its signature file {signature.name} is unreadable ({exc})") from exc
    # by position (model, then sidecar), not by name: a signed model may be renamed with its .sig
    signed = [entry["sha256"] for entry in payload["files"]]
    actual = list(digests.items())
    if len(signed) != len(actual):
        raise UntrustedModelError(
            f"its signature covers {len(signed)} file(s), not the {len(actual)} it should"
        )
    changed = [name for (name, digest), expected in zip(actual, signed, strict=True) if digest != expected]
    if changed:
        raise UntrustedModelError(
            f"{', '.join(changed)} changed after it was signed (the signature covers other content)"
        )
    key_id = payload.get("key_id")
    candidates = [k for k in policy.keys if k.key_id == key_id] or list(policy.keys)
    message = _canonical(payload)
    for candidate in candidates:
        try:
            candidate.key.verify(raw, message)
        except InvalidSignature:
            continue
        return f"signed by trusted key {candidate.key_id} ({candidate.source})"
    if not any(k.key_id == key_id for k in policy.keys):
        raise UntrustedModelError(f"it is signed by key {key_id}, which is not a trusted key")
    raise UntrustedModelError(f"its signature {signature.name} is not valid (forged or damaged)")


def _check_sidecar_names_model(model: Path, sidecar: Path, model_digest: str) -> None:
    try:
        named = json.loads(sidecar.read_text(encoding="utf-8")).get("model_sha256")
    except (OSError, ValueError, AttributeError) as exc:
        raise UntrustedModelError(f"{sidecar}: unreadable sidecar ({exc})") from exc
    if named != model_digest:
        raise UntrustedModelError(
            f"{model}: refused, its SHA-256 differs from the one its sidecar {sidecar.name} names "
            "(the graph file was modified or swapped)"
        )


# ---------------------------------------------------------------------------------------------- signing


def signature_path(model: str | os.PathLike) -> Path:
    model = Path(model)
    return model.with_name(model.name + SIGNATURE_SUFFIX)


def sign_model(
    model: str | os.PathLike, private_key: str | os.PathLike, sidecar: str | os.PathLike | None = None
) -> Path:
    """Sign ``model`` (and an export's ``sidecar``) with an Ed25519 private key; writes ``MODEL.sig``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    model = Path(model)
    files = _covered(model, sidecar)
    digests = {f.name: file_sha256(f) for f in files}
    if sidecar is not None:
        _check_sidecar_names_model(model, Path(sidecar), digests[model.name])
    key = _load_private_key(private_key)
    if not isinstance(key, Ed25519PrivateKey):
        raise UntrustedModelError(f"{private_key}: not an Ed25519 private key")
    payload = {
        "format": SIGNATURE_FORMAT,
        "format_version": SIGNATURE_VERSION,
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "files": [{"name": name, "sha256": digest} for name, digest in digests.items()],
        "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    document = payload | {"signature": base64.b64encode(key.sign(_canonical(payload))).decode("ascii")}
    out = signature_path(model)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def generate_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """A new Ed25519 key pair: the private key at ``path`` (PEM, readable by its owner only) and the
    public key at ``path.pub`` (PEM, the file to configure in ``IMAGING_AD_TRUST_KEYS``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise ValueError(f"{existing} exists already; choose another name (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | os.PathLike) -> TrustedKey:
    """An Ed25519 public key from a PEM file (``imaging-ad keygen``'s ``.pub``) or an OpenSSH line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UntrustedModelError(f"trust key {path} cannot be read ({exc.strerror or exc})") from exc
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UntrustedModelError(
            f"trust key {path}: not a public key in PEM or OpenSSH format ({exc})"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise UntrustedModelError(f"trust key {path}: not an Ed25519 public key")
    return TrustedKey(key_id(key), key, str(path))


def read_hash_list(path: str | os.PathLike) -> set[str]:
    """SHA-256 digests listed in ``path``: JSON (every ``"sha256"`` value, at any depth) or text
    (``sha256sum`` output or one digest a line; ``#`` starts a comment)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UntrustedModelError(f"trusted-hash list {path} cannot be read ({exc})") from exc
    if text.lstrip().startswith(("{", "[")):
        try:
            return {h.lower() for h in _json_digests(json.loads(text))}
        except ValueError as exc:
            raise UntrustedModelError(f"trusted-hash list {path}: invalid JSON ({exc})") from exc
    digests = set()
    for line in text.splitlines():
        token = line.split("#", 1)[0].strip().split(maxsplit=1)
        if token and _SHA256.match(token[0]):
            digests.add(token[0].lower())
    return digests


# ------------------------------------------------------------------------------------------------ helpers


def _covered(model: Path, sidecar: str | os.PathLike | None) -> list[Path]:
    files = [model] + ([Path(sidecar)] if sidecar is not None else [])
    for f in files:
        if not f.is_file():
            raise UntrustedModelError(f"{f}: file does not exist")
    return files


def _payload(document: dict) -> dict:
    if document.get("format") != SIGNATURE_FORMAT or document.get("format_version") != SIGNATURE_VERSION:
        raise ValueError(f"not an imaging_ad signature (format {document.get('format')!r})")
    if document.get("algorithm") != "ed25519":
        raise ValueError(f"unsupported algorithm {document.get('algorithm')!r}")
    return {k: v for k, v in document.items() if k != "signature"}


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _json_digests(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "sha256" and isinstance(item, str) and _SHA256.match(item):
                yield item
            else:
                yield from _json_digests(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_digests(item)


def _load_private_key(path: str | os.PathLike) -> Any:
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UntrustedModelError(f"key {path} cannot be read ({exc.strerror or exc})") from exc
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            return serialization.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UntrustedModelError(
            f"{path}: not an unencrypted private key in PEM or OpenSSH format ({exc}); "
            "make one with `imaging-ad keygen KEYFILE`"
        ) from exc


def _split(value: str) -> Sequence[str]:
    return [part for part in value.split(os.pathsep) if part.strip()]
