"""The public data sets the built-in recipes train on: where each comes from, and how it becomes the recipe's JSONL.

A recipe names its data as `datasets:NAME/FILE` (e.g. `datasets:summarization_scitldr/train.jsonl`), read from the data
folder: `--data-dir DIR`, else `$TUNESMITH_DATA_DIR`, else `~/.cache/tunesmith/data` (`$TUNESMITH_CACHE/data`). Any
folder that holds `NAME/FILE` will do, so a copy made on another machine is used as it is.

`tunesmith data get NAME` fills it: it downloads the upstream files at a fixed commit, checks their SHA-256 (where the
file's bytes are fixed; GitHub's on-request tarballs are not, so there only the outputs are checked), converts them
(the converters below: the same splits, seeds and cleaning the recipes' figures were measured on), and checks the
SHA-256 of every file it writes before it moves it into place. Own code because each upstream has its own layout; the
work is reading a few files, so the standard library does it (urllib, tarfile, gzip, json).
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tunesmith.errors import TunesmithError
from tunesmith.paths import cache_root
from tunesmith.run.files import sha256_of

PREFIX = "datasets:"
ENV = "TUNESMITH_DATA_DIR"


@dataclass(frozen=True)
class Download:
    url: str
    file: str                      # its name in the download folder, as the converter reads it
    sha256: Optional[str] = None   # None: bytes GitHub builds on request (an archive); the outputs are checked instead


@dataclass(frozen=True)
class Source:
    name: str                      # the folder under the data dir
    origin: str                    # repository + commit (or hub id) + files, one line
    license: str
    columns: str                   # the fields each record holds and what the recipes map them to
    recipes: tuple[str, ...]
    downloads: tuple[Download, ...]
    convert: Callable[[Path], dict[str, list[dict]]]   # the download folder -> {"train.jsonl": rows, ...}
    outputs: dict[str, str] = field(default_factory=dict)   # file -> SHA-256 of what `convert` writes


# ---------------------------------------------------------------- where the data lives

def data_dir() -> Path:
    """The folder `datasets:` paths are read from (`--data-dir` sets $TUNESMITH_DATA_DIR for the process)."""
    root = os.environ.get(ENV)
    return Path(root).expanduser() if root else cache_root() / "data"


def resolve(spec: str) -> Path:
    """`datasets:NAME/FILE` -> DATA_DIR/NAME/FILE; a missing one stops with the command that fetches it."""
    rel = spec[len(PREFIX):].strip("/")
    name = rel.split("/", 1)[0]
    if not name or ".." in Path(rel).parts:
        raise TunesmithError(f"{spec!r}: expected {PREFIX}NAME/FILE, e.g. {PREFIX}summarization_scitldr/train.jsonl")
    root = data_dir()
    path = root / rel
    if not path.exists():
        fetch = (f"run `tunesmith data get {name}`" if name in SOURCES
                 else f"no built-in source is named {name!r} (`tunesmith data sources` lists them)")
        raise TunesmithError(f"data set {name!r} is missing: no {path} ({spec}); {fetch}, or point tunesmith at a folder "
                             f"holding {rel} with --data-dir DIR or {ENV}=DIR")
    return path


def check_present(*specs) -> None:
    """Stop at once (before a model loads or a run folder is made) if a `datasets:` path among data.path / val_path
    specs is missing."""
    for spec in specs:
        for s in [spec] if isinstance(spec, str) else list(spec or ()):
            if s.startswith(PREFIX):
                resolve(s)


# ---------------------------------------------------------------- fetching

def urllib_fetch(url: str, dest: Path) -> None:
    """Download `url` to `dest` (streamed)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:  # URLError, timeouts, refused connections
        raise TunesmithError(f"cannot download {url}: {getattr(e, 'reason', e)} (no network? copy the data set folder "
                             f"from a machine that has one and point --data-dir or {ENV} at its parent)") from None


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def get(name: str, root: Optional[Path] = None, fetch: Callable[[str, Path], None] = urllib_fetch,
        source: Optional[Source] = None, log: Callable[[str], None] = print) -> Path:
    """Download, check, convert and write data set `name` into `root/name` (default: `data_dir()`). Files already there
    with the expected checksums are kept; nothing is moved into place unless every output checks."""
    src = source or SOURCES.get(name)
    if src is None:
        raise TunesmithError(f"no data set named {name!r}; available: {', '.join(SOURCES)}")
    out = (root or data_dir()) / src.name
    if src.outputs and all((out / f).is_file() and sha256_of(out / f) == h for f, h in src.outputs.items()):
        log(f"{src.name}: already in {out} (checksums match)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{src.name}-") as tmp:
        work = Path(tmp)
        downloads = work / "downloads"
        downloads.mkdir()
        for d in src.downloads:
            log(f"{src.name}: downloading {d.url}")
            fetch(d.url, downloads / d.file)
            if d.sha256 and (got := sha256_of(downloads / d.file)) != d.sha256:
                raise TunesmithError(f"{d.url}: SHA-256 {got}, expected {d.sha256}; nothing written")
        files = src.convert(downloads)
        staged = work / "out"
        staged.mkdir()
        for fname, rows in files.items():
            (staged / fname).write_bytes(jsonl_bytes(rows))
            want = src.outputs.get(fname)
            if want and (got := sha256_of(staged / fname)) != want:
                raise TunesmithError(f"{src.name}/{fname}: the converted file's SHA-256 is {got}, expected {want} "
                                     f"(upstream changed?); nothing written")
            log(f"{src.name}/{fname}: {len(rows)} records")
        (staged / "SOURCE.md").write_text(f"# {src.name}\n\nOrigin: {src.origin}\n\nLicense: {src.license}\n\n"
                                          f"Fields: {src.columns}\n\nWritten by `tunesmith data get {src.name}`.\n",
                                          encoding="utf-8")
        out.mkdir(exist_ok=True)
        for f in staged.iterdir():
            os.replace(f, out / f.name)  # same file system: each file appears whole
    log(f"{src.name}: written to {out}")
    return out


