from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger(service="payment")


@logger.inject_lambda_context
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    logger.append_keys(payment_id=event["payment_id"])
    logger.info("Collecting payment")
    return {"payment_id": event["payment_id"], "status": "collected"}
