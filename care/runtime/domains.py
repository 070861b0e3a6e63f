"""Pick the support domain (banking / telecom / medical / general) from a user's first message.

The same machinery as the triage layer (care/runtime/triage/): a message the triage flags as an
emergency is medical; otherwise a linear model on the same normalised hashed features
(care/data/triage/domain.npz, banking / general / medical, trained by scripts/train_triage.py on the
training sides of Banking77, Bitext, MedQuAD and the project's labelled set) decides, with the weighted
keyword rules below for telecom (no public telecom set exists to train on) and as the fallback when the
model is unsure or absent. Measured by bench/triage.py and tests/test_runtime_domains.py.
"""

from __future__ import annotations

import re
from functools import lru_cache

from care.domains import DOMAINS

# (pattern, weight). Strong terms weigh 2, ambiguous ones ("top up", "account", "refund") 1.
KEYWORDS: dict[str, list[tuple[str, float]]] = {
    "banking": [
        (r"\b(?:bank|banking|iban|swift|sort code|overdraft|loan|mortgage|savings?)\b", 2),
        (r"\b(?:debit|credit|visa|master ?card|virtual|disposable|contactless|physical) cards?\b", 2),
        (r"\bcards?\b", 1.5),
        (r"\b(?:pin|atm|cash ?machine|cash withdrawals?|withdraw\w*|cashback)\b", 2),
        (r"\b(?:transfer\w*|transaction\w*|deposit\w*|cheque|check ?book|statement|balance)\b", 1.5),
        (r"\b(?:exchange rates?|currenc\w*|fiat|crypto\w*|euros?|dollars?|pounds?|gbp|usd|eur)\b", 1.5),
        (r"\b(?:apple ?pay|google ?pay|direct debit|standing order|beneficiar\w*|payee)\b", 2),
        (r"\b(?:top[- ]?ups?|topped up|topping up)\b", 1.5),  # also phone credit: see telecom
        (r"\b(?:visa|mastercard|wallet|exchange|cleared|kyc|id check|identity (?:check|verification)|"
         r"verify (?:my )?(?:id|identity)|stole (?:my )?money|my money|get my money back)\b", 1.5),
        (r"\b(?:charged?|fees?|refunds?|payments?|paid|pay|money|funds?|declined|pending|reverted)\b", 1),
        (r"\b(?:verify|verification|identity|passcode|account|frozen|freeze|blocked?|stolen|lost)\b", 0.5),
    ],
    "telecom": [
        (r"\b(?:sim|e-?sim|roaming|mobile data|data plan|data bundle|airtime|4g|5g|lte|signal|network)\b", 2),
        (r"\b(?:wi-?fi|router|modem|broadband|internet|fibre|fiber|bandwidth|hotspot|landline)\b", 2),
        (r"\b(?:phone|handset|smartphone|calls?|texts?|sms|voicemail|minutes|tariff|contract|porting|"
         r"port my number|unlock(?:ed)? (?:my )?phone)\b", 1.5),
        (r"\b(?:top[- ]?up|recharge|credit|bundle)\b[^.?!]{0,30}\b(?:phone|airtime|data|sim|mobile|line)\b", 2.5),
        (r"\b(?:no (?:service|signal|internet)|dropped calls?|slow (?:internet|connection)|disconnect\w*)\b", 2),
        (r"\b(?:bill|billing|plan|upgrade|coverage|outage|technician|installation)\b", 1),
    ],
    "medical": [
        (r"\b(?:symptoms?|diagnos\w*|treatments?|therap\w*|disease|disorder|syndrome|infection|"
         r"inherited|genetic|prognosis|outlook|clinical trials?|complications?)\b", 2),
        (r"\b(?:doctor|nurse|clinic|hospital|health|medical|medicine|medication|drugs?|dose|dosage|"
         r"pills?|tablets?|prescription|vaccin\w*|pregnan\w*|surgery|injury)\b", 2),
        (r"\b(?:pain|ache|aches|fever|cough|headache|rash|bleeding|vomit\w*|nausea|diarrh\w*|dizzy|"
         r"swollen|swelling|breath\w*|blood pressure|diabetes|asthma|cancer|tumou?r|allerg\w*|"
         r"infect\w*|virus|bacteria\w*|malaria|hiv|tuberculosis|tb|stroke|heart|lungs?|kidney|liver|"
         r"stomach|skin|chest|sick|ill|illness|sore|injur\w*|wound|burn)\b", 2),
        (r"\b\w{4,}(?:itis|osis|emia|aemia|oma|pathy|plasia|trophy|algia|ectomy|lysis|ism|philia)\b", 2),
        (r"\b(?:hyper|hypo|dys|poly)\w{4,}|\b(?:deficiency|malabsorption|fibrillation|embolism|abuse|"
         r"shock|addiction|poisoning|fracture|anemia|obesity|dementia|depression|anxiety|autism)\b", 2),
        (r"\b(?:patient|baby|child)\b[^.?!]{0,40}\b(?:sick|fever|rash|cough|pain)\b", 1),
        (r"\b(?:anatomy|physiology|pharmacology|patholog\w*|nerve|artery|vein|muscle|bone|cells?|"
         r"enzyme|hormone|receptor|protein|gene|mutation|plasma|serum|antibod\w*|insulin|"
         r"following is|most common|drug of choice|dental|tooth|teeth)\b", 1.5),
    ],
}


