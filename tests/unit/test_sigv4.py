"""SigV4 verification (gateway/lambda_api/sigv4.py) against requests botocore itself signs."""

import datetime as dt
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from nimbus.gateway.lambda_api import errors, names, sigv4

KEY, SECRET = "0123456789abcdef0123456789abcdef", "s" * 40


def signed_scope(url: str, body: bytes = b"{}", method: str = "POST", secret: str = SECRET, extra=None):
    """The ASGI scope uvicorn would make of a request botocore signed (plus ``extra`` headers, unsigned)."""
    request = AWSRequest(method=method, url=url, data=body, headers={"X-Amz-Invocation-Type": "Event"})
    SigV4Auth(Credentials(KEY, secret), "lambda", "us-east-1").add_auth(request)
    parts = urlsplit(url)
    headers = [(b"host", parts.netloc.encode())]
    headers += [(k.lower().encode(), v.encode() if isinstance(v, str) else v) for k, v in request.headers.items()]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    return {"type": "http", "method": method, "raw_path": parts.path.encode(), "path": parts.path,
            "query_string": parts.query.encode(), "headers": headers}


def check(scope, body: bytes = b"{}", secret: str = SECRET) -> None:
    auth = sigv4.parse(scope)
    sigv4.check_clock(auth)
    sigv4.verify(auth, secret, scope, body)


def test_a_botocore_signature_verifies():
    # A qualified name as botocore sends it (":" percent-encoded) and a query string.
    scope = signed_scope("http://127.0.0.1:8080/2015-03-31/functions/fn%3Aprod/invocations?Qualifier=prod")
    check(scope)
    assert sigv4.parse(scope).access_key == KEY


@pytest.mark.parametrize("case", ["secret", "body", "path", "query", "header"])
def test_any_change_breaks_the_signature(case):
    scope = signed_scope("http://127.0.0.1:8080/2015-03-31/functions/fn/invocations?Qualifier=1")
    body, secret = b"{}", SECRET
    if case == "secret":
        secret = "t" * 40
    elif case == "body":
        body = b'{"a": 1}'
    elif case == "path":
        scope["raw_path"] = b"/2015-03-31/functions/other/invocations"
    elif case == "query":
        scope["query_string"] = b"Qualifier=2"
    else:  # a signed header's value
        scope["headers"] = [(k, b"RequestResponse" if k == b"x-amz-invocation-type" else v)
                            for k, v in scope["headers"]]
    with pytest.raises(errors.LambdaError) as caught:
        check(scope, body, secret)
    assert (caught.value.code, caught.value.status) == ("InvalidSignatureException", 403)


def test_content_sha256_must_be_the_body_hash():
    # botocore signs X-Amz-Content-SHA256's value instead of hashing the body: it must not stand in for one.
    scope = signed_scope("http://h/2015-03-31/functions/fn/invocations",
                         extra={"x-amz-content-sha256": "0" * 64})
    with pytest.raises(errors.LambdaError, match="X-Amz-Content-SHA256"):
        check(scope)


def test_clock_skew_over_15_minutes_is_refused():
    auth = sigv4.parse(signed_scope("http://h/2015-03-31/functions"))
    signed = dt.datetime.strptime(auth.amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    sigv4.check_clock(auth, signed + dt.timedelta(minutes=14))
    for skew in (dt.timedelta(minutes=16), -dt.timedelta(minutes=16)):
        with pytest.raises(errors.LambdaError, match="Signature expired"):
            sigv4.check_clock(auth, signed + skew)


def test_malformed_authorization_headers():
    base = {"type": "http", "method": "GET", "path": "/", "query_string": b""}
    assert sigv4.parse({**base, "headers": []}) is None
    for header in (b"Bearer nmb_x", b"AWS4-HMAC-SHA256 Credential=a/b, Signature=c", b"AWS4-HMAC-SHA256 " + b"x" * 5000):
        with pytest.raises(errors.LambdaError) as caught:
            sigv4.parse({**base, "headers": [(b"authorization", header), (b"x-amz-date", b"20240101T000000Z")]})
        assert 400 <= caught.value.status < 500


@pytest.mark.parametrize(("value", "expected"), [
    ("fn", ("fn", None)),
    ("fn:prod", ("fn", "prod")),
    ("000000000000:function:fn", ("fn", None)),
    ("000000000000:function:fn:3", ("fn", "3")),
    ("arn:aws:lambda:us-east-1:000000000000:function:fn:$LATEST", ("fn", "$LATEST")),
])
def test_function_names(value, expected):
    assert names.parse(value, "000000000000", "us-east-1") == expected


@pytest.mark.parametrize(("value", "code"), [
    ("arn:aws:lambda:us-east-1:111111111111:function:fn", "ResourceNotFoundException"),
    ("arn:aws:lambda:eu-west-1:000000000000:function:fn", "ResourceNotFoundException"),
    ("fn:", "InvalidParameterValueException"),
    ("a" * 171, "InvalidParameterValueException"),
    ("fn/../x", "InvalidParameterValueException"),
])
def test_bad_function_names(value, code):
    with pytest.raises(errors.LambdaError) as caught:
        names.parse(value, "000000000000", "us-east-1")
    assert caught.value.code == code
