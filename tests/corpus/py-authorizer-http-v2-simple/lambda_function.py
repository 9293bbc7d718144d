import os


def lambda_handler(event, context):
    """An HTTP API REQUEST authorizer with simple responses (payload format 2.0)."""
    response = {
        "isAuthorized": False,
        "context": {
            "stringKey": "value",
            "numberKey": 1,
            "booleanKey": True,
            "arrayKey": ["value1", "value2"],
            "mapKey": {"value1": "value2"},
        },
    }
    if event["headers"].get("authorization") == os.environ["EXPECTED_KEY"]:
        response["isAuthorized"] = True
        response["context"]["route"] = event["routeKey"]
    return response
