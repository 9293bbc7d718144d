import logging

logger = logging.getLogger()


def lambda_handler(event, context):
    """Structured logs with the function's log format set to JSON: extra keys become fields."""
    logger.info("Pricing order", extra={"order_id": event["order_id"]})
    logger.debug("Not at the INFO level")
    try:
        unit_price = event["total"] / event["quantity"]
    except ZeroDivisionError:
        logger.exception("Could not price order %s", event["order_id"])
        unit_price = None
    return {"order_id": event["order_id"], "unit_price": unit_price}
