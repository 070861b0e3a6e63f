"""Assemble care/data/safety/lang/<lang>.yaml from the authors' files in care/data/triage/.

    python scripts/assemble_lang.py pt bn fr es      (any of: the languages whose source files are present)

Sources, each written by one author (care/data/triage/DATA.md): lexicon_<lang>.yaml (phrases, context cues),
notices_<lang>.yaml (per-category notices; hi/bn with `native:` and `latin:` sections), cards_<lang>.yaml
(first-aid card translations; hi/bn also `cards_latin`), notices_fr_es_new.yaml (fr/es notices of the four
newer categories). For hi and bn, negation words come after the verb: they move to `negation_after`, except the
few that precede ("no", "not", "without", "bina"); `again` holds each language's recurrence words (AGAIN).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "care" / "data" / "triage"
OUT = ROOT / "care" / "data" / "safety" / "lang"
AGAIN = {"sw": ["tena", "again"], "hi": ["again", "phir se", "फिर से"], "bn": ["again", "abar", "আবার"],
         "pt": ["de novo", "outra vez", "novamente", "again"]}
BEFORE = {"no", "not", "without", "bina", "binaa", "ছাড়া", "বিনা"}
HEADER = ("# CARE Edge triage data for `{lang}`: phrases per category, context cues, notices and first-aid card steps.\n"
          "# Assembled by scripts/assemble_lang.py from care/data/triage/{{lexicon,notices,cards}}_{lang}.yaml\n"
          "# (native-speaker authors, care/data/triage/DATA.md); a clinic overrides any of it in its safety.yaml.\n")


def read(name: str) -> dict:
    path = SRC / name
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def assemble(lang: str) -> dict:
    out: dict = {"lang": lang}
    lex = read(f"lexicon_{lang}.yaml")
    if lex.get("phrases"):
        out["phrases"] = {k: sorted(set(map(str, v))) for k, v in lex["phrases"].items()}
    ctx = {k: list(dict.fromkeys(map(str, v or []))) for k, v in (lex.get("context") or {}).items()}
    if lang in ("hi", "bn") and "negation" in ctx:
        ctx["negation_after"] = [w for w in ctx["negation"] if w not in BEFORE]
        ctx["negation"] = [w for w in ctx["negation"] if w in BEFORE] or ["no", "not"]
    if ctx and "again" not in ctx:  # recurrence words ("it is happening again"): never all of `present`
        ctx["again"] = AGAIN.get(lang, ["again"])
    if ctx:
        out["context"] = ctx
    notices = read(f"notices_{lang}.yaml")
    for section, suffix in (("native", ""), ("latin", "_latin")):
        block = notices.get(section) if "native" in notices else (notices if section == "native" else {})
        for key in ("disclaimer", "not_a_doctor"):
            if block and key in block:
                out[key + suffix] = str(block.pop(key))
        if block:
            out["notices" + suffix] = {k: str(v) for k, v in block.items()}
    for cat, texts in read("notices_fr_es_new.yaml").items():
        if lang in texts:
            out.setdefault("notices", {})[cat] = str(texts[lang])
    cards = read(f"cards_{lang}.yaml")
    for key in ("card_title", "card_title_latin"):
        if key in cards:
            out[key] = str(cards[key])
    for key in ("cards", "cards_latin"):
        if key in cards:
            out[key] = {k: [str(s) for s in v] for k, v in cards[key].items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("langs", nargs="+")
    opts = parser.parse_args()
    for lang in opts.langs:
        data = assemble(lang)
        path = OUT / f"{lang}.yaml"
        path.write_text(HEADER.format(lang=lang) + yaml.safe_dump(data, allow_unicode=True, sort_keys=False,
                                                                   width=120), encoding="utf-8")
        print(f"wrote {path} ({', '.join(k for k in data if k != 'lang')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
