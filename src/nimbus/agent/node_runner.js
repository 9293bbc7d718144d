'use strict';
/**
 * The node side of the Nimbus guest agent (the `nodejs` runtime).
 *
 * The Python agent starts this script once per machine, with requests arriving on fd 3 and replies
 * leaving on fd 4, both in the frames of nimbus.protocol: u32 header_len | u32 blob_len (big-endian)
 * | JSON header | blob. It loads one handler on `init`, then serves `exec` requests one at a time.
 * stdout and stderr are the function's log stream (the agent captures them); this script writes there
 * only through the console it patches as Lambda's node runtime does: each line starts with the time, the
 * request id and the level (`<ISO time>\t<request id>\tINFO\t…`), or is a JSON object when
 * AWS_LAMBDA_LOG_FORMAT=JSON, and AWS_LAMBDA_LOG_LEVEL filters them. The agent validates sizes and
 * types; this side trusts it.
 *
 * When a call is answered follows Lambda's rules. A promise (or a plain return value) answers as soon as
 * it settles, and so do context.done/succeed/fail and an error passed to the callback. A callback's
 * result waits for the event loop to be empty while context.callbackWaitsForEmptyEventLoop is true (the
 * default), and a callback handler that never calls back answers null once the loop is empty. The
 * request pipe would keep the loop alive forever, so it is unref'd while a call runs and 'beforeExit'
 * says when nothing is left; it is ref'd again once the call is answered. A promise that never settles
 * is never answered here: the host's timeout ends the call, as it does a loop that never empties.
 */
const fs = require('fs');
const net = require('net');
const path = require('path');
const util = require('util');
const { pathToFileURL } = require('url');

const REQUEST_FD = 3;
const REPLY_FD = 4;
const PREFIX_SIZE = 8;
const MODULE_EXTENSIONS = ['.js', '.mjs', '.cjs'];

let handler = null;
let fn = null; // the init request: function name, version, memory, result limit
let requests = null; // the request pipe, unref'd while a call runs
let onEmptyLoop = null; // what the call in progress does when the event loop runs dry
let requestId; // the call in progress, or the last one (undefined while the module loads, as on Lambda)

// Lambda's log levels, in order; console.log is INFO.
const LEVELS = ['TRACE', 'DEBUG', 'INFO', 'WARN', 'ERROR', 'FATAL'];

/** The fields Lambda's node runtime gives an Error in a JSON log line. */
function errorFields(err) {
  return {
    errorType: (err.constructor && err.constructor.name) || 'UnknownError',
    errorMessage: err.message,
    stackTrace: typeof err.stack === 'string' ? err.stack.split('\n') : err.stack,
  };
}

/** One JSON log line's object: one argument is the message as is, several are formatted together. */
function jsonLine(level, params) {
  const line = { timestamp: new Date().toISOString(), level, requestId };
  if (params.length === 1) {
    line.message = params[0];
    try {
      return JSON.stringify(line, (_, value) => (value instanceof Error ? { ...errorFields(value), ...value } : value));
    } catch (_) {
      line.message = util.format(params[0]);
      return JSON.stringify(line);
    }
  }
  line.message = util.format(...params);
  const err = params.find((param) => param instanceof Error);
  if (err) Object.assign(line, errorFields(err), { stackTrace: typeof err.stack === 'string' ? err.stack.split('\n') : [] });
  return JSON.stringify(line);
}

/** Replace console's logging methods by Lambda's, reading the format and level from the environment. */
function patchConsole() {
  const json = String(process.env.AWS_LAMBDA_LOG_FORMAT || '').toUpperCase() === 'JSON';
  // JSON without a level logs at INFO: the application log level Lambda sets for JSON.
  const wanted = String(process.env.AWS_LAMBDA_LOG_LEVEL || (json ? 'INFO' : 'TRACE')).toUpperCase();
  const lowest = Math.max(0, LEVELS.indexOf(wanted));
  const write = (level, params) => {
    if (params.length === 0) params = [undefined]; // console.log() alone: Lambda prints "undefined"
    const text = json ? jsonLine(level, params)
      : `${new Date().toISOString()}\t${requestId}\t${level}\t${util.format(...params)}`;
    process.stdout.write(text + '\n');
  };
  const method = (level) => (LEVELS.indexOf(level) >= lowest ? (...params) => write(level, params) : () => {});
  console.trace = method('TRACE');
  console.debug = method('DEBUG');
  console.info = method('INFO');
  console.log = console.info;
  console.warn = method('WARN');
  console.error = method('ERROR');
  console.fatal = (...params) => write('FATAL', params);
}

/** An Error carrying the error type the host should see. */
function typedError(type, message) {
  const err = new Error(message);
  err.name = type;
  return err;
}

