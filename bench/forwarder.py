"""A reference point: the thinnest GenerateImage gateway on SIA's own stack.

A grpc.aio server on uvloop with SIA's options whose GenerateImage POSTs the
prompt to the upstream through `sia.providers.client.Upstream` (the HTTP
client SIA uses), parses the answer with orjson and returns its URLs. No
validation, logging, metrics, deadlines or retries: what is left is the cost
of gRPC plus the upstream call, the floor under SIA's figures. `bench.run`
reports its throughput beside SIA's (row 1f) so that target 1 reads against
what the stack itself allows on the machine.

    python -m bench.forwarder --upstream URL [--port 0]
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc
import grpc.aio
import orjson

from bench.echo_server import OPTIONS, serve_until_signalled
from sia.api.image.v1 import image_service_pb2 as pb
from sia.providers.client import Upstream
from sia.runtime import run

PATH = "/api/v3/images/generations"


class Forwarder:
    """GenerateImage and nothing else."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def generate_image(
        self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateImageResponse:
        """Forward the prompt; answer with the upstream's URLs."""
        body = {
            "model": request.model or "doubao-seedream-4-0-250828",
            "prompt": request.prompt,
            "size": request.size,
            "response_format": "url",
        }
        answer = await self.upstream.fetch(PATH, orjson.dumps(body), {})
        payload = orjson.loads(answer.body)
        images = [pb.Image(url=item["url"], size=item["size"]) for item in payload["data"]]
        return pb.GenerateImageResponse(images=images, model=payload["model"])


async def serve(host: str, port: int, upstream_url: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    upstream = Upstream(
        upstream_url,
        headers={"Authorization": "Bearer fake-key"},
        max_connections=4096,
        provider="bench",
    )
    server = grpc.aio.server(options=OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(
        Forwarder(upstream).generate_image,
        request_deserializer=pb.GenerateImageRequest.FromString,
        response_serializer=pb.GenerateImageResponse.SerializeToString,
    )
    generic = grpc.method_handlers_generic_handler(
        "image.v1.ImageService", {"GenerateImage": handler}
    )
    server.add_generic_rpc_handlers((generic,))
    try:
        await serve_until_signalled(server, host, port, "forwarder_ready")
    finally:
        await upstream.aclose()


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(prog="bench.forwarder", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="the fake Ark's base URL")
    args = parser.parse_args(argv)
    run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
