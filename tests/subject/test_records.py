"""A subject recorded in a file (an attack set's params.json) is data: one that names an entry point or
pickled vectors is refused unless the operator passes the trust flag on the command that reads it."""
from pathlib import Path

import pytest

from semguard.commands.attack import attack_set_subject
from semguard.cli import build_parser
from semguard.subject.core import SubjectSpec, UntrustedRecord, subject_record, subject_spec_from_record

ENTRY = SubjectSpec(model_entry="usermodels:resnet", images=Path("imgs"), vectors=Path("v.bin"))
PICKLED = SubjectSpec(model="resnet18", weights=Path("w.pth"), images=Path("imgs"), vectors=Path("v.kv"),
                      trust_pickled_vectors=True)


def _analyze(*flags: str):
    return build_parser().parse_args(["attack", "analyze", "--attack-set", "s", "--out", "o", *flags])


def test_a_recorded_entry_point_needs_trust_model_code_now():
    header = {"subject": subject_record(ENTRY)}
    with pytest.raises(UntrustedRecord, match=r"^s/params\.json: subject: field model_entry names code to import "
                                              r"and run \('usermodels:resnet'\); pass --trust-model-code to allow it$"):
        attack_set_subject(_analyze(), header)
    assert attack_set_subject(_analyze("--trust-model-code"), header).model_entry == "usermodels:resnet"


def test_recorded_trust_in_pickled_vectors_is_not_inherited():
    header = {"subject": subject_record(PICKLED)}
    with pytest.raises(UntrustedRecord, match=r"field trust_pickled_vectors asks to unpickle .*v\.kv.*"
                                              r"pass --trust-pickled-vectors to allow it"):
        attack_set_subject(_analyze(), header)
    assert attack_set_subject(_analyze("--trust-pickled-vectors"), header).trust_pickled_vectors
    plain = subject_record(SubjectSpec(model="resnet18", weights=Path("w.pth"), images=Path("i"), vectors=Path("v")))
    # the operator's flag decides, whatever the record says
    assert attack_set_subject(_analyze("--trust-pickled-vectors"), {"subject": plain}).trust_pickled_vectors
    assert not attack_set_subject(_analyze(), {"subject": plain}).trust_pickled_vectors


@pytest.mark.parametrize("record, message", [
    ([], "must be a JSON object"),
    ({"model": 3}, "field model must be str"),
    ({"input_size": True}, "field input_size must be int"),
    ({"trust_pickled_vectors": "yes"}, "field trust_pickled_vectors must be bool"),
    ({"mean": [{"x": 1}]}, "field mean must be list"),
    ({"colour": 1}, r"keys this semguard does not know: \['colour'\]"),
])
def test_malformed_records_name_the_field(record, message):
    with pytest.raises(ValueError, match=f"^x.json: {message}"):
        subject_spec_from_record(record, "x.json")
