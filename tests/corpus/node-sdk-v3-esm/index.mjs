// The AWS SDK for JavaScript v3 ships with the nodejs20.x runtime: no package.json needed.
import { S3Client, ListBucketsCommand } from '@aws-sdk/client-s3';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { DynamoDBDocumentClient, GetCommand } from '@aws-sdk/lib-dynamodb';

const s3 = new S3Client({});
const ddb = DynamoDBDocumentClient.from(new DynamoDBClient({}));

export const handler = async () => {
  const get = new GetCommand({ TableName: process.env.TABLE_NAME, Key: { id: 'o-1' } });
  return {
    s3Region: await s3.config.region(),
    ddbRegion: await ddb.config.region(),
    listBuckets: new ListBucketsCommand({}) instanceof ListBucketsCommand,
    table: get.input.TableName,
  };
};
