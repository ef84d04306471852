"""Prompt-tune the shipped demo model through a local swarm, then generate with the tuned prompts.

The demo model (client/demo/model) has memorised the Zen of Python: given a line's beginning it
recites the rest. Here its weights stay frozen on three daemons, and only a few deep prompts on
the client are trained (`tuning_mode="deep_ptune"`), so that after a line of the Zen it answers
with a sentence it has never seen. A progress bar shows the loss as it falls; at the end the
model generates with the tuned prompts, and the prompts are saved with `state_dict()`.

    python examples/prompt_tuning.py [--steps 150] [--save prompts.pt]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from petals_client import AutoDistributedModelForCausalLM
from petals_client.demo.run import DEFAULT_MODEL, split_blocks
from petals_client.localswarm import LocalSwarm
from petals_client.tokenizer import load_tokenizer

CONTEXTS = ["Beautiful is better than ugly.\n", "Simple is better than complex.\n", "Flat is better than nested.\n",
            "Readability counts.\n"]
ANSWER = "Petals tuned me.\n"


def batch(tokenizer, contexts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of context + answer (equal lengths are not needed: each row is its own batch of one
    here, joined by truncation to the shortest); labels only on the answer (-100 elsewhere)."""
    rows, labels = [], []
    for context in contexts:
        context_ids = tokenizer.encode(context)
        answer_ids = tokenizer.encode(ANSWER)[1:]  # no second <s>
        rows.append(context_ids + answer_ids)
        labels.append([-100] * len(context_ids) + answer_ids)
    width = min(len(r) for r in rows)
    # keep every row's end (the answer): drop leading context tokens of the longer rows
    return torch.tensor([r[-width:] for r in rows]), torch.tensor([l[-width:] for l in labels])


def tune(steps: int = 150, *, lr: float = 0.3, pre_seq_len: int = 8, daemons: int = 3,
         save: Path | None = None, out=sys.stdout) -> tuple[list[float], str]:
    """Run the whole example; returns the losses and the text generated after the last context."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the daemons are processes on the same cores
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    spans = split_blocks(6, daemons)
    with LocalSwarm(DEFAULT_MODEL, extra_args=["--num-threads", "1"]) as swarm:
        first = swarm.start(spans[0], initial_peers=[])
        for blocks in spans[1:]:
            swarm.start(blocks, initial_peers=first.addrs, wait=False)
        swarm.wait_all()
        with AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.addrs,
                                                             tuning_mode="deep_ptune",
                                                             pre_seq_len=pre_seq_len) as model:
            trainable = [p for p in model.parameters() if p.requires_grad]
            print(f"training {sum(p.numel() for p in trainable)} prompt values through {len(spans)} daemons "
                  f"({model.route()})", file=out, flush=True)
            optimizer = torch.optim.Adam(trainable, lr=lr)
            input_ids, labels = batch(tokenizer, CONTEXTS)
            losses: list[float] = []
            progress = tqdm(range(steps), desc="prompt tuning", file=out)
            for _ in progress:
                optimizer.zero_grad()
                loss = model(input_ids=input_ids, labels=labels).loss
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.close()
            prompt = tokenizer.encode(CONTEXTS[-1])
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=len(ANSWER) + 2, do_sample=False)
            text = tokenizer.decode(generated[0, len(prompt):].tolist())
            print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}\n{CONTEXTS[-1]!r} -> {text!r}", file=out, flush=True)
            if save is not None:
                torch.save({k: v for k, v in model.state_dict().items() if k.startswith("ptune.")}, save)
                print(f"tuned prompts saved to {save}", file=out)
    return losses, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    tune(args.steps, lr=args.lr, save=args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
