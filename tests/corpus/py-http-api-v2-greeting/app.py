import base64
import json

GREETINGS = {"en": "Hello", "fr": "Bonjour", "de": "Hallo"}


def lambda_handler(event, context):
    """An HTTP API (payload format 2.0) route: base64 body, comma-joined query values, cookies."""
    body = event.get("body") or "{}"
    if event.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8")
    name = json.loads(body)["name"]
    langs = (event.get("queryStringParameters") or {}).get("lang", "en").split(",")
    cookies = dict(cookie.split("=", 1) for cookie in event.get("cookies", []))
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "cookies": [f"last_greeted={name.split()[0]}; Path=/; HttpOnly"],
        "body": json.dumps({
            "greetings": [f"{GREETINGS[lang]} {name}" for lang in langs],
            "method": event["requestContext"]["http"]["method"],
            "route": event["routeKey"],
            "theme": cookies.get("theme"),
        }),
        "isBase64Encoded": False,
    }
