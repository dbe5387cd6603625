"""An MCP client on the PyPI `mcp` SDK (ClientSession) that drives `capvisor mcp`
for cli/tests/mcp.rs, and prints what it saw as one JSON object on stdout.
The Rust test makes the assertions; this script only reports.

    client.py stdio --vm NAME [--scenario narrowed] -- CAPVISOR_BINARY mcp [ARGS...]
    client.py http  --vm NAME [--scenario narrowed] --url http://127.0.0.1:PORT/mcp --bearer TOKEN

Scenario "narrowed" (a session redeemed from a share token): tools/list, and
vm_exec of `echo` and of `sh`, file_read, file_write and NAME_stop, each
reported as it came back. Scenario "revoked": one vm_exec of `echo`, after
the share was revoked. Scenario "full" (the default), both transports: initialize, vm_create of VM
NAME (with --create), tools/list, vm_exec in VM NAME (with a progress token;
then with stdin, env and cwd),
file_write + file_read (from an offset, and a 4-byte window), a vm_exec
past its timeout, a vm_exec the client cancels (then `ps`), a vm_exec with 200000 bytes of output, vm_create of
an image the session may not boot (a denial), the cap tools vms_list and
vms_remove (of a VM that does not exist), vm_exec in a VM that does not
exist (a tool error), and an unknown tool (a protocol error). The server's environment
(CAPVISOR_SOCKET, CAPVISOR_CONFIG_DIR) is inherited.
"""

import argparse
import asyncio
import json
import os
import sys
from contextlib import asynccontextmanager

from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


@asynccontextmanager
async def connect(args):
    if args.mode == "stdio":
        cmd = args.server
        params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=dict(os.environ))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                yield session
    else:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        headers = {"Authorization": f"Bearer {args.bearer}"} if args.bearer else {}
        async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120.0)) as http:
            async with streamable_http_client(args.url, http_client=http) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write) as session:
                    yield session


async def narrowed(args):
    """A session redeemed from a share of VM NAME allowing exec of `echo`
    only and files read-only: what its tools are and what they let through."""
    report = {}
    async with connect(args) as session:
        await session.initialize()
        tools = await session.list_tools()
        report["tools"] = [t.name for t in tools.tools]
        calls = {
            "echo": ("vm_exec", {"vm": args.vm, "argv": ["echo", "narrowed-ok"]}),
            "sh": ("vm_exec", {"vm": args.vm, "argv": ["sh", "-c", "echo no"]}),
            "read": ("file_read", {"vm": args.vm, "path": "/tmp/mcp-py.txt"}),
            "write": ("file_write", {"vm": args.vm, "path": "/tmp/mcp-narrowed.txt", "content": "x"}),
            "stop": (f"{args.vm}_stop", {}),
        }
        for key, (tool, arguments) in calls.items():
            r = await session.call_tool(tool, arguments)
            report[key] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}
    print(json.dumps(report))


async def revoked(args):
    """After the share was revoked: one vm_exec of `echo`, as it came back."""
    report = {}
    async with connect(args) as session:
        await session.initialize()
        r = await session.call_tool("vm_exec", {"vm": args.vm, "argv": ["echo", "after-revoke"]})
        report["echo"] = {"isError": r.is_error, "text": text_of(r)}
    print(json.dumps(report))


