// validate_k8s.cjs - offline validation of kvrelay's Kubernetes manifests (deploy/k8s/):
// no cluster, no API server. Every YAML document is checked
//   - built-in kinds (ConfigMap, Service, Deployment, Pod, ...): against the Kubernetes
//     OpenAPI schemas compiled into the npm package kubernetes-models (types, enums,
//     required fields; that package does not flag unknown fields);
//   - kubeflow.org/v2beta1 MPIJob: against the MPI Operator's CRD schema
//     (deploy/k8s/schemas/mpijob-v2beta1.json) by the structural-schema walker below, which
//     also rejects unknown fields as `kubectl apply --validate=strict` would, and each
//     replica's pod template again against kubernetes-models' PodTemplateSpec;
//   - across the files: referenced ConfigMaps exist, volume mounts name a volume, a
//     Deployment's selector matches its template, a Service selects some pod template and
//     its targetPort names a port of it.
// --self-test first feeds documents with one known mistake each and fails unless every
// one is rejected for that mistake: the checks above can fail.
//
//   node validate_k8s.cjs --modules DIR --schemas deploy/k8s/schemas [--self-test] FILE...
// DIR holds node_modules with kubernetes-models@4.5.1 and yaml@2 (installed at test time).
// Exit 0: every document valid; 1: errors (printed, one per line); 2: usage.
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

function usage() {
  console.error("usage: node validate_k8s.cjs --modules DIR --schemas DIR [--self-test] FILE...");
  process.exit(2);
}

const args = process.argv.slice(2);
let modulesDir = null, schemasDir = null, selfTest = false;
const files = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--modules") modulesDir = args[++i];
  else if (args[i] === "--schemas") schemasDir = args[++i];
  else if (args[i] === "--self-test") selfTest = true;
  else files.push(args[i]);
}
if (!modulesDir || !schemasDir || (!files.length && !selfTest)) usage();
const req = createRequire(path.join(path.resolve(modulesDir), "noop.js"));
const YAML = req("yaml");

// ---- the CRD walker: OpenAPI v3 structural schemas as Kubernetes uses them -------------
function typeOf(v) {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (Number.isInteger(v)) return "integer";
  return typeof v; // number, string, boolean, object
}

function checkSchema(s, v, at, errs) {
  if (v === null && s.nullable) return;
  if (s["x-kubernetes-int-or-string"]) {
    if (typeof v !== "string" && !Number.isInteger(v)) errs.push(`${at}: must be an integer or a string, got ${typeOf(v)}`);
    return;
  }
  if (s.anyOf && !s.type) {
    const ok = s.anyOf.some((alt) => { const e = []; checkSchema(alt, v, at, e); return e.length === 0; });
    if (!ok) errs.push(`${at}: matches none of the allowed forms`);
    return;
  }
  const t = typeOf(v);
  if (s.type) {
    const want = s.type;
    const fits = want === t || (want === "number" && t === "integer");
    if (!fits) { errs.push(`${at}: must be ${want}, got ${t} (${JSON.stringify(v)})`); return; }
  }
  if (s.enum && !s.enum.some((e) => e === v)) errs.push(`${at}: ${JSON.stringify(v)} is not one of ${JSON.stringify(s.enum)}`);
  if (t === "integer" && s.format === "int32" && (v < -2147483648 || v > 2147483647)) errs.push(`${at}: ${v} is out of int32 range`);
  if (typeof s.minimum === "number" && typeof v === "number" && v < s.minimum) errs.push(`${at}: ${v} < minimum ${s.minimum}`);
  if (typeof s.maximum === "number" && typeof v === "number" && v > s.maximum) errs.push(`${at}: ${v} > maximum ${s.maximum}`);
  if (t === "string" && s.pattern && !new RegExp(s.pattern).test(v)) errs.push(`${at}: "${v}" does not match ${s.pattern}`);
  if (t === "string" && typeof s.maxLength === "number" && v.length > s.maxLength) errs.push(`${at}: longer than ${s.maxLength}`);
  if (t === "array") {
    if (typeof s.minItems === "number" && v.length < s.minItems) errs.push(`${at}: fewer than ${s.minItems} items`);
    if (s.items) v.forEach((x, i) => checkSchema(s.items, x, `${at}[${i}]`, errs));
  }
  if (t === "object") {
    for (const r of s.required || []) if (!(r in v)) errs.push(`${at}: missing required field "${r}"`);
    const props = s.properties || {};
    for (const [k, x] of Object.entries(v)) {
      if (props[k]) checkSchema(props[k], x, `${at}.${k}`, errs);
      else if (s.additionalProperties && typeof s.additionalProperties === "object") checkSchema(s.additionalProperties, x, `${at}.${k}`, errs);
      else if (s.properties && !s["x-kubernetes-preserve-unknown-fields"] && s.additionalProperties !== true)
        errs.push(`${at}: unknown field "${k}"`);
    }
  }
}

