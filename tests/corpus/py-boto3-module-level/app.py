import os

import boto3
import botocore

# Clients made once per execution environment, outside the handler, as AWS's best practices advise.
s3 = boto3.client("s3")
dynamodb = boto3.resource("dynamodb")
table = dynamodb.Table(os.environ["TABLE_NAME"])


def lambda_handler(event, context):
    return {
        "s3_region": s3.meta.region_name,
        "dynamodb_region": dynamodb.meta.client.meta.region_name,
        "table": table.name,
        "boto3_has_version": bool(boto3.__version__),
        "botocore_has_version": bool(botocore.__version__),
    }
