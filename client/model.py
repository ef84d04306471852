"""`AutoDistributedModelForCausalLM`: a causal LM whose blocks live in the swarm.

The client loads only the embeddings, the final norm and the head (`ClientPart`), joins the swarm
through the initial peers, and drives inference sessions over a chain of daemons. Generation
reproduces `transformers` exactly (client/generation.py), token for token.

    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])
    out = model.generate(input_ids, max_new_tokens=20)
    with model.inference_session(max_length=256) as session:    # several turns, caches kept
        model.generate(turn1, session=session, max_new_tokens=10)
        model.generate(turn2, session=session, max_new_tokens=10)
    logits = model(input_ids).logits                               # full forward, stateless
    hidden = model.layers[2:5](hidden_states)                      # a slice of remote blocks

Training (weights in the swarm stay frozen; what is trainable lives on the client):

    out = model(input_ids=ids, labels=ids)                         # .loss, .logits
    out.loss.backward()                                            # through the daemons
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...],
                                                            tuning_mode="deep_ptune", pre_seq_len=8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import trio
from torch import nn
from transformers import GenerationConfig
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutput

from petals_protocol.models.checkpoint import Checkpoint
from petals_protocol.models.client_part import ClientPart, load_client_part
from petals_protocol.models.digests import default_cache_dir
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.p2p.host import load_swarm_key, make_host, running_host
from petals_protocol.p2p.identity import ed25519_private_key
from petals_protocol.tensors import as_activation_dtype, codec_dtype

from . import generation
from .head_batching import HeadBatcher
from .members import client_identity
from .ptune import PromptTuning
from .remote import RemoteSequential
from .routing import NoRoute, describe_route
from .runtime import ClientRuntime
from .session import InferenceSession
from .spotcheck import LocalDecider, SpotChecker, SpotCheckStats
from .swarm import SwarmClient

log = logging.getLogger("petals_client")


class RemoteInferenceSession:
    """A synchronous handle on an inference session (context manager); see `inference_session`."""

    def __init__(self, model: DistributedModelBase, max_length: int, batch_size: int) -> None:
        self.model = model
        self._session = InferenceSession(model.swarm, 0, model.num_blocks, max_length=max_length,
                                         batch_size=batch_size, push=model.push, checker=model.spot_checker,
                                         active_adapter=model.layers.active_adapter,
                                         prefill_chunk=model.prefill_chunk)
        if model.ptune is not None:  # the prefix's positions come first in every cache
            deep = model.ptune.deep_prompts()
            self._session.prompts = None if deep is None else deep.detach().to(model.client_part.head.weight.dtype)
        model.runtime.call(self._session.open)
        # Tokens whose hidden states every daemon has cached, and tokens seen or generated so far
        # (the last generated token is not fed until the next step needs it, as in transformers).
        self.fed = 0
        self.ids: torch.Tensor | None = None

    @property
    def position(self) -> int:
        return self._session.position

    @property
    def route(self) -> list[Any]:
        return self._session.route

    @property
    def recoveries(self) -> int:
        """How many times a failed daemon was replaced (history replayed to another one)."""
        return self._session.recoveries

    @property
    def resumes(self) -> int:
        """How many times a hop was re-opened on the same daemon (e.g. after an idle close)."""
        return self._session.resumes

    def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Run hidden states [B, T, H] through all remote blocks with the session's caches."""
        return self.model.runtime.call(self._session.step, hidden, position)

    def close(self) -> None:
        if self.model.head_batcher is not None:
            self.model.head_batcher.forget(self)
        self.model.runtime.call(self._session.close)

    def __enter__(self) -> RemoteInferenceSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class DistributedModelBase(nn.Module):
    """What every distributed model has: the client's part, the swarm, the remote blocks, and
    (with `tuning_mode`) trainable prompts. `model.parameters()` with `requires_grad` are exactly
    the trainable ones; the client's copy of the model's own weights is frozen."""

    def __init__(self, path: Path, client_part: ClientPart, runtime: ClientRuntime, swarm: SwarmClient,
                 generation_config: GenerationConfig | None) -> None:
        super().__init__()
        self.path = path
        self.client_part = client_part
        self.config = client_part.config
        self.runtime = runtime
        self.swarm = swarm
        self.generation_config = generation_config
        self.num_blocks = client_part.num_blocks
        self.layers = RemoteSequential(runtime, swarm, 0, self.num_blocks)
        self.push = True  # daemon-to-daemon forwarding in inference sessions (from_pretrained's `push`)
        self.prefill_chunk: int | None = None  # pipelined prefill (from_pretrained's `prefill_chunk`)
        # Activation codec of inference steps (from_pretrained's `compression`; tensors.CODECS), and
        # whether one-token decode steps use it too (else only multi-token steps: prefill).
        self.compression = "none"
        self.compress_decode = False
        # Concurrent sessions' heads in one matmul (from_pretrained's `batching`; client/head_batching.py)
        self.head_batcher: HeadBatcher | None = None
        # Re-computes a fraction of steps elsewhere (from_pretrained's `spot_check_rate`; client/spotcheck.py)
        self.spot_checker: SpotChecker | None = None
        self.ptune: PromptTuning | None = None  # from_pretrained's `tuning_mode` (client/ptune.py)
        self.eval()  # as transformers' from_pretrained: call .train() for dropout

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        initial_peers: Sequence[str],
        dtype: torch.dtype | None = None,
        device: str = "cpu",
        swarm_key: str | Path | None = None,
        connect_timeout: float = 10.0,
        step_timeout: float = 30.0,
        max_retries: int = 5,
        use_dht: bool = True,
        push: bool = True,
        prefill_chunk: int | None = None,
        batching: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        identity: str | Path | None = None,
        swarm_owner: str | None = None,
        member_certificate: str | Path | None = None,
        spot_check_rate: float = 0.0,
        recheck_reports: bool = True,
        allowed_peers: Sequence[str] | None = None,
        blocked_peers: Sequence[str] = (),
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        micro_batch_size: int | None = None,
        active_adapter: str | None = None,
        compression: str = "none",
        compress_decode: bool = False,
        **head_options: Any,
    ) -> Any:
        """Load the client's part of the model at `path` and find daemons for the rest.

        `path` is a local checkpoint folder or a Hub model id (`org/name`, at `revision`, with
        `token` for gated repos) fetched through the Hugging Face cache: only the config, index,
        generation config and the shards holding the embeddings, final norm and head.

        `dtype` must match what the daemons compute in (default: the dtype they announce).
        `push`: daemons forward each step's output to the next daemon themselves (fewer network
        legs per token; client/session.py); False makes the client drive every hop.
        `prefill_chunk`: a prompt longer than this many tokens is sent in chunks of this size, one
        after another without waiting, each pushed along the chain, so that the daemons compute
        different chunks at once (pipelined prefill; client/session.py). Off (None) by default; when
        on, a prompt's outputs differ from one pass by float rounding (chunked matmuls), and with
        spot checks on, prompts still run as one step.
        `batching`: sessions generating at the same time (from several threads) share one head
        computation per step, which also keeps them together for the daemons' `--batching`. Faster
        for many sessions, but within ~1e-6 of local `transformers` rather than bit-identical
        (client/head_batching.py); a lone session is always exact.
        `identity`: an Ed25519 key file (created if missing; `petals keygen`) that fixes this client's
        peer id, for a membership certificate or a daemon's `own_clients`; default: a new key each run.
        `swarm_owner` / `member_certificate`: a members-only swarm (docs/OPERATING.md), as for petalsd.
        `spot_check_rate` (0.0-1.0): the fraction of each hop's steps re-computed on another daemon
        serving the same blocks before the step is used; a daemon found wrong is avoided, reported
        in the DHT, and the step replayed on honest ones (client/spotcheck.py). 1.0 checks every
        step, so no token computed from a wrong answer is returned. Stateless calls (`model(...)`,
        `model.layers[i:j]`) are checked the same way. A disagreement is decided on the client's own
        copy of the blocks when `path` is a local folder holding them, else by a third daemon. Off by default: a check is a
        stateless forward over the whole history, so its cost grows with the session's length
        (BENCHMARKS.md has the measured cost).
        `recheck_reports`: before avoiding a daemon that an evidence report in the DHT accuses, run
        the report's inputs again (on this client's copy of the blocks, else on a daemon neither
        accused nor witness) and ignore the report if the accused answer is right. On by default:
        a signature proves who answered, not who was right, and one forward per new report (they
        are rare) is cheap next to avoiding an honest daemon that colluding witnesses framed.
        `compression` ("none", "fp16", "bf16"): hidden states of a multi-token step (prefill) travel
        client -> daemons -> client in that dtype, half the bytes of float32 on slow links, rounded
        (so not exact: "none", the default, is); `compress_decode` applies it to one-token steps too.
        `step_timeout`: how long a step waits on a daemon before the daemon counts as failed (the
        session then reroutes). A step's activations are given time on top, at 1 Mbit/s over each
        link they cross (a long prompt's megabytes on a slow uplink; protocol/p2p/streams.py,
        `transfer_allowance`), so a hung daemon is found out just as fast during decode.
        `allowed_peers` / `blocked_peers` (peer ids): use only / never these daemons, for routing,
        recovery and spot checks alike; a route they leave uncovered fails naming the blocks. An
        allowed entry may be a certificate issuer's peer id: daemons showing its valid, unrevoked
        certificate are allowed (client/swarm.py).

        Fine-tuning: `tuning_mode` "ptune" or "deep_ptune" with `pre_seq_len` prompts (client/
        ptune.py); `micro_batch_size`: sequences per forward/backward request (default: the
        daemons' max batch size), more run as parallel micro-batches; `active_adapter`: a LoRA
        adapter the daemons serve (`petalsd --adapters`), used by every request and session.
        """
        if not 0.0 <= spot_check_rate <= 1.0:
            raise ValueError(f"spot_check_rate must be within 0.0-1.0, got {spot_check_rate}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
        codec_dtype(compression)  # refuses an unknown codec before any connection is made
        if not initial_peers:
            raise ValueError("initial_peers is empty: give at least one daemon's multiaddr (/ip4/.../p2p/...)")
        checkpoint = Checkpoint(path, revision=revision, token=token, cache_dir=default_cache_dir())
        fingerprint = model_fingerprint(checkpoint)
        psk = load_swarm_key(Path(swarm_key)) if swarm_key else None
        key_pair, admission = client_identity(identity, swarm_owner, member_certificate)
        holder: dict[str, Any] = {}

        async def main(nursery: trio.Nursery, stop: trio.Event) -> None:
            host = make_host(key_pair, psk=psk, admission=admission)
            ready = trio.Event()

            async def keep_host() -> None:
                async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
                    ready.set()
                    await trio.sleep_forever()

            nursery.start_soon(keep_host)
            await ready.wait()
            swarm = SwarmClient(host=host, nursery=nursery, model_fingerprint=fingerprint,
                                initial_peers=list(initial_peers), connect_timeout=connect_timeout,
                                step_timeout=step_timeout, max_retries=max_retries,
                                allowed_peers=frozenset(allowed_peers) if allowed_peers is not None else None,
                                blocked_peers=frozenset(blocked_peers))
            if recheck_reports:  # before the first refresh, which reads the reports
                swarm.recheck = SpotChecker(swarm, 0.0, local=LocalDecider.for_folder(checkpoint)).recheck
            if use_dht:
                try:
                    from .discovery import join_swarm
                except ImportError:
                    pass
                else:
                    swarm.discovery = await join_swarm(host, nursery, list(initial_peers))
                    if admission is not None:
                        await nursery.start(swarm.discovery.keep_membership, admission)
            await swarm.refresh()
            holder["swarm"] = swarm

        runtime = ClientRuntime(main)
        swarm: SwarmClient = holder["swarm"]
        servers = swarm.servers()
        if dtype is None:  # compute in what the daemons compute in, or the hidden states will be refused
            dtype = getattr(torch, servers[0].dtype) if servers else torch.float32
        try:
            client_part = load_client_part(checkpoint, dtype=dtype, device=device)
        except BaseException:
            runtime.close()
            raise
        if not servers:
            runtime.close()
            raise NoRoute([(0, client_part.num_blocks)], swarm.route_restrictions() or
                          " (none of the initial peers answered for this model)")
        gen_file = checkpoint.source.fetch_optional("generation_config.json")
        gen_config = GenerationConfig.from_pretrained(gen_file.parent) if gen_file is not None else None
        model = cls(checkpoint.path, client_part, runtime, swarm, gen_config)
        try:
            model._configure(tuning_mode=tuning_mode, pre_seq_len=pre_seq_len, micro_batch_size=micro_batch_size,
                             active_adapter=active_adapter, checkpoint=checkpoint, **head_options)
        except BaseException:
            runtime.close()
            raise
        model.push = push
        model.prefill_chunk = prefill_chunk
        model.compression, model.compress_decode = compression, compress_decode
        if spot_check_rate > 0.0:
            model.spot_checker = SpotChecker(
                swarm, spot_check_rate, signer=ed25519_private_key(key_pair),
                publish=swarm.discovery.publish_evidence if swarm.discovery is not None else None,
                local=LocalDecider.for_folder(checkpoint))
            model.layers.checker = model.spot_checker  # stateless calls (model(...), model.layers[i:j])
        if batching:
            model.head_batcher = HeadBatcher(client_part.logits, batched_head=client_part.packed_logits())
        return model

    def _configure(self, *, tuning_mode: str | None, pre_seq_len: int, micro_batch_size: int | None,
                   active_adapter: str | None, checkpoint: Checkpoint, **head_options: Any) -> None:
        """from_pretrained's training options (subclasses take their head's options here)."""
        if head_options:
            raise TypeError(f"unexpected options: {', '.join(sorted(head_options))}")
        if tuning_mode is not None:
            text = self.config.get_text_config(decoder=True)
            self.ptune = PromptTuning(tuning_mode, pre_seq_len, self.client_part.hidden_size, self.num_blocks,
                                      getattr(text, "initializer_range", 0.02))
        elif pre_seq_len:
            raise ValueError("pre_seq_len is for prompt tuning: give tuning_mode='ptune' or 'deep_ptune' too")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        self.layers.micro_batch_size = micro_batch_size
        if active_adapter is not None:
            offered = sorted({a for s in self.swarm.servers() for a in s.adapters})
            if active_adapter not in offered:
                raise ValueError(f"no daemon of this swarm serves adapter {active_adapter!r} (served: "
                                 f"{', '.join(offered) or 'none'}); start daemons with --adapters")
        self.layers.active_adapter = active_adapter

    @property
    def pre_seq_len(self) -> int:
        return self.ptune.pre_seq_len if self.ptune is not None else 0

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embeddings (frozen): `model(inputs_embeds=model.get_input_embeddings()(ids))`."""
        return self.client_part.embeddings[0]

    def hidden_states(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The last block's output [B, T, H] for the tokens (the prompts' positions dropped), before
        the final norm; differentiable w.r.t. `inputs_embeds` and the prompts."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        _refuse_padding(attention_mask)
        if inputs_embeds is None:
            assert input_ids is not None
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
            inputs_embeds = self.get_input_embeddings()(input_ids.to(self.get_input_embeddings().weight.device))
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.client_part.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, tokens, {self.client_part.hidden_size}], "
                             f"got {list(inputs_embeds.shape)}")
        dtype = self.get_input_embeddings().weight.dtype
        deep = None
        if self.ptune is not None:
            prefix = self.ptune.prefix(inputs_embeds.shape[0]).to(device=inputs_embeds.device, dtype=dtype)
            inputs_embeds = torch.cat([prefix, inputs_embeds.to(dtype)], dim=1)
            deep = self.ptune.deep_prompts()
        hidden = self.layers(self.client_part.after_embeddings(inputs_embeds.to(dtype)),
                             None if deep is None else deep.to(dtype))
        return hidden[:, self.pre_seq_len:]

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> DistributedModelBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



class DistributedModelForCausalLM(DistributedModelBase):
    # ---------------------------------------------------------------- inference
    def inference_session(self, max_length: int, batch_size: int = 1) -> RemoteInferenceSession:
        """A session for `max_length` tokens (plus the prompts' positions, with prompt tuning)."""
        return RemoteInferenceSession(self, max_length + self.pre_seq_len, batch_size)

    def route(self) -> str:
        from .routing import choose_route

        return describe_route(choose_route(self.swarm.servers(), 0, self.num_blocks, banned=self.swarm.banned()))

    @property
    def spot_checks(self) -> SpotCheckStats | None:
        """Counts of steps checked, disagreements and daemons flagged (None: spot checks off)."""
        return self.spot_checker.stats if self.spot_checker is not None else None

    def _next_logits(self, session: RemoteInferenceSession, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            hidden = self.client_part.embed(ids, position=session.fed)
            if self.ptune is not None and session.position == 0:  # the prefix goes first, once
                prefix = self.ptune.prefix(ids.shape[0]).to(self.get_input_embeddings().weight.dtype)
                hidden = torch.cat([self.client_part.after_embeddings(prefix), hidden], dim=1)
            out = session.step(self._on_the_wire(hidden)).to(hidden.dtype)
            session.fed += ids.shape[1]
            last = out[:, -1:, :]
            logits = self.head_batcher(session, last) if self.head_batcher else self.client_part.logits(last)
            return logits[:, -1, :]

    def _on_the_wire(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` in the dtype an inference step sends it in (the `compression` codec's, if any)."""
        dtype = codec_dtype(self.compression)
        if dtype is None or (hidden.shape[1] == 1 and not self.compress_decode):
            return hidden
        return as_activation_dtype(hidden, dtype)

    def generate(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 session: RemoteInferenceSession | None = None, streamer: generation.Streamer | None = None,
                 generation_config: GenerationConfig | None = None,
                 logits_processor: LogitsProcessorList | None = None,
                 stopping_criteria: StoppingCriteriaList | None = None, tokenizer: Any = None,
                 generator: torch.Generator | None = None,
                 **options: Any) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """transformers-compatible generation (greedy or sampling), token for token identical.

        As in transformers: `generation_config` replaces the model's, keyword options override it;
        custom `logits_processor` / `stopping_criteria` join the built ones; `stop_strings` need
        `tokenizer`; `return_dict_in_generate` (with `output_scores` / `output_logits`) returns a
        `GenerateDecoderOnlyOutput`. In a `session`, `input_ids` are the new tokens of this turn:
        they are fed after everything the session has seen, and the result is `input_ids`
        followed by the generated tokens. `generator`: a private random source for sampling, so
        that concurrent seeded requests do not draw from each other's stream (default: torch's
        global one, as in transformers).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        _refuse_padding(attention_mask)
        config = generation.resolve_config(generation_config or self.generation_config, options)
        extras = generation.Extras(logits_processor, stopping_criteria, tokenizer)
        own_session = session is None
        if session is None:
            budget = generation.max_new_tokens(config, input_ids.shape[1])
            session = self.inference_session(input_ids.shape[1] + budget, batch_size=input_ids.shape[0])
        try:
            context = input_ids if session.ids is None else torch.cat([session.ids, input_ids], dim=1)
            unseen = context[:, session.fed:]
            out = generation.decode(context, lambda ids: self._next_logits(session, ids), config, streamer,
                                    unseen=unseen, extras=extras, generator=generator)
            session.ids = out.sequences
            sequences = out.sequences[:, context.shape[1] - input_ids.shape[1]:]
        finally:
            if own_session:
                session.close()
        if config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, scores=out.scores, logits=out.logits)
        return sequences

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None) -> CausalLMOutput:
        """A stateless forward through the swarm, as transformers' causal LMs return it: `.logits` for
        every position [B, T, vocab], and `.loss` (next-token cross-entropy, -100 ignored) with
        `labels`. Differentiable: `.loss.backward()` reaches `inputs_embeds` and the prompts."""
        logits = self.client_part.logits(self.hidden_states(input_ids, inputs_embeds, attention_mask))
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     shifted.reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def _refuse_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padded batches are not supported: give rows of equal length (attention_mask all ones)")


AutoDistributedModelForCausalLM = DistributedModelForCausalLM
