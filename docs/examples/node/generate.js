#!/usr/bin/env node
// Generate images with SIA from Node.js, and decode the server's error details.
//
//   node docs/examples/node/generate.js "a red fox" --size 1024x1024
//   node docs/examples/node/generate.js "a four-panel comic of a cat" --max-images 3
//
// SIA_SERVER is the server (default localhost:8080); SIA_API_KEY, when set, is sent as
// `authorization: Bearer <key>`. `npm ci` in the repository root installs the packages.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The repository's proto/ folder, found from this file so the script runs from anywhere.
const PROTO_DIR = path.resolve(__dirname, '..', '..', '..', 'proto');

const definition = protoLoader.loadSync('image/v1/image_service.proto', {
  // Field names as the proto spells them. With proto-loader's default (camelCase) a
  // request must say `maxImages`: `max_images` is dropped without a word, and the
  // server makes as many images as the model allows.
  keepCase: true,
  enums: String, // "RESPONSE_FORMAT_URL" rather than 1
  longs: String, // int64 as strings: a JS number cannot hold every one
  defaults: true, // unset fields read as "" or 0, not undefined
  oneofs: true, // a set proto3 `optional` field is also named in its oneof
  includeDirs: [PROTO_DIR],
});
const { ImageService } = grpc.loadPackageDefinition(definition).image.v1;

// proto-loader builds no decoders for messages outside a call, so google.rpc.Status
// and its details come from protobufjs (what proto-loader itself uses), loaded from
// proto/google/rpc. google/protobuf/*.proto are bundled with protobufjs.
const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => path.join(PROTO_DIR, target);
rpc.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpc.lookupType('google.rpc.Status');

// One line for each detail a client acts on; the others are skipped.
const DESCRIBE = {
  'google.rpc.ErrorInfo': (d) => [`reason ${d.reason} (${d.domain})`],
  'google.rpc.BadRequest': (d) => d.field_violations.map((v) => `${v.field}: ${v.description}`),
  'google.rpc.QuotaFailure': (d) => d.violations.map((v) => `quota ${v.subject} ${v.quota_id}: ${v.description}`),
  'google.rpc.RetryInfo': (d) => [`retry in ${(Number(d.retry_delay.seconds) + d.retry_delay.nanos / 1e9).toFixed(1)} s`],
};

// The details travel as a serialized google.rpc.Status in the `grpc-status-details-bin`
// trailer; each is a google.protobuf.Any whose type_url ends in the message's full name.
function errorLines(err) {
  const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw) return []; // no details: the deadline passed, the server is unreachable, ...
  return Status.decode(raw).details.flatMap((any) => {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (!DESCRIBE[name]) return [];
    const type = rpc.lookupType(name);
    return DESCRIBE[name](type.toObject(type.decode(any.value), { longs: String, defaults: true }));
  });
}

function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { size: { type: 'string' }, 'max-images': { type: 'string' } },
  });
  if (positionals.length !== 1) {
    console.error('usage: generate.js PROMPT [--size WxH] [--max-images N]');
    process.exit(2);
  }
  const client = new ImageService(process.env.SIA_SERVER || 'localhost:8080', grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': 64 * 1024 * 1024, // B64_JSON images exceed the 4 MiB default
  });
  const metadata = new grpc.Metadata();
  if (process.env.SIA_API_KEY) metadata.set('authorization', `Bearer ${process.env.SIA_API_KEY}`);
  // Always set a deadline: gRPC has none, and a generation can take minutes.
  const options = { deadline: new Date(Date.now() + 120_000) };

  const request = { prompt: positionals[0], size: values.size || '' };
  const group = values['max-images'] !== undefined;
  if (group) request.max_images = Number(values['max-images']); // sent only thanks to keepCase
  const call = group ? 'GenerateSequentialImages' : 'GenerateImage';

  client[call](request, metadata, options, (err, response) => {
    client.close();
    if (err) {
      console.error(`${grpc.status[err.code]}: ${err.details}`);
      for (const line of errorLines(err)) console.error(`  ${line}`);
      process.exitCode = 1;
      return;
    }
    for (const image of response.images) {
      const what = image.error ? `error ${image.error.code}: ${image.error.message}` : image.url;
      console.log(`${image.index} ${image.size} ${what}`);
    }
  });
}

main();
