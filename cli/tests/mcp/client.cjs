// An MCP client on the npm `@modelcontextprotocol/sdk` 1.x (Client +
// StdioClientTransport) that drives `capvisor mcp` for cli/tests/mcp.rs and
// prints what it saw as one JSON object on stdout; the Rust test asserts.
//
//   NODE_PATH=<npm dir>/node_modules node client.cjs --vm NAME -- CAPVISOR_BINARY mcp [ARGS...]
//
// It lists the tools, runs vm_exec in VM NAME (with a progress handler),
// the cap tool vms_list, vm_exec in a VM that does not exist (a tool error) and an unknown tool (a
// protocol error). The server inherits this process's environment
// (CAPVISOR_SOCKET, CAPVISOR_CONFIG_DIR).
"use strict";
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StdioClientTransport } = require("@modelcontextprotocol/sdk/client/stdio.js");

function textOf(r) {
  return (r.content || []).map((c) => c.text || "").join("");
}

async function main() {
  const argv = process.argv.slice(2);
  const vm = argv[argv.indexOf("--vm") + 1];
  const cmd = argv.slice(argv.indexOf("--") + 1);
  const transport = new StdioClientTransport({ command: cmd[0], args: cmd.slice(1), env: process.env, stderr: "inherit" });
  const client = new Client({ name: "capvisor-test-node", version: "1.0.0" });
  await client.connect(transport);
  const report = { server: client.getServerVersion()?.name };
  const tools = await client.listTools();
  report.tools = tools.tools.map((t) => t.name);

  const progress = [];
  let r = await client.callTool(
    { name: "vm_exec", arguments: { vm, argv: ["sh", "-c", "echo hello-from-guest; echo to-stderr >&2; exit 3"] } },
    undefined,
    { onprogress: (p) => progress.push(p), timeout: 120000, resetTimeoutOnProgress: true },
  );
  report.exec = { isError: !!r.isError, text: textOf(r), structured: r.structuredContent };
  report.progress = progress;

  r = await client.callTool({ name: "vms_list", arguments: {} });
  report.cap_list = { isError: !!r.isError, text: textOf(r), structured: r.structuredContent };

  r = await client.callTool({ name: "vm_exec", arguments: { vm: "no-such-vm", argv: ["true"] } });
  report.missing_vm = { isError: !!r.isError, text: textOf(r) };

  try {
    r = await client.callTool({ name: "no_such_tool", arguments: {} });
    report.unknown_tool = { raised: false, isError: !!r.isError, text: textOf(r) };
  } catch (e) {
    report.unknown_tool = { raised: true, code: e.code, message: e.message };
  }
  await client.close();
  process.stdout.write(JSON.stringify(report) + "\n");
}

main().catch((e) => {
  console.error("client.cjs:", e);
  process.exit(1);
});
