ORDERS = {"o-1": {"status": "shipped"}}


class OrderNotFoundError(Exception):
    """Raised for an order id we do not know; Lambda reports the class name as errorType."""


def lambda_handler(event, context):
    order_id = event["order_id"]
    if order_id not in ORDERS:
        raise OrderNotFoundError(f"Order {order_id} does not exist")
    return {"order_id": order_id, **ORDERS[order_id]}
