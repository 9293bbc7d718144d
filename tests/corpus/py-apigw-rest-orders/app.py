import json

HEADERS = {"Content-Type": "application/json"}


def lambda_handler(event, context):
    if event["httpMethod"] != "POST":
        return {"statusCode": 405, "headers": {"Allow": "POST"}, "body": ""}
    try:
        order = json.loads(event["body"] or "{}")
        quantity = int(order["quantity"])
        price = float(order["unit_price"])
    except (KeyError, ValueError) as exc:
        return {"statusCode": 400, "headers": HEADERS, "body": json.dumps({"error": str(exc)})}
    request = event["requestContext"]
    return {
        "statusCode": 201,
        "headers": {**HEADERS, "Location": f"/{request['stage']}/orders/{request['requestId']}"},
        "body": json.dumps({
            "item": order["item"],
            "quantity": quantity,
            "total": round(quantity * price, 2),
            "source_ip": request["identity"]["sourceIp"],
        }),
    }
