#!/usr/bin/env python3
"""Loads a moelab Hugging Face export with transformers and compares its logits with `moelab eval --logits-of`.

    python3 scripts/hf-check.py --run RUN_DIR --hf HF_DIR [--moelab build/moelab] [--tokens 64] [--seed 1]

`moelab export -k RUN_DIR --format hf --out HF_DIR` makes HF_DIR. The script draws --tokens token ids (seeded),
asks moelab for the logits of that sequence, runs AutoModelForCausalLM.from_pretrained(HF_DIR) in float32 on the
same ids, and prints the largest |logit difference| and |log-probability difference| and whether the greedy next
tokens agree at every position; it exits 1 when the log-probabilities differ by more than --tolerance (default 1e-4).
Then the tokenizer, from text: LlamaTokenizer and LlamaTokenizerFast loaded from HF_DIR must give, for each of a set
of texts (leading and repeated spaces, newlines, digits, non-ASCII, byte fallback, "</s>" as text), exactly the ids
`moelab data encode` gives with the same tokenizer.model (docs/export.md, "Tokenizer"); any difference exits 1.
transformers is not installable on the development machines; the device machine (docs/export.md) has it.
"""
import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile


TEXTS = [
    "The hacker wrote a program that",
    "  Two leading spaces, then\nnew lines\n\n\tand a tab.\n",
    "Digits: 1874, 3.14159 and 2048 pieces; 007.",
    "Non-ASCII: caf\u00e9, na\u00efve, Gr\u00f6\u00dfe, \u65e5\u672c\u8a9e, \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac.",
    "Byte fallback: \U0001F642 \U0001F680 \u203d \u2603.",
    "Spaces   repeated    and trailing   ",
    "Literal control text </s> <s> <unk> stays text.",
    " starts with a space",
]


def moelab_ids(moelab, tokenizer_model, text, workdir):
    """moelab's ids of `text`: `moelab data encode` into a shard (64-byte header, uint16 or uint32 ids, </s> last)."""
    src, shard = os.path.join(workdir, "text.txt"), os.path.join(workdir, "text.bin")
    with open(src, "w", encoding="utf-8") as f:
        f.write(text)
    subprocess.run([moelab, "data", "encode", "--tokenizer", tokenizer_model, src, "--out", shard, "-q"],
                   check=True, stdout=subprocess.DEVNULL)
    data = open(shard, "rb").read()
    width = struct.unpack_from("<I", data, 16)[0]  # header: magic, version, vocab_size, dtype_bytes (docs/tokens.md)
    body = data[64:]
    ids = list(struct.unpack(f"<{len(body) // width}{'H' if width == 2 else 'I'}", body))
    return ids[:-1]  # the document's </s>


def check_tokenizers(args):
    """Returns the number of texts on which LlamaTokenizer or LlamaTokenizerFast differ from moelab."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast
    tokenizers = {"LlamaTokenizer": LlamaTokenizer.from_pretrained(args.hf),
                  "LlamaTokenizerFast": LlamaTokenizerFast.from_pretrained(args.hf)}
    bad = 0
    with tempfile.TemporaryDirectory() as workdir:
        for text in TEXTS:
            ours = moelab_ids(args.moelab, os.path.join(args.hf, "tokenizer.model"), text, workdir)
            for name, tok in tokenizers.items():
                theirs = tok.encode(text, add_special_tokens=False)
                if theirs != ours:
                    bad += 1
                    print(f"hf-check: {name} differs on {text[:40]!r}: {theirs[:12]} vs moelab {ours[:12]}")
    print(f"hf-check: tokenizers from text: {len(TEXTS) * len(tokenizers) - bad} of {len(TEXTS) * len(tokenizers)} "
          f"(text, tokenizer) pairs give moelab's ids")
    return bad


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
    tokenizer_differences = check_tokenizers(args)
    sys.exit(0 if logp_diff <= args.tolerance and same_argmax and tokenizer_differences == 0 else 1)


if __name__ == "__main__":
    main()