async def main(args):
    if args.scenario == "narrowed":
        return await narrowed(args)
    if args.scenario == "revoked":
        return await revoked(args)
    report = {}
    async with connect(args) as session:
        init = await session.initialize()
        report["server"] = init.server_info.name if hasattr(init, "server_info") else None
        if args.create:
            boot = []

            async def on_boot(value, total, message):
                boot.append(message)

            r = await session.call_tool("vm_create", {"name": args.vm}, progress_callback=on_boot)
            report["create"] = {
                "isError": r.is_error,
                "text": text_of(r),
                "structured": r.structured_content,
                "progress": boot,
            }
        tools = await session.list_tools()
        report["tools"] = [t.name for t in tools.tools]
        report["schemas"] = {t.name: t.input_schema for t in tools.tools} if args.schemas else {}

        progress = []

        async def on_progress(value, total, message):
            progress.append({"progress": value, "message": message})

        r = await session.call_tool(
            "vm_exec",
            {"vm": args.vm, "argv": ["sh", "-c", "echo hello-from-guest; echo to-stderr >&2; exit 3"]},
            progress_callback=on_progress,
        )
        report["exec"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}
        report["progress"] = progress

        r = await session.call_tool(
            "vm_exec",
            {
                "vm": args.vm,
                "argv": ["sh", "-c", "cat; echo $FOO; pwd"],
                "stdin": "from-stdin\n",
                "env": {"FOO": "bar"},
                "cwd": "/tmp",
            },
        )
        report["exec_io"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}

        r = await session.call_tool(
            "file_write", {"vm": args.vm, "path": "/tmp/mcp-py.txt", "content": "line one\nline two\n"}
        )
        report["write"] = {"isError": r.is_error, "text": text_of(r)}
        r = await session.call_tool("file_read", {"vm": args.vm, "path": "/tmp/mcp-py.txt", "offset": 5})
        report["read"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}

        r = await session.call_tool("file_read", {"vm": args.vm, "path": "/tmp/mcp-py.txt", "max_bytes": 4})
        report["read_window"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}

        r = await session.call_tool(
            "vm_exec", {"vm": args.vm, "argv": ["sh", "-c", "echo started; sleep 30"], "timeout_secs": 1}
        )
        report["timeout"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}

        # A call the client gives up on: the command is killed (anyio cancels the
        # request, the SDK sends notifications/cancelled).
        import anyio

        with anyio.move_on_after(2):
            await session.call_tool("vm_exec", {"vm": args.vm, "argv": ["sleep", "41"]})
        for _ in range(20):  # the kill travels on its own: allow it up to 10 s
            await anyio.sleep(0.5)
            r = await session.call_tool("vm_exec", {"vm": args.vm, "argv": ["ps"]})
            report["after_cancel"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}
            if "sleep 41" not in (r.structured_content or {}).get("stdout", ""):
                break

        r = await session.call_tool("vm_exec", {"vm": args.vm, "argv": ["sh", "-c", "yes capvisor | head -c 200000"]})
        report["big"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}

        r = await session.call_tool("vm_create", {"name": "never", "image": "no-such-image"})
        report["denied_create"] = {"isError": r.is_error, "text": text_of(r)}

        r = await session.call_tool("vms_list", {})
        report["cap_list"] = {"isError": r.is_error, "text": text_of(r), "structured": r.structured_content}
        r = await session.call_tool("vms_remove", {"vmName": "no-such-vm"})
        report["cap_missing"] = {"isError": r.is_error, "text": text_of(r)}

        r = await session.call_tool("vm_exec", {"vm": "no-such-vm", "argv": ["true"]})
        report["missing_vm"] = {"isError": r.is_error, "text": text_of(r)}

        try:
            r = await session.call_tool("no_such_tool", {})
            report["unknown_tool"] = {"raised": False, "isError": r.is_error, "text": text_of(r)}
        except MCPError as e:
            report["unknown_tool"] = {"raised": True, "code": e.code, "message": e.message}
    print(json.dumps(report))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["stdio", "http"])
    p.add_argument("--vm", required=True)
    p.add_argument("--url")
    p.add_argument("--bearer")
    p.add_argument("--schemas", action="store_true", help="report each tool's input schema")
    p.add_argument("--scenario", choices=["full", "narrowed", "revoked"], default="full")
    p.add_argument("--create", action="store_true", help="full: first boot VM NAME with vm_create")
    argv = sys.argv[1:]
    server = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.server = server
    asyncio.run(main(args))
    sys.stdout.flush()
