export const handler = async (event, context) => {
  const stream = context.logStreamName;
  return {
    functionVersion: context.functionVersion,
    envVersion: process.env.AWS_LAMBDA_FUNCTION_VERSION,
    streamVersion: stream.slice(stream.indexOf('[') + 1, stream.indexOf(']')),
  };
};
