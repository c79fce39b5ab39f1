#!/usr/bin/python3
"""PyTorch reference for moelab's training throughput: the same architecture, shapes and optimizer, timed the
same way (mean wall time of full optimizer steps on random tokens after warm-up steps).

Run with Debian's PyTorch:
    /usr/bin/python3 bench/torch_reference.py --config configs/bench/dense-256.toml --threads 2 [--precision bf16]

The model follows moelab's defaults (src/config/config.h), read from the same TOML file:
  token embedding (tied with the output head), n_layers pre-norm blocks of
    RMSNorm -> qkv projection -> RoPE (rotate-half) on q, k -> causal softmax(q k^T / sqrt(hd)) v -> out projection
    RMSNorm -> FFN (GELU: fc1 -> gelu(erf) -> fc2; or SwiGLU) or, in MoE layers, a dropless token-choice MoE:
      router logits (N, E) -> softmax (fp32) -> top-k -> per expert: gather rows, fc1, act, fc2, weighted scatter-add
  final RMSNorm, logits, cross-entropy (+ aux balancing loss for MoE), no biases.
  AdamW (betas, eps, weight decay from [train]) after global-norm clipping.
bf16 uses torch.autocast(device, dtype=torch.bfloat16) with fp32 master weights, the usual PyTorch recipe.
--device cuda runs the same model eagerly on the GPU (PyTorch 2.x eager, the reference scripts/gpu-check.sh compares
moelab's cuda backend with; timing synchronises the device after each step).

Set up as its users would tune it: Debian's PyTorch sends fp32 matrix products to OpenBLAS through libblas.so.3,
which by default is the pthreads build, whose threads spin beside PyTorch's own OpenMP pool on the same cores. This
script re-executes itself with the OpenMP build of OpenBLAS loaded first (LD_PRELOAD of openblas-openmp's
libblas.so.3 and liblapack.so.3, package libopenblas0-openmp, installed by scripts/install-deps.sh --fixtures) and
OMP_NUM_THREADS = --threads, so both share one OpenMP pool; on dense-256 fp32 with 2 threads that ran 1.9x faster
than the pthreads default (2745 against 1444 tokens/s). --blas pthread keeps the default for comparison. The
RESULT line names the BLAS library that was loaded.

Output: one line `RESULT {json}` with tokens_per_s, step_ms and the settings, for bench/compare.
"""

import argparse
import json
import math
import os
import sys
import time

OPENMP_BLAS = "/usr/lib/x86_64-linux-gnu/openblas-openmp"


