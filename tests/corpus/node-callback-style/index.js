exports.handler = function (event, context, callback) {
  const numbers = event.numbers || [];
  const sum = numbers.reduce((a, b) => a + b, 0);
  callback(null, { sum, count: numbers.length, requestId: context.awsRequestId });
};
