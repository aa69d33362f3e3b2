"""Generation metrics against the dataset's references, from the metric libraries themselves
(rouge_score, sacrebleu, nltk): `evaluate.load(...)` fetches metric code from the hub and fails
offline. Every function takes one list of references per prediction (several where the data has
several); ROUGE and METEOR take the best reference per prediction, BLEU/chrF use all of them.
Scores are 0-100.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
WORDNET_SOURCE = Path("/usr/share/wordnet")  # Debian: apt-get install wordnet-base wordnet-sense-index
METEOR_MISSING = ("METEOR skipped: it needs WordNet, which is not installed "
                  "(Debian/Ubuntu: apt-get install wordnet-base wordnet-sense-index; `make setup` does this as root)")


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    each = rouge_each(predictions, references)
    n = max(1, len(predictions))
    return {t: round(sum(v) / n, 2) for t, v in each.items()}


def rouge_each(predictions: list[str], references: list[list[str]], types: tuple = ROUGE_TYPES) -> dict[str, list[float]]:
    """Per example, 100 x the F-measure against its best reference, for each ROUGE type."""
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    out = {t: [] for t in types}
    for pred, refs in zip(predictions, references):
        for t in types:
            # rougeLsum splits summaries into sentences on newlines
            p, rs = (pred.replace(". ", ".\n"), [r.replace(". ", ".\n") for r in refs]) if t == "rougeLsum" else (pred, refs)
            out[t].append(100 * max(scorer.score(r, p)[t].fmeasure for r in rs))
    return out


def rouge_l_one(prediction: str, references: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return round(100 * max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references), 1)


def bleu_chrf(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return {"bleu": round(sacrebleu.corpus_bleu(predictions, streams).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(predictions, streams).score, 2)}


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    hits = sum(any(norm(p) == norm(r) for r in refs) for p, refs in zip(predictions, references))
    return round(100 * hits / max(1, len(predictions)), 2)


def meteor(predictions: list[str], references: list[list[str]]) -> float | None:
    """None when WordNet is not available (the reason is METEOR_MISSING)."""
    if not ensure_wordnet():
        return None
    from nltk.translate.meteor_score import meteor_score

    total = sum(meteor_score([r.split() for r in refs], p.split()) for p, refs in zip(predictions, references))
    return round(100 * total / max(1, len(predictions)), 2)


def generation_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    out = {**rouge(predictions, references), **bleu_chrf(predictions, references),
           "exact_match": exact_match(predictions, references)}
    m = meteor(predictions, references)
    if m is not None:
        out["meteor"] = m
    return out


def ensure_wordnet() -> bool:
    """Make nltk find WordNet: its own data if present, else the Debian files copied (nltk cannot
    follow the package's symlinks) into our cache with the `lexnames` table nltk also wants."""
    import nltk

    from tunesmith.paths import cache_root

    target_root = cache_root() / "nltk_data"
    if str(target_root) not in nltk.data.path:
        nltk.data.path.append(str(target_root))
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return True
    except LookupError:
        pass
    if not (WORDNET_SOURCE / "data.noun").exists():
        return False
    target = target_root / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for f in WORDNET_SOURCE.iterdir():
        if f.is_file():
            shutil.copyfile(f, target / f.name)
    (target / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES)))
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        return False
    return True


# WordNet 3.0's lexicographer files (lexnames(5WN)): name and syntactic category
LEXNAMES = [("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
            ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
            ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
            ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
            ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
            ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
            ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
            ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
            ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
            ("adj.ppl", 3)]
