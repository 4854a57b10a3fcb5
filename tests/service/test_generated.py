"""The committed stubs in service/generated/ are exactly what `python -m service.gen_protos` writes."""
from service.gen_protos import stale_files


def test_generated_stubs_are_current():
    assert stale_files() == [], "run `python -m service.gen_protos` and commit service/generated/"
