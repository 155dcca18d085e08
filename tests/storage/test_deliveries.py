"""Result deliveries on real SQLite and PostgreSQL: leases, back-off, the attempts cap, dead letters and their retry, and a worker
that lost its lease cannot overwrite the new owner's outcome."""
import time

import pytest

from app.storage.db import create_db_engine
from app.storage.deliveries import DEAD_LETTER, PENDING, SENT, DeliveryRepository
from app.storage.inbox import InboxRepository, Received


@pytest.fixture
def stores(database_url: str) -> tuple[InboxRepository, DeliveryRepository]:
    engine = create_db_engine(database_url)
    inbox = InboxRepository(engine)
    inbox.put(Received(sop_instance_uid="1.2.3.1", study_instance_uid="1.2.3", series_instance_uid="1.2.3.0",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.1", source="stow-rs", dicom=b"DICM",
                       label_set="chest-xray-pneumonia", method="zeroshot"))
    entry, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    inbox.complete(entry, label_set_version=1, model_id="m", classification={"decision": "normal"},
                   deliveries=[("cstore", "PACS@127.0.0.1:104"), ("webhook", "http://hooks.example/x?token=s")])
    return inbox, DeliveryRepository(engine)


def states(inbox: InboxRepository) -> dict[str, str]:
    return {d.target: d.state for d in inbox.results()[0].deliveries}


def test_deliveries_are_written_with_their_result_and_sent_once(stores) -> None:
    inbox, deliveries = stores
    assert states(inbox) == {"cstore": PENDING, "webhook": PENDING}
    first, second = deliveries.claim(60, 3), deliveries.claim(60, 3)
    assert {first.target, second.target} == {"cstore", "webhook"} and deliveries.claim(60, 3) is None
    assert deliveries.sent(first, "1.2.3.99") and deliveries.sent(second)
    assert set(states(inbox).values()) == {SENT} and deliveries.next_due() is None


def test_back_off_then_dead_letter_then_retry(stores) -> None:
    inbox, deliveries = stores
    for _ in range(2):
        claimed = deliveries.claim(60, 3)
        deliveries.failed(claimed, "PACS@127.0.0.1:104 rejected", retry_in_seconds=0.2 if claimed.attempts == 1 else None)
        if claimed.attempts == 1:
            assert deliveries.claim(60, 3).id != claimed.id           # the other one; this waits out its back-off
            time.sleep(0.25)
    assert deliveries.dead_letters()["cstore"] + deliveries.dead_letters()["webhook"] == 1
    assert deliveries.retry_dead_letters() == 1
    assert DEAD_LETTER not in states(inbox).values()


def test_a_stale_worker_cannot_overwrite_and_a_dying_one_ends_as_a_dead_letter(stores) -> None:
    _, deliveries = stores
    stale, dying = deliveries.claim(0.05, 2), deliveries.claim(0.1, 2)
    time.sleep(0.15)
    owner = deliveries.claim(60, 2)            # the first lease ran out first: its delivery is taken over
    assert owner.id == stale.id and owner.attempts == 2
    assert not deliveries.failed(stale, "late", retry_in_seconds=None)    # lost its lease: no effect
    assert not deliveries.sent(stale)
    assert deliveries.sent(owner)
    assert deliveries.claim(0.05, 2).id == dying.id    # its second attempt, whose worker dies too
    time.sleep(0.1)
    assert deliveries.claim(60, 2) is None
    assert deliveries.dead_letters()[dying.target] == 1