// The MPI Operator's own admission rules for an MPIJob, which the CRD schema does not
// carry (restated from its pkg/apis/kubeflow/validation/validation.go, defaults applied).
function mpiJobRules(doc, at, errs) {
  const spec = doc.spec || {};
  const r = spec.mpiReplicaSpecs;
  if (!r || typeof r !== "object") return; // the schema reported it
  for (const k of Object.keys(r)) if (k !== "Launcher" && k !== "Worker") errs.push(`${at}: spec.mpiReplicaSpecs.${k}: only Launcher and Worker exist`);
  if (!r.Launcher) errs.push(`${at}: spec.mpiReplicaSpecs: must have a Launcher`);
  for (const [k, rs] of Object.entries(r)) {
    if (!rs) continue;
    const here = `${at}: spec.mpiReplicaSpecs.${k}`;
    if (rs.replicas === undefined) errs.push(`${here}.replicas: required`);
    else if (k === "Launcher" && rs.replicas !== 1) errs.push(`${here}.replicas: must be 1`);
    else if (k === "Worker" && rs.replicas < 1) errs.push(`${here}.replicas: must be at least 1`);
    if (rs.restartPolicy !== undefined && !["Never", "OnFailure"].includes(rs.restartPolicy)) errs.push(`${here}.restartPolicy: "${rs.restartPolicy}" is not Never or OnFailure`);
    const cs = ((rs.template || {}).spec || {}).containers;
    if (!Array.isArray(cs) || !cs.length) errs.push(`${here}.template.spec.containers: at least one container`);
  }
  const cp = (spec.runPolicy || {}).cleanPodPolicy;
  if (cp !== undefined && !["None", "Running", "All"].includes(cp)) errs.push(`${at}: spec.runPolicy.cleanPodPolicy: "${cp}" is not None, Running or All`);
  if (typeof spec.slotsPerWorker === "number" && spec.slotsPerWorker < 0) errs.push(`${at}: spec.slotsPerWorker: must not be negative`);
  // Worker pods are named <job>-worker-<i> and must be DNS-1035 labels.
  const n = (r.Worker && r.Worker.replicas > 0) ? r.Worker.replicas : 1;
  const host = `${(doc.metadata || {}).name}-worker-${n - 1}`;
  if (host.length > 63 || !/^[a-z]([-a-z0-9]*[a-z0-9])?$/.test(host)) errs.push(`${at}: metadata.name: worker pod name "${host}" is not a DNS-1035 label`);
}

// ---- per document ---------------------------------------------------------------------
const crds = {};
for (const f of fs.readdirSync(schemasDir)) {
  if (!f.endsWith(".json")) continue;
  const d = JSON.parse(fs.readFileSync(path.join(schemasDir, f), "utf8"));
  crds[`${d.group}/${d.version}/${d.kind}`] = d.openAPIV3Schema;
}

function builtinModel(apiVersion, kind) {
  const group = apiVersion.includes("/") ? apiVersion : `v1`;
  let mod;
  try { mod = req(`kubernetes-models/${group}`); } catch (e) { return null; }
  return mod[kind] || null;
}

function modelErrors(Model, obj, at) {
  try { new Model(obj).validate(); return []; } catch (e) {
    const list = e.errors || e.details || null;
    if (Array.isArray(list) && list.length)
      return list.map((x) => `${at}${x.instancePath || x.path || ""}: ${x.message}${x.params ? " " + JSON.stringify(x.params) : ""}`);
    return [`${at}: ${String(e.message || e).replace(/\s+/g, " ")}`];
  }
}

// Pod templates of a document: [{where, template}]
function podTemplates(doc) {
  const out = [];
  if (!doc || !doc.spec) return out;
  if (doc.spec.template) out.push({ where: "spec.template", template: doc.spec.template });
  if (doc.kind === "Pod") out.push({ where: "", template: { metadata: doc.metadata, spec: doc.spec } });
  const r = doc.spec.mpiReplicaSpecs;
  if (r && typeof r === "object")
    for (const [name, rs] of Object.entries(r)) if (rs && rs.template) out.push({ where: `spec.mpiReplicaSpecs.${name}.template`, template: rs.template });
  return out;
}

