// Validates rendered Kubernetes manifests offline, as an API server with strict field validation would:
//   node validate.mjs [--crd CRD.yaml]... [--json-dir DIR] [FILE.yaml ...]   (no FILE: standard input)
// Each FILE is checked on its own ("== FILE" before its lines when there are several); --json-dir writes each one's
// documents as DIR/<file name>.json.
// Built-in kinds: the API schemas compiled into kubernetes-models, plus a check that every field name exists (its
// validators let unknown fields pass), read from the models' type declarations. Custom resources: their CRD's
// openAPIV3Schema with ajv, every object closed to unknown fields (the API server prunes or, strict, rejects them),
// and their metadata checked as ObjectMeta. Prints one line per document; exits 1 if any is invalid.
import { readFileSync, readdirSync, writeFileSync, existsSync } from "node:fs";
import { basename, dirname, join as joinPath } from "node:path";
import { fileURLToPath } from "node:url";
import Ajv from "ajv";
import { parseAllDocuments } from "yaml";

const here = dirname(fileURLToPath(import.meta.url));
const modelsRoot = joinPath(here, "node_modules", "kubernetes-models");
const machineryRoot = joinPath(here, "node_modules", "@kubernetes-models", "apimachinery");

const args = process.argv.slice(2);
const crdFiles = [], inputs = [];
let jsonDir = null;
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--crd") crdFiles.push(args[++i]);
  else if (args[i] === "--json-dir") jsonDir = args[++i];
  else inputs.push(args[i]);
}

// ---- field names of built-in kinds, from the models' .d.ts files -------------------------------------------------
// Each declaration file holds one interface and exports it under its OpenAPI name (IIoK8sApiBatchV1JobSpec, ...).
const interfaces = new Map();   // OpenAPI name -> Map(field -> type text)

function* declarationFiles(dir) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = joinPath(dir, entry.name);
    if (entry.isDirectory()) { if (entry.name !== "node_modules" && entry.name !== "_schemas") yield* declarationFiles(path); }
    else if (entry.name.endsWith(".d.ts")) yield path;
  }
}

/** The fields of the first `export interface X { ... }` body: name -> type text (comments removed). */
function fieldsOf(source) {
  const start = source.match(/export interface \w+(?: extends [\w, ]+)? \{/);
  if (!start) return null;
  let depth = 1, i = start.index + start[0].length, body = "";
  for (; i < source.length && depth > 0; i++) {
    const c = source[i];
    if (c === "{") depth++;
    else if (c === "}") depth--;
    if (depth > 0) body += c;
  }
  body = body.replace(/\/\*[\s\S]*?\*\//g, "");
  const fields = new Map();
  let j = 0;
  while (j < body.length) {
    const m = /"([^"]+)"\??:\s*/y;
    m.lastIndex = j;
    const hit = m.exec(body);
    if (!hit) { j++; continue; }
    let k = m.lastIndex, d = 0, type = "";
    for (; k < body.length; k++) {
      const c = body[k];
      if (c === "{" || c === "<" || c === "(") d++;
      else if (c === "}" || c === ">" || c === ")") d--;
      else if (c === ";" && d === 0) break;
      type += c;
    }
    fields.set(hit[1], type.trim());
    j = k + 1;
  }
  return fields;
}

