"""Spot checks: re-compute a fraction of a session's steps on an independent daemon and catch wrong answers.

A daemon's signature proves who answered, not that the answer is right. With `spot_check_rate`
R, after every step each hop's result is checked with probability R: the hop's whole input
history (the chunks the session keeps for recovery, this step's included) is sent as a stateless
forward to another daemon serving the same blocks, and the rows of this step are compared with
what the hop answered, within the dtype's tolerance (`outputs_agree`; the rule and its reasons:
petals_protocol.evidence).
The session runs the checks before it returns the step, so with R = 1 no token computed from a
wrong answer reaches the caller.

On disagreement the client itself decides when it holds the hop's blocks (`LocalDecider`: the
model was loaded from a local checkpoint folder with those blocks' shards): it computes the same
forward locally, the only verdict that needs no trust in anyone. Otherwise a third daemon decides:
it runs the same forward, and whoever it disagrees with is wrong. The hop's daemon is also asked for the same forward, so that all three answers bind the
same request: they form an evidence report (petals_protocol.evidence) that the client signs and
publishes in the DHT for other clients. The daemon found wrong is flagged at once (never used
again by this client while the flag lasts); when it was the hop's daemon, the session replaces the
hop and replays the step on an honest one (client/session.py). Without a third daemon nobody can
be proven wrong: both are flagged and nothing is published.

The same checks cover stateless calls (`model(...)`, `RemoteSequential`: each hop's forward, with
its input as the history; client/remote.py) and sessions with deep prompts (the checking daemons
get the hop's prompts) or a LoRA adapter (only daemons serving that adapter check).

A check needs one daemon other than the hop's whose span covers the hop's blocks (and serves the
adapter, if any), or the client's own copy of the blocks. When there is neither the step goes unchecked (counted in `stats.unchecked`); with R = 1 that is an error instead,
because the promise that no wrong token reaches the caller could not be kept.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petals_protocol.errors import BadRecord, ErrorCode, PetalsError, RemoteError
from petals_protocol.evidence import (
    MAX_EVIDENCE_TTL,
    MAX_RECHECK_INPUT_SIZE,
    EvidenceReport,
    ForwardInputs,
    SignedOutput,
    encode_report,
    within_tolerance,
)
from petals_protocol.messages import ForwardResponse
from petals_protocol.models.checkpoint import Checkpoint
from petals_protocol.models.source import LocalFolder
from petals_protocol.models.span import load_span, span_shards
from petals_protocol.signing import peer_id_from_private_key, peer_id_from_text
from petals_protocol.tensors import from_torch, to_torch

from .remote import signed_forward
from .routing import Hop, hop_cost
from .session import CALLER_FAULTS, WrongOutput
from .swarm import NETWORK_ERRORS, SwarmClient

log = logging.getLogger("petals_client.spotcheck")

#: How long a report this client publishes is believed by others.
REPORT_TTL = MAX_EVIDENCE_TTL
#: Bound on publishing one report (a DHT store walks the network).
PUBLISH_TIMEOUT = 30.0


def outputs_agree(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether `output` equals `reference` within the tolerance of its dtype (petals_protocol.evidence)."""
    if output.shape != reference.shape or output.dtype != reference.dtype:
        return False
    a, b = output.double(), reference.double()
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        return bool(torch.equal(a, b))
    if not b.numel():
        return True
    return within_tolerance(float((a - b).abs().max()), float(b.abs().max()), str(reference.dtype).removeprefix("torch."))


class SpotCheckUnavailable(PetalsError):
    """spot_check_rate is 1 but no daemon other than the hop's serves `blocks`: the step cannot be checked."""

    code = ErrorCode.UNSUPPORTED

    def __init__(self, blocks: tuple[int, int], peer: str, adapter: str | None = None) -> None:
        with_adapter = f" with adapter {adapter!r}" if adapter is not None else ""
        super().__init__(f"spot_check_rate=1.0 needs a second daemon serving blocks {blocks[0]}:{blocks[1]}"
                         f"{with_adapter} (only {peer} serves them): start one, or lower the rate")
        self.blocks = blocks


