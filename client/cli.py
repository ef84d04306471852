"""The `petals` command: the user's tool.

  petals demo [--model PATH] [--prompt TEXT]       a local swarm on the shipped model, end to end
  petals generate --model PATH|ORG/NAME --initial-peers ADDR... "prompt"
  petals swarm --model PATH|ORG/NAME --initial-peers ADDR... [--json | --html FILE]
  petals serve --model PATH --initial-peers ADDR... [--host H --port P --api-key KEY]
  petals chat --model PATH|ORG/NAME --initial-peers ADDR...   interactive, the model's chat template
  petals manifest FOLDER                            digests of a full copy, for partial copies
  petals keygen FILE                                an Ed25519 key file (swarm owner, --identity); prints its peer id
  petals member add|revoke --owner-key FILE PEER_ID  members-only swarms: certify or revoke a peer
  petals ctl [--socket PATH] status|sessions|peers|metrics|drain|reload|stop

Nothing heavy (torch, transformers, libp2p) is imported before the command line is parsed, so
`--help`, `--version` and usage errors answer at once. Failures are one line on stderr (plus a
hint where there is an obvious next step); `-v` shows logs and, for failures, the traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from petals_protocol.ids import __version__  # no heavy imports: it reads package metadata

from .trust_options import add_membership_options, add_trust_options, membership_kwargs, trust_kwargs

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_STATUS_HELP = ("Exit status: 0 success; 1 failure at run time (unreachable peers, no route, "
                    "bad model folder); 2 bad command line. Errors are one line on stderr; -v adds "
                    "logs and tracebacks.")


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .demo.run import _TimedPrinter
    from .model import AutoDistributedModelForCausalLM
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model, revision=args.revision)
    with AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                         swarm_key=args.swarm_key, revision=args.revision,
                                                         **membership_kwargs(args), **trust_kwargs(args),
                                                         **_compression_options(args)) as lm:
        if args.show_route:
            print(f"route: {lm.route()}", file=sys.stderr)
        ids = torch.tensor([tokenizer.encode(args.prompt)])
        options = _sampling(args)
        print(args.prompt, end="", flush=True)
        try:
            lm.generate(ids, streamer=_TimedPrinter(tokenizer), **options)
        except BaseException:
            print(flush=True)  # end the half-printed text, so the error starts its own line
            raise
    return EXIT_OK


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    """generate() options from the sampling flags (seeding torch when --seed is given)."""
    import torch

    options: dict[str, object] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None:
        options.update(do_sample=True, temperature=args.temperature)
    if args.top_k is not None:
        options["top_k"] = args.top_k
    if args.top_p is not None:
        options["top_p"] = args.top_p
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return options


def _chat(args: argparse.Namespace) -> int:
    from .chat import chat_loop, require_chat_template
    from .model import AutoDistributedModelForCausalLM
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model, revision=args.revision)
    require_chat_template(tokenizer)  # before joining the swarm
    with AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                         swarm_key=args.swarm_key, revision=args.revision,
                                                         **membership_kwargs(args), **trust_kwargs(args),
                                                         **_compression_options(args)) as lm:
        chat_loop(lm, tokenizer, sys.stdin, sys.stdout, system=args.system, max_length=args.max_length,
                  **_sampling(args))
    return EXIT_OK


def _swarm(args: argparse.Namespace) -> int:
    if args.html:
        from .health import write_health_page

        return write_health_page(args.model, args.initial_peers, args.html, swarm_key=args.swarm_key,
                                 **membership_kwargs(args))
    from .swarm_table import show_swarm

    return show_swarm(args.model, args.initial_peers, as_json=args.json, swarm_key=args.swarm_key,
                      revision=args.revision, **membership_kwargs(args))


def _manifest(args: argparse.Namespace) -> int:
    from petals_protocol.models.digests import default_cache_dir
    from petals_protocol.models.fingerprint import write_manifest

    print(write_manifest(args.folder, cache_dir=default_cache_dir()))
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    from .members import keygen

    return keygen(Path(args.file))


def _member(args: argparse.Namespace) -> int:
    from . import members

    if args.action == "add":
        return members.add(Path(args.owner_key), args.peer_id, days=args.days,
                           output=Path(args.output) if args.output else None)
    if not args.initial_peers:
        args.parser.error("member revoke needs --initial-peers MULTIADDR... (the list is stored in the swarm's DHT)")
    return members.revoke(Path(args.owner_key), args.peer_id, initial_peers=args.initial_peers,
                          members_only=not args.open_swarm)


def _compression_options(args: argparse.Namespace) -> dict[str, object]:
    """from_pretrained's keyword arguments for --compression / --compress-decode."""
    return {"compression": args.compression, "compress_decode": args.compress_decode}


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import DEFAULT_MODEL, DEFAULT_PROMPT, run_demo

    return run_demo(Path(args.model) if args.model else DEFAULT_MODEL, prompt=args.prompt or DEFAULT_PROMPT,
                    daemons=args.daemons, max_new_tokens=args.max_new_tokens, echo_logs=args.verbose)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a pointer to --help, not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nhint: `{self.prog} --help` shows the usage\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth reading."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_model(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--model", required=True, help=help)
    parser.add_argument("--revision", help="Hub models: branch, tag or commit (default: main)")


