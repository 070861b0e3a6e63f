"""The model's reply to a flagged turn, when the user asks for one anyway: an instruction and a sentence filter.

By default a flagged turn answers with the notice and the vetted first-aid card only; the model writes
nothing, so nothing can contradict the notice. When the user asks the assistant anyway (the TUI's key,
`care chat --ask-anyway`, the server's `care_emergency_reply: "model"`), `turn_instruction()` is added to
that turn's system message (not saved in the history), the reply is headed by `ANYWAY_LABEL` (it is not
vetted text), and it passes through `ReplyGuard`: text is released a sentence at a time, and a sentence that
contradicts the notice (reassurance, "wait and see", "no need to see a doctor", an emergency number other
than the clinic's) is dropped. The session then yields a `ReplyCheckNote` naming what was removed. A sentence
filter cannot catch every contradiction, which is why this reply is never the default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from care.runtime.backend import GenerationResponse
from care.runtime.triage.normalize import normalize

INSTRUCTION = (
    "SAFETY FOR THIS MESSAGE: an emergency was flagged ({categories}). The user has already been told to call "
    "{number} now. Reply in at most a few short sentences with only safe first-aid steps to take while help "
    "comes. Do not give a diagnosis, do not reassure, do not suggest waiting or watching, and do not give any "
    "phone number other than {number}."
)

# Sentences that contradict an emergency notice (matched on normalised text: no accents, lower case).
_CONTRADICTS = [re.compile(p) for p in (
    r"\b(?:nothing|no need) to (?:worry|be worried|panic|be alarmed)\b|\bdon't (?:worry|panic)\b|\bnot to worry\b",
    r"\b(?:probably|likely|most likely|just|only|simply|nothing but|it's just|it is just) (?:a |an )?"
    r"(?:chest infection|cold|flu|virus|indigestion|heartburn|gas|wind|muscle (?:strain|pain)|anxiety|"
    r"panic attack|stress|minor|nothing serious|teething|a bug|tummy bug|normal)\b",
    r"\b(?:it|this|that) (?:is|sounds|seems|looks) (?:a sign of|like) (?:a |an )?(?:chest infection|cold|flu|"
    r"indigestion|heartburn|muscle strain|anxiety|stress|something minor)\b",
    r"\b(?:is|it's|sounds|seems) (?:not|nothing) (?:serious|dangerous|an emergency|urgent|to worry about)\b",
    r"\b(?:not|isn't|is not) (?:serious|dangerous|an emergency|urgent)\b|\bnothing serious\b",
    r"\bwait (?:and see|a (?:few|couple)|until|for (?:a few|a couple|it to pass|it to go))\b|\bwatch and wait\b|"
    r"\bsee (?:if|whether) it (?:gets better|passes|goes away|improves)\b|\bsleep it off\b",
    r"\b(?:no|don't|do not|there's no) need (?:to|for) (?:see|go to|call|visit|a) (?:a |an |the )?"
    r"(?:doctor|hospital|emergency|ambulance|health worker|clinic|nurse)\b|"
    r"\b(?:you )?(?:don't|do not) need (?:a |to see a |an |to go to )?(?:doctor|hospital|ambulance|emergency)\b",
    r"\b(?:will|should) (?:go away|pass|get better|settle) (?:on its own|by itself|in a (?:few|couple))\b",
    r"\b(?:rien de grave|pas de panique|ne vous inquietez pas|pas grave|attendez de voir|pas besoin de (?:voir|consulter|"
    r"medecin|aller))\b|\bprobablement (?:une|un) (?:rhume|grippe|infection)\b",
    r"\b(?:nada grave|no se preocupe|no te preocupes|no es grave|espere a ver|no hace falta (?:ir|ver|llamar)|"
    r"no necesita (?:ir|ver|medico))\b|\bprobablemente (?:un|una) (?:resfriado|gripe|infeccion)\b",
)]
# A phone number right after a word about calling ("call 999", "composez le 15", "llame al 911").
_CALL_NUMBER = re.compile(r"\b(?:call|dial|ring|phone|contact|number|hotline|helpline|text|appel\w*|compose\w*|"
                          r"numero|llam\w*|marque)\b\D{0,20}?(\+?\d[\d\s-]{0,14}\d|\d)(?!\s*(?:minutes?|hours?|"
                          r"times?|mg|ml|%))")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def with_instruction(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """`messages` with `instruction` appended to the system message (one added when there is none)."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = out[0]["content"] + "\n\n" + instruction
    else:
        out.insert(0, {"role": "system", "content": instruction})
    return out


def turn_instruction(categories: Iterable[str], number: str) -> str:
    cats = ", ".join(c.replace("_", " ") for c in categories)
    return INSTRUCTION.format(categories=cats, number=number)


