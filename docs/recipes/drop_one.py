"""How much each teacher layer matters: KL(teacher || teacher without that one layer) and perplexity,
on held-out text. A plan that drops a layer this table marks as large asks one student layer to do
the work of a layer the teacher cannot lose.

Usage: .venv/bin/python docs/recipes/drop_one.py TEXT_FILE [TOKENS]
"""

import sys

import torch

from boomerang import data as d
from boomerang.importance import dropped_teacher
from boomerang.models import load_teacher
from boomerang.training.losses import kl_to_teacher, next_token_cross_entropy


def main(path: str, tokens: int = 1024) -> None:
    teacher = load_teacher("default")
    held = d.heldout_blocks(path, teacher.tokenizer, tokens, seq_len=128, fraction=0.1)
    mask = torch.ones_like(held)
    model = teacher.model
    with torch.no_grad():
        reference = model(held, use_cache=False).logits
        print(f"teacher: perplexity {next_token_cross_entropy(reference, held, mask).exp():.1f} on {held.numel()} tokens")
        for i in range(teacher.n_layers):
            logits = dropped_teacher(model, [i])(held, use_cache=False).logits
            kl = kl_to_teacher(logits, reference, mask)
            ppl = next_token_cross_entropy(logits, held, mask).exp()
            print(f"without layer {i:2d}: KL {kl:7.3f}  perplexity {ppl:10.1f}", flush=True)


if __name__ == "__main__":
    main(*(sys.argv[1:2]), *(int(a) for a in sys.argv[2:3]))
