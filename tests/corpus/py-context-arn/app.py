import os


def lambda_handler(event, context):
    """The common trick for the account id and region: split the function's own ARN."""
    arn = context.invoked_function_arn
    _, partition, service, region, account_id, resource_type, *rest = arn.split(":")
    return {
        "partition": partition,
        "service": service,
        "region": region,
        "account_id": account_id,
        "resource_type": resource_type,
        "function_name": rest[0],
        "qualifier": rest[1] if len(rest) > 1 else None,
        "same_region_as_env": region == os.environ["AWS_REGION"],
        "same_name_as_env": rest[0] == os.environ["AWS_LAMBDA_FUNCTION_NAME"] == context.function_name,
    }
