exports.handler = async (event, context) => {
  console.log('Processing order', event.orderId);
  console.info('Items: %d', event.items.length);
  console.warn('Stock is low for', event.items[0]);
  console.error('Payment provider slow: %s ms', 2500);
  return { orderId: event.orderId, accepted: true };
};
