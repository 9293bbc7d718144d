// "type": "module" in package.json makes this .js file an ES module.
export const handler = async (event, context) => {
  const batchItemFailures = [];
  for (const record of event.Records) {
    try {
      await processMessageAsync(record);
    } catch (err) {
      console.error(`Failed ${record.messageId}: ${err.message}`);
      batchItemFailures.push({ itemIdentifier: record.messageId });
    }
  }
  return { batchItemFailures };
};

async function processMessageAsync(record) {
  const order = JSON.parse(record.body);
  if (order.amount <= 0) throw new Error('amount must be positive');
  console.log(`Processed order ${order.order_id}`);
}
