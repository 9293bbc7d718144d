import json


def lambda_handler(event, context):
    """The developer guide's 'reporting batch item failures' handler for SQS."""
    if event:
        batch_item_failures = []
        sqs_batch_response = {}

        for record in event["Records"]:
            try:
                process_message(record)
            except Exception as e:
                print(f"Failed {record['messageId']}: {e!r}")
                batch_item_failures.append({"itemIdentifier": record["messageId"]})

        sqs_batch_response["batchItemFailures"] = batch_item_failures
        return sqs_batch_response


def process_message(record):
    order = json.loads(record["body"])
    if order["amount"] <= 0:
        raise ValueError("amount must be positive")
    print(f"Processed order {order['order_id']}")
