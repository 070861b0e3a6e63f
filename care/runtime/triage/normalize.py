"""One spelling for the rules and the classifiers, in every script a clinic writes.

- Unicode NFC, lower case, curly quotes unified, every script's digits as ASCII digits ("३" -> "3").
- Accents are stripped from Latin letters only ("é" -> "e"): in Devanagari and Bengali the marks are letters
  (vowel signs, the virama), and stripping them broke every word ("मम्मी" -> "म म म ी"). Two spellings people
  use interchangeably are folded: the nukta is dropped and candrabindu is read as anusvara ("साँस" = "सांस").
- Words are found with Unicode word boundaries (the `regex` library: its \\w includes combining marks), so
  a word stays whole in any script.
- Letters repeated 3+ times are squeezed to 2 ("pleeease", "बहुतततत"); SMS spellings are expanded ("u",
  "cant", "jsuis", "xq", "vc", "plz") from the message language's table below and the `sms:` sections.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping

import regex

# SMS / chat spellings -> words the rules know, by language. Tokens only (whole words). Language files add
# theirs. A message is expanded with its own language's table (and English's, for the languages that mix in
# English: sms_table), never all of them: many keys are words elsewhere. Spanish "ya no respira" is not
# French "il y a", "yo" is not "years old" in Spanish, and romanised Hindi "ke" is not Spanish "que".
SMS_BY_LANG = {
    "en": {
        "u": "you", "ur": "your", "r": "are", "pls": "please", "plz": "please", "plss": "please",
        "cant": "can't", "dont": "don't", "wont": "won't", "isnt": "isn't", "doesnt": "doesn't",
        "didnt": "didn't", "hasnt": "hasn't", "wasnt": "wasn't", "aint": "isn't", "couldnt": "couldn't",
        "im": "i'm", "ive": "i've", "hes": "he's", "shes": "she's", "theyre": "they're", "thats": "that's",
        "whats": "what's", "bc": "because", "cuz": "because", "coz": "because", "bcuz": "because",
        "w/": "with", "w/o": "without", "bby": "baby", "bb": "baby", "dr": "doctor", "2day": "today",
        "gonna": "going to", "wanna": "want to", "gotta": "got to", "yr": "year", "yrs": "years",
        "y/o": "years old", "yo": "years old", "wk": "week", "wks": "weeks", "hr": "hour", "hrs": "hours",
        "min": "minute", "mins": "minutes", "abt": "about", "bcoz": "because", "sth": "something",
        "smth": "something", "ppl": "people", "lil": "little", "hosp": "hospital", "asap": "now",
        "mom": "mum", "mommy": "mum", "meds": "medicine", "b4": "before", "2nite": "tonight", "rn": "right now",
        "idk": "i don't know", "n": "and", "&": "and", "bf": "boyfriend", "gf": "girlfriend",
    },
    "fr": {
        "jsuis": "je suis", "chui": "je suis", "jveux": "je veux", "jpeux": "je peux", "jsais": "je sais",
        "pk": "pourquoi", "pq": "pourquoi", "tt": "tout", "ds": "dans", "bcp": "beaucoup",
        "svp": "s'il vous plait", "stp": "s'il te plait", "qd": "quand", "mtn": "maintenant",
        "jpp": "je peux plus", "jpe": "je peux", "c": "c'est", "ya": "il y a", "koi": "quoi", "ms": "mais",
    },
    "es": {
        "q": "que", "xq": "porque", "porq": "porque", "tb": "tambien", "tmb": "tambien", "x": "por",
        "d": "de", "k": "que", "ke": "que", "toy": "estoy", "ta": "esta", "pa": "para", "hno": "hermano",
    },
    "pt": {
        "vc": "voce", "vcs": "voces", "tbm": "tambem", "mto": "muito", "mt": "muito", "hj": "hoje",
        "nao": "nao", "n/": "nao", "ngm": "ninguem", "qdo": "quando", "qnd": "quando", "agr": "agora",
        "cmg": "comigo", "fds": "fim de semana", "blz": "beleza", "obg": "obrigado",
    },
}
MIXES_ENGLISH = frozenset({"en", "hi", "bn", "sw"})  # code-mixed with English SMS spellings ("pls", "u")
SMS = SMS_BY_LANG["en"]


def sms_table(lang: str, extra: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, str]:
    """The spellings a message in `lang` is expanded with: English's where it mixes in, its own, then the
    `extra` tables (a clinic's, by language; "*" for every language)."""
    extra = extra or {}
    table = dict(SMS_BY_LANG["en"]) if lang in MIXES_ENGLISH else {}
    for part in (SMS_BY_LANG.get(lang, {}), extra.get("*", {}), extra.get(lang, {})):
        table.update(part)
    return table


_LATIN_MAX = 0x024F  # Basic Latin .. Latin Extended-B
_LATIN_EXT = (0x1E00, 0x1EFF)  # Latin Extended Additional (Vietnamese etc.)
_NUKTA = {"\u093c", "\u09bc", "\u0a3c", "\u0abc", "\u0b3c"}  # Devanagari, Bengali, Gurmukhi, Gujarati, Oriya
_CANDRABINDU = {"\u0901": "\u0902", "\u0981": "\u0982"}  # -> anusvara
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'", "\u02bc": "'"})
TOKEN = regex.compile(r"[\w'&/]+|[^\s\w]")
_REPEAT = regex.compile(r"(\p{L})\1{2,}")
_HYPHEN = regex.compile(r"(?<=\p{L})-(?=\p{L})")


def _is_latin(ch: str) -> bool:
    o = ord(ch)
    return o <= _LATIN_MAX or _LATIN_EXT[0] <= o <= _LATIN_EXT[1]


def fold_marks(text: str) -> str:
    """Latin letters lose their accents; marks of other scripts stay, but for the nukta and candrabindu."""
    out: list[str] = []
    base = ""
    for ch in unicodedata.normalize("NFD", text):
        if unicodedata.combining(ch) or unicodedata.category(ch) == "Mn":
            if (base and _is_latin(base)) or ch in _NUKTA:
                continue
            out.append(_CANDRABINDU.get(ch, ch))
            continue
        base = ch
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


def ascii_digits(text: str) -> str:
    return "".join(str(unicodedata.digit(c)) if c.isdigit() and not c.isascii() and unicodedata.digit(c, None)
                   is not None else c for c in text)


def script_of(text: str) -> str:
    """"deva", "beng", "latin" or "other": the script most letters of `text` are in."""
    counts = {"deva": 0, "beng": 0, "latin": 0, "other": 0}
    for ch in text:
        if not ch.isalpha():
            continue
        o = ord(ch)
        key = ("deva" if 0x0900 <= o <= 0x097F else "beng" if 0x0980 <= o <= 0x09FF
               else "latin" if _is_latin(ch) else "other")
        counts[key] += 1
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else "latin"


def normalize(text: str, sms: Mapping[str, str] | None = None) -> str:
    """The normalised text (see the module docstring); `sms`: the spelling table (default: English's)."""
    table = SMS if sms is None else sms
    t = fold_marks(ascii_digits(text.lower())).translate(_QUOTES)
    t = _REPEAT.sub(r"\1\1", t)
    t = _HYPHEN.sub(" ", t)  # "self-harm" -> "self harm"
    t = regex.sub(r"(\d)\s*(?:yo|y/o)\b", r"\1 years old", t)  # "2yo" -> "2 years old"
    t = regex.sub(r"(\d)(yrs?|years?|wks?|weeks?|mos|months?|days?|hrs?|mins?)\b", r"\1 \2", t)  # "3wks"
    return " ".join(table.get(tok, tok) for tok in TOKEN.findall(t))


def strip_accents(text: str) -> str:
    """What a clinic's pattern is matched as: the same folding as the text (Latin accents only)."""
    return fold_marks(text.lower())
