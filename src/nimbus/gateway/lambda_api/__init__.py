"""The Lambda API that boto3 and the AWS CLI speak, at ``/2015-03-31`` (docs/api.md#lambda-api).

- ``routes``: the operations, as one raw ASGI handler (``LambdaApi``)
- ``shapes``: FunctionConfiguration and AliasConfiguration
- ``errors``: Lambda's error shapes, and Nimbus's errors mapped to them in one place
- ``names``: function names, qualifiers and ARNs
- ``sigv4``: signatures, verified with botocore's own signer (``gateway/auth.py`` calls it)
"""
