"""Pull images from an OCI distribution (v2) registry into the blob store.

    image = pull("127.0.0.1:5000/tools/py:3.11", BlobStore(root))

Every manifest and blob is checked against its digest (and declared size) before it
is stored, so a lying registry leaves nothing behind. Blobs already in the store are
not fetched again (the store is shared between images), and an interrupted blob
download resumes from its partial file with a ``Range`` request. Plain HTTP is used
only for loopback hosts and hosts the caller lists as insecure; everything else is
HTTPS. A redirect or a token realm may use plain HTTP to a loopback host only when the
registry itself is on loopback (a remote registry cannot point the puller at local
services). Auth: anonymous, then a Bearer token (or Basic) when the registry asks. The
user's credentials go only to the registry's own origin and to token realms the user
names (``token_realms=``, ``$SANDVM_REGISTRY_TOKEN_REALMS``; Docker Hub's
``auth.docker.io`` is known). Blob sizes a manifest declares are capped
(``$SANDVM_MAX_BLOB_BYTES``) and checked against free disk before anything is fetched.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sandvm.errors import (
    ConfigError,
    DigestMismatch,
    ImageError,
    ImageInvalid,
    ImageNotFound,
    ImageTooLarge,
    RegistryError,
)
from sandvm.images.blobs import BlobStore, parse_digest
from sandvm.images.manifest import (
    choose_platform,
    is_index,
    load_json,
    media_type_of,
    parse_config,
    parse_index,
    parse_manifest,
)
from sandvm.images.model import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    ImportedImage,
)

__all__ = ["DOCKER_HUB", "Progress", "Reference", "parse_reference", "pull"]

Progress = Callable[[str, int, int], None]
"""``progress(what, done_bytes, total_bytes)``; ``what`` is e.g. ``"layer 0123456789ab"``."""

DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
_MAX_REDIRECTS = 5
TOKEN_REALMS_ENV = "SANDVM_REGISTRY_TOKEN_REALMS"
# token realms a registry is known to use on another origin (host[:port])
_KNOWN_REALMS = {DOCKER_HUB: ("auth.docker.io",)}
_MAX_SMALL_BODY = 1 << 20  # token responses and error bodies

# docker/distribution reference grammar (lowercase repository paths, tags, hosts)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"(\[[0-9A-Fa-f:.]+\]|{_LABEL}(?:\.{_LABEL})*)(?::([0-9]{{1,5}}))?")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True)
class Reference:
    """An image reference: ``registry/repository[:tag][@digest]``.

    ``registry`` is ``host[:port]`` (``docker.io`` for Docker Hub). At least one of
    ``tag`` and ``digest`` is set by :func:`parse_reference`; the digest wins.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return (f"{self.registry}/{self.repository}"
                + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"


def parse_reference(ref: str) -> Reference:
    """Parse ``ref`` with docker's rules; a name without a host is on Docker Hub.

    ``"127.0.0.1:5000/tools/py:3.11"``, ``"localhost:5000/a/b@sha256:<hex>"``,
    ``"debian"`` (= ``docker.io/library/debian:latest``). Raises ImageInvalid saying
    what is wrong.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ImageInvalid("empty image reference")
    shown = ref[:200]
    if "://" in ref:
        raise ImageInvalid(f"image reference {shown!r} has a URL scheme: write"
                           " host[:port]/repository[:tag] (no http:// or https://)")
    name, at, digest = ref.partition("@")
    if at:
        try:
            parse_digest(digest)
        except ImageInvalid:
            raise ImageInvalid(f"image reference {shown!r}: {digest[:100]!r} is not a"
                               " sha256:<64 hex digits> digest") from None
    tag: str | None = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise ImageInvalid(f"image reference {shown!r}: invalid tag {tag[:200]!r}"
                               " (letters, digits, '_', '.', '-'; at most 128; not starting"
                               " with '.' or '-')")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
        m = _HOST.fullmatch(registry)
        if m is None or (m.group(2) is not None and not 0 < int(m.group(2)) < 65536):
            raise ImageInvalid(f"image reference {shown!r}: invalid registry host"
                               f" {registry[:200]!r}")
    else:
        registry, repository = DOCKER_HUB, name
    if registry in (DOCKER_HUB, "index.docker.io"):
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPOSITORY.fullmatch(repository):
        why = "must be lowercase" if repository.lower() != repository else "is malformed"
        raise ImageInvalid(f"image reference {shown!r}: repository {repository[:200]!r} {why}"
                           " (path components of a-z, 0-9 and separators '.', '_', '-')")
    if len(registry) + 1 + len(repository) > 255:
        raise ImageInvalid(f"image reference {shown!r}: the name is over 255 characters")
    if tag is None and not at:
        tag = "latest"
    return Reference(registry, repository, tag, digest if at else None)


def pull(ref: str | Reference, blobs: BlobStore, *, insecure_registries: Sequence[str] = (),
         username: str | None = None, password: str | None = None,
         token_realms: Sequence[str] = (), progress: Progress | None = None,
         timeout: float = 30.0) -> ImportedImage:
    """Pull image ``ref`` (its linux/amd64 variant) into ``blobs`` and describe it.

    ``insecure_registries`` are ``host`` or ``host:port`` entries that may be reached
    over plain HTTP (loopback hosts always may). ``username``/``password`` go only to
    the registry's own origin and to the token realms in ``token_realms`` (``host``
    or ``host:port``, added to ``$SANDVM_REGISTRY_TOKEN_REALMS``, comma-separated).
    ``timeout`` applies to each network operation. The manifest is stored last, so a
    stored manifest means all its blobs are there. Raises ImageInvalid (bad
    reference, unsupported media type), ImageNotFound (no such repository, tag,
    platform or blob), DigestMismatch (content or size differs from a digest or
    descriptor: nothing of it is stored), ImageTooLarge (oversized manifest or
    config, a blob over ``$SANDVM_MAX_BLOB_BYTES``, not enough free disk),
    RegistryError (transport, HTTP status, auth, a refused plain-HTTP host or token
    realm), ConfigError (a password without username, a bad environment setting).
    """
    reference = parse_reference(str(ref))
    if password is not None and username is None:
        raise ConfigError("a registry password needs a username")
    with _Session(reference, insecure=insecure_registries, username=username,
                  password=password, token_realms=token_realms,
                  timeout=timeout) as session:
        data, ctype = session.manifest(reference.target, digest=reference.digest)
        docs = [data]
        manifest_digest = _sha256(data)
        doc = load_json(data, f"manifest of {reference}")
        media_type = media_type_of(doc, ctype)
        if is_index(media_type):
            entry = choose_platform(parse_index(doc))
            if entry.media_type not in MANIFEST_TYPES:
                raise ImageInvalid(f"{reference}: the linux/amd64 entry has unsupported media"
                                   f" type {entry.media_type[:100]!r}")
            data, ctype = session.manifest(entry.digest, digest=entry.digest, size=entry.size)
            docs.append(data)
            manifest_digest = entry.digest
            doc = load_json(data, f"manifest {entry.digest}")
            media_type = media_type_of(doc, ctype)
        manifest = parse_manifest(doc, media_type)
        cfg = manifest.config
        if cfg.size > MAX_CONFIG_BYTES:
            raise ImageTooLarge(f"{reference}: image config is {cfg.size} bytes, over the"
                                f" {MAX_CONFIG_BYTES} byte cap")
        blobs.check_room([(cfg.digest, cfg.size), *((x.digest, x.size) for x in manifest.layers)],
                         str(reference))
        session.blob(blobs, cfg.digest, cfg.size, f"config {cfg.digest[7:19]}", progress)
        config = parse_config(blobs.path(cfg.digest).read_bytes())
        for layer in manifest.layers:
            session.blob(blobs, layer.digest, layer.size, f"layer {layer.digest[7:19]}",
                         progress)
    for d in docs:
        blobs.put_bytes(d)
    return ImportedImage(manifest_digest, cfg.digest, config, manifest.layers)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (no brackets) is ``localhost`` or a loopback address."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listed(host: str, port: int | None, entries: Sequence[str]) -> bool:
    """Whether ``host`` (no brackets) or ``host:port`` is one of ``entries`` (lowercase)."""
    host = host.lower()
    shown = f"[{host}]" if ":" in host else host
    return shown in entries or (port is not None and f"{shown}:{port}" in entries)


def _plain_http_ok(host: str, port: int | None, insecure: Sequence[str], *,
                   loopback: bool = True) -> bool:
    """Whether ``host`` (no brackets) may be reached over plain HTTP: listed as insecure,
    or (if ``loopback``) a loopback host."""
    return _listed(host, port, insecure) or (loopback and _is_loopback(host))


def _env_realms() -> tuple[str, ...]:
    return tuple(x.strip().lower() for x in os.environ.get(TOKEN_REALMS_ENV, "").split(",")
                 if x.strip())


def _read_capped(resp: httpx.Response, cap: int, what: str) -> bytes:
    """A streamed response's body, refusing more than ``cap`` bytes. Raises ImageTooLarge."""
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ImageTooLarge(f"{what} is {declared} bytes, over the {cap} byte cap")
    buf = bytearray()
    for chunk in resp.iter_bytes():
        buf += chunk
        if len(buf) > cap:
            raise ImageTooLarge(f"{what} is over the {cap} byte cap")
    return bytes(buf)


