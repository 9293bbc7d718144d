"""The Lambda API with NIMBUS_AUTH=on, on SQLite and PostgreSQL: SigV4 signatures are verified with the key's
secret and the key's tenant scopes everything; refusals are AWS's 403s, as botocore's modeled errors."""

import asyncio
import secrets

import boto3
import botocore.exceptions
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from test_lambda_api import REGION, client_for, create, payload_of

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def secured(request, tmp_path_factory, make_module_node):
    """A node with auth on, and an admin bearer key made in its store."""
    from nimbus.gateway import auth
    from nimbus.store import Store

    home = tmp_path_factory.mktemp("home")
    url = f"sqlite:///{home / 'nimbus.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    admin = auth.new_key()

    async def make_admin():
        store = await Store.open(url)
        try:
            await store.create_api_key(tenant="default", name="lambda-admin", key_hash=auth.hash_key(admin),
                                       admin=True, prefix=auth.display_prefix(admin))
        finally:
            await store.close()

    asyncio.run(make_admin())
    with make_module_node(home, url, auth="on") as running:
        running.admin = admin
        yield running


def make_key(node, tenant: str) -> dict:
    with node.client(headers={"Authorization": f"Bearer {node.admin}"}) as api:
        answer = api.post("/api/v1/keys", json={"tenant": tenant})
    assert answer.status_code == 201, answer.text
    return answer.json()


def signed_client(node, key: dict):
    return client_for(node.url, key["access_key_id"], key["secret_access_key"])


def error_code(caught) -> tuple[str, int]:
    response = caught.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def test_the_right_key_works_and_scopes_to_its_tenant(secured):
    tenant = "acme" + secrets.token_hex(3)
    acme = make_key(secured, tenant)
    assert acme["access_key_id"] == acme["id"] and len(acme["secret_access_key"]) >= 40
    lam = signed_client(secured, acme)
    create(lam, "lam-secure")
    assert payload_of(lam.invoke(FunctionName="lam-secure", Payload=b'{"k": 1}'))["event"] == {"k": 1}
    # The same function through /api/v1 with the same key's bearer token.
    with secured.client(headers={"Authorization": f"Bearer {acme['key']}"}) as api:
        assert [f["name"] for f in api.get("/api/v1/functions").json()["functions"]] == ["lam-secure"]

    other = signed_client(secured, make_key(secured, "globex" + secrets.token_hex(3)))
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.invoke(FunctionName="lam-secure")
    assert other.list_functions()["Functions"] == []


def test_bad_credentials_are_refused(secured):
    key = make_key(secured, "initech" + secrets.token_hex(3))
    create(signed_client(secured, key), "lam-guarded")

    wrong_secret = client_for(secured.url, key["access_key_id"], "x" * 40)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        wrong_secret.invoke(FunctionName="lam-guarded")
    assert error_code(caught) == ("InvalidSignatureException", 403)

    unknown = client_for(secured.url, "0" * 32, key["secret_access_key"])
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        unknown.list_functions()
    assert error_code(caught) == ("UnrecognizedClientException", 403)

    unsigned = boto3.client("lambda", endpoint_url=secured.url, region_name=REGION,
                            config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}))
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        unsigned.invoke(FunctionName="lam-guarded")
    assert error_code(caught) == ("MissingAuthenticationTokenException", 403)

    # A signature over one body does not carry another: the payload's hash is part of what is signed.
    url = f"{secured.url}/2015-03-31/functions/lam-guarded/invocations"
    request = AWSRequest(method="POST", url=url, data=b'{"amount": 1}')
    SigV4Auth(Credentials(key["access_key_id"], key["secret_access_key"]), "lambda", REGION).add_auth(request)
    with secured.client() as raw:
        headers = dict(request.headers.items())
        assert raw.post(url, content=b'{"amount": 1}', headers=headers).status_code == 200
        tampered = raw.post(url, content=b'{"amount": 1000}', headers=headers)
    assert tampered.status_code == 403 and tampered.headers["x-amzn-errortype"] == "InvalidSignatureException"

    # A revoked key stops at once on the node that revoked it.
    with secured.client(headers={"Authorization": f"Bearer {secured.admin}"}) as api:
        assert api.delete(f"/api/v1/keys/{key['id']}").status_code == 200
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        signed_client(secured, key).list_functions()
    assert error_code(caught) == ("UnrecognizedClientException", 403)


def test_rate_limit_is_too_many_requests(make_node, tmp_path):
    with make_node(tmp_path, f"sqlite:///{tmp_path / 'nimbus.db'}", rate_limit=0.001, rate_burst=1) as node:
        lam = client_for(node.url)
        lam.list_functions()
        with pytest.raises(lam.exceptions.TooManyRequestsException) as caught:
            lam.list_functions()
    headers = caught.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429 and int(headers["retry-after"]) >= 1
    assert caught.value.response["Reason"] == "CallerRateLimitExceeded"
