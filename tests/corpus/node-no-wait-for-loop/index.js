// A module-level keep-alive (as a database pool has) never lets the event loop empty, so the handler
// tells Lambda not to wait for it.
const keepAlive = setInterval(() => {}, 1000);
let calls = 0;

exports.handler = (event, context, callback) => {
  context.callbackWaitsForEmptyEventLoop = false;
  calls += 1;
  callback(null, { ok: true, calls, keepAliveActive: keepAlive.hasRef() });
};
