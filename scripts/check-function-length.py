#!/usr/bin/env python3
"""No function in src/ longer than the limit (default 150 lines, from its signature to its closing brace).

  scripts/check-function-length.py                   check the tree
  scripts/check-function-length.py --plant LINES     check it as if src/ also held a function of LINES lines, to
                                                     show the check fails on a planted long function (CTest runs
                                                     this and expects failure)

Functions are found by a small C++ scanner: comments, string, raw-string and character literals are skipped; a brace
block whose header holds a parameter list, at namespace or class scope, is a function; lambdas and blocks inside a
function count toward it. scripts/function-length-exceptions.txt lists the functions allowed to be longer, one per
line as `path:function  reason`, each with its reason. An exception that no longer applies (the function got
shorter, or is gone) fails the check too, so the list only shrinks. Standard library only.
"""
import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXCEPTIONS = ROOT / "scripts" / "function-length-exceptions.txt"
SCOPE = re.compile(r"^\s*(template\s*<[^{]*>\s*)?(namespace|struct|class|union|enum)\b")
NAME = re.compile(r"(operator\s*\S+|~?[A-Za-z_][A-Za-z0-9_]*)\s*(<[^()]*>)?\s*$")


def blank(s):
    return re.sub(r"[^\n]", " ", s)


def strip(text):
    """The text with comments, string, raw-string and character literals blanked (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^(\s]*)\(', text[i:])
            end = text.find(")" + m.group(1) + '"', i) if m else -1
            j = n if end < 0 else end + len(m.group(1)) + 2
        elif c in "\"'" and not (c == "'" and i > 0 and text[i - 1].isalnum()):  # 1'000 is a digit separator
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(n, j + 1)
        else:
            out.append(c)
            i += 1
            continue
        out.append(blank(text[i:j]))
        i = j
    return "".join(out)


def functions(text):
    """(name, first line, last line) of every function defined in C++ source `text`."""
    text = strip(text)
    stack = []  # ("scope",), ("block",), ("init",) or ("function", name, first line)
    header_start, line, found = 0, 1, []
    for i, c in enumerate(text):
        if c == "\n":
            line += 1
        if c not in ";{}":
            continue
        in_function = any(k[0] == "function" for k in stack)
        in_init = any(k[0] == "init" for k in stack)
        keep_header = in_init
        if c == "{":
            header = text[header_start:i]
            if in_function or in_init:
                kind = ("block",)
            elif SCOPE.match(header) and "(" not in header:
                kind = ("scope",)
            elif re.search(r"\)\s*(noexcept\s*)?:(?!:)", header) and re.search(r"[A-Za-z0-9_>]\s*$", header):
                kind = ("init",)  # a member initialised with braces in a constructor's initialiser list
                keep_header = True
            elif ")" in header and not header.strip().startswith("="):
                m = NAME.search(header[: header.find("(")])
                first = line - header[len(header) - len(header.lstrip()):].count("\n")
                kind = ("function", m.group(1) if m else "?", first)
            else:
                kind = ("block",)
            stack.append(kind)
        elif c == "}" and stack:
            kind = stack.pop()
            if kind[0] == "function":
                found.append((kind[1], kind[2], line))
            keep_header = keep_header or kind[0] == "init"
        if not keep_header and not any(k[0] in ("function", "init") for k in stack):
            header_start = i + 1
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--plant", type=int, metavar="LINES", help="add a planted function of LINES lines")
    a = ap.parse_args()
    allowed = {}
    for number, raw in enumerate(EXCEPTIONS.read_text().splitlines() if EXCEPTIONS.exists() else [], 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        key, _, reason = entry.partition(" ")
        if not reason.strip():
            sys.exit(f"check-function-length: {EXCEPTIONS.name}:{number}: '{key}' gives no reason")
        allowed[key] = reason.strip()
    sources = {p.relative_to(ROOT).as_posix(): p.read_text(errors="replace")
               for p in sorted((ROOT / "src").rglob("*")) if p.suffix in (".cpp", ".h", ".cu", ".cuh")}
    if a.plant:
        sources["src/planted.cpp"] = "int planted(int x) {\n" + "  x += 1;\n" * (a.plant - 2) + "}\n"
    too_long, used = [], set()
    for rel, text in sources.items():
        for name, first, last in functions(text):
            if last - first + 1 <= a.limit:
                continue
            key = f"{rel}:{name}"
            if key in allowed:
                used.add(key)
            else:
                too_long.append(f"{rel}:{first}: {name} is {last - first + 1} lines (limit {a.limit})")
    stale = sorted(set(allowed) - used)
    for s in too_long:
        print("check-function-length: " + s, file=sys.stderr)
    for s in stale:
        print(f"check-function-length: the exception {s} no longer applies: remove it from {EXCEPTIONS.name}",
              file=sys.stderr)
    if too_long:
        print(f"check-function-length: split each function above into named steps, or list it in "
              f"scripts/{EXCEPTIONS.name} with the reason it must stay long", file=sys.stderr)
    if too_long or stale:
        sys.exit(1)
    print(f"check-function-length: every function under src/ is at most {a.limit} lines, but the {len(allowed)} "
          f"listed in scripts/{EXCEPTIONS.name}")


if __name__ == "__main__":
    main()
