"""The Lambda API's warm Invoke beside /api/v1's, on the same node, function and connection pattern.

The Lambda request carries the headers boto3 sends (SigV4 ``Authorization``, ``X-Amz-Date``, its
user agent, ``X-Amz-Invocation-Type``); the node runs with auth off, so the signature is parsed by no
one, as on a node where any signature is accepted. The two paths are measured in alternating rounds so
drift in the machine's speed falls on both alike.
"""

from bench.common import p50_ms
from bench.loadgen import sequential

ROUNDS = 3
BOTO3_HEADERS = {
    "User-Agent": "Boto3/1.34.0 md/Botocore#1.34.0 ua/2.0 os/linux lang/python#3.11 cfg/retry-mode#legacy",
    "X-Amz-Invocation-Type": "RequestResponse",
    "X-Amz-Date": "20240101T000000Z",
    "Authorization": "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/lambda/aws4_request, "
                     "SignedHeaders=host;x-amz-date;x-amz-invocation-type, Signature=" + "0" * 64,
    "amz-sdk-invocation-id": "00000000-0000-0000-0000-000000000000",
    "amz-sdk-request": "attempt=1; max=5",
}


def measure(invoke_url: str, lambda_url: str, body: bytes, n: int) -> dict:
    native: list[float] = []
    lam: list[float] = []
    for _ in range(ROUNDS):
        native += sequential(invoke_url, body, n)
        lam += sequential(lambda_url, body, n, headers=BOTO3_HEADERS)
    value, floor = p50_ms(lam), p50_ms(native)
    return {"value": value, "floor": floor, "ratio": value / floor, "samples": len(lam),
            "floor_is": "the same node's /api/v1 warm invoke p50, measured in alternating rounds"}
