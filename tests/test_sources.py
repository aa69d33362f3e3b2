"""The public data sets behind the built-in recipes (data/sources.py): each converter on small files laid out as
upstream's, `tunesmith data get` with the download replaced by a copy of those files (the checksums and the
conversion are the real code), and a missing data set stopping a recipe in one line that names the command."""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import re
import tarfile

import pytest

from tunesmith.cli.main import main
from tunesmith.config import list_recipes, load_config
from tunesmith.data import sources
from tunesmith.errors import TunesmithError


def _tar_gz(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _scitldr_files(folder):
    folder.mkdir(exist_ok=True)
    train = [{"paper_id": "p1", "title": "T1", "source": ["First sentence\n", "goes on.", "  ", " Second one. "],
              "target": ["A TL;DR. "]},
             {"paper_id": "p2", "title": "T2", "source": ["Only  one  sentence."], "target": ["Short.", "Other."]}]
    dev = [{"paper_id": "d1", "title": "D1", "source": ["Dev abstract."], "target": [" Ref one.", "Ref two. "]}]
    (folder / "train.jsonl").write_text(_jsonl(train), encoding="utf-8")
    (folder / "dev.jsonl").write_text(_jsonl(dev) + "\n", encoding="utf-8")


def test_scitldr_joins_the_sentences_and_keeps_every_reference(tmp_path):
    _scitldr_files(tmp_path)
    out = sources.convert_scitldr(tmp_path)
    assert [r["id"] for r in out["train.jsonl"]] == ["p1", "p2"]
    first = out["train.jsonl"][0]
    assert first["document"] == "First sentence goes on. Second one."   # each stripped, blank ones dropped
    assert first["summary"] == "A TL;DR." and first["all_summaries"] == ["A TL;DR."]
    assert out["train.jsonl"][1]["document"] == "Only  one  sentence."
    assert out["test.jsonl"] == [{"id": "d1", "title": "D1", "document": "Dev abstract.", "summary": "Ref one.",
                                  "all_summaries": ["Ref one.", "Ref two."], "source_split": "dev"}]


def test_hh_pairs_share_the_prompt_and_drop_what_cannot_be_a_pair(tmp_path):
    rows = []
    for i in range(40):
        prompt = f"\n\nHuman: question {i}?\n\nAssistant: earlier\n\nHuman: more {i}?\n\nAssistant:"
        rows.append({"chosen": prompt + f" safe {i}", "rejected": prompt + f" unsafe {i}"})
    rows[3]["rejected"] = "\n\nHuman: another conversation\n\nAssistant: x"      # prefixes differ
    rows[5]["rejected"] = rows[5]["chosen"]                                       # same final turn
    rows[7]["chosen"] = rows[7]["chosen"].rsplit(" safe", 1)[0] + "   "          # empty final turn
    with gzip.open(tmp_path / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(_jsonl(rows))
    out = sources.convert_hh_harmless(tmp_path)
    kept = out["train.jsonl"] + out["test.jsonl"]
    ids = {r["id"] for r in kept}
    assert not ids & {"hh_harmless_test_0003", "hh_harmless_test_0005", "hh_harmless_test_0007"}
    assert len(out["test.jsonl"]) == int(0.15 * 37) and len(out["train.jsonl"]) == 37 - 2 * int(0.15 * 37)
    assert len(ids) == len(kept)
    pair = next(r for r in kept if r["id"] == "hh_harmless_test_0012")
    assert pair["prompt"] == "Human: question 12?\n\nAssistant: earlier\n\nHuman: more 12?\n\nAssistant:"
    assert (pair["chosen"], pair["rejected"], pair["num_human_turns"]) == ("safe 12", "unsafe 12", 2)


def _vader_archive(path):
    files = {}
    for domain, stem in sources.VADER_DOMAINS:
        truth, ratings = [], []
        for i in range(1, 31):
            sid = f"{i}" if domain in ("tweets", "movie_reviews") else f"1_{i}"
            score = (-2.0, 0.0, 0.49, 0.5, -0.5, 3.25)[i % 6]
            text = f"{domain} snippet {i} &amp; more" if i != 30 else "Shared  Text"   # i=30: the same in every domain
            truth.append(f"{sid}\t{score}\t{text}")
            ratings.append(f"{sid}\t{score}\t0.5\t{[1, 2, 3][: 1 + i % 3]}")
        bom = "\ufeff" if domain == "product_reviews" else ""
        files[f"hutto_ICWSM_2014/{stem}_GroundTruth.txt"] = (bom + "\r\n".join(truth) + "\r\n").encode("utf-8")
        files[f"hutto_ICWSM_2014/{stem}_anonDataRatings.txt"] = (bom + "\n".join(ratings)).encode("utf-8")
    files["hutto_ICWSM_2014/vader_sentiment_lexicon.txt"] = b"\xde\xad not utf-8"   # read by nobody
    _tar_gz(path / "hutto_ICWSM_2014.tar.gz", files)


def test_vader_labels_by_the_mean_rating_and_splits_each_domain(tmp_path):
    _vader_archive(tmp_path)
    out = sources.convert_vader(tmp_path)
    rows = out["train.jsonl"] + out["test.jsonl"]
    assert sum(r["text"] == "Shared  Text" for r in rows) <= 1 and len(rows) < 4 * 30   # deduplicated across domains
    for domain, _ in sources.VADER_DOMAINS:
        n = 29 + (domain == "tweets")                  # the shared text is kept once, in the first domain
        test = [r for r in out["test.jsonl"] if r["domain"] == domain]
        train = [r for r in out["train.jsonl"] if r["domain"] == domain]
        assert len(test) == int(0.1 * n) and len(train) == n - 2 * int(0.1 * n)   # 10 % holdout not written
    by_score = {r["score"]: r["label"] for r in rows}
    assert by_score == {-2.0: "negative", 0.0: "neutral", 0.49: "neutral", 0.5: "positive", -0.5: "negative",
                        3.25: "positive"}
    r = next(r for r in rows if r["id"] == "movie_reviews_7")
    assert r["text"] == "movie_reviews snippet 7 & more" and r["n_raters"] == 2 and r["score_std"] == 0.5
    assert any(r["id"].startswith("product_reviews_1_") for r in rows)


def _bible_archive(path):
    """Six books: two long ones (over 1200 verses, never held out) and four of 700 verses."""
    files, top = {}, "StyleTransferBibleData-abc/Data/Bibles"
    books = {"Alpha": 1300, "Beta": 700, "Gamma": 700, "Delta": 700, "Epsilon": 1250, "Zeta": 700}
    for book, n in books.items():
        for version in ("WEB", "KJV"):
            for ch in range(1, 11):   # 10 chapters: Book1, Book10, Book2, ... in file-name order
                lines = [f"{v} {version.lower()} {book} {ch}:{v}  text" for v in range(1, n // 10 + 1)]
                if book == "Beta" and ch == 1:
                    lines[0] = "1 identical in both"                        # dropped: nothing to learn
                    if version == "KJV":
                        lines = lines[:-1]                                   # dropped: the last verse only in WEB
                files[f"{top}/{version}/{book}/{book}{ch}.txt"] = ("\n".join(lines) + "\n").encode("utf-8")
    files[f"{top}/WEB/Beta/notes.txt"] = b"not a chapter"
    _tar_gz(path / "bible.tar.gz", files)
    return books


def test_bible_pairs_verses_and_holds_out_whole_books(tmp_path):
    _bible_archive(tmp_path)
    out = sources.convert_bible(tmp_path)
    train, test = out["train.jsonl"], out["test.jsonl"]
    assert len(test) == 1000 and not {r["id"] for r in train} & {r["id"] for r in test}
    used = {r["book"] for r in train + test}
    assert {"Alpha", "Epsilon"} <= used                  # over 1200 verses: never held out
    held = {"Beta", "Gamma", "Delta", "Zeta"} - used
    assert len(held) == 3                                # short books held out until 1500 verses (3 x ~700)
    assert len(train) == sum({"Alpha": 1300, "Epsilon": 1250, "Beta": 698, "Gamma": 700, "Delta": 700,
                              "Zeta": 700}[b] for b in used) - 1000
    r = next(r for r in train + test if r["id"] == "Alpha.10.3")
    assert (r["input"], r["output"], r["chapter"], r["verse"]) == ("web Alpha 10:3 text", "kjv Alpha 10:3 text", 10, 3)
    assert r["instruction"] == sources.KJV_INSTRUCTION


@pytest.fixture
def scitldr_source(tmp_path):
    """The registry's SciTLDR entry with its downloads served from small local files (checksums of those files)."""
    upstream = tmp_path / "upstream"
    _scitldr_files(upstream)
    src = sources.SOURCES["summarization_scitldr"]
    downloads = tuple(dataclasses.replace(d, sha256=sources.sha256_of(upstream / d.file)) for d in src.downloads)
    converted = sources.convert_scitldr(upstream)
    outputs = {f: __import__("hashlib").sha256(sources.jsonl_bytes(rows)).hexdigest() for f, rows in converted.items()}
    fetched = []

    def fetch(url, dest):
        fetched.append(url)
        dest.write_bytes((upstream / url.rsplit("/", 1)[1]).read_bytes())

    return dataclasses.replace(src, downloads=downloads, outputs=outputs), fetch, fetched


def test_get_downloads_checks_converts_and_keeps_what_is_already_there(tmp_path, scitldr_source):
    src, fetch, fetched = scitldr_source
    out = sources.get(src.name, tmp_path / "data", fetch=fetch, source=src, log=lambda m: None)
    assert out == tmp_path / "data" / "summarization_scitldr"
    assert sorted(p.name for p in out.iterdir()) == ["SOURCE.md", "test.jsonl", "train.jsonl"]
    assert [json.loads(ln)["id"] for ln in (out / "train.jsonl").read_text().splitlines()] == ["p1", "p2"]
    assert "allenai/scitldr" in (out / "SOURCE.md").read_text()
    assert len(fetched) == 2 and all(u.startswith("https://raw.githubusercontent.com/allenai/scitldr/") for u in fetched)
    sources.get(src.name, tmp_path / "data", fetch=fetch, source=src, log=lambda m: None)
    assert len(fetched) == 2                               # checksums match: nothing downloaded again
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]   # no staging folder left


def test_a_download_or_a_conversion_with_the_wrong_checksum_writes_nothing(tmp_path, scitldr_source):
    src, fetch, _ = scitldr_source
    bad_download = dataclasses.replace(src, downloads=(dataclasses.replace(src.downloads[0], sha256="0" * 64),
                                                       src.downloads[1]))
    with pytest.raises(TunesmithError, match=r"train.jsonl: SHA-256 [0-9a-f]{64}, expected 0{64}; nothing written"):
        sources.get(src.name, tmp_path, fetch=fetch, source=bad_download, log=lambda m: None)
    bad_output = dataclasses.replace(src, outputs={**src.outputs, "test.jsonl": "1" * 64})
    with pytest.raises(TunesmithError, match="summarization_scitldr/test.jsonl: the converted file's SHA-256"):
        sources.get(src.name, tmp_path, fetch=fetch, source=bad_output, log=lambda m: None)
    assert not (tmp_path / "summarization_scitldr").exists() or not any((tmp_path / "summarization_scitldr").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_network_is_one_clear_line(tmp_path):
    with pytest.raises(TunesmithError, match=r"cannot download http://127.0.0.1:9/x.tar.gz: .+ \(no network\? copy the "
                                             r"data set folder .+ point --data-dir or TUNESMITH_DATA_DIR at its parent\)"):
        sources.urllib_fetch("http://127.0.0.1:9/x.tar.gz", tmp_path / "x.tar.gz")   # port 9: nothing listens


def test_datasets_paths_resolve_against_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_DIR", str(tmp_path))
    (tmp_path / "sentiment_vader").mkdir()
    (tmp_path / "sentiment_vader" / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    assert sources.resolve("datasets:sentiment_vader/train.jsonl") == tmp_path / "sentiment_vader" / "train.jsonl"
    with pytest.raises(TunesmithError) as e:
        sources.resolve("datasets:sentiment_vader/test.jsonl")
    assert "run `tunesmith data get sentiment_vader`" in str(e.value) and "TUNESMITH_DATA_DIR=DIR" in str(e.value)
    with pytest.raises(TunesmithError, match="no built-in source is named 'mine'"):
        sources.resolve("datasets:mine/x.jsonl")
    with pytest.raises(TunesmithError, match="expected datasets:NAME/FILE"):
        sources.resolve("datasets:../etc/passwd")
    monkeypatch.delenv("TUNESMITH_DATA_DIR")
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    assert sources.data_dir() == tmp_path / "cache" / "data"


@pytest.mark.parametrize("argv", [["train", "tldr"], ["plan", "kjv"], ["data", "inspect", "sentiment"]])
def test_a_recipe_without_its_data_stops_in_one_line_naming_the_command(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setenv("TUNESMITH_DATA_DIR", str(tmp_path / "elsewhere"))   # restored after main() sets it
    assert main(argv + ["--data-dir", str(tmp_path / "empty"), f"output.dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "empty") in err
    assert re.search(r"run `tunesmith data get \w+`, or point tunesmith at a folder holding \S+ with --data-dir DIR or "
                     r"TUNESMITH_DATA_DIR=DIR", err)
    assert not (tmp_path / "runs").exists()


def test_every_builtin_recipe_names_where_its_data_comes_from():
    """Each recipe reading a `datasets:` path names a registered source, and its header says where that comes from."""
    checked = 0
    for name, path in list_recipes().items():
        cfg = load_config(name)
        specs = [cfg.data.path] if isinstance(cfg.data.path, str) else cfg.data.path
        for spec in specs:
            assert spec.startswith(("builtin:", sources.PREFIX)), f"{name}: data.path {spec!r} is not a public source"
            if spec.startswith(sources.PREFIX):
                src = sources.SOURCES[spec[len(sources.PREFIX):].split("/")[0]]
                header = "".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))
                repo = src.origin.split()[1]
                assert repo in header and f"tunesmith data get {src.name}" in header, name
                assert name in src.recipes
                checked += 1
    assert checked >= 7


def test_the_pinned_checksums_are_those_of_the_data_the_results_were_measured_on():
    """Where the data folder holds the project's copy (tests/conftest.py points it there when present), every file
    the registry pins has that checksum: `tunesmith data get` gives what the recipes' figures were measured on."""
    root = sources.data_dir()
    present = [(s, f, h) for s in sources.SOURCES.values() for f, h in s.outputs.items() if (root / s.name / f).is_file()]
    if not present:
        pytest.skip(f"no data sets in {root}")
    for s, f, h in present:
        assert sources.sha256_of(root / s.name / f) == h, f"{s.name}/{f}"
