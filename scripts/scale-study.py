#!/usr/bin/python3
"""Scales one of the quickstart's study specs to a time budget (scripts/quickstart.sh --hours H).

The default study (configs/study/*.toml) trains every configuration with 4 seeds in about DEFAULT_MINUTES of
training on 2 cores (measured: docs/report.md). Given H hours, this keeps the design and spends the time on
  * more seeds: 6 once H >= 2 (the t interval's width falls from 3.18 / sqrt(4) to 2.57 / sqrt(6) seed sd), and
  * larger budgets: every FLOP budget times F, with F = available time / (default time x seeds / 4), and every
    IsoFLOP and granularity shape widened by F^(1/4) (N* grows as C^(1/2), N as d^2), rounded to a multiple of 4,
    so that each ladder still brackets its budget's optimum; the learning-rate rule follows d_model.
The fixed-parameter spec scales the same way: its budget by F, its total parameters N by F^(1/2) and its shapes
by F^(1/4), so its runs' tokens grow by about F^(1/2) as the IsoFLOP runs' do (faster for the narrowest, sparsest
shapes, whose FLOPs are mostly embedding and attention: at --hours 3 the 64-expert arm needs more tokens than the
default corpus holds and the planner leaves it out; keeping N would have left out the 32-expert arm too).
Prints the scaled spec on stdout and the plan (F, seeds, ETA) on stderr. Standard library only.
"""
import argparse
import math
import re
import sys

DEFAULT_MINUTES = 23.0  # training minutes of the default study on 2 cores, --jobs 2 (measured: docs/report.md)
BASE_SEEDS = 4          # the default study's seeds


def scale_numbers(text, key, factor, fmt):
    """Multiplies every number of `key = [ ... ]` arrays (one line) by factor."""
    def repl(m):
        values = [fmt(float(v) * factor) for v in m.group(2).split(",") if v.strip()]
        return m.group(1) + ", ".join(values) + "]"
    return re.sub(r"^(\s*" + re.escape(key) + r"\s*=\s*\[)([^\]]*)\]", repl, text, flags=re.M)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--hours", type=float, required=True)
    a = ap.parse_args()
    if a.hours <= 0:
        sys.exit("scale-study: --hours must be positive")
    text = open(a.spec, encoding="utf-8").read()
    seeds = 6 if a.hours >= 2 else BASE_SEEDS
    available = a.hours * 60  # training minutes (the default's rate was measured with --jobs 2 on 2 cores)
    factor = max(1.0, available / (DEFAULT_MINUTES * seeds / BASE_SEEDS))
    widen = factor ** 0.25
    fixed = re.search(r'^kind\s*=\s*"fixed_params"', text, flags=re.M) is not None
    text = scale_numbers(text, "budgets", factor, lambda v: "%.3g" % v)
    if fixed:
        text = scale_numbers(text, "params", math.sqrt(factor), lambda v: "%.3g" % v)
    text = re.sub(r"^(d_model\s*=\s*)(\d+)", lambda m: m.group(1) + str(max(8, 4 * round(int(m.group(2)) * widen / 4))),
                  text, flags=re.M)
    text = re.sub(r"^seeds\s*=\s*\[[^\]]*\]", "seeds = [" + ", ".join(str(s) for s in range(1, seeds + 1)) + "]",
                  text, flags=re.M)
    header = ("# Scaled by scripts/scale-study.py from %s for --hours %g: budgets x %.3g, %sd_model x %.3g, %d seeds.\n"
              % (a.spec, a.hours, factor, "params x %.3g, " % math.sqrt(factor) if fixed else "", widen, seeds))
    sys.stdout.write(header + text)
    print("scale-study: %s: budgets x %.3g, %d seeds (the default study: %d min of training, %d seeds; this one: about "
          "%.0f min on 2 cores)" % (a.spec, factor, seeds, DEFAULT_MINUTES, BASE_SEEDS,
                                    DEFAULT_MINUTES * seeds / BASE_SEEDS * factor),
          file=sys.stderr)


if __name__ == "__main__":
    main()
