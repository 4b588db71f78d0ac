"""A minute with rankwise: adapt a small GPT-2-style model, train a few steps, save, reload, merge."""

from __future__ import annotations

import tempfile

import torch
import transformers

import rankwise as rw


def main() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    # A toy language: each token is the previous one plus one (mod 64); the random model can't.
    starts = torch.randint(0, 64, (32, 1))
    batch = (starts + torch.arange(32)) % 64

    model = rw.adapt(model, rw.LoRAConfig(rank=8, alpha=16, targets=("c_attn", "c_fc")))
    print(rw.summary(model), "\n")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(41):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        adapted = model(input_ids=batch).logits
        rw.save_adapter(model, folder)
        torch.manual_seed(0)
        reloaded = rw.load_adapter(transformers.GPT2LMHeadModel(config), folder).eval()
        print(f"\nsave -> load, max output difference: {(reloaded(input_ids=batch).logits - adapted).abs().max():.2e}")
        merged = rw.unwrap(reloaded, merge=True)
        print(
            f"merged plain model ({type(merged.transformer.h[0].attn.c_attn).__name__} layers again), "
            f"max output difference: {(merged(input_ids=batch).logits - adapted).abs().max():.2e}"
        )
    print("\nmethods:", ", ".join(rw.methods()))


if __name__ == "__main__":
    main()
