#!/usr/bin/env python3
"""One-way dependencies between moelab's source folders.

Reads the folder order written in docs/architecture.md (the line after `<!-- folder-order -->`, folders low to
high separated by `<`), then every `#include "folder/..."` under src/, and fails when
  - a folder includes a folder above it in that order (an upward include), or
  - the folders' include graph has a cycle (named, with one include line per edge), or
  - a folder under src/ is missing from the order.

  scripts/check-deps.py                         check the tree
  scripts/check-deps.py --plant FILE:HEADER     check it as if FILE (under src/) also included HEADER, to show the
                                                check fails on a planted cycle (CTest runs this and expects failure)
"""
import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z_0-9]+)/[^"]+"', re.M)


def read_order(doc):
    lines = doc.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "<!-- folder-order -->":
            for rest in lines[i + 1:]:
                if rest.strip() and not rest.strip().startswith("```"):
                    return [f.strip() for f in rest.split("<")]
    sys.exit(f"check-deps: {doc} has no '<!-- folder-order -->' line followed by 'core < config < ...'")


def include_edges(src, plant):
    """{(from_folder, to_folder): [(file, line_number), ...]} for includes across folders."""
    edges = {}
    files = sorted(p for p in src.rglob("*") if p.suffix in (".h", ".cpp", ".cu"))
    for path in files:
        rel = path.relative_to(src)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        text = path.read_text()
        if plant and plant[0] == str(rel):
            text += f'\n#include "{plant[1]}"\n'
        for number, line in enumerate(text.splitlines(), 1):
            m = INCLUDE.match(line)
            if m and m.group(1) != folder and (src / m.group(1)).is_dir():
                edges.setdefault((folder, m.group(1)), []).append((str(rel), number))
    return edges


def cycles(edges):
    """Strongly connected components with more than one folder (Tarjan)."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plant", help="FILE:HEADER, an include to add before checking (FILE relative to src/)")
    args = parser.parse_args()
    plant = tuple(args.plant.split(":", 1)) if args.plant else None
    src = ROOT / "src"
    order = read_order(ROOT / "docs" / "architecture.md")
    rank = {folder: i for i, folder in enumerate(order)}
    problems = []
    folders = sorted(p.name for p in src.iterdir() if p.is_dir())
    for folder in folders:
        if folder not in rank:
            problems.append(f"folder src/{folder}/ is not in the order in docs/architecture.md; add it there")
    edges = include_edges(src, plant)
    for component in cycles(edges):
        lines = []
        for (a, b), where in sorted(edges.items()):
            if a in component and b in component:
                lines.append(f"    {a} -> {b}: {where[0][0]}:{where[0][1]}")
        problems.append("folder cycle " + " <-> ".join(component) + ":\n" + "\n".join(lines))
    for (a, b), where in sorted(edges.items()):
        if a in rank and b in rank and rank[b] > rank[a]:
            sites = ", ".join(f"{f}:{n}" for f, n in where[:3])
            problems.append(f"upward include: {a} includes {b}, which is above it in the order ({sites})")
    if problems:
        print("check-deps: the folders' dependencies do not point one way:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        print("  order: " + " < ".join(order), file=sys.stderr)
        return 1
    print(f"check-deps: {len(edges)} folder-to-folder include edges, all downward in " + " < ".join(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
