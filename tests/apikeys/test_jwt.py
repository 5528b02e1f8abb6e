"""Bearer JWTs ([jwt]): a verified token stands for its subject's key, and every
check of a key (quota, revocation, model list) applies to it unchanged.

The live server verifies against tests/fixtures/jwt-test-jwks.json; the tests sign
with its TEST-ONLY private key. Other key sets are built in the test, in-process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.test import RequestFactory
from django.utils import timezone
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from apikeys import jwt_auth
from apikeys.authentication import caller_for
from apikeys.keys import PresentedKey
from apikeys.models import ApiKey
from djangollmapi.config import JwtConfig
from djangollmapi.errors import ApiError
from tests.conftest import free_port
from tests.helpers import error_of

pytestmark = pytest.mark.django_db(transaction=True)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PRIVATE_KEY = serialization.load_pem_private_key((FIXTURES / "jwt-test-private.pem").read_bytes(), password=None)
KID = "djangollmapi-test-1"
ISSUER, AUDIENCE = "https://issuer.test", "djangollmapi-tests"
RUN = {"text": "hi", "model": "echo"}
CHAT = {"model": "words", "messages": [{"role": "user", "content": "hello there"}]}
DROP = object()  # a claim to leave out


def new_subject() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@issuer.test"


def claims_for(subject: str, **overrides) -> dict:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300}
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not DROP}


def make_token(subject: str | None = None, *, key=PRIVATE_KEY, kid: str | None = KID, **claims) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims_for(subject or new_subject(), **claims), key, algorithm="RS256", headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(header: dict, claims: dict, sign=lambda signing_input: b"") -> str:
    """A token PyJWT would refuse to build: `alg: none`, or HS256 over a public key."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


