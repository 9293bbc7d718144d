from aws_lambda_powertools.utilities.parser import BaseModel, event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext


class OrderItem(BaseModel):
    id: int
    quantity: int
    description: str


class Order(BaseModel):
    id: int
    description: str
    items: list[OrderItem]
    optional_field: str | None = None


@event_parser(model=Order)
def lambda_handler(event: Order, context: LambdaContext):
    return {
        "order_id": event.id,
        "item_count": len(event.items),
        "total_quantity": sum(item.quantity for item in event.items),
        "optional_field": event.optional_field,
    }
