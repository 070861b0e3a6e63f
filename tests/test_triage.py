"""The triage layer: normalisation, lexicon context checks, conversation context, clinic overrides, FR/ES,
`care triage`, and a recall floor on the labelled dev set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from care.cli import main
from care.runtime import safety, triage, triage_data


@pytest.fixture(scope="module")
def rules():
    return safety.load_rules(Path("/nonexistent/safety.yaml"))


@pytest.fixture(scope="module")
def lexicon():
    return safety.load_rules(Path("/nonexistent/safety.yaml"), classifier=False)


def test_normalize():
    assert triage.normalize("Él  NO respirá") == "el no respira"
    assert triage.normalize("u cant breathe?? pleeease") == "you can't breathe ? ? pleease"
    assert triage.normalize("my 2yo drank it") == "my 2 years old drank it"
    assert triage.normalize("self-harm") == "self harm"
    assert triage.normalize("jsuis pas bien") == "je suis pas bien"


def test_typo_index():
    idx = triage.TypoIndex(["seizure", "breathing", "bleeding"])
    assert idx.correct("siezure") == "seizure"  # swapped letters
    assert idx.correct("bleding") == "bleeding"  # one letter missing
    assert idx.correct("house") == "house"  # not near any lexicon word
    assert triage.within_one_edit("abcd", "abdc") and not triage.within_one_edit("abcd", "dcba")


@pytest.mark.parametrize(("text", "category"), [
    ("my 2 year old drank some of the bleach under the sink, what do I do", "overdose_poisoning"),
    ("he collapsed and isnt responding", "unconscious_or_seizure"),
    ("took a whole bottle of paracetamol an hour ago", "overdose_poisoning"),
    ("thinking of ending it all, pills ready", "suicidal_thoughts"),
    ("he has a siezure", "unconscious_or_seizure"),
    ("cant breth", "difficulty_breathing"),
    ("je veux mourir", "suicidal_thoughts"),
    ("mi hijo se tomó cloro", "overdose_poisoning"),
    ("mordu par un serpent au pied", "bites_stings"),
    ("picadura de alacrán en la mano de mi hija", "bites_stings"),
    ("stiff neck and fever and a rash that doesn't fade under a glass", "sepsis_meningitis"),
])
def test_lexicon_catches(lexicon, text, category):
    result = lexicon.assess(text)
    assert result.emergency and category in result.categories, (text, result.categories)


@pytest.mark.parametrize(("text", "why"), [
    ("I have no chest pain, just a cough", "negation"),
    ("I'm pregnant 24 weeks, no bleeding no pain, question about the glucose test", "negation"),
    ("I had a stroke in 2019, can I fly?", "past"),
    ("used to self harm as a teen, scars itch", "past"),
    ("What are the signs of a stroke?", "general"),
    ("What is (are) Heart Attack ?", "general"),
    ("the leaflet says overdose may harm the liver, is that per day", "general"),
    ("this bill is killing me", "idiom"),
    ("my laptop keeps having a seizure", "idiom"),
    ("choking on all these fees, can you explain the charges", "idiom"),
])
def test_lexicon_context_cancels(lexicon, text, why):
    assert not lexicon.assess(text).emergency, (text, why)


def test_conversation_context_carries_age(rules):
    earlier = ["my baby is 3 weeks old"]
    alone = rules.assess("she has a fever and feels hot")
    with_age = rules.assess("she has a fever and feels hot", earlier)
    assert with_age.emergency and with_age.category == "young_infant", with_age
    assert alone.category != "young_infant"
    # The facts alone never flag a later harmless turn.
    assert not rules.assess("thanks, where do I park?", earlier).emergency
    notices = rules.check("she has a fever and feels hot", ("en",), earlier)
    assert notices and notices[0].category == "young_infant"


# Short follow-ups and lone context facts: no symptom, so no flag (the classifier alone needs a word that is
# not filler or a fact; see Context.evidence). Written for this test, not taken from any data set.
@pytest.mark.parametrize("text", [
    "and then?", "ok, what now", "so what do we do after that?", "right. and tomorrow?", "got it, thanks!",
    "sorry, can you say that again?", "how many times?", "and if it doesn't work?",
    "et ensuite ?", "ok merci beaucoup", "et alors ?", "d'accord, et demain ?", "c'est normal ?",
    "y luego?", "vale, ¿y después?", "ok gracias", "¿y entonces qué hago?", "¿es normal?",
    "my daughter is 7", "he's 2 years old", "I am 28 weeks pregnant", "she's diabetic",
    "mon fils a 5 ans", "je suis enceinte de 6 mois", "mi bebé tiene 2 meses", "estoy embarazada",
])
def test_short_follow_ups_and_lone_facts_pass(rules, text):
    result = rules.assess(text)
    assert not result.emergency, (text, result)
    # ... and after a fact, a follow-up still adds nothing.
    assert not rules.assess(text, ["my baby is 3 weeks old"]).emergency, text


def test_fact_then_symptom_flags_in_context(rules):
    earlier = ["my baby is 3 weeks old"]
    assert not rules.assess(earlier[0]).emergency  # the fact alone
    result = rules.assess("she feels very hot and won't feed", earlier)
    assert result.emergency and result.category == "young_infant", result
    (notice, *_) = rules.check("elle a de la fièvre", ("fr",), ["mon bébé a 3 semaines"])
    assert notice.category == "young_infant"


def test_classifier_alone_needs_evidence(rules):
    ctx = rules.context
    assert ctx.evidence(triage.normalize("and now?")) == []
    assert ctx.evidence(triage.normalize("my baby is 3 weeks old")) == []
    assert ctx.evidence(triage.normalize("she won't feed")) == ["feed"]


@pytest.mark.parametrize("text", [
    "How do I block my lost card?", "What is the exchange rate for pounds?",
    "my internet is slow since yesterday", "I'm dying to know my balance",
])
def test_everyday_messages_pass(rules, text):
    assert not rules.assess(text).emergency


def test_notices_in_three_languages(rules):
    for cat in triage_data.CATEGORIES:
        for lang in ("en", "fr", "es"):
            assert rules.messages[cat][lang].count("{emergency_number}") == 1, (cat, lang)
    (notice, *_) = rules.check("mi bebé de 3 semanas tiene fiebre", ("fr", "es"))
    assert notice.category == "young_infant" and "Un bébé" in notice.message and "Un bebé" in notice.message


def _override(text: str) -> Path:
    from care.paths import config_dir

    path = config_dir() / "safety.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_override_add_phrase_and_category(_user_dirs):
    _override("emergency_number: '112'\n"
              "rules:\n  - id: clinic_lassa\n    category: viral_haemorrhagic\n"
              "    phrases:\n      en: [bleeding gums fever]\n"
              "messages:\n  viral_haemorrhagic:\n    en: 'Isolate and call {emergency_number}.'\n")
    (notice,) = safety.check("my son has bleeding gums and high fever")
    assert notice.category == "viral_haemorrhagic" and notice.message == "Isolate and call 112."


def test_override_always_flag_beats_every_check(_user_dirs):
    text = "I had a heart attack in 2019, what diet now?"
    assert not safety.load_rules().assess(text).emergency  # past history: not flagged by default
    _override("rules:\n  - id: clinic_mi\n    category: chest_pain\n    always_flag: true\n"
              "    phrases:\n      en: [heart attack]\n")
    result = safety.load_rules().assess(text)
    assert result.emergency and result.category == "chest_pain" and result.source == "always_flag"
    assert result.score == 1.0
    # Negated still flags: the clinic asked for it.
    assert safety.load_rules().assess("no heart attack").emergency


def test_override_disable_category_silences_classifier_too(_user_dirs, rules):
    if rules.model is None:
        pytest.skip("no classifier shipped")
    text = "my dad is grey and sweaty and says his chest feels like someone is sitting on it"
    before = rules.assess(text)
    assert before.emergency and before.category == "chest_pain"
    _override("categories:\n  chest_pain:\n    enabled: false\n")
    after = safety.load_rules().assess(text)
    assert "chest_pain" not in after.categories
    _override("rules:\n" + "".join(f"  - id: {r.id}\n    enabled: false\n" for r in rules.rules
                                    if r.category == "chest_pain"))
    again = safety.load_rules()
    assert "chest_pain" in again.disabled and "chest_pain" not in again.assess(text).categories


def test_bad_override_names_file(_user_dirs):
    from care.errors import ConfigError

    _override("rules:\n  - id: x\n    category: y\n    phrases: {en: [ok]}\n    patterns: ['(bad']\n")
    with pytest.raises(ConfigError, match="bad pattern"):
        safety.load_rules()


# -- regression floor on the dev set (measured by bench/triage.py; never tuned on it) -----------------
DEV = triage_data.labelled_dir() / "dev.jsonl"


@pytest.mark.skipif(not DEV.is_file(), reason="no dev set")
def test_dev_recall_floor(rules):
    rows = triage_data.read_labelled(DEV)
    emer = [r for r in rows if r.emergency]
    neg = [r for r in rows if not r.emergency]
    recall = sum(rules.assess(r.text).emergency for r in emer) / len(emer)
    false_alarms = sum(rules.assess(r.text).emergency for r in neg) / len(neg)
    print(f"dev recall {recall:.3f}, false alarms {false_alarms:.3f}")
    assert recall >= RECALL_FLOOR and false_alarms <= FALSE_ALARM_CEILING


RECALL_FLOOR = 0.95  # measured 0.980 (bench/triage.py)
FALSE_ALARM_CEILING = 0.30  # measured 0.225 on the hard negatives


# -- care triage -----------------------------------------------------------------------------------
def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_care_triage_args_file_and_stdin(capsys, tmp_path, monkeypatch):
    assert main(["triage", "he collapsed and isnt responding", "How do I block my card?"]) == 0
    rows = _lines(capsys.readouterr().out)
    assert [r["emergency"] for r in rows] == [True, False]
    assert rows[0]["category"] == "unconscious_or_seizure" and set(rows[0]) >= {"text", "emergency", "category",
                                                                                "score"}
    f = tmp_path / "msgs.txt"
    f.write_text("je veux mourir\n\nmy wifi is down\n", encoding="utf-8")
    assert main(["triage", "--file", str(f)]) == 0
    assert [r["category"] for r in _lines(capsys.readouterr().out)] == ["suicidal_thoughts", None]
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("my baby is 3 weeks old\nshe has a fever\n"))
    assert main(["triage", "--context", "-"]) == 0
    assert [r["category"] for r in _lines(capsys.readouterr().out)][1] == "young_infant"


def test_care_triage_rules_file_and_errors(capsys, tmp_path):
    rules_file = tmp_path / "clinic.yaml"
    rules_file.write_text("categories:\n  suicidal_thoughts:\n    enabled: false\n", encoding="utf-8")
    assert main(["triage", "--rules", str(rules_file), "je veux mourir"]) == 0
    assert _lines(capsys.readouterr().out)[0]["category"] != "suicidal_thoughts"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe broken")
    assert main(["triage", "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: Messages file is not UTF-8") and "bad.txt" in err and err.count("\n") == 1
    assert main(["triage"]) == 2
    assert "No messages" in capsys.readouterr().err
    assert main(["triage", "--rules", str(tmp_path / "missing.yaml"), "x"]) == 2
    assert "Rules file not found" in capsys.readouterr().err


def test_care_triage_imports_no_torch_or_model():
    code = ("import sys, io, contextlib\nfrom care.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['triage', 'chest pain'])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'sklearn', 'textual') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_missing_classifier_is_a_one_line_error_not_a_silent_lexicon_fallback(monkeypatch, tmp_path):
    from care.errors import ConfigError
    from care.runtime import safety, triage

    monkeypatch.setattr(triage, "model_path", lambda name="model.npz": tmp_path / name)
    triage.packaged_model.cache_clear()
    safety._load_cached.cache_clear()  # rules loaded earlier in the session hold the real model
    try:
        with pytest.raises(ConfigError, match="triage classifier is missing") as exc:
            safety.load_rules(Path("/nonexistent/safety.yaml"))
        assert "make setup" in exc.value.one_line()
    finally:
        triage.packaged_model.cache_clear()
        safety._load_cached.cache_clear()
