"""The benchmarks' upstream: `sia fake-ark` (sia.testing.fake_ark), run on uvloop.

The fake shares the machine with the server under test, so every millisecond
of CPU it spends per request is taken from SIA's figures; uvloop trims that
share. Its arguments are `sia fake-ark`'s.

    python -m bench.fake_upstream --port 0 --latency 2
"""

from __future__ import annotations

import asyncio
import sys

from sia.testing import fake_ark


def main() -> None:
    """Install uvloop's policy (when installed) and run the fake until SIGTERM."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    fake_ark.main(sys.argv[1:])


if __name__ == "__main__":
    main()
