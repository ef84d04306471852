"""The `petals serve` subcommand's options (the server itself: client/serve.py)."""
from __future__ import annotations

import argparse
import os

from .trust_options import add_membership_options, add_trust_options, membership_kwargs, trust_kwargs

ENV_API_KEY = "PETALS_API_KEY"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint folder with a tokenizer (the client "
                        "loads embeddings and head)")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    parser.add_argument("--swarm-key", help="pre-shared key file of a private swarm")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--model-name", help="the model id clients name (default: the checkpoint folder's name)")
    parser.add_argument("--api-key", default=os.environ.get(ENV_API_KEY),
                        help=f"require `Authorization: Bearer KEY` on /v1 (default: ${ENV_API_KEY})")
    parser.add_argument("--allow-no-api-key", action="store_true",
                        help="listen on a non-loopback address without an API key")
    parser.add_argument("--max-concurrent", type=int, default=8,
                        help="completions generated at once, each its own session (more get 429; default 8)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="most tokens one request may generate, also chat's default (default 1024)")
    add_membership_options(parser)
    add_trust_options(parser)
    parser.set_defaults(func=run, parser=parser)  # `parser`: for errors found after parsing


def run(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, run_server

    return run_server(ServeOptions(
        model=args.model, initial_peers=args.initial_peers, host=args.host, port=args.port,
        model_id=args.model_name, api_key=args.api_key, allow_no_api_key=args.allow_no_api_key,
        max_concurrent=args.max_concurrent, max_tokens=args.max_tokens, swarm_key=args.swarm_key,
        trust={**membership_kwargs(args), **trust_kwargs(args)}))
