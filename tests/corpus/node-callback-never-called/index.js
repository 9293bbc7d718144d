// A callback-style handler that forgets to call back: Lambda answers null once the event loop is empty.
exports.handler = (event, context, callback) => {
  setTimeout(() => console.log('cleanup done'), 20);
};
