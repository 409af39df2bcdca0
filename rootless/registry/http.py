"""HTTP to registries: scheme and TLS per host, authentication, and retries that do not just sleep.

Built on `requests` sessions (the stack oras uses). oras's own request loop is not used: it keeps
one bearer token per client (so a cross-repository mount or a second repository re-authenticates
with the wrong scope), hides the token server's answer, and retries any failure with sleeps of up
to a minute and a half. Here tokens are cached per scope set, challenges are learnt from the
`/v2/` ping so most requests authenticate up front, and only transient failures are retried, with
short exponential backoff (honouring `Retry-After`).
"""

from __future__ import annotations

import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rootless.errors import RbuildError
from rootless.registry import auth
from rootless.registry.conf import RegistriesConf, tls_files

if TYPE_CHECKING:
    import ssl

    import requests

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.25
MAX_RETRY_AFTER = 30.0
TIMEOUT = (15.0, 60.0)
USER_AGENT = "rbuild/0.1"
BLOCKSIZE = 1 << 20  # bytes per send() of a request body (urllib3's default of 16 KiB costs CPU)


def api_host(host: str) -> str:
    """The host that serves `host`'s API: Docker Hub's lives on `registry-1.docker.io`."""
    return "registry-1.docker.io" if host == "docker.io" else host


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1, with or without a port: plain http is allowed there."""
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _proxies(url: str) -> dict[str, Any]:
    """Loopback never goes through $http_proxy/$https_proxy (Go's rule, so skopeo's too): None entries
    remove the environment's proxies for this request."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    return {"http": None, "https": None} if is_loopback(host) else {}


def backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`: `Retry-After` when given, else 0.25s doubling, jittered."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER)
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    return BACKOFF_BASE * (2.0**attempt) * (0.75 + random.random() / 2)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the connection failed, try again" (requests imported lazily)."""
    import requests
    import urllib3.exceptions

    return (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
    )


def describe(exc: BaseException) -> str:
    """A short cause for an error message: the innermost reason, never a URL with secrets or a repr."""
    text = str(exc)
    for marker in ("Caused by ", "NewConnectionError(", "ProtocolError("):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = text.strip("()'\" ")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted"
    if "Connection refused" in text:
        return "connection refused"
    return text[:200] or type(exc).__name__


def error_detail(resp: requests.Response) -> str:
    """`STATUS Reason` plus the registry's first error code/message, if its body has one."""
    detail = f"{resp.status_code} {resp.reason or ''}".strip()
    try:
        errors = resp.json().get("errors") or []
        first = errors[0]
        detail += f" ({first.get('code', '')}: {first.get('message', '')})".replace("(: ", "(")
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        pass
    return detail


class RegistryAuthError(RbuildError):
    """401/403 or a refused token: retrying the same request cannot help."""


Body = Callable[[], tuple[Any, int]]
"""Makes a fresh request body (bytes, a file or an iterable) and its length, once per attempt."""


def _adapter(ctx: ssl.SSLContext | None, verify_ctx: bool) -> Any:
    """A requests adapter (connection pool) sending 1 MiB blocks, with `ctx` for TLS when given."""
    import requests
    import requests.adapters

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            if ctx is not None:
                kwargs["ssl_context"] = ctx
            kwargs["blocksize"] = BLOCKSIZE
            super().init_poolmanager(*args, **kwargs)

        def send(
            self,
            request: requests.PreparedRequest,
            stream: bool = False,
            timeout: Any = None,
            verify: bool | str = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> requests.Response:
            if ctx is not None:
                verify = verify_ctx  # else urllib3 turns verification back on in our context
            return super().send(request, stream, timeout, verify, cert, proxies)

    return Adapter(pool_connections=4, pool_maxsize=16)


@dataclass
class _HostState:
    base_url: str
    challenge: auth.Challenge | None


class RegistryHTTP:
    """Requests to registries for one rbuild invocation: safe to share between threads."""

    def __init__(
        self,
        conf: RegistriesConf,
        *,
        tls_verify: bool | None,
        cert_dir: str | None,
        authfile: str | None,
        creds: auth.Credentials | None,
        creds_hosts: set[str] | None = None,
    ) -> None:
        self.conf = conf
        self.tls_verify = tls_verify
        self.cert_dir = cert_dir
        self.authfile = authfile
        self.creds = creds
        self.creds_hosts = creds_hosts  # where `creds` may be sent; None: every host
        self.tokens = auth.TokenCache()
        self.insecure_hosts: set[str] = set()  # from registries.conf sources (mirrors, rewritten locations)
        self._hosts: dict[str, _HostState] = {}
        self._creds: dict[tuple[str, str], auth.Credentials | None] = {}
        self._adapters: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._local = threading.local()

    # -- sessions and TLS ------------------------------------------------------------------

    def session(self) -> requests.Session:
        """This thread's session; every thread routes through the same adapters (connection pools)."""
        session = getattr(self._local, "session", None)
        if session is None:
            import http.cookiejar

            import requests

            adapters = self._adapters
            lock = self._lock

            class Session(requests.Session):
                def get_adapter(self, url: str) -> Any:
                    with lock:
                        for prefix in sorted(adapters, key=len, reverse=True):
                            if url.lower().startswith(prefix):
                                return adapters[prefix]
                    return super().get_adapter(url)

            session = Session()
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            session.headers["User-Agent"] = USER_AGENT
            with lock:
                if not adapters:
                    adapters["https://"] = _adapter(None, True)
                    adapters["http://"] = _adapter(None, True)
            self._local.session = session
        return session

    def _mount(self, prefix: str, adapter: Any) -> None:
        with self._lock:
            self._adapters[prefix] = adapter

    def _tls_adapter(self, host: str, verify: bool) -> Any:
        """An adapter whose TLS context trusts the system roots plus certs.d/HOST (or --cert-dir)."""
        import ssl

        files = tls_files(host, self.cert_dir)
        ctx = ssl.create_default_context()
        if not verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the user asked for it
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            for ca in files.ca_files:
                ctx.load_verify_locations(cafile=ca)
            for cert, key in files.client_pairs:
                ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise RbuildError(f"cannot load TLS files for {host}: {e}") from None

        return _adapter(ctx, verify)

    def _skip_verify(self, host: str) -> bool:
        if self.tls_verify is not None:
            return not self.tls_verify
        return host in self.insecure_hosts or self.conf.insecure(host)

    def host_state(self, host: str) -> _HostState:
        """How to talk to `host`: https, or http where allowed (loopback, or TLS verification off).

        Decided once per host with a `/v2/` ping, which also learns the auth challenge.
        """
        with self._lock:
            state = self._hosts.get(host)
            lock = self._locks.setdefault(host, threading.Lock())
        if state is not None:
            return state
        with lock:
            if host in self._hosts:
                return self._hosts[host]
            state = self._probe(host)
            with self._lock:
                self._hosts[host] = state
            return state

    def _probe(self, host: str) -> _HostState:
        resp = self._probe_loopback_http(host) if self.tls_verify is None and is_loopback(host) else None
        if resp is not None:
            base = f"http://{api_host(host)}"
        else:
            skip_verify = self._skip_verify(host)
            base = f"https://{api_host(host)}"
            self._mount(base + "/", self._tls_adapter(host, not skip_verify))
            try:
                resp = self._ping(base, retries=0 if skip_verify else MAX_ATTEMPTS)
            except transient_errors() as e:
                if not skip_verify:
                    raise RbuildError(
                        f"cannot reach registry {host}: {describe(e)}" + self._tls_hint(host, e)
                    ) from None
                base = f"http://{api_host(host)}"  # containers' rule for insecure registries: then http
                try:
                    resp = self._ping(base, retries=MAX_ATTEMPTS)
                except transient_errors() as e2:
                    raise RbuildError(f"cannot reach registry {host}: {describe(e2)}") from None
        if resp.status_code == 401:
            challenge = auth.parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            return _HostState(base, challenge)
        if resp.status_code >= 400 and resp.status_code != 404:
            raise RbuildError(f"registry {host} answered /v2/ with {error_detail(resp)}")
        return _HostState(base, None)

    def _probe_loopback_http(self, host: str) -> requests.Response | None:
        """On loopback, plain http first: nothing leaves the machine, and it spares a TLS set-up.
        None when no registry answers there in plain http (e.g. a TLS server's 400)."""
        try:
            resp = self._ping(f"http://{api_host(host)}", retries=0)
        except transient_errors():
            return None
        if resp.status_code in (200, 401) or "Docker-Distribution-API-Version" in resp.headers:
            return resp
        return None

    def _tls_hint(self, host: str, exc: BaseException) -> str:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return (
                f" (put its CA in ~/.config/containers/certs.d/{host}/ca.crt or --cert-dir, or use --tls-verify=false)"
            )
        return ""

    def _ping(self, base: str, retries: int) -> requests.Response:
        for attempt in range(retries + 1):
            try:
                resp = self.session().get(base + "/v2/", timeout=TIMEOUT, proxies=_proxies(base))
            except transient_errors() as e:
                # Nobody listening, or a TLS mismatch: waiting will not change the answer.
                if attempt >= retries or describe(e) == "connection refused" or "SSLError" in repr(e):
                    raise
                time.sleep(backoff(attempt))
                continue
            if resp.status_code in RETRY_STATUSES and attempt < retries:
                time.sleep(backoff(attempt, resp.headers.get("Retry-After")))
                continue
            return resp
        raise AssertionError("unreachable")

    # -- authentication ----------------------------------------------------------------

    def credentials(self, host: str, repository: str = "") -> auth.Credentials | None:
        """`--creds` (for the hosts it is meant for), else the auth files and helpers (looked up once per
        host and repository)."""
        if self.creds is not None and (self.creds_hosts is None or host in self.creds_hosts):
            return self.creds
        key = (host, repository)
        with self._lock:
            if key in self._creds:
                return self._creds[key]
        found = auth.lookup_credentials(host, repository or None, self.authfile)
        with self._lock:
            self._creds[key] = found
        return found

    def _login_hint(self, host: str) -> str:
        """What to do when `host` got no credentials (and why, when --creds was given for other hosts)."""
        if self.creds is None:
            return f"; run rbuild login {host}"
        return f"; run rbuild login {host} (--creds goes only to the registries named on the command line)"

    def auth_header(
        self,
        host: str,
        scopes: Iterable[str],
        *,
        repository: str = "",
        fresh: bool = False,
        challenge: auth.Challenge | None = None,
        what: str = "",
    ) -> dict[str, str]:
        """The `Authorization` header for `scopes` on `host`, from the learnt challenge."""
        state = self.host_state(host)
        challenge = challenge or state.challenge
        if challenge is None:
            return {}
        creds = self.credentials(host, repository)
        if challenge.scheme == "basic":
            if creds is None:
                raise RegistryAuthError(f"{what or host}: authentication required (401){self._login_hint(host)}")
            return {"Authorization": creds.basic()}
        if challenge.scheme != "bearer":
            raise RbuildError(f"{what or host}: unsupported authentication scheme {challenge.scheme!r}")
        scope_set = sorted(set(scopes) | {s for s in challenge.params.get("scope", "").split(" ") if s})
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        who = creds.username if creds else ""
        key = (realm, service, tuple(scope_set), who)
        if fresh:
            self.tokens.drop(key)
        with self._lock:
            key_lock = self._locks.setdefault(repr(key), threading.Lock())
        with key_lock:  # parallel blob transfers share one token request
            token = self.tokens.get(key)
            if token is None:
                token, lifetime = self._fetch_token(host, realm, service, scope_set, creds, what)
                self.tokens.put(key, token, lifetime)
        return {"Authorization": f"Bearer {token}"}

    def _fetch_token(
        self, host: str, realm: str, service: str, scopes: list[str], creds: auth.Credentials | None, what: str
    ) -> tuple[str, float]:
        """The token flow: GET the realm (basic auth if we have credentials), or POST an identity token."""
        if not realm.startswith(("https://", "http://")):
            raise RbuildError(f"{what or host}: bad token realm {realm!r}")
        realm_host = urllib.parse.urlsplit(realm).hostname or ""
        if (
            creds is not None
            and realm.startswith("http://")
            and self.host_state(host).base_url.startswith("https://")
            and realm_host not in ("localhost", "127.0.0.1", "::1")
        ):
            raise RbuildError(f"{what or host}: the token realm {realm} is plain http: credentials not sent")
        params: list[tuple[str, str]] = [("service", service)] if service else []
        params += [("scope", s) for s in scopes]
        for attempt in range(MAX_ATTEMPTS):
            try:
                if creds is not None and creds.identity_token:
                    form = params + [
                        ("grant_type", "refresh_token"),
                        ("client_id", "rbuild"),
                        ("refresh_token", creds.identity_token),
                    ]
                    resp = self.session().post(realm, data=form, timeout=TIMEOUT)
                else:
                    headers = {"Authorization": creds.basic()} if creds else {}
                    resp = self.session().get(realm, params=params, headers=headers, timeout=TIMEOUT)
            except transient_errors() as e:
                if attempt + 1 >= MAX_ATTEMPTS:
                    raise RbuildError(f"{what or host}: token server unreachable: {describe(e)}") from None
                time.sleep(backoff(attempt))
                continue
            if resp.status_code in RETRY_STATUSES and attempt + 1 < MAX_ATTEMPTS:
                time.sleep(backoff(attempt, resp.headers.get("Retry-After")))
                continue
            if resp.status_code in (401, 403):
                raise RegistryAuthError(
                    f"{what or host}: authentication failed: token server answered "
                    f"{resp.status_code}" + ("" if creds else self._login_hint(host))
                )
            if resp.status_code != 200:
                raise RbuildError(f"{what or host}: token server answered {error_detail(resp)}")
            try:
                data = resp.json()
                token = data.get("token") or data.get("access_token")
                lifetime = float(data.get("expires_in") or 60)
            except (ValueError, AttributeError, TypeError):
                token = None
            if not token:
                raise RbuildError(f"{what or host}: token server sent no token")
            return str(token), lifetime
        raise AssertionError("unreachable")

    # -- requests ----------------------------------------------------------------------

    def url(self, host: str, path: str) -> str:
        """An absolute URL for an API path (or a Location header, absolute or relative)."""
        if path.startswith(("http://", "https://")):
            return path
        return self.host_state(host).base_url + path

    def request(
        self,
        method: str,
        host: str,
        path: str,
        *,
        scopes: Iterable[str] = (),
        repository: str = "",
        what: str,
        headers: dict[str, str] | None = None,
        body: Body | None = None,
        stream: bool = False,
        retry: bool = True,
        allow_redirects: bool = True,
    ) -> requests.Response:
        """One API request with authentication, retried on 429/5xx and connection failures.

        401 and 403 raise an error naming `what`; other statuses are the caller's to judge.
        With `retry=False` a transient failure is raised at once (the caller resumes on its own).
        """
        scopes = list(scopes)
        url = self.url(host, path)
        # credentials only ever go to the registry itself: an upload Location or a redirect naming another
        # host (or plain http for an https registry) gets the request without them
        own = urllib.parse.urlsplit(self.host_state(host).base_url)
        target = urllib.parse.urlsplit(url)
        same_origin = (target.scheme, target.netloc) == (own.scheme, own.netloc)
        if target.scheme == "http" and own.scheme == "https":
            raise RbuildError(f"{what}: the registry sent rbuild to plain http ({target.netloc}); refused")
        attempt = 0
        refreshed = fresh = False
        challenge: auth.Challenge | None = None
        while True:
            hdrs = dict(headers or {})
            if same_origin:
                hdrs.update(
                    self.auth_header(host, scopes, repository=repository, fresh=fresh, challenge=challenge, what=what)
                )
            data = None
            if body is not None:
                data, length = body()
                hdrs["Content-Length"] = str(length)
            try:
                resp = self.session().request(
                    method,
                    url,
                    headers=hdrs,
                    data=data,
                    stream=stream,
                    timeout=TIMEOUT,
                    allow_redirects=allow_redirects,
                    proxies=_proxies(url),
                )
            except transient_errors() as e:
                attempt += 1
                if not retry or attempt >= MAX_ATTEMPTS:
                    raise RbuildError(f"{what}: {describe(e)}") from None
                time.sleep(backoff(attempt - 1))
                continue
            # a challenge counts only when the registry itself sent it, not a host a redirect led to
            from_registry = same_origin and (
                urllib.parse.urlsplit(resp.url).scheme,
                urllib.parse.urlsplit(resp.url).netloc,
            ) == (own.scheme, own.netloc)
            if resp.status_code == 401 and not refreshed and from_registry:
                new = auth.parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                if new is not None:
                    resp.close()
                    # A refused token is dropped; a first challenge may still be served from the cache.
                    fresh = "Authorization" in hdrs
                    challenge, refreshed = new, True
                    self._learn(host, new)
                    continue
            if resp.status_code in (401, 403):
                resp.close()
                has_creds = self.credentials(host, repository) is not None
                refusal = auth.parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                if resp.status_code == 403 or (refusal and refusal.params.get("error") == "insufficient_scope"):
                    verb = "access denied"
                else:
                    verb = "authentication failed" if has_creds else "authentication required"
                hint = "" if has_creds else self._login_hint(host)
                raise RegistryAuthError(f"{what}: {verb} ({resp.status_code}){hint}")
            if resp.status_code in RETRY_STATUSES and retry and attempt + 1 < MAX_ATTEMPTS:
                attempt += 1
                wait = backoff(attempt - 1, resp.headers.get("Retry-After"))
                resp.close()
                time.sleep(wait)
                continue
            return resp

    def _learn(self, host: str, challenge: auth.Challenge) -> None:
        """Remember a host's challenge (without its per-request scope) so later requests authenticate first."""
        state = self.host_state(host)
        if state.challenge is None or state.challenge.scheme != challenge.scheme:
            params = {k: v for k, v in challenge.params.items() if k != "scope"}
            state.challenge = auth.Challenge(challenge.scheme, params)
