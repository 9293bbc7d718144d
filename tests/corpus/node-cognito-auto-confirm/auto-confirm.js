// Cognito PreSignUp trigger (the Cognito developer guide's auto-confirm example), in a hyphenated file.
exports.handler = (event, context, callback) => {
  const email = event.request.userAttributes.email || '';
  if (email.endsWith('@example.com')) {
    event.response.autoConfirmUser = true;
    event.response.autoVerifyEmail = true;
  }
  if (event.request.userAttributes.hasOwnProperty('phone_number') && event.response.autoConfirmUser) {
    event.response.autoVerifyPhone = true;
  }
  callback(null, event);
};