@lru_cache(maxsize=1)
def _compiled() -> dict[str, list[tuple[re.Pattern[str], float]]]:
    return {d: [(re.compile(p, re.IGNORECASE), w) for p, w in rules] for d, rules in KEYWORDS.items()}


def domain_scores(text: str) -> dict[str, float]:
    """Sum of matched keyword weights per domain (each pattern counts once)."""
    return {d: sum(w for pat, w in rules if pat.search(text)) for d, rules in _compiled().items()}


# Below MODEL_CONFIDENCE the keyword rules decide. Banking77's 10k queries pull short everyday questions
# ("where is my order?", "what time is it?") to banking, so banking without any banking keyword needs more.
# Chosen on the training sides (Banking77 train, MedQuAD even half, train.jsonl), not on what is measured.
MODEL_CONFIDENCE = 0.8
MIN_EVIDENCE = 0.1  # the model's best class must gain this much over its no-words (bias-only) probability
BANKING_WITHOUT_KEYWORDS = 0.995
TELECOM_TO_BANKING = 0.98
STRONG_TELECOM = 3.5  # e.g. "airtime" + "phone"; "phone" or "card ... roaming" alone is weaker


def detect_domain(text: str, threshold: float = 1.5) -> str:
    """medical for an emergency; else the domain model, telecom keywords, then keyword rules."""
    from care.runtime import triage
    from care.runtime.triage import classifier, decide

    rules = triage.load_rules()
    if triage.assess([text], rules).emergency:
        return "medical"
    keywords = keyword_domain(text, threshold)
    model = classifier.packaged_model("domain.npz")
    if model is None:
        return keywords
    proba = model.proba(decide.normalized(text, rules))
    best = max(proba, key=proba.__getitem__)
    if proba[best] - model.proba("")[best] < MIN_EVIDENCE:
        return keywords  # "Hello!", "thanks": the words say nothing the empty message does not
    if keywords == "telecom":  # the model knows no telecom: it overrules only weak telecom words
        weak = domain_scores(text)["telecom"] < STRONG_TELECOM
        return "banking" if weak and best == "banking" and proba[best] >= TELECOM_TO_BANKING else keywords
    if proba[best] < MODEL_CONFIDENCE:
        return keywords
    if best == "banking" and proba[best] < BANKING_WITHOUT_KEYWORDS and domain_scores(text)["banking"] == 0:
        return keywords
    return best


def keyword_domain(text: str, threshold: float = 1.5) -> str:
    """banking / telecom / medical by keywords, or general when no domain reaches `threshold` or two tie."""
    scores = domain_scores(text)
    best = max(scores, key=scores.__getitem__)
    ranked = sorted(scores.values(), reverse=True)
    if ranked[0] < threshold or ranked[0] == ranked[1]:
        return "general"
    assert best in DOMAINS
    return best
