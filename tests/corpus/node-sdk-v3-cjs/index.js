const { SQSClient, SendMessageCommand } = require('@aws-sdk/client-sqs');

const sqs = new SQSClient({});

exports.handler = async (event) => {
  const command = new SendMessageCommand({ QueueUrl: process.env.QUEUE_URL, MessageBody: JSON.stringify(event) });
  return { region: await sqs.config.region(), queueUrl: command.input.QueueUrl, body: command.input.MessageBody };
};