@dataclass
class SpotCheckStats:
    steps: int = 0  # hop-steps that could have been checked
    checked: int = 0  # of them, re-computed on another daemon
    unchecked: int = 0  # chosen for a check but no independent daemon was available
    disagreements: int = 0
    computed_locally: int = 0  # checks and verdicts computed on the client's own copy of the blocks
    first_disagreement_at: int | None = None  # how many checks had run when the first disagreement came
    flagged: list[str] = field(default_factory=list)  # daemons proven (or suspected) wrong, in order
    published: int = 0  # reports stored in the DHT (at least one peer acknowledged)

    @property
    def fraction(self) -> float:
        return self.checked / self.steps if self.steps else 0.0


@dataclass
class SpotChecker:
    """Decides which steps to check and checks them; one per model, shared by its sessions."""

    swarm: SwarmClient
    rate: float
    signer: Ed25519PrivateKey | None = None  # signs published reports; None: do not publish
    publish: Callable[[bytes, EvidenceReport], Awaitable[int]] | None = None
    local: LocalDecider | None = None  # the client's own copy of the blocks, deciding disagreements
    rng: random.Random = field(default_factory=random.Random)
    stats: SpotCheckStats = field(default_factory=SpotCheckStats)
    reports: list[EvidenceReport] = field(default_factory=list)  # what this client found

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"spot_check_rate must be within 0.0-1.0, got {self.rate}")

    def choose(self) -> bool:
        """Whether to check the next hop-step (counted)."""
        self.stats.steps += 1
        return self.rate >= 1.0 or (self.rate > 0.0 and self.rng.random() < self.rate)

    def _independent(self, hop: Hop | Blocks, exclude: set[str], tokens: int, adapter: str | None) -> list[Hop]:
        """Other daemons able to run exactly the hop's blocks over `tokens` tokens (with `adapter`,
        if any: a daemon without it would compute something else), cheapest first."""
        banned = self.swarm.banned()
        usable = [s for s in self.swarm.servers()
                  if s.peer_id not in exclude and s.peer_id not in banned and s.state == "online"
                  and (adapter is None or adapter in s.adapters)
                  and s.start <= hop.start and s.end >= hop.end and (not s.max_length or s.max_length >= tokens)]
        usable.sort(key=lambda s: hop_cost(s, hop.start, hop.end, 0))
        return [Hop(s, hop.start, hop.end) for s in usable]

    async def _ask(self, hop: Hop | Blocks, exclude: set[str], inputs: CheckedInputs) -> _Answer | None:
        """The first verified answer of an independent daemon, or None. A daemon that fails is
        banned as usual, unless it refused the request itself (too long for it, say)."""
        for candidate in self._independent(hop, exclude, inputs.history.shape[1], inputs.adapter):
            peer = candidate.server.peer_id
            exclude.add(peer)
            try:
                return _Answer(peer, await inputs.forward(self.swarm, candidate))
            except NETWORK_ERRORS as exc:
                log.warning("spot check: daemon %s failed on blocks %d:%d (%s: %s)", candidate.server.name,
                            hop.start, hop.end, type(exc).__name__, exc)
                if not (isinstance(exc, RemoteError) and exc.code in CALLER_FAULTS):
                    self.swarm.ban(peer)
        return None

    async def _ask_one(self, hop: Hop, inputs: CheckedInputs) -> _Answer | None:
        """The hop's own daemon's answer to the same forward (for the report), or None."""
        try:
            return _Answer(hop.server.peer_id, await inputs.forward(self.swarm, hop))
        except NETWORK_ERRORS as exc:
            log.warning("spot check: no forward from %s for the report (%s: %s)", hop.server.name,
                        type(exc).__name__, exc)
            return None

    async def check(self, hop: Hop, history: torch.Tensor, output: torch.Tensor, *,
                    prompts: torch.Tensor | None = None, adapter: str | None = None) -> None:
        """Check that `output` (the hop's answer to the last rows of `history`) is right.
        `prompts` [hop blocks, 1 or B, K, H]: the hop's deep prompts (positions [0, K) of the
        history); `adapter`: the LoRA adapter it computed with. The checking daemons get both.

        Raises WrongOutput when the hop's daemon is found wrong (it is flagged); returns when
        its answer stands (a wrong checker is flagged and reported on the way).
        """
        accused_id = hop.server.peer_id
        rows = output.shape[1]
        inputs = CheckedInputs(history, prompts, adapter)
        checker = await self._ask(hop, {accused_id}, inputs)
        if checker is None and self.local is not None:  # nobody else serves the blocks: check here
            reference = await self.local.forward(hop, inputs)
            if reference is not None:
                self.stats.checked += 1
                self.stats.computed_locally += 1
                if outputs_agree(output, reference[:, -rows:]):
                    return
                self.stats.disagreements += 1
                self._flag(accused_id)
                raise WrongOutput(f"daemon {hop.server.name} answered blocks {hop.start}:{hop.end} wrong "
                                  "(computed locally)")
        if checker is None:
            self.stats.unchecked += 1
            if self.rate >= 1.0:
                raise SpotCheckUnavailable((hop.start, hop.end), hop.server.name, adapter)
            log.info("spot check of blocks %d:%d skipped: no other daemon serves them", hop.start, hop.end)
            return
        self.stats.checked += 1
        if outputs_agree(output, checker.output[:, -rows:]):
            return
        self.stats.disagreements += 1
        if self.stats.first_disagreement_at is None:
            self.stats.first_disagreement_at = self.stats.checked
        local = await self.local.forward(hop, inputs) if self.local is not None else None
        log.warning("spot check: %s and %s disagree on blocks %d:%d; %s", hop.server.name, checker.peer_id,
                    hop.start, hop.end, "computed locally" if local is not None else "asking a third daemon")
        # A third daemon: the decider, or with a local verdict a second witness for the report.
        decider = await self._ask(hop, {accused_id, checker.peer_id}, inputs)
        if decider is None and local is None:
            log.error("spot check: no third daemon serves blocks %d:%d to decide; flagging both", hop.start, hop.end)
            self._flag(checker.peer_id)
            self._flag(accused_id)
            raise WrongOutput(f"{hop.server.name} and {checker.peer_id} disagree on blocks {hop.start}:{hop.end}")
        reference = local if local is not None else decider.output  # type: ignore[union-attr]
        if local is not None:
            self.stats.computed_locally += 1
        hop_right = outputs_agree(output, reference[:, -rows:])
        checker_right = outputs_agree(checker.output, reference)
        if hop_right == checker_right:  # both or neither agree with the decider: trust neither
            self._flag(checker.peer_id)
            self._flag(accused_id)
            raise WrongOutput(f"three daemons disagree on blocks {hop.start}:{hop.end}")
        # The same forward from the hop's daemon: all three answers then bind the same request.
        # Only daemons' signed answers prove anything to others: no report without a third one.
        hop_answer = await self._ask_one(hop, inputs) if decider is not None else None
        if hop_right:
            self._flag(checker.peer_id)
            if decider is not None:
                await self._report(hop, inputs, checker, (hop_answer, decider))
            return
        self._flag(accused_id)
        if decider is not None:
            await self._report(hop, inputs, hop_answer, (checker, decider))
        raise WrongOutput(f"daemon {hop.server.name} answered blocks {hop.start}:{hop.end} wrong")

    async def recheck(self, report: EvidenceReport) -> bool | None:
        """Run a verified report's inputs again, here when this client holds the blocks, else on a
        daemon neither accused nor witness (so colluders cannot confirm themselves): True when the
        accused answer is wrong, False when it is right (a framing report), None when the report
        carries no inputs or nobody can run them."""
        if report.inputs is None:
            return None
        blocks = Blocks(report.start_block, report.end_block)
        inputs = CheckedInputs.of(report.inputs)
        reference = await self.local.forward(blocks, inputs) if self.local is not None else None
        if reference is None:
            involved = {report.accused_text, *(w.peer_id_text for w in report.witnesses)}
            answer = await self._ask(blocks, involved, inputs)
            if answer is None:
                return None
            reference = answer.output
        if outputs_agree(to_torch(report.accused.output), reference):
            return False
        return outputs_agree(to_torch(report.witnesses[0].output), reference) or None

    def _flag(self, peer_id: str) -> None:
        log.warning("spot check: flagged peer=%s (wrong answers)", peer_id)
        self.swarm.flag(peer_id)
        self.stats.flagged.append(peer_id)

    async def _report(self, hop: Hop, inputs: CheckedInputs, accused: _Answer | None,
                      witnesses: tuple[_Answer | None, _Answer]) -> None:
        """Build, verify and publish the evidence (only a report that proves something is published)."""
        first, second = witnesses
        if accused is None or first is None or self.signer is None:
            return
        payload = inputs.payload()
        included = payload if payload.wire_size() <= MAX_RECHECK_INPUT_SIZE else None  # else: digest only
        report = EvidenceReport(self.swarm.model_fingerprint, hop.start, hop.end,
                                payload.digest(self.swarm.model_fingerprint, hop.start, hop.end), accused.signed(),
                                (first.signed(), second.signed()), peer_id_from_private_key(self.signer),
                                time.time() + REPORT_TTL, included)
        try:
            report.verify(now=time.time())
            blob = encode_report(self.signer, report)
        except BadRecord as exc:
            log.warning("spot check: no report published on %s: %s", report.accused_text, exc)
            return
        self.reports.append(report)
        if self.publish is None:
            return
        with trio.move_on_after(PUBLISH_TIMEOUT):
            stored = await self.publish(blob, report)
            self.stats.published += stored > 0
            log.warning("published evidence against %s (blocks %d:%d) to %d peers", report.accused_text,
                        hop.start, hop.end, stored)


