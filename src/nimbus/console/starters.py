"""The code the deploy page starts from, per runtime: a small handler that runs as it is, so a first deploy
succeeds before anything is edited, and that shows the shape the runtime contract asks for
(docs/runtimes.md)."""

from nimbus import runtimes

PYTHON3 = '''\
import json


def handler(event, context):
    """Called once per invocation with the event (parsed JSON) and Lambda's context."""
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"hello called with {json.dumps(event)}")  # stdout and stderr are the call's logs
    return {"message": f"Hello, {name}!"}
'''

NODEJS = '''\
// Called once per invocation with the event (parsed JSON) and Lambda's context.
exports.handler = async (event, context) => {
  const name = (event && event.name) || "world";
  console.log("hello called with", JSON.stringify(event)); // the call's logs
  return { message: `Hello, ${name}!` };
};
'''

GO = '''\
package main

import "encoding/json"

// Handle is called once per invocation with the raw JSON event; Nimbus adds the main.
func Handle(event json.RawMessage) (any, error) {
\tvar in struct {
\t\tName string `json:"name"`
\t}
\tif err := json.Unmarshal(event, &in); err != nil {
\t\treturn nil, err
\t}
\tif in.Name == "" {
\t\tin.Name = "world"
\t}
\treturn map[string]string{"message": "Hello, " + in.Name + "!"}, nil
}
'''

RUST = '''\
use std::io::{self, BufRead, Write};

// One JSON event per line on stdin, one JSON result per line on stdout; stderr is the call's logs.
fn main() {
    let mut out = io::stdout().lock();
    for line in io::stdin().lock().lines() {
        let line = line.unwrap();
        eprintln!("hello called with {line}");
        writeln!(out, "{{\\"message\\": \\"Hello from Rust!\\", \\"bytes\\": {}}}", line.len()).unwrap();
        out.flush().unwrap();
    }
}
'''

WASM = '''\
;; A WASI command module as WAT text: echoes each JSON event line back as its result.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (loop $next
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (if (i32.eqz (i32.load (i32.const 8))) (then (return)))
      (i32.store (i32.const 4) (i32.load (i32.const 8)))
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
      (br $next))))
'''

# AWS's custom-runtime tutorial, in one file: this text is the bootstrap (a package may hold more files).
PROVIDED = r'''#!/bin/sh
# This file is the bootstrap: started once per machine, it asks the Runtime API for each event and
# posts the answer back. Any language can do the same (a Go or Rust binary, Python, Node.js...).
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
HEADERS=$(mktemp)
while true; do
  EVENT=$(curl -sS -D "$HEADERS" "$API/invocation/next")
  REQUEST_ID=$(grep -i '^lambda-runtime-aws-request-id:' "$HEADERS" | cut -d: -f2 | tr -d '[:space:]')
  echo "hello called with $EVENT" >&2  # stdout and stderr are the call's logs
  curl -sS -o /dev/null -X POST "$API/invocation/$REQUEST_ID/response" \
    -d "{\"message\": \"Hello from a shell bootstrap!\", \"handler\": \"$_HANDLER\"}"
done
'''

CODE = {"python3": PYTHON3, "nodejs": NODEJS, "go": GO, "rust": RUST, "wasm": WASM, "provided": PROVIDED}


def starter(runtime: str) -> str:
    """The starter source of a runtime (canonical id); empty for one without a starter."""
    return CODE.get(runtime, "")


def handler(runtime: str) -> str:
    """The handler the starter is written for: the runtime's default."""
    return runtimes.get(runtime).default_handler