/** A stack trace without this script's frames, which sit below the user's. */
function userStack(stack) {
  const lines = String(stack || '').split('\n');
  const cut = lines.findIndex((line) => line.includes(__filename));
  return (cut === -1 ? lines : lines.slice(0, cut)).join('\n');
}

/**
 * `{type, message, stack}` from anything a handler throws or passes to its callback. Like Lambda's node
 * runtime: an Error keeps its name; any other value is typed by `typeof` and described by its `toString`
 * (`callback('Unauthorized')` is `{errorType: 'string', errorMessage: 'Unauthorized'}`).
 */
function describe(err) {
  if (err !== null && typeof err === 'object' && 'message' in err) {
    return { type: String(err.name || 'Error'), message: String(err.message), stack: userStack(err.stack) };
  }
  let message;
  try {
    message = String(err);
  } catch (_) {
    message = Object.prototype.toString.call(err); // an object whose toString throws or is not a function
  }
  return { type: typeof err, message, stack: '' };
}

/** Write one frame synchronously: once the reply is out, nothing the function does later can lose it. */
function send(header, blob = Buffer.alloc(0)) {
  const head = Buffer.from(JSON.stringify(header), 'utf8');
  const prefix = Buffer.alloc(PREFIX_SIZE);
  prefix.writeUInt32BE(head.length, 0);
  prefix.writeUInt32BE(blob.length, 4);
  const frame = Buffer.concat([prefix, head, blob]);
  let offset = 0;
  while (offset < frame.length) {
    try {
      offset += fs.writeSync(REPLY_FD, frame, offset);
    } catch (err) {
      if (err.code !== 'EAGAIN') throw err;
    }
  }
}

function sendError(err) {
  send({ type: 'error', error: describe(err) });
}

/** The first of `<module>.js`, `.mjs`, `.cjs` that exists in the task directory. */
function findModuleFile(taskDir, moduleName) {
  const base = path.resolve(taskDir, moduleName);
  return MODULE_EXTENSIONS.map((ext) => base + ext).find((file) => fs.existsSync(file));
}

async function importModule(file) {
  if (file.endsWith('.mjs')) return import(pathToFileURL(file).href);
  try {
    return require(file);
  } catch (err) {
    // A .js file in a package with "type": "module" is an ES module.
    if (err && err.code === 'ERR_REQUIRE_ESM') return import(pathToFileURL(file).href);
    throw err;
  }
}

async function load(request) {
  // Lambda's name for this runtime, from the node that runs it (the agent does not know its version).
  process.env.AWS_EXECUTION_ENV = `AWS_Lambda_nodejs${process.versions.node.split('.')[0]}.x`;
  const dot = request.handler.lastIndexOf('.');
  const moduleName = request.handler.slice(0, dot);
  const functionName = request.handler.slice(dot + 1);
  const file = findModuleFile(request.task_dir, moduleName);
  if (!file) {
    throw typedError('ImportModuleError', `Cannot find module '${moduleName}' in ${request.task_dir}`);
  }
  let mod;
  try {
    mod = await importModule(file);
  } catch (err) {
    if (err && err.code === 'MODULE_NOT_FOUND') {
      const wrapped = typedError('ImportModuleError', err.message);
      wrapped.stack = err.stack;
      throw wrapped;
    }
    throw err;
  }
  let found = mod ? mod[functionName] : undefined;
  if (found === undefined && mod && mod.default) found = mod.default[functionName];
  if (found === undefined) {
    throw typedError('HandlerNotFound', `module '${moduleName}' has no export '${functionName}'`);
  }
  if (typeof found !== 'function') {
    throw typedError('HandlerNotFound', `'${request.handler}' is not a function`);
  }
  handler = found;
  fn = request;
}

/** The `context` argument, with the names of Lambda's node runtime. */
function makeContext(request) {
  const started = performance.now();
  return {
    functionName: fn.function_name,
    functionVersion: fn.function_version,
    invocationId: request.invocation_id,
    awsRequestId: request.invocation_id,
    invokedFunctionArn: request.arn || fn.arn, // with the call's qualifier when it named one
    memoryLimitInMB: String(fn.memory_mb),  // a string, as on Lambda
    logGroupName: fn.log_group_name,
    logStreamName: fn.log_stream_name,
    identity: undefined,
    clientContext: request.client_context, // what the caller sent as X-Amz-Client-Context, if anything
    callbackWaitsForEmptyEventLoop: true, // read when the callback is called, as on Lambda
    getRemainingTimeInMillis() {
      return Math.max(0, Math.floor(request.deadline_ms - (performance.now() - started)));
    },
  };
}

/**
 * Call the handler and settle with its outcome, whichever way it reports it: a returned value, a
 * returned Promise, `callback(err, result)`, or the legacy `context.done/succeed/fail`. The first wins;
 * when it is answered is Lambda's rule (see the top of this file).
 */
