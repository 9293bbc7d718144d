exports.handler = async (event) => {
  if (typeof event.quantity !== 'number') {
    throw new TypeError('quantity must be a number');
  }
  return { quantity: event.quantity, doubled: event.quantity * 2 };
};
