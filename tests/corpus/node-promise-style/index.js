// Not async, but returns a promise: Lambda answers when it settles.
exports.handler = (event) =>
  new Promise((resolve, reject) => {
    setTimeout(() => {
      if (event.fail) reject(new RangeError(`delay ${event.delay} is out of range`));
      else resolve({ waited: event.delay, at: 'timer' });
    }, event.delay);
  });