# ---------------------------------------------------------------- converters

def _split(rows: list, *fractions_or_counts) -> list[list]:
    parts, start = [], 0
    for k in fractions_or_counts:
        parts.append(rows[start:start + k])
        start += k
    parts.append(rows[start:])
    return parts


def convert_scitldr(folder: Path) -> dict[str, list[dict]]:
    """SciTLDR-A: the abstract's sentences joined by single spaces -> `document`; the first reference TL;DR ->
    `summary`, all of them -> `all_summaries`. Official train -> train.jsonl, official dev -> test.jsonl (the official
    test split stays unused here, as a final holdout)."""
    def rows(path: Path, split: str) -> list[dict]:
        out = []
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            r = json.loads(line)
            targets = [t.strip() for t in r["target"]]
            out.append({"id": r["paper_id"], "title": r.get("title"),
                        "document": " ".join(s.strip() for s in r["source"] if s.strip()),
                        "summary": targets[0], "all_summaries": targets, "source_split": split})
        return out

    return {"train.jsonl": rows(folder / "train.jsonl", "train"), "test.jsonl": rows(folder / "dev.jsonl", "dev")}


def convert_hh_harmless(folder: Path) -> dict[str, list[dict]]:
    """HH-RLHF harmless-base test pairs: the conversation up to the last `\\n\\nAssistant:` (the same in both answers)
    -> `prompt`, the two final turns -> `chosen` / `rejected`; pairs whose prefixes differ or whose final turns are
    equal or empty are dropped. Shuffled with random.Random(0): 15 % holdout (not written), 15 % test, the rest train."""
    marker = "\n\nAssistant:"
    pairs = []
    with gzip.open(folder / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    for i, line in enumerate(lines):
        r = json.loads(line)
        c, j = r["chosen"], r["rejected"]
        ic, ij = c.rfind(marker), j.rfind(marker)
        prefix = c[:ic + len(marker)]
        if ic < 0 or prefix != j[:ij + len(marker)]:
            continue
        chosen, rejected = c[ic + len(marker):].strip(), j[ij + len(marker):].strip()
        if not chosen or not rejected or chosen == rejected:
            continue
        prompt = prefix.strip()
        pairs.append({"id": f"hh_harmless_test_{i:04d}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "num_human_turns": prompt.count("Human:")})
    random.Random(0).shuffle(pairs)
    k = int(0.15 * len(pairs))
    _holdout, test, train = _split(pairs, k, k)
    return {"train.jsonl": train, "test.jsonl": test}


VADER_DOMAINS = (("tweets", "tweets"), ("movie_reviews", "movieReviewSnippets"),
                 ("product_reviews", "amazonReviewSnippets"), ("nyt_editorials", "nytEditorialSnippets"))


def convert_vader(folder: Path) -> dict[str, list[dict]]:
    """VADER's ICWSM-14 ground truth: the snippet (HTML entities unescaped) -> `text`; the mean rating -> `score`
    (rounded to 4 places) and `label` (positive >= 0.5, negative <= -0.5, else neutral); `score_std` and `n_raters`
    from the ratings file. Duplicates (lower-cased, whitespace-normalised) dropped. Per domain, shuffled with one
    random.Random(0): the first 10 % holdout (not written), the next 10 % test, the rest train."""
    members = {}
    with tarfile.open(folder / "hutto_ICWSM_2014.tar.gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.endswith(("_GroundTruth.txt", "_anonDataRatings.txt")):
                members[Path(m.name).name] = tar.extractfile(m).read().decode("utf-8-sig")

    def lines(name: str) -> list[str]:
        return [ln for ln in members[name].replace("\r\n", "\n").split("\n") if ln.strip()]

    seen, per_domain = set(), {}
    for domain, stem in VADER_DOMAINS:
        ratings = {}
        for ln in lines(f"{stem}_anonDataRatings.txt"):
            cols = ln.split("\t")
            ratings[cols[0].strip()] = (float(cols[2]), len(ast.literal_eval(cols[3])))
        rows = []
        for ln in lines(f"{stem}_GroundTruth.txt"):
            sid, score, text = ln.split("\t", 2)
            text = html.unescape(text).strip()
            key = " ".join(text.lower().split())
            if key in seen:
                continue
            seen.add(key)
            score = float(score)
            std, n = ratings[sid.strip()]
            rows.append({"id": f"{domain}_{sid.strip()}", "text": text,
                         "label": "positive" if score >= 0.5 else "negative" if score <= -0.5 else "neutral",
                         "score": round(score, 4), "score_std": std, "n_raters": n, "domain": domain})
        per_domain[domain] = rows
    rng, train, test = random.Random(0), [], []
    for domain, _ in VADER_DOMAINS:
        rows = per_domain[domain]
        rng.shuffle(rows)
        k = int(0.1 * len(rows))
        _holdout, t, rest = _split(rows, k, k)
        test += t
        train += rest
    return {"train.jsonl": train, "test.jsonl": test}


KJV_INSTRUCTION = ("Rewrite the following Bible verse, given in modern English (World English Bible), in the archaic "
                   "style of the King James Version.")


def convert_bible(folder: Path) -> dict[str, list[dict]]:
    """StyleTransferBibleData's WEB and KJV chapter files (`Data/Bibles/{WEB,KJV}/<Book>/<Book><n>.txt`, one
    `<verse> <text>` line per verse, whitespace normalised): a verse in both, non-empty and not identical, becomes
    {instruction, input: WEB, output: KJV}. Books (by name) shuffled with random.Random(0); books of <= 1200 verses
    go to a holdout (not written) until it holds 1500 verses; the other books' verses, shuffled by the same generator
    (after it drew the holdout's 1000), give test (first 1000) and train (next 8000)."""
    pattern = re.compile(r"(?:^|/)Data/Bibles/(WEB|KJV)/([^/]+)/([^/]+)\.txt$")
    chapters: dict[tuple[str, str], dict[str, str]] = {}   # (version, book) -> chapter file stem -> text
    with tarfile.open(folder / "bible.tar.gz") as tar:
        for m in tar:
            hit = pattern.search(m.name) if m.isfile() else None
            if hit and re.fullmatch(re.escape(hit[2]) + r"\d+", hit[3]):
                chapters.setdefault((hit[1], hit[2]), {})[hit[3]] = tar.extractfile(m).read().decode("utf-8-sig")

    def verses(version: str, book: str) -> dict[tuple[int, int], str]:
        out = {}
        for stem in sorted(chapters.get((version, book), {})):   # file-name order, as a folder listing sorts
            ch = int(stem[len(book):])
            for line in chapters[(version, book)][stem].split("\n"):
                num, _, text = line.strip().partition(" ")
                if num.isdigit():
                    out[(ch, int(num))] = " ".join(text.split())
        return out

    by_book = {}
    for book in sorted({b for v, b in chapters if v == "WEB"}):
        web, kjv = verses("WEB", book), verses("KJV", book)
        rows = [{"id": f"{book}.{ch}.{v}", "instruction": KJV_INSTRUCTION, "input": web[(ch, v)], "output": kjv[(ch, v)],
                 "book": book, "chapter": ch, "verse": v, "source_style": "WEB", "target_style": "KJV"}
                for (ch, v) in web if kjv.get((ch, v)) and web[(ch, v)] and web[(ch, v)] != kjv[(ch, v)]]
        if rows:
            by_book[book] = rows
    rng = random.Random(0)
    books = list(by_book)
    rng.shuffle(books)
    holdout, n = [], 0
    for book in books:
        if n >= 1500:
            break
        if len(by_book[book]) <= 1200:
            holdout.append(book)
            n += len(by_book[book])
    held = [r for b in holdout for r in by_book[b]]
    rng.shuffle(held)   # the holdout's 1000 verses (not written); drawn here so the generator reaches the next step as it did
    shared = [r for b in by_book if b not in holdout for r in by_book[b]]
    rng.shuffle(shared)
    return {"train.jsonl": shared[1000:9000], "test.jsonl": shared[:1000]}


# ---------------------------------------------------------------- the registry

def _raw(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


SCITLDR_COMMIT = "5ccad9c00a60ad75c9e04abf7f27d0f53f983b20"
HH_COMMIT = "354e5c3cb8960630860dd5774a6ac2a58313bf4d"
VADER_COMMIT = "44fc044cd877310ee8278a0eadf34bcd50d41d06"
BIBLE_COMMIT = "1c6c8eec242d496c40531d740cd0d57f5f195d05"

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source(
        name="summarization_scitldr",
        origin=f"GitHub allenai/scitldr @ {SCITLDR_COMMIT}, SciTLDR-Data/SciTLDR-A/{{train,dev}}.jsonl "
               f"(Cachola et al. 2020, \"TLDR: Extreme Summarization of Scientific Documents\")",
        license="Apache-2.0",
        columns="id, title, document (the abstract), summary (first reference TL;DR), all_summaries (every reference), "
                "source_split; recipes map instruction <- document, output <- summary, references <- all_summaries",
        recipes=("tldr", "tldr-grpo"),
        downloads=(Download(_raw("allenai/scitldr", SCITLDR_COMMIT, "SciTLDR-Data/SciTLDR-A/train.jsonl"), "train.jsonl",
                            "b222771d387be585cfdf5ae957b36757138415a352e0a3e3b23f73f87c3b1119"),
                   Download(_raw("allenai/scitldr", SCITLDR_COMMIT, "SciTLDR-Data/SciTLDR-A/dev.jsonl"), "dev.jsonl",
                            "3191fa98ccc09521332b7a1cd63b1930be4e8df125a235ccd31e40329709525e")),
        convert=convert_scitldr,
        outputs={"train.jsonl": "73aa085393b53ede7e2214f94a49f672098ec93ccd14426538f4fc4290421be7",
                 "test.jsonl": "8c280916e62b263d5f793ae53f559e60ed51a2b311ffec6c42bfa582cca6544c"}),
    Source(
        name="style_bible_web_to_kjv",
        origin=f"GitHub keithecarlson/StyleTransferBibleData @ {BIBLE_COMMIT}, Data/Bibles/{{WEB,KJV}}/<Book>/<Book><n>.txt "
               f"(Carlson, Riddell & Rockmore 2018, \"Evaluating prose style transfer with the Bible\")",
        license="the texts are public domain (World English Bible; King James Version); the repository states no license",
        columns="id (Book.chapter.verse), instruction (fixed text), input (WEB verse), output (KJV verse), book, chapter, "
                "verse, source_style, target_style; the kjv recipe's text template reads instruction / input / output",
        recipes=("kjv",),
        downloads=(Download(f"https://codeload.github.com/keithecarlson/StyleTransferBibleData/tar.gz/{BIBLE_COMMIT}",
                            "bible.tar.gz"),),
        convert=convert_bible,
        outputs={"train.jsonl": "91b26056b1b1a6dd6c5d314208229a1f77b7f8a1e8d8749ce2ce01f75e94b596",
                 "test.jsonl": "daa3ff5b3136bf956d220b8a5c0595892b6bf92b02e83d9bb28766e75228165d"}),
    Source(
        name="sentiment_vader",
        origin=f"GitHub cjhutto/vaderSentiment @ {VADER_COMMIT}, additional_resources/hutto_ICWSM_2014.tar.gz "
               f"(Hutto & Gilbert 2014, \"VADER\", ICWSM-14: human-rated snippets)",
        license="MIT (cite the ICWSM-14 paper)",
        columns="id, text, label (positive >= 0.5, negative <= -0.5, else neutral, from the mean rating), score (mean "
                "rating in [-4, 4]), score_std, n_raters, domain; the sentiment recipe reads text and label",
        recipes=("sentiment",),
        downloads=(Download(_raw("cjhutto/vaderSentiment", VADER_COMMIT, "additional_resources/hutto_ICWSM_2014.tar.gz"),
                            "hutto_ICWSM_2014.tar.gz",
                            "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"),),
        convert=convert_vader,
        outputs={"train.jsonl": "745a5ac1d3caf8641b4841b73ff48b83df6558e7266ece2b4b815388d2bd0365",
                 "test.jsonl": "70431e7455b597f701db01051bee2aa0ecc8d69d5ff6f8277db9faf8d9ef00ad"}),
    Source(
        name="preference_hh_harmless",
        origin=f"GitHub anthropics/hh-rlhf @ {HH_COMMIT}, harmless-base/test.jsonl.gz "
               f"(Bai et al. 2022, \"Training a Helpful and Harmless Assistant with RLHF\"; red-teaming content)",
        license="MIT",
        columns="id, prompt (the conversation, Human:/Assistant: turns, ending with Assistant:), chosen (the less harmful "
                "final answer), rejected, num_human_turns; the hh-* recipes read prompt / chosen / rejected",
        recipes=("hh-dpo", "hh-reward", "hh-grpo"),
        downloads=(Download(_raw("anthropics/hh-rlhf", HH_COMMIT, "harmless-base/test.jsonl.gz"), "test.jsonl.gz",
                            "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"),),
        convert=convert_hh_harmless,
        outputs={"train.jsonl": "7ca6afc2327a71e25b3abc68794ebae154cd502a2edfa7a10ab6b12fdfec9e94",
                 "test.jsonl": "37853f43e9b6084820a3eb3154fa47da77f9970ed3c47f562ed1fad95032c3e7"}),
)}
