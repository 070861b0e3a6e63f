"""Red-flag rules: hits, false alarms, languages, the clinic override file, framing."""

from __future__ import annotations

import pytest

from care.errors import ConfigError
from care.runtime import safety

HITS = [
    ("I have chest pain and my left arm is numb", "chest_pain"),
    ("there's a crushing pressure in my chest", "chest_pain"),
    ("I think I'm having a heart attack", "chest_pain"),
    ("my mother's face is drooping and her speech is slurred", "stroke"),
    ("I think he is having a stroke", "stroke"),
    ("the cut won't stop bleeding", "severe_bleeding"),
    ("he is bleeding heavily from his leg", "severe_bleeding"),
    ("I can't breathe properly", "difficulty_breathing"),
    ("my child is having difficulty breathing and her lips are blue", "difficulty_breathing"),
    ("I want to kill myself", "suicidal_thoughts"),
    ("I don't want to live anymore", "suicidal_thoughts"),
    ("I've been having suicidal thoughts", "suicidal_thoughts"),
    ("my son swallowed bleach", "overdose_poisoning"),
    ("I took too many of my sleeping pills", "overdose_poisoning"),
    ("I think she overdosed", "overdose_poisoning"),
    ("I'm 30 weeks pregnant and bleeding", "pregnancy_emergency"),
    ("I am pregnant and the baby stopped moving", "pregnancy_emergency"),
    ("my water broke at 32 weeks", "pregnancy_emergency"),
    ("he is unconscious and won't wake up", "unconscious_or_seizure"),
    ("my throat is swelling after a bee sting", "severe_allergic_reaction"),
    ("j'ai une douleur dans la poitrine", "chest_pain"),
    ("je n'arrive pas à respirer", "difficulty_breathing"),
    ("tengo dolor en el pecho", "chest_pain"),
    ("quiero morir", "suicidal_thoughts"),
]

FALSE_ALARMS = [
    "my card payment bounced",
    "I need a chest of drawers delivered",
    "this bank is killing me with fees",
    "I'm dying to know my balance",
    "How do I stop a payment that is pending?",
    "my phone battery is bleeding charge",
    "I have no chest pain, just a mild cough",
    "I don't have any chest pain",
    "Does the swimming pool offer backstroke lessons?",
    "The stock price had a stroke of luck",
    "I want to die my hair red",
    "What is the exchange rate for pounds?",
    "I lost my card, can you block it?",
    "my account was frozen after a transfer",
    "I'm pregnant, can I take paracetamol for a headache?",
    "How often should I get my blood pressure checked?",
]


@pytest.mark.parametrize(("text", "category"), HITS)
def test_red_flags_fire(text, category):
    cats = [n.category for n in safety.check(text)]
    assert category in cats, f"{text!r} -> {cats}"


@pytest.mark.parametrize("text", FALSE_ALARMS)
def test_no_false_alarms(text):
    assert safety.check(text) == [], text


def _banking77_false_alarms(shared_data, step: int) -> None:
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO((shared_data / "banking77" / "test.csv").read_text(encoding="utf-8"))))
    assert len(rows) > 3000
    rows = rows[::step]
    lexicon = safety.load_rules(classifier=False)
    assert [r["text"] for r in rows if lexicon.check(r["text"])] == []  # the rules alone: none
    rules = safety.load_rules()  # with the classifier: within the issue's 0.5% (bench/triage.py prints it)
    fired = [r["text"] for r in rows if rules.check(r["text"])]
    assert len(fired) / len(rows) <= 0.005, fired


def test_banking77_has_no_false_alarms(shared_data):
    _banking77_false_alarms(shared_data, step=4)  # a fixed quarter: the default suite stays fast


@pytest.mark.slow
def test_banking77_has_no_false_alarms_full(shared_data):
    _banking77_false_alarms(shared_data, step=1)


def test_messages_in_configured_languages():
    (notice,) = safety.check("I can't breathe", ("en", "fr"))
    assert "emergency" in notice.message and "urgence" in notice.message
    assert notice.message.count("\n") == 1
    (notice,) = safety.check("tengo dolor en el pecho", ("es",))
    assert "emergencia" in notice.message and "emergency " not in notice.message
    # A language the file has no text for falls back to English rather than nothing.
    (notice,) = safety.check("I can't breathe", ("xx",))
    assert "emergency" in notice.message


def test_clinic_override_file(_user_dirs):
    from care.paths import config_dir

    path = config_dir() / "safety.yaml"
    path.write_text(
        "languages: [fr]\n"
        "emergency_number: '15'\n"
        "rules:\n"
        "  - id: chest_pain\n    enabled: false\n"
        "  - id: clinic_snakebite\n    category: snakebite\n    patterns:\n      en: ['\\bsnake\\s*bite|bitten by a snake']\n"
        "messages:\n  snakebite:\n    fr: 'Morsure de serpent : venez au centre de santé, appelez le {emergency_number}.'\n",
        encoding="utf-8")
    rules = safety.load_rules()
    assert rules.languages == ("fr",)
    assert rules.check("I have chest pain") == []
    # The clinic's category comes first (the packaged rules now also know snake bites: bites_stings).
    notice = rules.check("my son was bitten by a snake")[0]
    assert notice.category == "snakebite" and "appelez le 15" in notice.message
    (notice,) = rules.check("I can't breathe")  # packaged rule, clinic language and number
    assert "Appelez le 15" in notice.message
    assert len(rules.sources) == 2


def test_bad_override_is_one_clear_error(_user_dirs):
    from care.paths import config_dir

    path = config_dir() / "safety.yaml"
    path.write_text("rules:\n  - id: x\n    category: y\n    patterns: ['(unclosed']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad pattern") as err:
        safety.load_rules()
    assert "safety.yaml" in err.value.one_line()
    path.write_text("rules: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        safety.load_rules()


def test_packaged_rules_cover_the_issue_categories():
    cats = {r.category for r in safety.load_rules().rules}
    assert {"chest_pain", "stroke", "severe_bleeding", "difficulty_breathing", "suicidal_thoughts",
            "overdose_poisoning", "pregnancy_emergency"} <= cats


@pytest.mark.parametrize(("text", "claims"), [
    ("As a doctor, I recommend rest.", True),
    ("I am a nurse and this is normal.", True),
    ("I'm your physician.", True),
    ("Please see a doctor if it gets worse.", False),
    ("A doctor would check your blood pressure.", False),
])
def test_claims_clinician(text, claims):
    assert safety.claims_clinician(text) is claims
