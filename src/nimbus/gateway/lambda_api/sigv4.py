"""SigV4, as botocore signs the Lambda API's requests, checked by recomputing the signature with
botocore's own signer (``SigV4Auth``): no canonical request of our own to drift from the client's.

``parse`` reads the ``Authorization`` header (before the body is read: an unknown key id is refused at
once); ``verify`` recomputes the signature over the method, path, query, the headers the client signed
and the body, and compares in constant time. A request dated more than ``SKEW_S`` from now is refused,
as AWS does, so a captured request cannot be replayed later.
"""

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from nimbus.gateway.lambda_api import errors

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "lambda"
SKEW_S = 15 * 60
HEADER_MAX = 4096  # longer Authorization headers are not botocore's: refused before any parsing
MISMATCH = ("The request signature we calculated does not match the signature you provided. Check your AWS "
            "Secret Access Key and signing method. Consult the service documentation for details.")


@dataclass(frozen=True, slots=True)
class Authorization:
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def parse(scope) -> Authorization | None:
    """The request's SigV4 ``Authorization``; None when it has none. ``LambdaError`` when it is malformed."""
    header = _header(scope, b"authorization")
    if header is None:
        return None
    if len(header) > HEADER_MAX:
        raise errors.bad_content("the Authorization header is too long")
    algorithm, _, rest = header.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise errors.LambdaError("IncompleteSignatureException", 400,
                                 f"Authorization header requires the {ALGORITHM} algorithm")
    fields = {}
    for part in rest.split(","):
        key, _, value = part.strip().partition("=")
        fields[key] = value
    credential = fields.get("Credential", "").split("/")
    if len(credential) != 5 or not fields.get("SignedHeaders") or not fields.get("Signature") \
            or credential[4] != "aws4_request":
        raise errors.LambdaError("IncompleteSignatureException", 400,
                                 "Authorization header requires Credential, SignedHeaders and Signature")
    amz_date = _header(scope, b"x-amz-date")
    if amz_date is None:
        raise errors.LambdaError("IncompleteSignatureException", 400, "the request has no X-Amz-Date header")
    return Authorization(access_key=credential[0], date=credential[1], region=credential[2],
                         service=credential[3], signed_headers=tuple(fields["SignedHeaders"].split(";")),
                         signature=fields["Signature"], amz_date=amz_date)


def check_clock(auth: Authorization, now: dt.datetime | None = None) -> None:
    """Refuse a request signed for another service, or dated more than ``SKEW_S`` away from now."""
    if auth.service != SERVICE:
        raise errors.signature(f"Credential should be scoped to correct service: '{SERVICE}'.")
    try:
        when = dt.datetime.strptime(auth.amz_date, SIGV4_TIMESTAMP).replace(tzinfo=dt.UTC)
    except ValueError:
        raise errors.signature("X-Amz-Date must be in the ISO8601 basic format yyyyMMdd'T'HHmmss'Z'") from None
    if auth.date != auth.amz_date[:8]:
        raise errors.signature("the credential scope's date is not the X-Amz-Date's")
    now = now or dt.datetime.now(dt.UTC)
    if abs((now - when).total_seconds()) > SKEW_S:
        raise errors.signature(f"Signature expired: {auth.amz_date} is now earlier than "
                               f"{(now - dt.timedelta(seconds=SKEW_S)).strftime(SIGV4_TIMESTAMP)} "
                               f"({now.strftime(SIGV4_TIMESTAMP)} - 15 min.)")


def expected(auth: Authorization, secret: str, scope, body: bytes) -> str:
    """The signature botocore would make for this request with ``secret``."""
    headers = HTTPHeaders()
    wanted = set(auth.signed_headers)
    for key, value in scope["headers"]:
        name = key.decode("latin-1")
        if name in wanted:
            headers[name] = value.decode("latin-1")  # HTTPHeaders appends: repeated headers are joined
    host = headers.get("host", "")
    query = scope.get("query_string", b"").decode("latin-1")
    # The raw path as the client sent it: botocore signed its own percent-encoding of the name (":" as %3A).
    path = scope.get("raw_path") or scope["path"].encode()
    url = f"http://{host}{path.decode('latin-1')}" + (f"?{query}" if query else "")
    request = AWSRequest(method=scope["method"], url=url, data=body)
    request.headers = headers
    request.context["timestamp"] = auth.amz_date
    signer = SigV4Auth(Credentials(auth.access_key, secret), auth.service, auth.region)
    if signer.signed_headers(signer.headers_to_sign(request)) != ";".join(auth.signed_headers):
        return ""  # a header the client says it signed is missing (or host was not signed): no match
    return signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)


def verify(auth: Authorization, secret: str, scope, body: bytes) -> None:
    """Raise ``InvalidSignatureException`` unless the request was signed with ``secret`` over this body."""
    declared = _header(scope, b"x-amz-content-sha256")
    # botocore signs that header's value in place of the body's hash: it must be the body's hash.
    if declared is not None and declared != hashlib.sha256(body).hexdigest():
        raise errors.signature("X-Amz-Content-SHA256 is not the sha256 of the body")
    if not hmac.compare_digest(expected(auth, secret, scope, body), auth.signature):
        raise errors.signature(MISMATCH)
