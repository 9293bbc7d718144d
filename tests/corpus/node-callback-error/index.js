class ValidationError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ValidationError';
  }
}

exports.handler = (event, context, callback) => {
  if (event.kind === 'custom') return callback(new ValidationError(`field ${event.field} is required`));
  if (event.kind === 'plain') return callback(new Error('Something went wrong'));
  callback(null, 'fine');
};
