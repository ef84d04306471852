"""The client's decoding loop reproduces transformers' generate exactly (no network involved:
the model's blocks run locally through the same Span code the daemons use)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from petals_client import generation
from petals_client.demo.run import DEFAULT_MODEL
from petals_protocol.models.client_part import load_client_part
from petals_protocol.models.span import load_span
from petals_protocol.models.synthetic import make_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", num_layers=4, hidden_size=64,
                                  vocab_size=96, seed=3)


def local_logits_fn(path, split=2, end=4):
    client = load_client_part(path)
    spans = [load_span(path, 0, split), load_span(path, split, end)]
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
    out = generation.decode(ids, local_logits_fn(checkpoint), config).sequences
    assert out.tolist() == ref.tolist()


def test_sampling_with_seed_matches_transformers(checkpoint):
    ids = torch.tensor([[5, 17, 33, 2]])
    opts = dict(max_new_tokens=25, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(1234)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint).generate(ids, **opts)
    torch.manual_seed(1234)
    out = generation.decode(ids, local_logits_fn(checkpoint), generation.resolve_config(None, opts)).sequences
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
    out = generation.decode(torch.tensor([[1], [2]]), fake_logits, config).sequences
    assert out.tolist() == [[1, eos, 0], [2, 5, eos]]


def test_unsupported_options_are_refused():
    with pytest.raises(TypeError, match="num_return_sequences"):
        generation.resolve_config(None, {"num_return_sequences": 2})
    with pytest.raises(ValueError, match="beam"):
        generation.resolve_config(None, {"num_beams": 4})


class StopAfterToken(StoppingCriteria):
    """Finishes a row once it produced `token` (a custom criterion, as users write them)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_custom_processors_criteria_and_scores_match_transformers(checkpoint):
    ids = torch.tensor([[5, 17, 33, 2, 40, 41]])
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    free = model.generate(ids, max_new_tokens=12, do_sample=False)
    processed = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.2,
                               logits_processor=LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)]))
    assert processed.tolist() != free.tolist()  # else this test could not show the processor is applied
    new = processed[0, ids.shape[1]:].tolist()
    stop_token = new[5]
    stops_after = new.index(stop_token) + 1  # the custom criterion ends generation there
    opts = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.2, return_dict_in_generate=True,
                output_scores=True, output_logits=True)

    def extras():
        return dict(logits_processor=LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)]),
                    stopping_criteria=StoppingCriteriaList([StopAfterToken(stop_token)]))

    ref = model.generate(ids, **opts, **extras())
    out = generation.decode(ids, local_logits_fn(checkpoint), generation.resolve_config(None, opts),
                            extras=generation.Extras(**extras()))
    assert out.sequences.tolist() == ref.sequences.tolist() == processed[:, :ids.shape[1] + stops_after].tolist()
    assert len(out.scores) == len(ref.scores) == len(out.logits) == stops_after
    for mine, theirs in [*zip(out.scores, ref.scores), *zip(out.logits, ref.logits)]:
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_stop_strings_match_transformers():
    """On the demo model (a real byte-level tokenizer): generation ends where the text contains a stop string."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    ids = torch.tensor([tokenizer("Beautiful is")["input_ids"]])
    opts = dict(max_new_tokens=40, do_sample=False, stop_strings=["than"])
    ref = model.generate(ids, tokenizer=tokenizer, **opts)
    config = generation.resolve_config(model.generation_config, opts)
    out = generation.decode(ids, local_logits_fn(DEFAULT_MODEL, 3, 6), config,
                            extras=generation.Extras(tokenizer=tokenizer)).sequences
    assert out.tolist() == ref.tolist()
    assert tokenizer.decode(out[0, ids.shape[1]:]).endswith("than")  # stopped there, not at the budget
    with pytest.raises(ValueError, match="tokenizer"):
        generation.decode(ids, local_logits_fn(DEFAULT_MODEL, 3, 6), config)
