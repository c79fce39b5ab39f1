#!/usr/bin/env python3
"""Loads a moelab Hugging Face export with transformers and compares its logits with `moelab eval --logits-of`.

    python3 scripts/hf-check.py --run RUN_DIR --hf HF_DIR [--moelab build/moelab] [--tokens 64] [--seed 1]

`moelab export -k RUN_DIR --format hf --out HF_DIR` makes HF_DIR. The script draws --tokens token ids (seeded),
asks moelab for the logits of that sequence, runs AutoModelForCausalLM.from_pretrained(HF_DIR) in float32 on the
same ids, and prints the largest |logit difference| and |log-probability difference| and whether the greedy next
tokens agree at every position; it exits 1 when the log-probabilities differ by more than --tolerance (default 1e-4).
transformers is not installable on the development machines; the device machine (docs/export.md) has it.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="moelab run or checkpoint directory")
    ap.add_argument("--hf", required=True, help="its `moelab export --format hf` directory")
    ap.add_argument("--moelab", default="build/moelab", help="the moelab binary")
    ap.add_argument("--tokens", type=int, default=64, help="sequence length to compare (<= model.seq_len)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest |log p difference| that passes")
    args = ap.parse_args()
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        sys.exit(f"hf-check: transformers and torch are needed ({e}); run this on a machine that has them")

    config = json.load(open(os.path.join(args.hf, "config.json")))
    rng = random.Random(args.seed)
    ids = [rng.randrange(3, config["vocab_size"]) for _ in range(args.tokens)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
        token_file = f.name
    out = subprocess.run([args.moelab, "eval", "-k", args.run, "--logits-of", token_file, "--threads", "2"],
                         check=True, capture_output=True, text=True).stdout
    ours = torch.tensor(json.loads(out)["logits"], dtype=torch.float64)

    model = AutoModelForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].to(torch.float64)
    logit_diff = (theirs - ours).abs().max().item()
    logp_diff = (torch.log_softmax(theirs, -1) - torch.log_softmax(ours, -1)).abs().max().item()
    same_argmax = bool((theirs.argmax(-1) == ours.argmax(-1)).all())
    print(f"hf-check: {config['architectures'][0]}, {len(ids)} positions, vocab {config['vocab_size']}: "
          f"max |logit diff| {logit_diff:.3g}, max |log p diff| {logp_diff:.3g}, "
          f"greedy next token equal at every position: {same_argmax}")
    sys.exit(0 if logp_diff <= args.tolerance and same_argmax else 1)


if __name__ == "__main__":
    main()
