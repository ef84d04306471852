"""The client's decoding loop reproduces transformers' generate exactly (no network involved:
the model's blocks run locally through the same Span code the daemons use)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from petals_client import generation
from petals_protocol.models.client_part import load_client_part
from petals_protocol.models.span import load_span
from petals_protocol.models.synthetic import make_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", num_layers=4, hidden_size=64,
                                  vocab_size=96, seed=3)


def local_logits_fn(path):
    client = load_client_part(path)
    spans = [load_span(path, 0, 2), load_span(path, 2, 4)]
    caches = [s.new_cache(1, 128) for s in spans]

    def next_logits(ids):
        with torch.inference_mode():
            h = client.embed(ids)
            for span, cache in zip(spans, caches):
                h = span.forward(h, cache)
            return client.logits(h[:, -1:, :])[:, -1, :]

    return next_logits


def test_greedy_matches_transformers(checkpoint):
    ids = torch.tensor([[5, 17, 33, 2, 40, 41]])
    ref = AutoModelForCausalLM.from_pretrained(checkpoint).generate(ids, max_new_tokens=20, do_sample=False)
    config = generation.resolve_config(None, {"max_new_tokens": 20, "do_sample": False})
    out = generation.decode(ids, local_logits_fn(checkpoint), config)
    assert out.tolist() == ref.tolist()


def test_sampling_with_seed_matches_transformers(checkpoint):
    ids = torch.tensor([[5, 17, 33, 2]])
    opts = dict(max_new_tokens=25, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(1234)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint).generate(ids, **opts)
    torch.manual_seed(1234)
    out = generation.decode(ids, local_logits_fn(checkpoint), generation.resolve_config(None, opts))
    assert out.tolist() == ref.tolist()


def test_eos_stops_and_pads_finished_rows():
    vocab = 8
    eos = 3
    script = iter([[eos, 5], [1, eos], [1, 1]])

    def fake_logits(ids):
        row_tokens = next(script)
        logits = torch.full((2, vocab), -10.0)
        for r, t in enumerate(row_tokens):
            logits[r, t] = 10.0
        return logits

    config = generation.resolve_config(GenerationConfig(eos_token_id=eos, pad_token_id=0),
                                       {"max_new_tokens": 10})
    out = generation.decode(torch.tensor([[1], [2]]), fake_logits, config)
    assert out.tolist() == [[1, eos, 0], [2, 5, eos]]


def test_unsupported_options_are_refused():
    with pytest.raises(TypeError, match="num_return_sequences"):
        generation.resolve_config(None, {"num_return_sequences": 2})
    with pytest.raises(ValueError, match="beam"):
        generation.resolve_config(None, {"num_beams": 4})