function callHandler(event, context) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const succeed = (value) => {
      if (!settled) { settled = true; onEmptyLoop = null; resolve(value); }
    };
    const fail = (err) => {
      if (!settled) { settled = true; onEmptyLoop = null; reject(err === undefined ? new Error('the handler failed') : err); }
    };
    const done = (err, value) => (err === null || err === undefined ? succeed(value) : fail(err));
    const callback = (err, value) => {
      if (settled) return;
      if (err !== null && err !== undefined) fail(err);
      else if (!context.callbackWaitsForEmptyEventLoop) succeed(value);
      else {
        settled = true; // the result is fixed; it leaves when nothing else is left to run
        onEmptyLoop = () => resolve(value);
      }
    };
    context.done = done;
    context.succeed = succeed;
    context.fail = fail;
    let returned;
    try {
      returned = handler(event, context, callback);
    } catch (err) {
      fail(err);
      return;
    }
    if (returned !== null && typeof returned === 'object' && typeof returned.then === 'function') {
      onEmptyLoop = () => succeed(null); // a promise left pending when nothing can settle it: null, as on Lambda
      returned.then(succeed, fail);
    } else if (handler.length < 3) {
      succeed(returned); // a plain function: its return value is the result
    } else if (!settled) {
      onEmptyLoop = () => succeed(null); // callback style that never calls back: null, as on Lambda
    }
  });
}

/** Serialise a result, mapping failures to the error types the host knows. */
function encodeResult(value) {
  let text;
  try {
    text = JSON.stringify(value);
  } catch (err) {
    throw typedError('ResultNotSerializable', `the result is not JSON-serialisable: ${err.message}`);
  }
  const output = Buffer.from(text === undefined ? 'null' : text, 'utf8');
  if (output.length > fn.result_max) {
    throw typedError('ResultTooLarge',
      `result of ${output.length} bytes is over the limit of ${fn.result_max} bytes (6 MiB)`);
  }
  return output;
}

async function exec(request, blob) {
  let event;
  try {
    event = JSON.parse(blob.toString('utf8'));
  } catch (err) {
    throw typedError('InvalidEvent', `the event is not valid JSON: ${err.message}`);
  }
  process.env._X_AMZN_TRACE_ID = request.trace_id; // per call, as Lambda's runtime sets it
  requestId = request.invocation_id;
  requests.unref(); // the loop may now run dry: 'beforeExit' says when
  try {
    const value = await callHandler(event, makeContext(request));
    return encodeResult(value);
  } finally {
    onEmptyLoop = null;
    requests.ref();
  }
}

/** The event loop ran dry during a call: answer it if its rules say so; keep the process alive either way. */
function emptyLoop() {
  const action = onEmptyLoop;
  onEmptyLoop = null;
  if (action) action();
  else requests.ref(); // nothing to answer (the result is on its way): keep the process alive
}

async function dispatch(header, blob) {
  try {
    if (header.type === 'init') {
      await load(header);
      send({ type: 'init_ok' });
    } else if (header.type === 'exec') {
      send({ type: 'result' }, await exec(header, blob));
    } else {
      throw typedError('ProtocolError', `unexpected request type ${header.type}`);
    }
  } catch (err) {
    sendError(err);
  }
}

/** Splits the request stream into frames without copying it more than once per frame. */
class FrameReader {
  constructor(onFrame) {
    this.chunks = [];
    this.size = 0;
    this.onFrame = onFrame;
  }

  push(chunk) {
    this.chunks.push(chunk);
    this.size += chunk.length;
    while (this.size >= PREFIX_SIZE) {
      if (this.chunks[0].length < PREFIX_SIZE) this.chunks = [Buffer.concat(this.chunks, this.size)];
      const prefix = this.chunks[0];
      const headLength = prefix.readUInt32BE(0);
      const total = PREFIX_SIZE + headLength + prefix.readUInt32BE(4);
      if (this.size < total) return;
      const data = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.size);
      const header = JSON.parse(data.toString('utf8', PREFIX_SIZE, PREFIX_SIZE + headLength));
      const blob = data.subarray(PREFIX_SIZE + headLength, total);
      this.chunks = data.length > total ? [data.subarray(total)] : [];
      this.size -= total;
      this.onFrame(header, blob);
    }
  }
}

function main() {
  patchConsole();
  let queue = Promise.resolve(); // one request at a time, in order
  const reader = new FrameReader((header, blob) => {
    queue = queue.then(() => dispatch(header, blob));
  });
  requests = new net.Socket({ fd: REQUEST_FD, readable: true, writable: false });
  process.on('beforeExit', emptyLoop);
  requests.on('data', (chunk) => reader.push(chunk));
  // The agent closed the channel (or died): the machine is going away.
  requests.on('end', () => process.exit(0));
  requests.on('error', () => process.exit(1));
}

main();
