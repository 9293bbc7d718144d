from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger(service="users")
app = APIGatewayRestResolver()


@app.get("/users/<user_id>")
def get_user(user_id: str):
    fields = app.current_event.get_query_string_value(name="fields", default_value="")
    return {"id": user_id, "fields": fields.split(","), "stage": app.current_event.request_context.stage}


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)
