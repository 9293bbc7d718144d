import os

# Configuration read once at import, from the function's environment variables.
TABLE_NAME = os.environ["TABLE_NAME"]
STAGE = os.environ.get("STAGE", "dev")
FEATURES = [flag for flag in os.environ.get("FEATURE_FLAGS", "").split(",") if flag]


def lambda_handler(event, context):
    return {
        "table": TABLE_NAME,
        "stage": STAGE,
        "features": FEATURES,
        "region": os.environ["AWS_REGION"],
        "default_region": os.environ["AWS_DEFAULT_REGION"],
        "function_name": os.environ["AWS_LAMBDA_FUNCTION_NAME"],
        "memory": os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"],
        "log_group": os.environ["AWS_LAMBDA_LOG_GROUP_NAME"],
        "execution_env": os.environ["AWS_EXECUTION_ENV"],
        "handler": os.environ["_HANDLER"],
        "task_root": os.environ["LAMBDA_TASK_ROOT"],
        "cwd": os.getcwd(),
        "tz": os.environ["TZ"],
        "initialization_type": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"],
    }