def _add_sampling(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help="most tokens to generate")
    parser.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=float, metavar="P", help="sample within the top-P probability mass")
    parser.add_argument("--seed", type=int, metavar="N", help="seed torch's generator (reproducible sampling)")


def _add_peers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR",
                        help="full multiaddrs (/ip4/HOST/tcp/PORT/p2p/PEER_ID) of daemons in the swarm, "
                             "as printed on their `ready` line")
    parser.add_argument("--swarm-key", metavar="FILE", help="pre-shared key file of a private swarm")


def _add_compression(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compression", choices=("none", "fp16", "bf16"), default="none",
                        help="send prompts' hidden states in this dtype (half the bytes on slow links; "
                             "rounded, so not exact)")
    parser.add_argument("--compress-decode", action="store_true", help="--compression for one-token steps too")


def build_parser() -> argparse.ArgumentParser:
    formatter = _Help
    parser = _Parser(prog="petals", description="Run language models over a swarm of petalsd daemons.",
                                     epilog=EXIT_STATUS_HELP, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"petals {__version__}")
    verbose_help = "show logs (the demo's daemons' too) and tracebacks"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # -v after the subcommand too (`petals generate -v ...`); SUPPRESS keeps the top-level value.
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help, parents=[common], epilog=EXIT_STATUS_HELP,
                                 formatter_class=formatter)
        command.set_defaults(parser=command)  # for errors found after parsing (parse_args)
        return command

    demo = add("demo", "start a local swarm on the shipped model and generate through it")
    demo.add_argument("--model", help="a local checkpoint folder (default: the shipped demo model)")
    demo.add_argument("--prompt", help="text to continue (default: the demo's own)")
    demo.add_argument("--daemons", type=int, default=3, metavar="N", help="how many daemons to split the model over")
    demo.add_argument("--max-new-tokens", type=int, default=1000, metavar="N", help="upper bound; the model stops at its end-of-text token")
    demo.set_defaults(func=_demo)

    gen = add("generate", "generate text through a swarm")
    _add_model(gen, "local checkpoint folder or Hub id ORG/NAME (the client fetches and loads only embeddings, "
                    "final norm and head)")
    _add_peers(gen)
    add_membership_options(gen)
    _add_sampling(gen, max_new_tokens=64)
    add_trust_options(gen)
    _add_compression(gen)
    gen.add_argument("--show-route", action="store_true", help="print which daemons serve which blocks")
    gen.add_argument("--prompt", dest="prompt_option", metavar="TEXT", help="the text to continue (or give it last, "
                     "as a positional argument)")
    gen.add_argument("prompt", nargs="?", help="the text to continue")
    gen.set_defaults(func=_generate, positional="prompt")

    chat = add("chat", "talk with a chat model through a swarm (its tokenizer's chat template)")
    _add_model(chat, "local checkpoint folder or Hub id ORG/NAME")
    _add_peers(chat)
    add_membership_options(chat)
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.add_argument("--max-length", type=int, default=2048, metavar="N", help="most tokens of the conversation")
    _add_sampling(chat, max_new_tokens=512)
    add_trust_options(chat)
    _add_compression(chat)
    chat.set_defaults(func=_chat)

    swarm = add("swarm", "which blocks are served by whom")
    _add_model(swarm, "local checkpoint folder or Hub id ORG/NAME")
    _add_peers(swarm)
    add_membership_options(swarm)
    swarm.add_argument("--json", action="store_true", help="machine-readable output")
    swarm.add_argument("--html", metavar="FILE", help="write the health page (as `petals serve` shows it) to FILE")
    swarm.set_defaults(func=_swarm)

    manifest = add("manifest", "write petals_manifest.json (every tensor's digest) into a full checkpoint "
                   "folder, so that copies holding only some shards share its fingerprint")
    manifest.add_argument("folder")
    manifest.set_defaults(func=_manifest)

    keygen = add("keygen", "create an Ed25519 key file and print its peer id (a swarm owner key, or a "
                 "daemon's or client's --identity)")
    keygen.add_argument("file", help="where to write the key (an existing file is kept; its peer id is printed)")
    keygen.set_defaults(func=_keygen)

    member = add("member", "members-only swarms: certify a peer (add) or revoke its certificates (revoke)")
    member.add_argument("action", choices=("add", "revoke"))
    member.add_argument("peer_id", metavar="PEER_ID", help="the member's peer id (its daemon's `ready` line, or "
                        "`petals keygen` on its key file)")
    member.add_argument("--owner-key", required=True, metavar="FILE", help="the swarm owner's key file")
    member.add_argument("--days", type=float, default=90.0, metavar="N", help="add: days the certificate is valid")
    member.add_argument("--output", metavar="FILE", help="add: write the certificate here (default: stdout)")
    member.add_argument("--initial-peers", nargs="+", metavar="MULTIADDR", help="revoke: daemons of the swarm, "
                        "where the revocation list is stored")
    member.add_argument("--open-swarm", action="store_true", help="revoke: the swarm is open (its daemons show "
                        "certificates only for clients' --allowed-peers ISSUER), so join it without membership")
    member.set_defaults(func=_member)

    ctl = add("ctl", "control a local daemon over its Unix socket")
    from . import ctl as ctl_mod

    ctl_mod.configure_parser(ctl)
    ctl.set_defaults(func=ctl_mod.run)

    from .serve_cli import configure_parser as configure_serve

    configure_serve(add("serve", "an OpenAI-compatible API and the swarm health page over HTTP"))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse like argparse, except that a positional given after a multi-value option
    (`--initial-peers ADDR "Hello"`) is taken back from that option: multiaddrs start with "/",
    a prompt does not, so the split is unambiguous."""
    args = build_parser().parse_args(argv)
    if getattr(args, "positional", None) == "prompt":
        peers = args.initial_peers
        while args.prompt is None and len(peers) > 1 and not peers[-1].startswith("/"):
            args.prompt = peers.pop()
        if args.prompt is not None and args.prompt_option is not None:
            args.parser.error("give the prompt once: either --prompt TEXT or as the last argument")
        args.prompt = args.prompt if args.prompt is not None else args.prompt_option
        if args.prompt is None:
            args.parser.error("the prompt is missing: petals generate --model M --initial-peers ADDR... \"text\"")
    for addr in getattr(args, "initial_peers", None) or ():
        problem = _peer_address_problem(addr)
        if problem:
            args.parser.error(f"--initial-peers {addr!r}: {problem}")
    return args


def _peer_address_problem(addr: str) -> str | None:
    """Why `addr` cannot name a peer to dial (None if it can): caught before anything starts."""
    import multiaddr
    import multiaddr.exceptions

    try:
        names = [p.name for p in multiaddr.Multiaddr(addr).protocols()]
    except (ValueError, multiaddr.exceptions.Error) as exc:
        return f"not a multiaddr ({str(exc).splitlines()[0]}); expected /ip4/HOST/tcp/PORT/p2p/PEER_ID"
    if "p2p" not in names:
        return "must end in /p2p/PEER_ID (the daemon's `ready` line prints its full address)"
    return None


def _hint(exc: BaseException) -> str | None:
    """A next step for the failures a user meets first, by type name (no heavy imports here)."""
    names = {t.__name__ for t in type(exc).__mro__}
    if names & {"DialError", "DHTError"}:
        return ("check the address (copy it from the daemon's `ready` line, /p2p/ part included) "
                "and that the daemon is running and reachable from here")
    if "NoRoute" in names:
        return "`petals swarm --model M --initial-peers ADDR...` shows which blocks are served and the gaps"
    if "ModelLoadError" in names or isinstance(exc, FileNotFoundError):
        return "--model takes a local Hugging Face checkpoint folder (config.json, *.safetensors) or a Hub id ORG/NAME"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from petals_protocol.threads import quiet_openmp_waits

    quiet_openmp_waits()  # before torch is imported: its OpenMP runtime reads this once
    try:
        from petals_protocol.p2p.host import quiet_libp2p_logs

        quiet_libp2p_logs()
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (a traceback with -v)
        return _report(exc, args.verbose)


def _report(exc: BaseException, verbose: bool) -> int:
    from petals_protocol.errors import PetalsError, first_error

    error = first_error(exc, (PetalsError, ValueError, OSError)) or exc
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    expected = error is not exc or isinstance(exc, (PetalsError, ValueError, OSError))
    if expected:
        print(f"petals: error: {error}", file=sys.stderr)
    else:  # a bug of ours: still one line, and how to get the rest
        print(f"petals: internal error: {type(error).__name__}: {error}"
              + ("" if verbose else " (run with -v for the traceback)"), file=sys.stderr)
    hint = _hint(error)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