for (const root of [modelsRoot, machineryRoot]) {
  for (const file of declarationFiles(root)) {
    const source = readFileSync(file, "utf8");
    const alias = source.match(/export type \{ (\w+) as (IIoK8s\w+)/);
    if (!alias) continue;
    const fields = fieldsOf(source);
    if (fields) interfaces.set(alias[2], fields);
  }
}

const join = (path, key) => (path ? `${path}.${key}` : key);

/** Every field of `value` must be declared by the type `type`; returns "path: message" strings. */
function unknownFields(value, type, path, problems) {
  type = type.trim();
  if (value === null || value === undefined) return problems;
  const array = type.match(/^Array<(.*)>$/s);
  if (array) {
    if (Array.isArray(value)) value.forEach((v, i) => unknownFields(v, array[1], `${path}[${i}]`, problems));
    return problems;
  }
  const map = type.match(/^\{\s*\[key: string\]:\s*(.*?);?\s*\}$/s);
  if (map) {
    if (typeof value === "object") for (const [k, v] of Object.entries(value)) unknownFields(v, map[1], join(path, k), problems);
    return problems;
  }
  const fields = interfaces.get(type);
  if (!fields || typeof value !== "object" || Array.isArray(value)) return problems;   // scalars, int-or-string, quantities
  for (const [k, v] of Object.entries(value)) {
    if (!fields.has(k)) problems.push(`${join(path, k)}: unknown field (${type.replace(/^IIoK8s/, "")} has no '${k}')`);
    else unknownFields(v, fields.get(k), join(path, k), problems);
  }
  return problems;
}

// ---- built-in kinds: the model class of apiVersion/kind --------------------------------------------------------
async function modelOf(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (!/^[\w.]*$/.test(group) || !/^\w+$/.test(version) || !/^\w+$/.test(kind)) return null;
  if (!existsSync(joinPath(modelsRoot, group, version, `${kind}.js`))) return null;
  const module = await import(`kubernetes-models/${group ? group + "/" : ""}${version}/${kind}`);
  return module[kind] ?? null;
}

function openAPIName(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["core", apiVersion];
  const groupName = group.replace(/\.k8s\.io$/, "").split(".").map(p => p[0].toUpperCase() + p.slice(1)).join("");
  return `IIoK8sApi${groupName}${version[0].toUpperCase()}${version.slice(1)}${kind}`;
}

// ---- custom resources: their CRD's schema, closed to unknown fields --------------------------------------------
function closeObjects(schema) {
  if (Array.isArray(schema)) { schema.forEach(closeObjects); return schema; }
  if (schema && typeof schema === "object") {
    if (schema.properties && schema.additionalProperties === undefined && !schema["x-kubernetes-preserve-unknown-fields"])
      schema.additionalProperties = false;
    Object.values(schema).forEach(closeObjects);
  }
  return schema;
}

const ajv = new Ajv({ strict: false, allErrors: true, validateFormats: false });
const customKinds = new Map();   // "group/version/Kind" -> validate function
for (const file of crdFiles) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    const crd = doc.toJS();
    if (crd?.kind !== "CustomResourceDefinition") continue;
    for (const v of crd.spec.versions) {
      const schema = closeObjects(structuredClone(v.schema.openAPIV3Schema));
      if (schema.properties) schema.properties.metadata = { type: "object" };   // checked as ObjectMeta below
      customKinds.set(`${crd.spec.group}/${v.name}/${crd.spec.names.kind}`, ajv.compile(schema));
    }
  }
}

// ---- each file, each document ------------------------------------------------------------------------------------
async function problemsOf(value) {
  const problems = [];
  if (typeof value.apiVersion !== "string" || typeof value.kind !== "string") problems.push("apiVersion and kind are required");
  else if (customKinds.has(`${value.apiVersion}/${value.kind}`)) {
    const validate = customKinds.get(`${value.apiVersion}/${value.kind}`);
    if (!validate(value)) for (const e of validate.errors)
      problems.push(`${e.instancePath || "/"}: ${e.message}${e.params?.additionalProperty ? ` '${e.params.additionalProperty}'` : ""}${e.params?.allowedValues ? ` (${e.params.allowedValues.join(", ")})` : ""}`);
    unknownFields(value.metadata, "IIoK8sApimachineryPkgApisMetaV1ObjectMeta", "metadata", problems);
  } else {
    const Model = await modelOf(value.apiVersion, value.kind);
    if (!Model) problems.push(`unknown kind ${value.apiVersion} ${value.kind} (not a built-in kind, and no --crd defines it)`);
    else {
      try { new Model(value).validate(); }
      catch (e) { problems.push(...String(e.message).split("\n").filter(l => l.trim())); }
      const type = openAPIName(value.apiVersion, value.kind);
      if (!interfaces.has(type)) problems.push(`no field list for ${type} in kubernetes-models: cannot check field names`);
      else unknownFields(value, type, "", problems);
    }
  }
  return problems;
}

let failed = 0;
for (const input of inputs.length ? inputs : [null]) {
  if (inputs.length > 1) console.log(`== ${input}`);
  const documents = [];
  let invalid = 0;
  for (const doc of parseAllDocuments(readFileSync(input ?? 0, "utf8"))) {
    if (doc.errors.length) { console.log(`FAIL (unparsable YAML): ${doc.errors[0].message}`); invalid++; continue; }
    const value = doc.toJS();
    if (value === null) continue;
    documents.push(value);
    const problems = await problemsOf(value);
    const name = `${value.kind ?? "?"} ${value.metadata?.name ?? "?"}`;
    if (problems.length) { invalid++; console.log(`FAIL ${name}`); for (const p of problems) console.log(`  ${p}`); }
    else console.log(`ok   ${name}`);
  }
  if (jsonDir) writeFileSync(joinPath(jsonDir, `${basename(input ?? "stdin")}.json`), JSON.stringify(documents, null, 1));
  console.log(`${documents.length} documents, ${invalid} invalid`);
  if (invalid) failed++;
}
process.exit(failed ? 1 : 0);
