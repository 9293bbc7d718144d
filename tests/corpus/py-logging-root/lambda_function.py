import logging

logger = logging.getLogger()
logger.setLevel("INFO")


def lambda_handler(event, context):
    """The developer guide's logging example: the root logger, configured by the runtime."""
    logger.info("Processing order %s", event["order_id"])
    logger.debug("Full event: %s", event)
    if event["quantity"] > event["stock"]:
        logger.warning("Stock for %s is low: %d left", event["item"], event["stock"])
    return {"order_id": event["order_id"], "status": "accepted"}