@dataclass(frozen=True)
class Blocks:
    """A span of blocks to check, before any daemon is chosen for it (a report's)."""

    start: int
    end: int


@dataclass(frozen=True)
class _Answer:
    """A verified forward reply and the daemon that signed it."""

    peer_id: str
    reply: ForwardResponse

    @property
    def output(self) -> torch.Tensor:
        return to_torch(self.reply.hidden)

    def signed(self) -> SignedOutput:
        return SignedOutput(peer_id_from_text(self.peer_id), self.reply.request_id, self.reply.hidden,
                            self.reply.signature)


@dataclass(frozen=True)
class CheckedInputs:
    """What a checked hop computed on: its input history, deep prompts and adapter. Every daemon
    asked about the hop gets exactly these, so that all answers bind the same request."""

    history: torch.Tensor
    prompts: torch.Tensor | None = None
    adapter: str | None = None

    async def forward(self, swarm: SwarmClient, hop: Hop) -> ForwardResponse:
        payload = self.payload()
        return await signed_forward(swarm, hop, payload.hidden, prompts=payload.prompts, adapter=self.adapter)

    def payload(self) -> ForwardInputs:
        prompts = from_torch(self.prompts.contiguous()) if self.prompts is not None else None
        return ForwardInputs(from_torch(self.history), prompts, self.adapter)

    def digest(self, hop: Hop, fingerprint: str) -> bytes:
        """The input digest every forward over these inputs on the hop's blocks binds (the request digest)."""
        return self.payload().digest(fingerprint, hop.start, hop.end)

    @classmethod
    def of(cls, inputs: ForwardInputs) -> CheckedInputs:
        return cls(to_torch(inputs.hidden), to_torch(inputs.prompts) if inputs.prompts is not None else None,
                   inputs.adapter)


