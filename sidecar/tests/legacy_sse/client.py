"""The official Python SDK's legacy HTTP+SSE client: connects to <url>, calls `echo`, prints the text.

It sends credentials of its own, which the sidecar must strip.
"""
import sys

import anyio
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client


async def main(url: str) -> None:
    headers = {"X-API-Key": "agent-key", "Authorization": "Bearer agent-token"}
    async with sse_client(url, headers=headers) as streams:
        async with ClientSession(*streams[:2]) as session:
            await session.initialize()
            result = await session.call_tool("echo", {"text": "legacy hello"})
            print(result.content[0].text, flush=True)


anyio.run(main, sys.argv[1])
