from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

processor = BatchProcessor(event_type=EventType.SQS)
logger = Logger(service="orders")


def record_handler(record: SQSRecord):
    payload = record.json_body  # a body that is not JSON fails this record only
    if payload["amount"] <= 0:
        raise ValueError(f"order {payload['order_id']} has a non-positive amount")
    logger.info("Processed order", extra={"order_id": payload["order_id"]})


@logger.inject_lambda_context
def lambda_handler(event, context: LambdaContext):
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
