// Validates Kubernetes objects (YAML files, one or more documents each) against the
// schemas of the @kubernetes-models packages pinned in package-lock.json: Envoy
// Gateway, Istio, the Gateway API and Kubernetes itself. run.sh installs them and runs
// this; see docs/operators/gateways.md for what the schemas are and where they come from.
//
//   node check.mjs FILE...                      every object must be valid (exit 0)
//   node check.mjs --expect-failures FILE...    every FILE must be rejected, with an
//                                               error containing its "# expect: TEXT" line
//
// Besides each schema's own rules (types, enums, patterns, required fields, limits), an
// object may hold no field the schema does not know, as `kubectl apply` (strict field
// validation) demands: the packages' validators let unknown fields through, so every
// field the validator never looked at is reported. Objects whose schema leaves them open
// (x-kubernetes-preserve-unknown-fields, e.g. an EnvoyFilter's patch value) are listed
// as "not checked by the schema" instead.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const MODULES = [
  // [apiVersion prefix, module folder]; the kind is the module's file name.
  [/^v1$/, () => "kubernetes-models/v1"],
  [/^gateway\.networking\.k8s\.io\/(v1|v1beta1|v1alpha2|v1alpha3)$/, (m) => `@kubernetes-models/gateway-api/gateway.networking.k8s.io/${m[1]}`],
  [/^gateway\.envoyproxy\.io\/v1alpha1$/, () => "@kubernetes-models/envoy-gateway/gateway.envoyproxy.io/v1alpha1"],
  [/^((?:networking|security|telemetry|extensions)\.istio\.io)\/(v1|v1beta1|v1alpha1|v1alpha3)$/, (m) => `@kubernetes-models/istio/${m[1]}/${m[2]}`],
];

async function modelFor(apiVersion, kind) {
  for (const [pattern, folder] of MODULES) {
    const m = pattern.exec(apiVersion ?? "");
    if (m) {
      if (!/^[A-Z][A-Za-z0-9]*$/.test(kind ?? "")) return null;
      try {
        return (await import(`${folder(m)}/${kind}`))[kind] ?? null;
      } catch {
        return null;
      }
    }
  }
  return null;
}

// Wraps `value` so that every property the validator reads is recorded in `seen`.
function tracked(value, seen, proxies) {
  if (value === null || typeof value !== "object") return value;
  let proxy = proxies.get(value);
  if (proxy) return proxy;
  seen.set(value, new Set());
  proxy = new Proxy(value, {
    get(target, key, receiver) {
      if (typeof key === "string") seen.get(target).add(key);
      return tracked(Reflect.get(target, key, receiver), seen, proxies);
    },
  });
  proxies.set(value, proxy);
  return proxy;
}

// Fields the validator never read (unknown to the schema) and objects it never opened.
function unread(value, seen, path, unknown, opaque) {
  if (value === null || typeof value !== "object") return;
  if (Array.isArray(value)) {
    value.forEach((item, i) => unread(item, seen, `${path}/${i}`, unknown, opaque));
    return;
  }
  const read = seen.get(value);
  const keys = Object.keys(value);
  if (keys.length === 0) return;
  if (!read || read.size === 0) {
    opaque.push(path || "/");
    return;
  }
  for (const key of keys) {
    if (!read.has(key)) unknown.push(`${path}/${key}`);
    else unread(value[key], seen, `${path}/${key}`, unknown, opaque);
  }
}

// Problems of one object (empty: valid) and the paths its schema leaves open.
async function check(object) {
  const model = await modelFor(object?.apiVersion, object?.kind);
  if (!model) {
    return { problems: [`no schema for apiVersion ${object?.apiVersion} kind ${object?.kind}`], opaque: [] };
  }
  const seen = new WeakMap();
  const problems = [];
  try {
    model.prototype.validate.call(tracked(object, seen, new WeakMap()));
  } catch (err) {
    for (const e of err.errors ?? [{ instancePath: "", message: String(err.message ?? err) }]) {
      const detail = e.params?.allowedValues ? ` (${e.params.allowedValues.join(", ")})` : "";
      problems.push(`${e.instancePath || "/"}: ${e.message}${detail}`);
    }
  }
  const unknown = [];
  const opaque = [];
  unread(object, seen, "", unknown, opaque);
  for (const path of unknown) problems.push(`${path}: unknown field (not in the schema)`);
  return { problems, opaque };
}

async function checkFile(file) {
  const text = readFileSync(file, "utf8");
  const results = [];
  const docs = parseAllDocuments(text, { uniqueKeys: true });
  for (const [i, doc] of docs.entries()) {
    const where = `${file} (document ${i + 1})`;
    if (doc.errors.length) {
      results.push({ where, problems: doc.errors.map((e) => `YAML: ${e.message}`), opaque: [] });
      continue;
    }
    const object = doc.toJS();
    if (object === null || object === undefined) continue;
    const name = `${object.kind ?? "?"} ${object.metadata?.namespace ?? "-"}/${object.metadata?.name ?? "?"}`;
    results.push({ where: `${where} ${name}`, ...(await check(object)) });
  }
  if (results.length === 0) results.push({ where: file, problems: ["no object in the file"], opaque: [] });
  return { text, results };
}

const args = process.argv.slice(2);
const expectFailures = args[0] === "--expect-failures";
const files = expectFailures ? args.slice(1) : args;
if (files.length === 0) {
  console.error("usage: node check.mjs [--expect-failures] FILE...");
  process.exit(2);
}
let failed = 0;
let passed = 0;
for (const file of files) {
  const { text, results } = await checkFile(file);
  const problems = results.flatMap((r) => r.problems.map((p) => `${r.where}: ${p}`));
  if (expectFailures) {
    const expected = /^# expect: (.+)$/m.exec(text)?.[1]?.trim();
    if (!expected) {
      console.log(`FAIL ${file}: no "# expect: TEXT" line`);
      failed++;
    } else if (problems.some((p) => p.includes(expected))) {
      console.log(`ok   ${file}: rejected as expected (${expected})`);
      passed++;
    } else {
      console.log(`FAIL ${file}: expected an error containing "${expected}", got ${problems.length ? problems.join("; ") : "none (accepted)"}`);
      failed++;
    }
    continue;
  }
  for (const r of results) {
    if (r.problems.length) {
      for (const p of r.problems) console.log(`FAIL ${r.where}: ${p}`);
      failed++;
    } else {
      const open = r.opaque.length ? ` (not checked by the schema: ${r.opaque.join(", ")})` : "";
      console.log(`ok   ${r.where}${open}`);
      passed++;
    }
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