@cache
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def assert_401(response, code: str, token: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert error_of(response)["code"] == code
    assert token not in response.text
    assert token.split(".")[1] not in response.text  # nor its claims


# -- through the live server -------------------------------------------------------


def test_first_token_creates_the_subjects_key_and_later_ones_reuse_it(live):
    subject = new_subject()
    token = make_token(subject)
    response = live.post("/api/", token, json=RUN)
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "hi"
    api_key = ApiKey.objects.get(jwt_subject=subject)
    assert (api_key.name, api_key.max_calls, api_key.calls_used) == (f"jwt:{subject}", 5, 1)
    assert api_key.max_tokens_total is None and api_key.allowed_models == []

    response = live.post("/v1/chat/completions", make_token(subject), json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    api_key.refresh_from_db()
    assert api_key.calls_used == 2
    assert api_key.tokens_used == response.json()["usage"]["total_tokens"]
    assert ApiKey.objects.filter(jwt_subject=subject).count() == 1
    assert api_key.jobs.count() == 2


def test_usage_reads_the_subjects_key(live):
    token = make_token()
    assert live.post("/api/", token, json=RUN).status_code == 200
    response = live.get("/api/usage/", token)
    assert response.status_code == 200, response.text
    assert response.json()["key"]["calls_used"] == 1
    assert response.json()["key"]["calls_left"] == 4


def test_the_quota_of_created_keys_applies(live):
    token = make_token()
    for _ in range(5):
        assert live.post("/api/", token, json=RUN).status_code == 200
    response = live.post("/api/", token, json=RUN)
    assert response.status_code == 429
    assert error_of(response)["code"] == "quota_exhausted"


def test_simultaneous_first_calls_share_one_key(live):
    subject = new_subject()
    token = make_token(subject)
    with ThreadPoolExecutor(5) as pool:
        statuses = list(pool.map(lambda _: live.post("/api/", token, json=RUN).status_code, range(5)))
    assert statuses == [200] * 5
    api_key = ApiKey.objects.get(jwt_subject=subject)
    assert api_key.calls_used == 5


def test_an_admin_linked_subject_uses_that_key_and_its_limits(live, make_key):
    subject = new_subject()
    make_key(name="alice", jwt_subject=subject, allowed_models=["echo"], max_calls=10)
    token = make_token(subject)
    assert live.post("/api/", token, json=RUN).status_code == 200
    response = live.post("/v1/chat/completions", token, json=CHAT)
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"
    api_key = ApiKey.objects.get(jwt_subject=subject)
    assert (api_key.name, api_key.calls_used) == ("alice", 1)
    assert ApiKey.objects.count() == 1


def test_revoking_the_subjects_key_stops_its_tokens(live):
    subject = new_subject()
    token = make_token(subject)
    assert live.post("/api/", token, json=RUN).status_code == 200
    ApiKey.objects.filter(jwt_subject=subject).update(revoked_at=timezone.now())
    assert_401(live.post("/api/", token, json=RUN), "key_revoked", token)
    assert_401(live.post("/v1/chat/completions", token, json=CHAT), "key_revoked", token)
    assert ApiKey.objects.filter(jwt_subject=subject).count() == 1


def test_expired_token(live):
    now = int(time.time())
    token = make_token(iat=now - 600, exp=now - 120)  # beyond the 30 s leeway
    assert_401(live.post("/api/", token, json=RUN), "token_expired", token)


def test_token_expired_within_the_leeway_still_works(live):
    token = make_token(exp=int(time.time()) - 5)
    assert live.post("/api/", token, json=RUN).status_code == 200


def test_wrong_issuer(live):
    token = make_token(iss="https://elsewhere.test")
    assert_401(live.post("/api/", token, json=RUN), "invalid_issuer", token)


def test_wrong_audience(live):
    token = make_token(aud=["another-api", "yet-another"])
    assert_401(live.post("/v1/chat/completions", token, json=CHAT), "invalid_audience", token)


def test_audience_list_containing_ours(live):
    token = make_token(aud=["another-api", AUDIENCE])
    assert live.post("/api/", token, json=RUN).status_code == 200


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
def test_missing_required_claim(live, claim):
    token = make_token(**{claim: DROP})
    assert_401(live.post("/api/", token, json=RUN), "invalid_token", token)
    assert not ApiKey.objects.exists()


def test_wrong_signature(live):
    token = make_token(key=other_rsa_key())
    assert_401(live.post("/api/", token, json=RUN), "invalid_token", token)
    assert not ApiKey.objects.exists()


def test_unsigned_token_is_refused(live):
    token = hand_built({"alg": "none", "typ": "JWT"}, claims_for(new_subject()))
    assert token.endswith(".")
    assert_401(live.post("/api/", token, json=RUN), "invalid_token", token)
    token = hand_built({"alg": "none", "kid": KID}, claims_for(new_subject()))
    assert_401(live.post("/v1/chat/completions", token, json=CHAT), "invalid_token", token)
    assert not ApiKey.objects.exists()


def test_hs256_signed_with_the_public_key_is_refused(live):
    """The classic algorithm confusion: an HMAC over the public key, which anyone has."""
    public_pem = PRIVATE_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def sign(signing_input: bytes) -> bytes:
        return hmac.new(public_pem, signing_input, hashlib.sha256).digest()

    for header in ({"alg": "HS256", "kid": KID}, {"alg": "HS256"}):
        token = hand_built(header, claims_for(new_subject()), sign)
        assert_401(live.post("/api/", token, json=RUN), "invalid_token", token)
    assert not ApiKey.objects.exists()


def test_unknown_kid(live):
    token = make_token(kid="someone-elses-key")
    assert_401(live.post("/api/", token, json=RUN), "invalid_token", token)


def test_garbage_in_jwt_shape(live):
    for token in ("abc.def.ghi", "e30.e30.", "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln"):
        assert_401(live.post("/api/", token, json=RUN), "invalid_token", token)


def test_api_keys_still_work_beside_tokens(live, key):
    assert live.post("/api/", key, json=RUN).status_code == 200


# -- in-process: other key sets, other settings ------------------------------------


def jwks_file(tmp_path: Path, *jwks: dict) -> str:
    path = tmp_path / f"jwks-{uuid.uuid4().hex}.json"
    path.write_text(json.dumps({"keys": list(jwks)}))
    return str(path)


def public_jwk(private_key, **fields) -> dict:
    algorithm = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    return {**algorithm.to_jwk(private_key.public_key(), as_dict=True), **fields}


def config(**fields) -> JwtConfig:
    return JwtConfig(issuer=ISSUER, audience=AUDIENCE, **fields)


def api_error(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


def test_the_committed_jwks_is_the_public_half_of_the_test_key():
    jwks = json.loads((FIXTURES / "jwt-test-jwks.json").read_text())
    (published,) = jwks["keys"]
    expected = public_jwk(PRIVATE_KEY, kid=KID, use="sig", alg="RS256")
    assert {name: expected[name] for name in published} == published


def test_our_keys_never_look_like_tokens(make_key):
    assert not jwt_auth.looks_like_jwt(make_key())
    assert jwt_auth.looks_like_jwt(make_token())
    assert jwt_auth.looks_like_jwt("e30.e30.")
    assert not jwt_auth.looks_like_jwt("a.b")
    assert not jwt_auth.looks_like_jwt("a.b.c.d")


def test_a_lone_key_signs_tokens_without_kid_es256_too(tmp_path):
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwt_config = config(jwks_file=jwks_file(tmp_path, public_jwk(private_key)))
    subject = new_subject()
    token = jwt.encode(claims_for(subject), private_key, algorithm="ES256")
    presented = jwt_auth.presented_jwt(token, jwt_config)
    api_key = ApiKey.objects.get(jwt_subject=subject)
    assert presented == PresentedKey(api_key.prefix, api_key.secret_hash)


def test_with_several_keys_the_kid_chooses(tmp_path):
    second = other_rsa_key()
    jwt_config = config(
        jwks_file=jwks_file(tmp_path, public_jwk(PRIVATE_KEY, kid="one"), public_jwk(second, kid="two"))
    )
    assert jwt_auth.presented_jwt(make_token(key=second, kid="two"), jwt_config)
    assert api_error(lambda: jwt_auth.presented_jwt(make_token(key=second, kid="one"), jwt_config)).code == (
        "invalid_token"
    )
    no_kid = api_error(lambda: jwt_auth.presented_jwt(make_token(key=second, kid=None), jwt_config))
    assert (no_kid.status, no_kid.code) == (401, "invalid_token")


def test_a_symmetric_key_in_the_jwks_never_verifies(tmp_path):
    secret = b"s" * 32
    jwt_config = config(jwks_file=jwks_file(tmp_path, {"kty": "oct", "kid": "hmac", "k": b64url(secret)}))
    token = jwt.encode(claims_for(new_subject()), secret, algorithm="HS256", headers={"kid": "hmac"})
    assert api_error(lambda: jwt_auth.presented_jwt(token, jwt_config)).code == "invalid_token"


def test_without_create_keys_only_linked_subjects_get_in(tmp_path, make_key):
    jwt_config = config(jwks_file=str(FIXTURES / "jwt-test-jwks.json"), create_keys=False)
    error = api_error(lambda: jwt_auth.presented_jwt(make_token(), jwt_config))
    assert (error.status, error.code, error.headers) == (401, "unknown_subject", {"WWW-Authenticate": "Bearer"})
    assert not ApiKey.objects.exists()
    subject = new_subject()
    make_key(jwt_subject=subject)
    assert jwt_auth.presented_jwt(make_token(subject), jwt_config).prefix == ApiKey.objects.get().prefix


def test_created_keys_take_the_configured_limits():
    jwt_config = config(
        jwks_file=str(FIXTURES / "jwt-test-jwks.json"), max_calls=7, max_tokens_total=900, allowed_models=("echo",)
    )
    subject = new_subject()
    jwt_auth.presented_jwt(make_token(subject), jwt_config)
    api_key = ApiKey.objects.get(jwt_subject=subject)
    assert (api_key.max_calls, api_key.max_tokens_total, api_key.allowed_models) == (7, 900, ["echo"])


def test_the_loser_of_a_first_call_race_reads_the_winners_key(make_key):
    """What the second of two simultaneous first calls sees: the row it meant to create
    appeared after its lookup, so its insert fails and it takes the winner's."""
    subject = new_subject()
    make_key(name="winner", jwt_subject=subject)
    api_key = jwt_auth.create_key_for_subject(subject, config(jwks_file=str(FIXTURES / "jwt-test-jwks.json")))
    assert api_key.name == "winner"
    assert ApiKey.objects.count() == 1


def test_a_subject_too_long_for_the_column_is_refused():
    jwt_config = config(jwks_file=str(FIXTURES / "jwt-test-jwks.json"))
    error = api_error(lambda: jwt_auth.presented_jwt(make_token("x" * 256), jwt_config))
    assert error.code == "invalid_token"
    assert not ApiKey.objects.exists()


def test_unreadable_jwks_file_is_a_503(tmp_path, caplog):
    for path in (tmp_path / "absent.json", Path(jwks_file(tmp_path)), tmp_path / "broken.json"):
        if path.name == "broken.json":
            path.write_text("{not json")
        error = api_error(lambda path=path: jwt_auth.presented_jwt(make_token(), config(jwks_file=str(path))))
        assert (error.status, error.code) == (503, "jwks_unavailable")
    assert "JWKS" in caplog.text


class JwksHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


def test_jwks_url_is_fetched_and_an_unreachable_one_is_a_503():
    JwksHandler.body = (FIXTURES / "jwt-test-jwks.json").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), JwksHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        assert jwt_auth.presented_jwt(make_token(), config(jwks_url=url))
        assert jwt_auth.presented_jwt(make_token(), config(jwks_url=url))  # from the client's cache
        error = api_error(lambda: jwt_auth.presented_jwt(make_token(kid="rotated"), config(jwks_url=url)))
        assert error.code == "invalid_token"
    finally:
        server.shutdown()
        server.server_close()
    closed = f"http://127.0.0.1:{free_port()}/jwks.json"
    error = api_error(lambda: jwt_auth.presented_jwt(make_token(), config(jwks_url=closed)))
    assert (error.status, error.code) == (503, "jwks_unavailable")


def test_a_token_without_jwt_configured_is_an_invalid_key(settings):
    settings.LLM_CONFIG = settings.LLM_CONFIG.model_copy(update={"jwt": None})
    request = RequestFactory().post("/api/", HTTP_AUTHORIZATION=f"Bearer {make_token()}")
    error = api_error(lambda: caller_for(request))
    assert (error.status, error.code) == (401, "invalid_api_key")


def test_the_admin_links_a_subject_and_leaves_others_unlinked(admin_client):
    form = {"owner_email": "", "note": "", "max_calls": "", "weight": "1"}
    admin_client.post("/admin/apikeys/apikey/add/", {**form, "name": "alice", "jwt_subject": "alice@issuer.test"})
    admin_client.post("/admin/apikeys/apikey/add/", {**form, "name": "bob", "jwt_subject": ""})
    admin_client.post("/admin/apikeys/apikey/add/", {**form, "name": "carol", "jwt_subject": ""})
    subjects = dict(ApiKey.objects.values_list("name", "jwt_subject"))
    assert subjects == {"alice": "alice@issuer.test", "bob": None, "carol": None}
    listing = admin_client.get("/admin/apikeys/apikey/", {"q": "alice@issuer"}).content.decode()
    assert "alice" in listing and "bob" not in listing
