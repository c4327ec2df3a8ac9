"""MLflow's authorization function behind Kubeflow's gateway (``authorization_function`` of the
basic-auth app: ``kubeflow_auth:authenticate_request``).

Kubeflow's Istio gateway logs users in with Dex and forwards every request with
``Authorization: Bearer <Dex ID token>``, and it denies requests that carry any other
Authorization header (AuthorizationPolicy istio-ingressgateway-require-jwt), so MLflow's own Basic
login can never work through it. This function keeps Basic auth, exactly as MLflow's basic-auth
app does it, for everything inside the cluster (pipeline steps, notebooks, jobs), and accepts a
Bearer token when it is an RS256 JWT signed by a key of the issuer's JWKS
(``KUBEFLOW_OIDC_ISSUER``, keys at ``KUBEFLOW_OIDC_JWKS_URL``, default ``<issuer>/keys``), for
that issuer, unexpired, and (with ``KUBEFLOW_OIDC_AUDIENCE``) for that audience. The user is
the token's ``email`` claim (``KUBEFLOW_OIDC_USERNAME_CLAIM``); MLflow creates it on first sight,
with a random password nobody knows, and its permissions are MLflow's defaults (read everything,
manage what it creates) until an admin grants more. Without ``KUBEFLOW_OIDC_ISSUER`` Bearer
tokens are refused. Needs only what the MLflow server image has (cryptography, Flask).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
import urllib.request
from typing import Any

from flask import Response, request
from mlflow.server.auth import authenticate_request_basic_auth, store
from werkzeug.datastructures import Authorization

LEEWAY_S = 30  # clock skew allowed on exp / nbf
JWKS_TTL_S = 300  # keys are re-read this often (and at once for an unknown kid)
_jwks: dict[str, Any] = {"keys": {}, "read_at": 0.0}
_verified: dict[str, tuple[str, float]] = {}  # token -> (username, exp): MLflow asks several times per request
_lock = threading.Lock()


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _issuer() -> str:
    return os.environ.get("KUBEFLOW_OIDC_ISSUER", "").rstrip("/")


def _public_keys(refresh: bool = False) -> dict[str, Any]:
    """kid -> RSA public key, from the issuer's JWKS (cached)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    with _lock:
        if refresh or time.monotonic() - _jwks["read_at"] > JWKS_TTL_S:
            url = os.environ.get("KUBEFLOW_OIDC_JWKS_URL") or f"{_issuer()}/keys"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    document = json.load(response)
            except (OSError, ValueError) as exc:  # the issuer is down: the keys read before still hold
                print(f"kubeflow_auth: reading {url} failed: {exc}", flush=True)
                return dict(_jwks["keys"])
            keys = {}
            for jwk in document.get("keys", []):
                if jwk.get("kty") == "RSA" and jwk.get("use", "sig") == "sig":
                    numbers = rsa.RSAPublicNumbers(int.from_bytes(_b64url(jwk["e"]), "big"), int.from_bytes(_b64url(jwk["n"]), "big"))
                    keys[jwk.get("kid", "")] = numbers.public_key()
            _jwks.update(keys=keys, read_at=time.monotonic())
        return dict(_jwks["keys"])


def verify_token(token: str) -> dict | None:
    """The claims of ``token`` when it is a valid RS256 JWT of the issuer; None otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    issuer = _issuer()
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header, claims = json.loads(_b64url(header_b64)), json.loads(_b64url(payload_b64))
    except ValueError:
        return None
    if not issuer or header.get("alg") != "RS256" or not isinstance(claims, dict):
        return None
    keys = _public_keys()
    if header.get("kid", "") not in keys:
        keys = _public_keys(refresh=True)  # the issuer rotated its keys
    key = keys.get(header.get("kid", ""))
    if key is None:
        return None
    try:
        key.verify(_b64url(signature_b64), f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return None
    now = time.time()
    audience = os.environ.get("KUBEFLOW_OIDC_AUDIENCE", "")
    audiences = claims.get("aud") if isinstance(claims.get("aud"), list) else [claims.get("aud")]
    if claims.get("iss", "").rstrip("/") != issuer or not isinstance(claims.get("exp"), (int, float)) or claims["exp"] + LEEWAY_S < now:
        return None
    if claims.get("nbf", 0) - LEEWAY_S > now or (audience and audience not in audiences):
        return None
    return claims


def _bearer_user(token: str) -> str | None:
    cached = _verified.get(token)
    if cached and cached[1] + LEEWAY_S >= time.time():
        return cached[0]
    claims = verify_token(token)
    username = claims.get(os.environ.get("KUBEFLOW_OIDC_USERNAME_CLAIM", "email")) if claims else None
    if not isinstance(username, str) or not username:
        return None
    if not store.has_user(username):
        try:
            store.create_user(username, secrets.token_urlsafe(32))  # logs in through Kubeflow only
        except Exception:  # noqa: BLE001 (a concurrent request created it first)
            if not store.has_user(username):
                raise
    with _lock:
        if len(_verified) > 10_000:
            _verified.clear()
        _verified[token] = (username, float(claims["exp"]))
    return username


def authenticate_request() -> Authorization | Response:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        username = _bearer_user(header[7:].strip())
        if username is None:
            return Response("Kubeflow login token not accepted by MLflow", 401)
        return Authorization("bearer", {"username": username})
    return authenticate_request_basic_auth()
