import os


def lambda_handler(event, context):
    """Which version answered: handlers log it to tell $LATEST from a published version behind an alias."""
    stream = context.log_stream_name
    return {
        "function_version": context.function_version,
        "env_version": os.environ["AWS_LAMBDA_FUNCTION_VERSION"],
        "stream_version": stream[stream.index("[") + 1:stream.index("]")],
    }
