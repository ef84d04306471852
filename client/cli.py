"""The `petals` command: the user's tool.

  petals demo [--model PATH] [--prompt TEXT]       a local swarm on the shipped model, end to end
  petals generate --model PATH --initial-peers ADDR... "prompt"
  petals swarm --model PATH --initial-peers ADDR... [--json | --html FILE]
  petals serve --model PATH --initial-peers ADDR... [--host H --port P --api-key KEY]
  petals ctl [--socket PATH] status|sessions|peers|metrics|drain|reload|stop
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from petals_protocol.errors import PetalsError


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .model import AutoDistributedModelForCausalLM
    from .tokenizer import load_tokenizer
    from .demo.run import _TimedPrinter

    tokenizer = load_tokenizer(args.model)
    with AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                         swarm_key=args.swarm_key) as lm:
        if args.show_route:
            print(f"route: {lm.route()}", file=sys.stderr)
        ids = torch.tensor([tokenizer.encode(args.prompt)])
        print(args.prompt, end="", flush=True)
        options = {"max_new_tokens": args.max_new_tokens}
        if args.temperature is not None:
            options.update(do_sample=True, temperature=args.temperature)
        if args.top_k is not None:
            options["top_k"] = args.top_k
        if args.top_p is not None:
            options["top_p"] = args.top_p
        if args.seed is not None:
            torch.manual_seed(args.seed)
        lm.generate(ids, streamer=_TimedPrinter(tokenizer), **options)
    return 0


def _swarm(args: argparse.Namespace) -> int:
    if args.html:
        from .health import write_health_page

        return write_health_page(args.model, args.initial_peers, args.html, swarm_key=args.swarm_key)
    from .swarm_table import show_swarm

    return show_swarm(args.model, args.initial_peers, as_json=args.json, swarm_key=args.swarm_key)


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import DEFAULT_MODEL, DEFAULT_PROMPT, run_demo

    return run_demo(Path(args.model) if args.model else DEFAULT_MODEL, prompt=args.prompt or DEFAULT_PROMPT,
                    daemons=args.daemons, max_new_tokens=args.max_new_tokens, echo_logs=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petals", description="Run language models over a swarm of petalsd daemons.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show client (and demo daemons') logs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="start a local swarm on the shipped model and generate through it")
    demo.add_argument("--model", help="a local checkpoint folder (default: the shipped demo model)")
    demo.add_argument("--prompt", help="text to continue")
    demo.add_argument("--daemons", type=int, default=3, help="how many daemons to split the model over (default 3)")
    demo.add_argument("--max-new-tokens", type=int, default=1000, help="upper bound; the model stops at its end-of-text token")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="generate text through a swarm")
    gen.add_argument("--model", required=True, help="local checkpoint folder (the client loads embeddings and head)")
    gen.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    gen.add_argument("--swarm-key", help="pre-shared key file of a private swarm")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--show-route", action="store_true", help="print which daemons serve which blocks")
    gen.add_argument("prompt")
    gen.set_defaults(func=_generate)

    swarm = sub.add_parser("swarm", help="which blocks are served by whom")
    swarm.add_argument("--model", required=True)
    swarm.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    swarm.add_argument("--swarm-key")
    swarm.add_argument("--json", action="store_true", help="machine-readable output")
    swarm.add_argument("--html", metavar="FILE", help="write the health page (as `petals serve` shows it) to FILE")
    swarm.set_defaults(func=_swarm)

    ctl = sub.add_parser("ctl", help="control the local daemon over its Unix socket")
    from . import ctl as ctl_mod

    ctl_mod.configure_parser(ctl)
    ctl.set_defaults(func=ctl_mod.run)

    from .serve_cli import configure_parser as configure_serve

    configure_serve(sub.add_parser("serve", help="an OpenAI-compatible API and the swarm health page over HTTP"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from petals_protocol.p2p.host import quiet_libp2p_logs

    quiet_libp2p_logs()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (PetalsError, ValueError, OSError) as exc:
        print(f"petals: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