function validateDoc(doc, at, errs) {
  if (!doc || typeof doc !== "object") { errs.push(`${at}: not a mapping`); return; }
  const { apiVersion, kind } = doc;
  if (typeof apiVersion !== "string" || typeof kind !== "string") { errs.push(`${at}: apiVersion and kind are required`); return; }
  if (!doc.metadata || typeof doc.metadata.name !== "string") errs.push(`${at}: metadata.name is required`);
  const crd = crds[`${apiVersion}/${kind}`];
  if (crd) {
    checkSchema(crd, doc, `${at} ${kind}`, errs);
    if (kind === "MPIJob") mpiJobRules(doc, `${at} MPIJob`, errs);
    const PodTemplateSpec = builtinModel("v1", "PodTemplateSpec");
    for (const { where, template } of podTemplates(doc)) errs.push(...modelErrors(PodTemplateSpec, template, `${at} ${kind}.${where}`));
    return;
  }
  const Model = builtinModel(apiVersion, kind);
  if (!Model) { errs.push(`${at}: no schema for ${apiVersion} ${kind}`); return; }
  errs.push(...modelErrors(Model, doc, `${at} ${kind}`));
}

function labelsMatch(selector, labels) {
  return Object.entries(selector || {}).every(([k, v]) => labels && labels[k] === v);
}

function crossCheck(docs, errs) {
  const configMaps = new Set(docs.filter((d) => d.doc.kind === "ConfigMap").map((d) => d.doc.metadata.name));
  const templates = [];
  for (const { doc, at } of docs) {
    for (const { where, template } of podTemplates(doc)) {
      const spec = (template && template.spec) || {};
      const vols = new Set((spec.volumes || []).map((v) => v.name));
      const here = `${at} ${doc.kind} ${where}`;
      templates.push({ here, template });
      for (const c of [...(spec.containers || []), ...(spec.initContainers || [])]) {
        for (const m of c.volumeMounts || []) if (!vols.has(m.name)) errs.push(`${here}: container ${c.name} mounts volume "${m.name}", which the pod does not define`);
        for (const e of c.envFrom || []) if (e.configMapRef && !configMaps.has(e.configMapRef.name)) errs.push(`${here}: container ${c.name} reads ConfigMap "${e.configMapRef.name}", which no file defines`);
        for (const e of c.env || []) {
          const r = e.valueFrom && e.valueFrom.configMapKeyRef;
          if (r && !configMaps.has(r.name)) errs.push(`${here}: container ${c.name} reads ConfigMap "${r.name}", which no file defines`);
        }
      }
    }
    if (doc.kind === "Deployment" && doc.spec && doc.spec.selector && doc.spec.template) {
      const labels = (doc.spec.template.metadata || {}).labels;
      if (!labelsMatch(doc.spec.selector.matchLabels, labels)) errs.push(`${at} Deployment: spec.selector does not match the template's labels`);
    }
  }
  for (const { doc, at } of docs) {
    if (doc.kind !== "Service" || !doc.spec || !doc.spec.selector) continue;
    const selected = templates.filter((t) => labelsMatch(doc.spec.selector, (t.template.metadata || {}).labels));
    if (!selected.length) { errs.push(`${at} Service ${doc.metadata.name}: its selector ${JSON.stringify(doc.spec.selector)} matches no pod template`); continue; }
    for (const p of doc.spec.ports || []) {
      const tp = p.targetPort === undefined ? p.port : p.targetPort;
      for (const t of selected) {
        const ports = ((t.template.spec || {}).containers || []).flatMap((c) => c.ports || []);
        const found = ports.some((cp) => (typeof tp === "string" ? cp.name === tp : cp.containerPort === tp));
        if (!found) errs.push(`${at} Service ${doc.metadata.name}: targetPort ${tp} is no container port of ${t.here}`);
      }
    }
  }
}

function validateTexts(texts) { // [{name, text}] -> errors
  const errs = [], docs = [];
  for (const { name, text } of texts) {
    const parsed = YAML.parseAllDocuments(text);
    parsed.forEach((d, i) => {
      const at = `${name}#${i + 1}`;
      if (d.errors && d.errors.length) { for (const e of d.errors) errs.push(`${at}: YAML: ${e.message.split("\n")[0]}`); return; }
      const doc = d.toJS();
      if (doc === null) return; // empty document
      validateDoc(doc, at, errs);
      docs.push({ doc, at });
    });
  }
  crossCheck(docs, errs);
  return { errs, n: docs.length };
}

