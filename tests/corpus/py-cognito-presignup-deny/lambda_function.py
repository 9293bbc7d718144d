def lambda_handler(event, context):
    """Cognito PreSignUp trigger: an exception's message is what the sign-up call shows the user."""
    email = event["request"]["userAttributes"].get("email", "")
    if not email.endswith("@example.com"):
        raise Exception("Cannot register users without a company email address")
    return event
