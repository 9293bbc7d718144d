def lambda_handler(event, context):
    """A TOKEN authorizer as API Gateway's documentation sketches it: allow, deny, or 401 by raising."""
    token = event["authorizationToken"]
    if token == "allow":
        return generate_policy("user", "Allow", event["methodArn"])
    if token == "deny":
        return generate_policy("user", "Deny", event["methodArn"])
    if token == "unauthorized":
        raise Exception("Unauthorized")  # API Gateway answers 401
    return "Error: Invalid token"  # API Gateway answers 500


def generate_policy(principal_id, effect, resource):
    auth_response = {"principalId": principal_id}
    if effect and resource:
        auth_response["policyDocument"] = {
            "Version": "2012-10-17",
            "Statement": [{"Action": "execute-api:Invoke", "Effect": effect, "Resource": resource}],
        }
    auth_response["context"] = {"stringKey": "stringval", "numberKey": 123, "booleanKey": True}
    return auth_response
