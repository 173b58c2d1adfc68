"""The overload benchmark's open-loop generator awaits answers for a bounded time after its
schedule (``benchmarks/open_loop.py``, ``wait_s``): a server that never answers (as a baseline
with a queue of many seconds) leaves every request as an ``UNANSWERED`` shot, none lost, and
the generator returns instead of waiting for the server to drain."""

from __future__ import annotations

import asyncio

from benchmarks.open_loop import UNANSWERED, open_loop, run_loop


def test_requests_without_an_answer_by_the_end_of_the_wait_are_unanswered_shots() -> None:
    async def scenario() -> list[int]:
        held: list[asyncio.StreamWriter] = []

        async def never_answers(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # reads nothing, answers nothing, keeps the connection

        server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            shots = await open_loop(
                f"http://127.0.0.1:{port}/predict", [b"{}"], {}, [(50.0, 0.2)], wait_s=0.2
            )
        finally:
            for writer in held:
                writer.close()
            server.close()
        return [s.status for s in shots]

    statuses = run_loop(scenario())
    assert statuses == [UNANSWERED] * 10
