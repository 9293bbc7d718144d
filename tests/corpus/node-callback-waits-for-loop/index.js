// callbackWaitsForEmptyEventLoop is true by default: Lambda answers once the timer below has run.
exports.handler = (event, context, callback) => {
  setTimeout(() => {
    console.log(`flushed ${event.metrics} metrics`);
  }, 50);
  callback(null, { queued: event.metrics });
};
