// A mesh client in Node, from the protos and the service config alone: round robin over
// the DC's agents, UNAVAILABLE retried by gRPC itself, a bearer token on every call.
//
//   npm install @grpc/grpc-js @grpc/proto-loader
//   MESH_TOKEN=$(meshctl token issue --user alice --role submitter) \
//   MESH_CA=~/.gpumesh/local/pki/ca.crt MESH_AGENTS=127.0.0.1:50051,127.0.0.1:50052 \
//     node docs/examples/submit.mjs
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { randomUUID } from "node:crypto";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
const definition = protoLoader.loadSync("mesh/v1/tasks.proto", {
  includeDirs: [join(root, "proto")],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const { TaskService } = grpc.loadPackageDefinition(definition).mesh.v1;

const mesh = process.env.MESH_NAME ?? "gpumesh";
const token = process.env.MESH_TOKEN;
const credentials = grpc.credentials.combineChannelCredentials(
  grpc.credentials.createSsl(readFileSync(process.env.MESH_CA)),
  grpc.credentials.createFromMetadataGenerator((_, done) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    done(null, metadata);
  }),
);
const client = new TaskService(`ipv4:${process.env.MESH_AGENTS}`, credentials, {
  "grpc.service_config": readFileSync(join(here, "..", "service-config.json"), "utf8"),
  "grpc.ssl_target_name_override": `agent.${mesh}`, // every agent's certificate names it
});

// The task id is the idempotency key: a Submit retried with it never makes a second task.
const spec = {
  task_id: randomUUID(),
  task_type: "TASK_TYPE_T2I",
  pipeline: "sleep",
  model: process.env.MESH_MODEL ?? "sdxl-1.0",
  params: { seconds: "1", steps: "4" },
};
client.Submit({ spec }, (error, reply) => {
  if (error) throw error;
  console.log(`submitted ${reply.status.task_id} (${reply.status.state})`);
  const events = client.Watch({ task_id: reply.status.task_id });
  events.on("data", (event) =>
    console.log(event.status.state, `${event.status.progress.step}/${event.status.progress.total}`),
  );
  events.on("end", () => client.close());
  events.on("error", (e) => { console.error(e.message); process.exit(1); });
});
