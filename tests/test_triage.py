"""The triage package (care/runtime/triage): normalisation in every script, the lexicon and its context checks,
conversation context, languages, notices and first-aid cards, clinic overrides, `care triage`, and floors on
the dev sets (measured by bench/triage.py, never tuned on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from care.cli import main
from care.errors import ConfigError
from care.runtime import triage
from care.runtime.triage import classifier, data, decide, lexicon
from care.runtime.triage import rules as rules_mod
from care.runtime.triage.normalize import normalize, script_of, sms_table


@pytest.fixture(scope="module")
def rules():
    return triage.packaged_rules()


@pytest.fixture(scope="module")
def lexicon_only():
    return triage.packaged_rules(classifier_on=False)


def v(text: str, rules: triage.Rules | None = None, earlier: tuple[str, ...] | list[str] = ()) -> decide.Verdict:
    return triage.assess([*earlier, text], rules or triage.load_rules())


# -- normalisation -----------------------------------------------------------------------------------------
def test_normalize_latin():
    assert normalize("Él  NO respirá") == "el no respira"
    assert normalize("u cant breathe?? pleeease") == "you can't breathe ? ? pleease"
    assert normalize("my 2yo drank it") == "my 2 years old drank it"
    assert normalize("self-harm") == "self harm"
    assert normalize("jsuis pas bien", sms_table("fr")) == "je suis pas bien"
    # Each language's own spellings: Spanish "ya" and "yo" are words, not French "il y a" or "years old".
    assert normalize("ya no respira yo creo", sms_table("es")) == "ya no respira yo creo"
    assert normalize("mtoto ana homa ya juu", sms_table("sw")) == "mtoto ana homa ya juu"
    assert normalize("u cant breathe", sms_table("hi")) == "you can't breathe"  # Hinglish mixes in English


def test_normalize_keeps_words_whole_in_every_script():
    """Issue 23: "मम्मी को सांस ..." came out as one token a character, the virama stripped."""
    assert normalize("मम्मी को सांस लेने में बहुत दिक्कत").split() == ["मम्मी", "को", "सांस", "लेने", "में", "बहुत",
                                                                       "दिक्कत"]
    assert normalize("আম্মুর বুকে ব্যথা") == "আম্মুর বুকে ব্যথা"
    assert normalize("साँस") == normalize("सांस")  # candrabindu read as anusvara
    assert normalize("बच्चा ३ महीने का") == "बच्चा 3 महीने का"  # Devanagari digits
    assert normalize("বাচ্চার জ্বর!!!") == "বাচ্চার জ্বর ! ! !"
    assert script_of("मम्मी को") == "deva" and script_of("আম্মু") == "beng" and script_of("mummy ko") == "latin"


def test_typo_index():
    idx = lexicon.TypoIndex(["seizure", "breathing", "bleeding"])
    assert idx.correct("siezure") == "seizure"  # swapped letters
    assert idx.correct("bleding") == "bleeding"  # one letter missing
    assert idx.correct("house") == "house"  # not near any lexicon word
    assert lexicon.within_one_edit("abcd", "abdc") and not lexicon.within_one_edit("abcd", "dcba")
    by_lang = lexicon.TypoIndex({"en": ["breathing"], "es": ["responde"]})
    assert by_lang.correct("response", "en") == "response"  # an English word, one edit from a Spanish one
    assert by_lang.correct("respnde", "es") == "responde" and by_lang.correct("breathng", "es") == "breathing"


def test_an_english_word_is_not_read_as_another_languages_lexicon_word(lexicon_only):
    # The typo index, not the classifier: "no response" is one edit from Spanish "no responde" (unconscious).
    assert not v("the seller sent no response and I want my money back", lexicon_only).emergency
    spanish = v("mi abuelo se cayo y no respnde", lexicon_only)
    assert spanish.category == "unconscious_or_seizure" and spanish.why == "lexicon: no responde"


# -- the lexicon and its context checks ---------------------------------------------------------------------
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
    ("I have chest pain and my left arm is numb", "chest_pain"),
    ("my mother's face is drooping and her speech is slurred", "stroke"),
    ("the cut won't stop bleeding", "severe_bleeding"),
    ("my child is having difficulty breathing and her lips are blue", "difficulty_breathing"),
    ("I don't want to live anymore", "suicidal_thoughts"),
    ("I'm 30 weeks pregnant and bleeding", "pregnancy_emergency"),
    ("my throat is swelling after a bee sting", "severe_allergic_reaction"),
    ("j'ai une douleur dans la poitrine", "chest_pain"),
    ("tengo dolor en el pecho", "chest_pain"),
])
def test_lexicon_catches(lexicon_only, text, category):
    result = v(text, lexicon_only)
    assert result.emergency and category in result.categories, (text, result)
    assert result.why.startswith("lexicon: ")


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
    ("Sepsis. Can sepsis be prevented?", "general"),
])
def test_lexicon_context_cancels(lexicon_only, text, why):
    result = v(text, lexicon_only)
    assert not result.emergency, (text, why, result)


@pytest.mark.parametrize("text", [
    "my card payment bounced", "I need a chest of drawers delivered", "I'm dying to know my balance",
    "How do I stop a payment that is pending?", "my phone battery is bleeding charge",
    "Does the swimming pool offer backstroke lessons?", "I want to die my hair red",
    "I lost my card, can you block it?", "I'm pregnant, can I take paracetamol for a headache?",
    "How often should I get my blood pressure checked?", "my internet is slow since yesterday",
])
def test_everyday_messages_pass(rules, text):
    assert not v(text, rules).emergency


def test_conversation_context_carries_age(rules):
    earlier = ["my baby is 3 weeks old"]
    with_age = v("she has a fever and feels hot", rules, earlier)
    assert with_age.emergency and with_age.category == "young_infant" and with_age.why.endswith("+context")
    assert v("she has a fever and feels hot", rules).category != "young_infant"
    assert not v("thanks, where do I park?", rules, earlier).emergency  # the facts alone never flag
    assert v("elle a de la fièvre", rules, ["mon bébé a 3 semaines"]).category == "young_infant"


# Short follow-ups and lone context facts: no symptom, so no flag. Written for this test.
@pytest.mark.parametrize("text", [
    "and then?", "ok, what now", "so what do we do after that?", "got it, thanks!", "how many times?",
    "et ensuite ?", "ok merci beaucoup", "c'est normal ?", "y luego?", "ok gracias", "¿es normal?",
    "my daughter is 7", "he's 2 years old", "I am 28 weeks pregnant", "she's diabetic",
    "mon fils a 5 ans", "je suis enceinte de 6 mois", "mi bebé tiene 2 meses", "estoy embarazada",
])
def test_short_follow_ups_and_lone_facts_pass(rules, text):
    assert not v(text, rules).emergency, text
    assert not v(text, rules, ["my baby is 3 weeks old"]).emergency, text


def test_classifier_alone_needs_evidence(rules):
    ctx = rules.context
    assert ctx.evidence(normalize("and now?")) == []
    assert ctx.evidence(normalize("my baby is 3 weeks old")) == []
    assert ctx.evidence(normalize("she won't feed")) == ["feed"]
    assert ctx.evidence(normalize("बच्चा दूध नहीं पी रहा")) != []  # any script's words can be evidence


# -- the verdict, languages, notices and cards --------------------------------------------------------------
def test_verdict_fields_and_reasons(rules):
    result = v("he collapsed and is not breathing", rules)
    assert result.emergency and result.category and result.language == "en" and 0 <= result.score <= 1
    assert result.why.startswith("lexicon: ") or result.why == "classifier"
    assert v("I had a stroke in 2019, can I fly?", rules).why == "cancelled: past"
    assert v("How do I block my card?", rules).emergency is False


@pytest.mark.parametrize(("text", "lang", "script"), [
    ("he collapsed and is not breathing", "en", "native"), ("il ne respire plus", "fr", "native"),
    ("no puede respirar", "es", "native"), ("मम्मी को सांस नहीं आ रही", "hi", "native"),
    ("আম্মু শ্বাস নিতে পারছে না", "bn", "native"),
])
def test_language_and_script(rules, text, lang, script):
    result = v(text, rules)
    assert (result.language, result.script) == (lang, script)


def test_notice_in_the_users_language_when_served(rules):
    result = v("tengo dolor en el pecho", rules)
    assert "emergencias" in triage.notice_text(result, rules, ("en", "es"))  # served: the user's language
    assert "emergency number" in triage.notice_text(result, rules, ("en",))  # not served: the clinic's
    both = triage.notice_text(v("il ne respire plus", rules), rules, ("en", "es"))  # fr not served: all served
    assert both.count("\n") == 1 and "emergency" in both and "emergencia" in both


def test_every_category_has_a_sourced_card_and_notices(rules):
    for cat in data.CATEGORIES:
        steps = rules.cards.get(cat)
        assert steps and all(s.get("source") and s.get("en") for s in steps), cat
        assert rules.messages[cat]["en"].count("{emergency_number}") == 1, cat
    card = triage.card(v("my dad collapsed and is not breathing", rules), rules, ("en",))
    assert card is not None and card.text.startswith("While help comes:") and "\n1. " in card.text
    assert len(card.steps) == len(card.sources) and all(card.sources)


def test_translated_cards_match_the_english_steps():
    """Each language file's card has as many steps as the English card, in the same order (the loader
    refuses otherwise, naming the file)."""
    for path in rules_mod.language_files():
        lang_data = rules_mod.read_yaml(path)
        base = rules_mod.read_yaml(rules_mod.packaged_dir() / "cards.yaml")["cards"]
        for cat, steps in (lang_data.get("cards") or {}).items():
            assert len(steps) == len(base[cat]["steps"]), (path.name, cat)


# -- clinic overrides ------------------------------------------------------------------------------------
def _override(text: str) -> Path:
    from care.paths import config_dir

    path = config_dir() / "safety.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_clinic_override_file(_user_dirs):
    _override("languages: [fr]\nemergency_number: '15'\n"
              "rules:\n  - id: chest_pain\n    enabled: false\n"
              "  - id: clinic_snakebite\n    category: snakebite\n    patterns:\n      en: ['\\bsnake\\s*bite|bitten by a snake']\n"
              "messages:\n  snakebite:\n    fr: 'Morsure de serpent : venez au centre de santé, appelez le {emergency_number}.'\n"
              "cards:\n  snakebite:\n    steps:\n      - {source: 'Protocole du district', fr: 'Allez au CHU : il a le sérum.'}\n")
    rules = triage.load_rules()
    assert rules.languages == ("fr",) and len(rules.sources) == 2
    assert not any(r.id == "chest_pain" and r.enabled for r in rules.rules)
    result = v("my son was bitten by a snake", rules)
    assert result.category == "snakebite"  # the clinic's own category comes first
    assert "appelez le 15" in triage.notice_text(result, rules)
    assert triage.card(result, rules).steps == ["1. Allez au CHU : il a le sérum."]
    assert "Appelez le 15" in triage.notice_text(v("I can't breathe", rules), rules)


def test_override_always_flag_beats_every_check(_user_dirs):
    text = "I had a heart attack in 2019, what diet now?"
    assert not v(text).emergency
    _override("rules:\n  - id: clinic_mi\n    category: chest_pain\n    always_flag: true\n    phrases:\n      en: [heart attack]\n")
    result = v(text)
    assert result.emergency and result.category == "chest_pain" and result.source == "always_flag" and result.score == 1.0
    assert v("no heart attack").emergency  # negated still flags: the clinic asked for it


def test_override_disable_category_silences_classifier_too(_user_dirs, rules):
    text = "my dad is grey and sweaty and says his chest feels like someone is sitting on it"
    assert v(text, rules).category == "chest_pain"
    _override("categories:\n  chest_pain:\n    enabled: false\n")
    assert "chest_pain" not in v(text).categories


@pytest.mark.parametrize(("content", "match"), [
    ("rules:\n  - id: x\n    category: y\n    patterns: ['(unclosed']\n", "bad pattern"),
    ("rules: [\n", "not valid YAML"),
    ("cards:\n  stroke:\n    steps: ['no source']\n", "cards.stroke.steps"),
    ("rules:\n  - category: y\n", "rules\\[0\\]"),
])
def test_bad_override_is_one_line_naming_file_and_key(_user_dirs, content, match):
    _override(content)
    with pytest.raises(ConfigError, match=match) as err:
        triage.load_rules()
    assert "safety.yaml" in err.value.one_line() and "\n" not in err.value.one_line()


def test_missing_classifier_is_a_one_line_error_not_a_silent_lexicon_fallback(monkeypatch, tmp_path):
    monkeypatch.setattr(classifier, "model_path", lambda name="model.npz": tmp_path / name)
    classifier.packaged_model.cache_clear()
    rules_mod._load_cached.cache_clear()  # rules loaded earlier in the session hold the real model
    try:
        with pytest.raises(ConfigError, match="triage classifier is missing") as exc:
            triage.packaged_rules()
        assert "make setup" in exc.value.one_line()
    finally:
        classifier.packaged_model.cache_clear()
        rules_mod._load_cached.cache_clear()


# -- floors on the dev sets (measured by bench/triage.py; never tuned on them) -------------------------------
def test_dev_recall_and_false_alarm_floors(rules):
    rows = data.read_split("dev")
    assert len(rows) > 1000  # the dev sets ship in the repo (care/data/triage/dev*.jsonl)
    emer = [r for r in rows if r.emergency]
    neg = [r for r in rows if not r.emergency]
    recall = sum(triage.assess(r.messages, rules).emergency for r in emer) / len(emer)
    false_alarms = sum(triage.assess(r.messages, rules).emergency for r in neg) / len(neg)
    assert recall >= RECALL_FLOOR and false_alarms <= FALSE_ALARM_CEILING, (recall, false_alarms)


RECALL_FLOOR = 0.95
FALSE_ALARM_CEILING = 0.20  # bench at 90686fd: 0.144 [0.120, 0.172]; the 0.08 target is not met


@pytest.mark.shared_data
def test_banking77_has_no_false_alarms(shared_data, rules, lexicon_only):
    texts = data.banking77(shared_data, "test")  # all 3,080: a quarter's rate was too noisy for a 0.5% ceiling
    assert [t for t in texts[::4] if v(t, lexicon_only).emergency] == []  # the rules alone: none
    fired = [t for t in texts if v(t, rules).emergency]
    assert len(fired) / len(texts) <= 0.005, fired


# -- care triage -----------------------------------------------------------------------------------------
def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_care_triage_args_file_and_stdin(capsys, tmp_path, monkeypatch):
    assert main(["triage", "he collapsed and isnt responding", "How do I block my card?"]) == 0
    rows = _lines(capsys.readouterr().out)
    assert [r["emergency"] for r in rows] == [True, False]
    assert rows[0]["category"] == "unconscious_or_seizure"
    assert set(rows[0]) >= {"text", "emergency", "category", "language", "score", "why"}
    f = tmp_path / "msgs.txt"
    f.write_text("je veux mourir\n\nmy wifi is down\n", encoding="utf-8")
    assert main(["triage", "--file", str(f)]) == 0
    out = _lines(capsys.readouterr().out)
    assert [r["category"] for r in out] == ["suicidal_thoughts", None] and out[0]["language"] == "fr"
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("my baby is 3 weeks old\nshe has a fever\n"))
    assert main(["triage", "--context", "-"]) == 0
    assert [r["category"] for r in _lines(capsys.readouterr().out)][1] == "young_infant"
    assert main(["triage", "--show", "--lang", "en", "my son is not breathing"]) == 0
    shown = _lines(capsys.readouterr().out)[0]
    assert shown["notice"] and shown["card"].startswith("While help comes:")


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


@pytest.mark.parametrize(("text", "claims"), [
    ("As a doctor, I recommend rest.", True), ("I am a nurse and this is normal.", True),
    ("I'm your physician.", True), ("Please see a doctor if it gets worse.", False),
    ("A doctor would check your blood pressure.", False),
])
def test_claims_clinician(text, claims):
    assert triage.claims_clinician(text) is claims


# -- context cues by language, and the classifier's veto ----------------------------------------------------
def test_a_languages_cues_do_not_cancel_another_languages_message(lexicon_only):
    # Bangla "na" (no) after a hit cancels it in Bangla; in Swahili "na" is "and".
    assert lexicon_only.context_for("bn").cue_names(normalize("bleeding na")) == ["negation"]
    assert "negation" not in lexicon_only.context_for("sw").cue_names(normalize("bleeding na"))
    swahili = v("Niko pregnant 30 weeks, leo nimeanza kuona bleeding nyekundu na contractions kila dakika tano",
                lexicon_only)
    assert swahili.language == "sw" and swahili.emergency, swahili.why
    # Portuguese "sem" (without) is the French abbreviation of "semaines".
    assert v("nouveau né 2 sem fievre et mou", lexicon_only).emergency
    # Portuguese "no" is "in the" ("dor no peito": chest pain), not English "no"; its own "sem" still negates.
    assert v("meu pai ta com dor forte no peito e suando frio", lexicon_only).emergency
    assert not v("sem dor no peito, só uma tosse chata", lexicon_only).emergency
    # Every language's cues together stay available, and English cues hold in every language (code-mixing).
    assert "negation" in lexicon_only.context.cue_names(normalize("bleeding na"))
    assert "negation" in lexicon_only.context_for("sw").cue_names(normalize("no chest pain"))


def test_classifier_veto_of_lexicon_hits(rules):
    import dataclasses

    text = "my husband has crushing chest pain and is sweating"
    assert rules.model is not None and v(text, rules).source == "lexicon"
    vetoing = dataclasses.replace(rules, model=dataclasses.replace(rules.model, veto=1.01))
    vetoed = v(text, vetoing)
    assert not vetoed.emergency and vetoed.why.startswith("cancelled: classifier") and vetoed.source == "veto"
    # An always_flag rule is never vetoed.
    forced = dataclasses.replace(vetoing, rules=[dataclasses.replace(r, always_flag=True) for r in rules.rules])
    assert v(text, forced).emergency
    assert 0.0 <= rules.model.veto < rules.model.threshold  # the packaged veto sits below the flag threshold


def test_the_situations_category_comes_before_a_generic_sign(lexicon_only):
    # Both the drowning and the breathing phrases match; the card shown must be the drowning one.
    drowned = v("we just pulled my son out of the pond, he is not breathing", lexicon_only)
    assert drowned.emergency and drowned.categories[0] == "drowning", drowned.categories
    assert "difficulty_breathing" in drowned.categories  # both matched: the order is what is tested
    bleeding = v("I am 7 months pregnant and bleeding heavily", lexicon_only)
    assert bleeding.categories[0] == "pregnancy_emergency", bleeding.categories
    assert decide.GENERIC_SIGNS.issubset(data.CATEGORIES)


def test_the_classifier_names_the_category_when_far_surer(rules):
    import dataclasses

    import numpy as np

    text = "my husband is not breathing"  # the lexicon's phrase names a sign: difficulty_breathing
    plain = v(text, rules)
    assert plain.emergency and plain.source == "lexicon"
    # A model far surer of another category (its bias pushed up) names the category; the lexicon still flags.
    model = rules.model
    bias = model.bias.copy()
    bias[model.classes.index("drowning")] += 12.0
    sure = dataclasses.replace(rules, model=dataclasses.replace(model, bias=bias.astype(np.float32)))
    named = v(text, sure)
    assert named.emergency and named.category == "drowning" and named.why.endswith("category: classifier"), named
    assert plain.category in named.categories  # the lexicon's category is kept after it
    # Not for an always-flag rule: the clinic's phrase names its category.
    forced = dataclasses.replace(sure, rules=[dataclasses.replace(r, always_flag=True) for r in sure.rules])
    assert v(text, forced).category == plain.category
