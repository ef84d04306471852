"""Prompt tuning through the swarm (fp32, 3 daemons) against a local reference of the same prompts."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.ptune import PromptTuning
from petals_protocol.errors import ErrorCode
from petals_protocol.ids import FORWARD_PROTOCOL
from petals_protocol.messages import (
    BackwardRequest,
    BackwardResponse,
    ErrorReply,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
    OpenSession,
    StepResult,
)
from petals_protocol.models.span import load_span
from petals_protocol.tensors import from_torch, to_torch
from rawclient import RawClient, assert_readable, hidden_payload, new_id, request, run_raw
from swarmlib import start_swarm

pytestmark = pytest.mark.integration

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [2, 71, 82, 81, 82, 84, 59, 4, 52, 35]])
PRE_SEQ_LEN = 3


@pytest.fixture(scope="module", params=["llama", "bloom"])
def family_swarm(request, llama_path, bloom_path):
    path = llama_path if request.param == "llama" else bloom_path
    swarm = start_swarm(path, ["0:2", "2:4", "4:6"])
    yield path, swarm
    swarm.stop()


def tuned_model(path, swarm, mode: str = "deep_ptune") -> AutoDistributedModelForCausalLM:
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs, tuning_mode=mode,
                                                            pre_seq_len=PRE_SEQ_LEN)
    if model.ptune.intermediate_prompt_embeddings is not None:  # non-zero deep prompts, so that they matter
        with torch.no_grad():
            model.ptune.intermediate_prompt_embeddings.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(3))
    return model


def blocks_of(ref):
    return ref.model.layers if hasattr(ref, "model") else ref.transformer.h


def reference_logits(ref, ptune: PromptTuning, ids: torch.Tensor) -> torch.Tensor:
    """The same prompts on the local transformers model: the prefix before the tokens' embeddings,
    each block's prompt added to its input's first positions (forward pre-hooks)."""
    deep = ptune.deep_prompts()
    handles = []
    if deep is not None:
        for index, block in enumerate(blocks_of(ref)):
            def hook(module, args, kwargs, index=index):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :PRE_SEQ_LEN] + deep[index], hidden[:, PRE_SEQ_LEN:]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        embeds = torch.cat([ptune.prefix(ids.shape[0]), ref.get_input_embeddings()(ids)], dim=1)
        return ref(inputs_embeds=embeds).logits[:, PRE_SEQ_LEN:]
    finally:
        for handle in handles:
            handle.remove()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def local_copy(model) -> PromptTuning:
    ptune = PromptTuning(model.ptune.mode, PRE_SEQ_LEN, model.client_part.hidden_size, model.num_blocks, 0.02)
    ptune.load_state_dict(model.ptune.state_dict())
    return ptune


def test_deep_prompt_gradients_equal_the_local_reference(family_swarm):
    path, swarm = family_swarm
    ref = AutoModelForCausalLM.from_pretrained(path).requires_grad_(False)
    with tuned_model(path, swarm) as model:
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trainable == ["ptune.prompt_embeddings.weight", "ptune.intermediate_prompt_embeddings.weight"]
        local = local_copy(model)
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        expected_logits = reference_logits(ref, local, IDS)
        lm_loss(expected_logits, IDS).backward()
        assert (out.logits - expected_logits).abs().max().item() <= 1e-5
        for mine, theirs in zip(model.ptune.parameters(), local.parameters(), strict=True):
            assert theirs.grad.abs().sum() > 0
            assert (mine.grad - theirs.grad).abs().max().item() <= 1e-5


def test_twenty_steps_through_the_swarm_equal_twenty_local_steps(family_swarm):
    path, swarm = family_swarm
    ref = AutoModelForCausalLM.from_pretrained(path).requires_grad_(False)
    with tuned_model(path, swarm) as model:
        local = local_copy(model)
        remote_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
        local_opt = torch.optim.Adam(local.parameters(), lr=0.01)
        losses = []
        for _ in range(20):
            remote_opt.zero_grad()
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            remote_opt.step()
            local_opt.zero_grad()
            lm_loss(reference_logits(ref, local, IDS), IDS).backward()
            local_opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        for mine, theirs in zip(model.ptune.parameters(), local.parameters(), strict=True):
            assert (mine - theirs).abs().max().item() <= 1e-4

        # The tuned prompts generate: greedy decoding equals the reference (recomputed each token).
        prompt = IDS[:1, :6]
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        ids = prompt
        with torch.no_grad():
            for _ in range(6):
                ids = torch.cat([ids, reference_logits(ref, local, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.tolist() == ids.tolist()

        # The prompts save and load with state_dict().
        state = model.state_dict()
        with tuned_model(path, swarm) as again:
            again.load_state_dict(state)
            for mine, theirs in zip(model.ptune.parameters(), again.ptune.parameters(), strict=True):
                assert torch.equal(mine, theirs)


def test_plain_ptune_logits_equal_the_reference(family_swarm):
    path, swarm = family_swarm
    ref = AutoModelForCausalLM.from_pretrained(path).requires_grad_(False)
    with tuned_model(path, swarm, "ptune") as model:
        assert model.ptune.deep_prompts() is None
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
            assert (logits - reference_logits(ref, local_copy(model), IDS)).abs().max().item() <= 1e-5


def test_malformed_prompts_and_gradients_get_clear_errors(family_swarm):
    path, swarm = family_swarm
    hidden_size = 64
    hidden = hidden_payload(2, 5, hidden_size, seed=1)
    prompts = torch.randn(2, 1, 3, hidden_size, generator=torch.Generator().manual_seed(2))
    span = load_span(path, 0, 2)
    with torch.inference_mode():
        expected = span.forward(to_torch(hidden), None, 0, 2, prompts)
    nan_prompts = prompts.clone()
    nan_prompts[1, 0, 2, 5] = float("nan")
    nan_grad = torch.ones(2, 5, hidden_size)
    nan_grad[0, 0, 0] = float("nan")

    async def attack(client: RawClient) -> None:
        addr = swarm.daemons[0].addrs[0]
        fingerprint = (await client.info(addr)).model_fingerprint

        def forward(p: torch.Tensor) -> ForwardRequest:
            return ForwardRequest(request_id=new_id(), model_fingerprint=fingerprint, start_block=0, end_block=2,
                                  hidden=hidden, prompts=from_torch(p))

        def backward(grad: torch.Tensor, p: torch.Tensor | None = None) -> BackwardRequest:
            return BackwardRequest(request_id=new_id(), model_fingerprint=fingerprint, start_block=0, end_block=2,
                                   hidden=hidden, grad_output=from_torch(grad),
                                   prompts=from_torch(p) if p is not None else None)

        stream = await client.open(addr, FORWARD_PROTOCOL)
        cases = [
            ("prompts of another hidden size", forward(torch.zeros(2, 1, 3, hidden_size + 1)), "prompts must be"),
            ("prompts for 3 sequences of 2", forward(torch.zeros(2, 3, 3, hidden_size)), "prompts must be"),
            ("prompts in float16", forward(prompts.half()), "dtype float16"),
            ("NaN in the prompts", forward(nan_prompts), "prompts contains NaN"),
            ("NaN in grad_output", backward(nan_grad), "grad_output contains NaN"),
            ("NaN prompts in a backward", backward(torch.ones(2, 5, hidden_size), nan_prompts), "NaN"),
        ]
        for name, msg, words in cases:
            reply = await request(stream, msg)
            assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_TENSOR, (name, reply)
            assert words in reply.message, (name, reply.message)
            assert_readable(reply.message)
        ok = await request(stream, forward(prompts))  # the same stream goes on serving
        assert isinstance(ok, ForwardResponse) and torch.equal(to_torch(ok.hidden), expected)
        grads = await request(stream, backward(torch.ones(2, 5, hidden_size), prompts))
        assert isinstance(grads, BackwardResponse) and grads.grad_prompts is not None
        assert grads.grad_prompts.shape == (2, 1, 3, hidden_size)
        await stream.close()

        # Inference steps: bad prompts are refused and the session goes on, its cache untouched.
        session_id = new_id()
        session = await client.open_session(addr, OpenSession(
            session_id=session_id, model_fingerprint=fingerprint, start_block=0, end_block=2, max_length=16,
            batch_size=2))

        def step(number: int, p: torch.Tensor) -> InferenceStep:
            return InferenceStep(session_id=session_id, step=number, position=0, hidden=hidden, prompts=from_torch(p))

        for number, bad in enumerate([nan_prompts, prompts.half(), torch.zeros(2, 1, 3, hidden_size + 1)]):
            reply = await request(session, step(number, bad))
            assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_TENSOR, reply
        reply = await request(session, step(3, prompts))
        assert isinstance(reply, StepResult) and torch.equal(to_torch(reply.hidden), expected)
        await session.close()

    run_raw(attack)
