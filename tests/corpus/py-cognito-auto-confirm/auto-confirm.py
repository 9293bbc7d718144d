COMPANY_DOMAIN = "example.com"


def handler(event, context):
    """Cognito PreSignUp trigger: confirm and verify users who sign up with a company address."""
    email = event["request"]["userAttributes"].get("email", "")
    if email.rpartition("@")[2] == COMPANY_DOMAIN:
        event["response"]["autoConfirmUser"] = True
        event["response"]["autoVerifyEmail"] = True
    if "phone_number" in event["request"]["userAttributes"] and event["response"]["autoConfirmUser"]:
        event["response"]["autoVerifyPhone"] = True
    return event