def _registry_error(resp: httpx.Response) -> tuple[str, str]:
    """The first (code, message) of a registry's JSON error body, or empty strings."""
    with contextlib.suppress(ImageError, httpx.HTTPError):
        body = _read_capped(resp, _MAX_SMALL_BODY, "error body")
        errors = load_json(body, "error body", cap=_MAX_SMALL_BODY).get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("code", "")), str(errors[0].get("message", ""))
    return "", ""


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate: Bearer realm="...",service="..."`` as (scheme, params)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


class _Session:
    """One repository on one registry: an httpx client, its URL policy and auth state."""

    def __init__(self, ref: Reference, *, insecure: Sequence[str], username: str | None,
                 password: str | None, token_realms: Sequence[str], timeout: float) -> None:
        self.ref = ref
        self.insecure = tuple(i.lower() for i in insecure)
        self.token_realms = (*(r.lower() for r in token_realms), *_env_realms(),
                             *_KNOWN_REALMS.get(ref.registry, ()))
        host = _DOCKER_HUB_API if ref.registry == DOCKER_HUB else ref.registry
        m = _HOST.fullmatch(host)
        assert m is not None  # parse_reference checked it
        port = int(m.group(2)) if m.group(2) else None
        # plain HTTP to loopback elsewhere (redirects, realms) only from a loopback registry
        self.loopback = _is_loopback(m.group(1).strip("[]"))
        scheme = "http" if _plain_http_ok(m.group(1).strip("[]"), port, self.insecure) \
            else "https"
        self.base = httpx.URL(f"{scheme}://{host}/v2/{ref.repository}/")
        self.basic = None if username is None else "Basic " + base64.b64encode(
            f"{username}:{password or ''}".encode()).decode()
        self.auth: str | None = None
        # identity: a digest covers the bytes as stored, not a transfer encoding of them
        self.client = httpx.Client(timeout=timeout, follow_redirects=False,
                                   headers={"Accept-Encoding": "identity"})

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def _same_origin(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, url.port) == (self.base.scheme, self.base.host,
                                                    self.base.port)

    def _url_ok(self, url: httpx.URL) -> bool:
        """Whether a redirect or token realm may lead to ``url``: HTTPS, or plain HTTP to
        an insecure-listed host, or to loopback if the registry itself is on loopback."""
        return url.scheme == "https" or (
            url.scheme == "http" and _plain_http_ok(url.host, url.port, self.insecure,
                                                    loopback=self.loopback))

    def _realm_trusted(self, realm: httpx.URL) -> bool:
        """Whether the user's credentials may go to token realm ``realm``."""
        return self._same_origin(realm) or _listed(realm.host, realm.port, self.token_realms)

    def _transport_error(self, exc: httpx.HTTPError, what: str) -> RegistryError:
        where = self.ref.registry if self.ref.registry != DOCKER_HUB \
            else f"{DOCKER_HUB} ({_DOCKER_HUB_API})"
        hint = ("; a registry that serves plain HTTP must be on loopback or listed in"
                " insecure_registries (--insecure-registry)"
                if self.base.scheme == "https" and "SSL" in str(exc) else "")
        return RegistryError(f"cannot fetch {what} from {where}:"
                             f" {str(exc) or type(exc).__name__}{hint}")

    def _status_error(self, resp: httpx.Response, what: str) -> RegistryError:
        code, message = _registry_error(resp)
        detail = f": {code} {message}"[:300] if code or message else ""
        return RegistryError(f"{self.ref.registry} answered HTTP {resp.status_code} for"
                             f" {what} of {self.ref.registry}/{self.ref.repository}{detail}")

    def _send(self, url: httpx.URL, headers: dict[str, str], what: str) -> httpx.Response:
        """One GET, following redirects; Authorization only goes to the registry itself."""
        for _ in range(_MAX_REDIRECTS + 1):
            sent = dict(headers)
            if self.auth and self._same_origin(url):
                sent["Authorization"] = self.auth
            try:
                resp = self.client.send(self.client.build_request("GET", url, headers=sent),
                                        stream=True)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, what) from None
            if not resp.has_redirect_location:
                return resp
            resp.close()
            url = url.join(resp.headers["location"])
            if not self._url_ok(url):
                raise RegistryError(f"refusing to follow a redirect for {what} to"
                                    f" {str(url)[:200]}: plain HTTP only to insecure_registries,"
                                    " or to loopback from a registry on loopback")
        raise RegistryError(f"too many redirects fetching {what}")

    def get(self, path: str, headers: dict[str, str], what: str) -> httpx.Response:
        """GET ``path`` under the repository, authenticating on a 401.

        The response is streamed: the caller closes it. Raises RegistryError.
        """
        url = self.base.join(path)
        resp = self._send(url, headers, what)
        if resp.status_code == 401:
            challenge = resp.headers.get("www-authenticate", "")
            resp.close()
            self.auth = self._authenticate(challenge)
            resp = self._send(url, headers, what)
            if resp.status_code == 401:
                resp.close()
                raise RegistryError(f"{self.ref.registry} refused access to {what} of"
                                    f" {self.ref.repository} even after authenticating")
        return resp

    def _authenticate(self, challenge: str) -> str:
        """The Authorization header that answers ``challenge``. Raises RegistryError."""
        scheme, params = _parse_challenge(challenge)
        registry = self.ref.registry
        if scheme == "basic":
            if self.basic is None:
                raise RegistryError(f"{registry} requires a username and password")
            return self.basic
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(f"{registry} answered 401 with an unsupported challenge"
                                f" {challenge[:200]!r}")
        try:
            realm = httpx.URL(params["realm"])
        except httpx.InvalidURL:
            raise RegistryError(f"{registry} named an invalid token realm"
                                f" {params['realm'][:200]!r}") from None
        if not self._url_ok(realm):
            raise RegistryError(f"{registry} named token realm {str(realm)[:200]!r}: plain"
                                " HTTP only to insecure_registries, or to loopback from a"
                                " registry on loopback")
        if self.basic is not None and not self._realm_trusted(realm):
            where = f"{realm.host}:{realm.port}" if realm.port else realm.host
            raise RegistryError(
                f"{registry} asks for a token from {realm.scheme}://{where}, not its own"
                " origin: sandvm sends your registry credentials only to the registry itself"
                " or to token realms you name. If you trust that host, name it"
                f" (token_realms=[{where!r}] or {TOKEN_REALMS_ENV}={where})")
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {} if self.basic is None else {"Authorization": self.basic}
        try:
            with self.client.stream("GET", realm, params=query, headers=headers) as resp:
                if resp.status_code in (401, 403):
                    who = "the credentials" if self.basic else "anonymous access"
                    raise RegistryError(f"the token server of {registry} refused {who}"
                                        f" (HTTP {resp.status_code})")
                if resp.status_code != 200:
                    raise RegistryError(f"the token server of {registry} answered HTTP"
                                        f" {resp.status_code}")
                body = _read_capped(resp, _MAX_SMALL_BODY, "token response")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, "a token") from None
        try:
            doc: dict[str, Any] = load_json(body, "token response", cap=_MAX_SMALL_BODY)
        except ImageError as exc:
            raise RegistryError(f"the token server of {registry} sent garbage:"
                                f" {exc.message}") from None
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token server of {registry} sent no token")
        return f"Bearer {token}"

    def manifest(self, target: str, *, digest: str | None = None,
                 size: int | None = None) -> tuple[bytes, str]:
        """Manifest ``target`` (tag or digest) as (bytes, Content-Type), verified.

        Checked against ``digest``/``size`` when given and against the
        Docker-Content-Digest header. Raises ImageNotFound, ImageTooLarge,
        DigestMismatch, RegistryError.
        """
        what = f"manifest {target}"
        resp = self.get(f"manifests/{target}", {"Accept": _ACCEPT}, what)
        try:
            if resp.status_code == 404:
                name = f"{self.ref.registry}/{self.ref.repository}"
                if _registry_error(resp)[0] == "NAME_UNKNOWN":
                    raise ImageNotFound(f"no repository {name}")
                raise ImageNotFound(f"{'manifest' if digest else 'tag'} {target!r} not found"
                                    f" in {name}")
            if resp.status_code != 200:
                raise self._status_error(resp, what)
            data = _read_capped(resp, MAX_MANIFEST_BYTES, what)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None
        finally:
            resp.close()
        actual = _sha256(data)
        if digest is not None and actual != digest:
            raise DigestMismatch(f"{what} hashes to {actual}")
        if size is not None and len(data) != size:
            raise DigestMismatch(f"{what} has {len(data)} bytes, its descriptor declares {size}")
        header = resp.headers.get("docker-content-digest", "")
        if header.startswith("sha256:") and header != actual:
            raise DigestMismatch(f"{what} hashes to {actual}, the registry says {header}")
        return data, resp.headers.get("content-type", "")

    def blob(self, blobs: BlobStore, digest: str, size: int, what: str,
             progress: Progress | None) -> None:
        """Make sure blob ``digest`` is in ``blobs``, downloading (or resuming) it.

        A partial download that turns out wrong is dropped and fetched once more from
        the start. Raises DigestMismatch (nothing stored), ImageNotFound, RegistryError
        (a broken transfer keeps its partial file so the next pull resumes).
        """
        if blobs.has(digest):
            if progress:
                progress(what, size, size)
            return
        partial = blobs.partial_path(digest)
        for attempt in (1, 2):
            resumed = partial.exists() and partial.stat().st_size > 0
            try:
                self._download(blobs, digest, size, what, progress)
                return
            except DigestMismatch:
                partial.unlink(missing_ok=True)
                if not resumed or attempt == 2:
                    raise

    def _download(self, blobs: BlobStore, digest: str, size: int, what: str,
                  progress: Progress | None) -> None:
        partial = blobs.partial_path(digest)
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        if have == size:  # complete but not yet verified (or an empty blob)
            blobs.put_chunks(digest, (), size=size, prefix=partial)
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self.get(f"blobs/{digest}", headers, what)
        try:
            if resp.status_code == 404:
                raise ImageNotFound(f"{what} ({digest}) is missing from"
                                    f" {self.ref.registry}/{self.ref.repository}")
            if have and resp.status_code == 416:
                raise DigestMismatch(f"{what}: the registry has fewer bytes than the"
                                     f" {size} its descriptor declares")
            if resp.status_code == 206:
                if not resp.headers.get("content-range", "").startswith(f"bytes {have}-"):
                    raise DigestMismatch(f"{what}: the registry answered the wrong range"
                                         f" ({resp.headers.get('content-range', '')[:100]!r})")
            elif resp.status_code == 200:
                have = 0  # no resume: the registry sends the whole blob
            else:
                raise self._status_error(resp, what)
            blobs.put_chunks(digest, self._tee(resp, partial, have, size, what, progress),
                             size=size, prefix=partial if have else None)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None
        finally:
            resp.close()
        partial.unlink(missing_ok=True)

    @staticmethod
    def _tee(resp: httpx.Response, partial: Path, have: int, size: int, what: str,
             progress: Progress | None) -> Iterator[bytes]:
        """The body's chunks, also appended to ``partial`` so a broken transfer resumes."""
        done = have
        with open(partial, "ab" if have else "wb") as out:
            for chunk in resp.iter_raw():  # raw: the blob as stored, never decoded
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(what, min(done, size), size)
                yield chunk