// ---- self-test: one known mistake per case, each must be caught ------------------------
const okDeployment = `apiVersion: v1
kind: ConfigMap
metadata: {name: c}
data: {A: "1"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
      - name: k
        image: i
        envFrom: [{configMapRef: {name: c}}]
        ports: [{name: grpc, containerPort: 50051}]
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  selector: {app: x}
  ports: [{port: 50051, targetPort: grpc}]
`;
const okMPIJob = `apiVersion: kubeflow.org/v2beta1
kind: MPIJob
metadata: {name: m}
spec:
  slotsPerWorker: 1
  runPolicy: {cleanPodPolicy: Running}
  mpiReplicaSpecs:
    Launcher:
      replicas: 1
      template:
        spec:
          containers: [{name: l, image: i}]
`;
const cases = [
  ["a valid set (must pass)", okDeployment + "---\n" + okMPIJob, null],
  ["MPIJob: slotsPerWorker a string", okMPIJob.replace("slotsPerWorker: 1", "slotsPerWorker: one"), /slotsPerWorker: must be integer/],
  ["MPIJob: unknown field", okMPIJob.replace("slotsPerWorker: 1", "slotsPerWorker: 1\n  slotPerWorker: 1"), /unknown field "slotPerWorker"/],
  ["MPIJob: bad enum", okMPIJob.replace("slotsPerWorker: 1", "slotsPerWorker: 1\n  mpiImplementation: OpenMP"), /is not one of/],
  ["MPIJob: bad cleanPodPolicy", okMPIJob.replace("cleanPodPolicy: Running", "cleanPodPolicy: Sometimes"), /cleanPodPolicy: "Sometimes"/],
  ["MPIJob: two launchers", okMPIJob.replace("replicas: 1", "replicas: 2"), /Launcher.replicas: must be 1/],
  ["MPIJob: name not a DNS label", okMPIJob.replace("name: m}", "name: My_Job}"), /DNS-1035/],
  ["MPIJob: no mpiReplicaSpecs", okMPIJob.replace(/  mpiReplicaSpecs:[\s\S]*/, ""), /missing required field "mpiReplicaSpecs"/],
  ["MPIJob: container without name", okMPIJob.replace("{name: l, image: i}", "{image: i}"), /name/],
  ["Deployment: replicas a string", okDeployment.replace("spec:\n  selector", "spec:\n  replicas: two\n  selector"), /replicas/],
  ["Deployment: no containers", okDeployment.replace(/      containers:[\s\S]*?targetPort: grpc}\]\n/, "      restartPolicy: Always\n"), /containers/],
  ["Deployment: selector does not match", okDeployment.replace("matchLabels: {app: x}", "matchLabels: {app: y}"), /selector does not match/],
  ["Service: selects nothing", okDeployment.replace("selector: {app: x}\n  ports", "selector: {app: z}\n  ports"), /matches no pod template/],
  ["Service: unknown targetPort", okDeployment.replace("targetPort: grpc", "targetPort: http"), /targetPort http/],
  ["missing ConfigMap", okDeployment.replace("configMapRef: {name: c}", "configMapRef: {name: nope}"), /ConfigMap "nope"/],
  ["YAML syntax", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c\n", /YAML/],
];

let failed = 0;
if (selfTest) {
  for (const [what, text, want] of cases) {
    const { errs } = validateTexts([{ name: "self-test", text }]);
    const ok = want === null ? errs.length === 0 : errs.some((e) => want.test(e));
    if (!ok) { failed++; console.log(`SELF-TEST FAILED: ${what}: ${errs.length ? errs.join(" | ") : "no error reported"}`); }
  }
  console.log(`self-test: ${cases.length - failed}/${cases.length} known mistakes handled as expected`);
}
if (files.length) {
  const { errs, n } = validateTexts(files.map((f) => ({ name: path.basename(f), text: fs.readFileSync(f, "utf8") })));
  for (const e of errs) console.log(`INVALID ${e}`);
  console.log(`${n} documents in ${files.length} files: ${errs.length ? errs.length + " errors" : "valid"}`);
  if (errs.length) failed++;
}
process.exit(failed ? 1 : 0);