@dataclass
class LocalDecider:
    """The client's own copy of blocks: a disagreement's verdict computed locally, trusting nobody.

    Used when the model was loaded from a local checkpoint folder holding every shard of the
    disputed blocks (`holds`); a Hub model's blocks are not fetched for it (that would download a
    daemon's share of the model on the first disagreement). The blocks are loaded only when a
    disagreement needs them, in the dtype of the disputed inputs, and released afterwards: disagreements are
    rare, and a client that holds the weights must not keep them all in memory for them.
    A hop with a LoRA adapter is left to a third daemon (the client holds no adapters).
    """

    checkpoint: Checkpoint

    @classmethod
    def for_folder(cls, checkpoint: Checkpoint) -> LocalDecider | None:
        """A decider when the checkpoint is a local folder (a Hub model's: None)."""
        return cls(checkpoint) if isinstance(checkpoint.source, LocalFolder) else None

    def holds(self, start: int, end: int) -> bool:
        return all((self.checkpoint.path / shard).is_file() for shard in span_shards(self.checkpoint, start, end))

    async def forward(self, hop: Hop | Blocks, inputs: CheckedInputs) -> torch.Tensor | None:
        """The hop's forward over `inputs` computed here (in a worker thread), or None when the
        folder lacks those blocks or the hop uses an adapter."""
        if inputs.adapter is not None or not self.holds(hop.start, hop.end):
            return None

        def compute() -> torch.Tensor:  # in the dtype the daemons computed in
            span = load_span(self.checkpoint, hop.start, hop.end, dtype=inputs.history.dtype)
            with torch.no_grad():
                return span.forward(inputs.history, None, hop.start, hop.end, inputs.prompts)

        return await trio.to_thread.run_sync(compute)
