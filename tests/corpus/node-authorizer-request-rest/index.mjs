// A REQUEST authorizer for a REST API: identity from headers, query string and stage variables.
export const handler = async (event, context) => {
  const { headers, queryStringParameters: query, stageVariables } = event;
  const [, , , region, accountId, apiPath] = event.methodArn.split(':');
  const [restApiId, stage, method] = apiPath.split('/');
  const resource = `arn:aws:execute-api:${region}:${accountId}:${restApiId}/${stage}/${method}/`;

  if (headers.HeaderAuth1 === 'headerValue1' && query.QueryString1 === 'queryValue1'
      && stageVariables.StageVar1 === 'stageValue1') {
    return generatePolicy('me', 'Allow', resource, { source: 'request-authorizer' });
  }
  return generatePolicy('me', 'Deny', resource);
};

const generatePolicy = (principalId, effect, resource, context) => ({
  principalId,
  policyDocument: {
    Version: '2012-10-17',
    Statement: [{ Action: 'execute-api:Invoke', Effect: effect, Resource: resource }],
  },
  ...(context ? { context } : {}),
});