def use_openmp_blas():
    """Re-executes this script with OpenBLAS's OpenMP build loaded ahead of the default (see the docstring)."""
    if (os.environ.get("MOELAB_TORCH_REFERENCE_BLAS") or "--blas" in sys.argv and "pthread" in sys.argv
            or "cuda" in sys.argv):  # the GPU needs no BLAS
        return
    threads = "2"
    if "--threads" in sys.argv:
        threads = sys.argv[sys.argv.index("--threads") + 1]
    libs = [os.path.join(OPENMP_BLAS, n) for n in ("libblas.so.3", "liblapack.so.3")]
    if not all(os.path.exists(lib) for lib in libs):
        print("torch_reference: warning: OpenBLAS's OpenMP build is not installed (libopenblas0-openmp; "
              "scripts/install-deps.sh --fixtures); PyTorch's fp32 products use the pthreads build, whose threads "
              "fight PyTorch's OpenMP pool, so PyTorch's fp32 figures are understated", file=sys.stderr)
        return
    env = dict(os.environ, MOELAB_TORCH_REFERENCE_BLAS="openmp", OMP_NUM_THREADS=threads,
               LD_PRELOAD=":".join(libs + ([os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD") else [])))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


use_openmp_blas()

try:
    import tomllib  # Python 3.11+
except ImportError:  # pragma: no cover
    tomllib = None

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_toml(path):
    if tomllib is None:
        sys.exit("torch_reference: needs Python 3.11+ (tomllib)")
    with open(path, "rb") as f:
        return tomllib.load(f)


def apply_set(cfg, assignment):
    key, value = assignment.split("=", 1)
    section, name = key.split(".", 1)
    v = value.strip().strip('"')
    for conv in (int, float):
        try:
            v = conv(v)
            break
        except ValueError:
            pass
    if v in ("true", "false"):
        v = v == "true"
    cfg.setdefault(section, {})[name] = v


class Settings:
    def __init__(self, cfg):
        m, t, moe = cfg.get("model", {}), cfg.get("train", {}), cfg.get("moe", {})
        self.vocab = m.get("vocab_size", 8192)
        self.d_model = m.get("d_model", 256)
        self.n_layers = m.get("n_layers", 4)
        self.n_heads = m.get("n_heads", 4)
        self.d_ff = m.get("d_ff", 0) or 4 * self.d_model
        self.seq = m.get("seq_len", 256)
        self.ffn = m.get("ffn", "gelu")
        self.norm = m.get("norm", "rmsnorm")
        self.pos = m.get("pos", "rope")
        self.eps = m.get("norm_eps", 1e-5)
        self.rope_theta = m.get("rope_theta", 10000.0)
        if self.norm != "rmsnorm" or self.pos != "rope" or m.get("bias", False) or not m.get("tied_embeddings", True):
            sys.exit("torch_reference: only the default rmsnorm / rope / no-bias / tied model is implemented")
        self.batch = t.get("batch_size", 8)
        self.lr = t.get("lr", 3e-3)
        self.beta1, self.beta2 = t.get("beta1", 0.9), t.get("beta2", 0.95)
        self.adam_eps = t.get("adam_eps", 1e-8)
        self.weight_decay = t.get("weight_decay", 0.1)
        self.grad_clip = t.get("grad_clip", 1.0)
        expansion = moe.get("expansion", 0)
        self.granularity = moe.get("granularity", 1)
        self.top_k = moe.get("top_k", 2)
        if expansion > 0:
            self.experts = expansion * self.granularity
            self.top_k = self.top_k * self.granularity
        else:
            self.experts = moe.get("experts", 0)
        self.moe_every = moe.get("every", 1)
        self.aux_weight = moe.get("aux_loss_weight", 0.01)
        self.expert_hidden = self.d_ff // self.granularity
        if moe.get("capacity_factor", 0) or moe.get("router", "token_choice") != "token_choice" or \
                moe.get("shared_experts", 0) or moe.get("renormalize", False):
            sys.exit("torch_reference: only dropless token choice without shared experts is implemented")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Statistics in fp32 (as moelab does in both precisions).
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq, hd, theta):
    inv = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2.0 / hd)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x, cos, sin):  # x (B, H, T, hd), rotate-half
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.h, self.hd = s.n_heads, s.d_model // s.n_heads
        self.qkv = nn.Linear(s.d_model, 3 * s.d_model, bias=False)
        self.out = nn.Linear(s.d_model, s.d_model, bias=False)
        cos, sin = rope_tables(s.seq, self.hd, s.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("mask", torch.triu(torch.ones(s.seq, s.seq, dtype=torch.bool), 1), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, self.cos[:T], self.sin[:T]), apply_rope(k, self.cos[:T], self.sin[:T])
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).type_as(v)
        y = (probs @ v).transpose(1, 2).reshape(B, T, C)
        return self.out(y)


def activation(kind, h):
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class Mlp(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.kind = s.ffn
        width = 2 * s.d_ff if s.ffn == "swiglu" else s.d_ff
        self.fc1 = nn.Linear(s.d_model, width, bias=False)
        self.fc2 = nn.Linear(s.d_ff, s.d_model, bias=False)

    def forward(self, x):
        return self.fc2(activation(self.kind, self.fc1(x)))


class Moe(nn.Module):
    """Dropless token choice: sort-free loop over experts with index_select / index_add (the usual eager way)."""

    def __init__(self, s):
        super().__init__()
        self.kind, self.E, self.K = s.ffn, s.experts, s.top_k
        fe = s.expert_hidden
        p = 2 * fe if s.ffn == "swiglu" else fe
        self.router = nn.Linear(s.d_model, s.experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(s.experts, p, s.d_model) * 0.02)
        self.w2 = nn.Parameter(torch.randn(s.experts, s.d_model, fe) * 0.02)
        self.aux = None

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        with torch.autocast(flat.device.type, enabled=False):  # fp32 router
            logits = flat.float() @ self.router.weight.t()
            probs = torch.softmax(logits, dim=-1)
        topv, topi = probs.topk(self.K, dim=-1)
        out = torch.zeros_like(flat)
        counts = torch.bincount(topi.flatten(), minlength=self.E)
        self.aux = self.E * torch.sum(counts.float() / topi.numel() * probs.mean(0))
        for e in range(self.E):
            tok, slot = torch.nonzero(topi == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = flat.index_select(0, tok)
            h = activation(self.kind, xe @ self.w1[e].t().to(xe.dtype))
            ye = (h @ self.w2[e].t().to(h.dtype)) * topv[tok, slot, None].to(h.dtype)
            out.index_add_(0, tok, ye.to(out.dtype))
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, s, moe):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(s.d_model, s.eps), RMSNorm(s.d_model, s.eps)
        self.attn = Attention(s)
        self.ffn = Moe(s) if moe else Mlp(s)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Model(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.emb = nn.Embedding(s.vocab, s.d_model)
        self.blocks = nn.ModuleList(
            Block(s, s.experts > 0 and (i + 1) % s.moe_every == 0) for i in range(s.n_layers))
        self.norm = RMSNorm(s.d_model, s.eps)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets):
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        logits = F.linear(self.norm(x), self.emb.weight)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        aux = [b.ffn.aux for b in self.blocks if isinstance(b.ffn, Moe)]
        return loss, (sum(aux) if aux else None)


def loaded_blas():
    """The OpenBLAS library this process loaded (from /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libopenblas" in line})
    return paths[0] if paths else "none"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], help="override a config key, e.g. model.d_model=512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--blas", choices=["openmp", "pthread"], default="openmp",
                    help="OpenBLAS build for fp32 products: openmp (loaded first, the default) or Debian's pthreads "
                         "default")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    cfg = load_toml(args.config)
    for a in args.set:
        apply_set(cfg, a)
    s = Settings(cfg)
    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_reference: --device cuda but PyTorch sees no GPU")
    model = Model(s).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("emb")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("emb"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(s.beta1, s.beta2), eps=s.adam_eps)
    gen = torch.Generator().manual_seed(1)

    def step():
        tokens = torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen).to(device)
        targets = torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen).to(device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss, aux = model(tokens, targets)
            total = loss + s.aux_weight * aux if aux is not None else loss
        total.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, loss.item()

    for _ in range(args.warmup):
        step()
    seconds = [step()[0] for _ in range(args.steps)]
    step_s = sum(seconds) / len(seconds)
    result = {"tokens_per_s": s.batch * s.seq / step_s, "step_ms": 1e3 * step_s, "threads": args.threads,
              "precision": args.precision, "torch": torch.__version__,
              "params": sum(p.numel() for p in model.parameters()), "blas": loaded_blas(), "device": args.device}
    print(f"torch_reference: {args.config} {args.precision} {args.threads} threads: "
          f"{result['step_ms']:.1f} ms/step, {result['tokens_per_s']:.0f} tokens/s (BLAS {result['blas']})")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