def contradiction(sentence: str, numbers: set[str]) -> str | None:
    """Why `sentence` contradicts an emergency notice ("reassurance", "other number"), or None."""
    norm = normalize(sentence)
    if any(p.search(norm) for p in _CONTRADICTS):
        return "reassurance"
    allowed = {re.sub(r"\D", "", n) for n in numbers}
    found = [re.sub(r"\D", "", m.group(1)) for m in _CALL_NUMBER.finditer(norm)]
    if any(f and f not in allowed for f in found):
        return "other number"
    return None


@dataclass
class ReplyCheckNote(GenerationResponse):
    """Yielded after a flagged turn's reply when sentences were removed; `text` says so to the user."""

    removed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


# Heads the model's own reply to a flagged turn (asked for anyway): it is not the vetted card.
ANYWAY_LABEL = {
    "en": "[Assistant's own reply, not vetted first-aid text: follow the steps above first.]",
    "fr": "[Réponse de l'assistant, non vérifiée : suivez d'abord les étapes ci-dessus.]",
    "es": "[Respuesta del asistente, no verificada: siga primero los pasos de arriba.]",
    "pt": "[Resposta do assistente, não verificada: siga primeiro os passos acima.]",
    "sw": "[Jibu la msaidizi, halijathibitishwa: fuata kwanza hatua zilizo juu.]",
    "hi": "[सहायक का अपना जवाब, जाँचा हुआ नहीं: पहले ऊपर के कदम मानें।]",
    "bn": "[সহকারীর নিজের উত্তর, যাচাই করা নয়: আগে উপরের ধাপগুলো মানুন।]",
}

NOTE_TEXT = {
    "en": "[{n} sentence(s) removed: they contradicted the emergency notice.]",
    "fr": "[{n} phrase(s) retirée(s) : elles contredisaient l'avis d'urgence.]",
    "es": "[{n} frase(s) eliminada(s): contradecían el aviso de emergencia.]",
    "pt": "[{n} frase(s) removida(s): contradiziam o aviso de emergência.]",
    "sw": "[Sentensi {n} zimeondolewa: zilipingana na tahadhari ya dharura.]",
    "hi": "[{n} वाक्य हटाए गए: वे आपातकालीन सूचना के उलट थे।]",
    "bn": "[{n}টি বাক্য সরানো হয়েছে: সেগুলো জরুরি সতর্কতার বিপরীত ছিল।]",
}


def localized_label(table: dict[str, str], languages: Iterable[str], **kw: object) -> str:
    texts = [table[lang].format(**kw) for lang in languages if lang in table]
    return " ".join(texts or [table["en"].format(**kw)])


def note_text(n: int, languages: Iterable[str]) -> str:
    return localized_label(NOTE_TEXT, languages, n=n)


# Replies that present the assistant as a clinician (small models do this despite the system prompt).
_CLAIMS_CLINICIAN = re.compile(
    r"\b(?:i\s*(?:'m|am)\s+(?:a|your)\s+(?:\w+\s+)?(?:doctor|physician|nurse|gp|pharmacist)"
    r"|as\s+(?:a|your)\s+(?:\w+\s+)?(?:doctor|physician|nurse)\b(?!\s+(?:would|will|may|might|can)))",
    re.IGNORECASE,
)


def claims_clinician(text: str) -> bool:
    """True when a reply presents the assistant as a doctor/nurse ("I am a doctor", "as your physician")."""
    return bool(_CLAIMS_CLINICIAN.search(text))


class ReplyGuard:
    """Releases streamed text a sentence at a time, dropping contradicting sentences."""

    def __init__(self, numbers: set[str]) -> None:
        self.numbers = numbers
        self.buffer = ""
        self.removed: list[str] = []
        self.reasons: list[str] = []

    def feed(self, text: str) -> str:
        """Text that may be shown now (whole checked sentences with their trailing space)."""
        self.buffer += text
        out = []
        while True:
            m = _SENTENCE_END.search(self.buffer)
            if m is None:
                break
            sentence, sep = self.buffer[: m.start()], m.group()
            self.buffer = self.buffer[m.end():]
            out.append(self._checked(sentence, sep))
        return "".join(out)

    def flush(self) -> str:
        rest, self.buffer = self.buffer, ""
        return self._checked(rest, "") if rest else ""

    def _checked(self, sentence: str, sep: str) -> str:
        why = contradiction(sentence, self.numbers) if sentence.strip() else None
        if why is None:
            return sentence + sep
        self.removed.append(sentence.strip())
        self.reasons.append(why)
        return "\n" if "\n" in sep else ""
