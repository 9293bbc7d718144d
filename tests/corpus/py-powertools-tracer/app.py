from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

tracer = Tracer(service="booking")
logger = Logger(service="booking")


@tracer.capture_method
def confirm_booking(booking_id: str) -> dict:
    tracer.put_annotation(key="BookingId", value=booking_id)
    tracer.put_metadata(key="booking", value={"id": booking_id, "confirmed": True})
    return {"booking_id": booking_id, "status": "CONFIRMED"}


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    booking = confirm_booking(event["booking_id"])
    logger.info("Booking confirmed", extra={"booking_id": booking["booking_id"]})
    return booking
