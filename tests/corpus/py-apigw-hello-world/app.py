import json


def lambda_handler(event, context):
    """Sample pure Lambda function, as `sam init` writes it.

    event: API Gateway Lambda Proxy Input Format
    context: Lambda Context runtime methods and attributes
    """
    return {
        "statusCode": 200,
        "body": json.dumps({
            "message": "hello world",
        }),
    }
