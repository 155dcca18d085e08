"""The durable DICOM queue on real SQLite and PostgreSQL: a re-send is recognised, leases hand each instance to one worker, a
killed worker's instance comes back, and an instance gets exactly one result."""
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.storage.db import create_db_engine
from app.storage.inbox import DONE, FAILED, QUEUED, SKIPPED, InboxRepository, Received


def received(n: int, **changes) -> Received:
    values = dict(sop_instance_uid=f"1.2.3.{n}", study_instance_uid="1.2.3", series_instance_uid="1.2.3.0",
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", source="stow-rs", dicom=b"DICM" + bytes([n]),
                  label_set="chest-xray-pneumonia", method="zeroshot")
    return Received(**{**values, **changes})


@pytest.fixture
def inbox(database_url: str) -> InboxRepository:
    return InboxRepository(create_db_engine(database_url))


def test_a_resent_instance_is_recognised_not_queued_twice(inbox: InboxRepository) -> None:
    first, created = inbox.put(received(1))
    again, created_again = inbox.put(received(1, dicom=b"other bytes"))
    assert created and not created_again and again.id == first.id and first.state == QUEUED
    skipped, _ = inbox.put(received(2, label_set=None, method=None, skip_reason="no routing rule matches X"))
    assert skipped.state == SKIPPED and skipped.reason == "no routing rule matches X"
    assert inbox.waiting() == 1


def test_leases_order_and_exactly_one_result(inbox: InboxRepository) -> None:
    for n in (1, 2):
        inbox.put(received(n))
    entry, data = inbox.claim(lease_seconds=60, max_attempts=3)
    assert entry.sop_instance_uid == "1.2.3.1" and data == b"DICM\x01" and entry.attempts == 1
    second, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    assert second.sop_instance_uid == "1.2.3.2"
    assert inbox.claim(lease_seconds=60, max_attempts=3) is None                 # both leased
    result = inbox.complete(entry, label_set_version=1, model_id="m", classification={"decision": "normal"})
    assert result is not None and inbox.entry_for("1.2.3.1").state == DONE
    assert inbox.complete(entry, label_set_version=1, model_id="m", classification={"decision": "other"}) is None
    assert [r.classification["decision"] for r in inbox.results(study_instance_uid="1.2.3")] == ["normal"]
    assert inbox.result(result.id).sop_instance_uid == "1.2.3.1"


def test_an_expired_lease_goes_back_to_the_queue(inbox: InboxRepository) -> None:
    inbox.put(received(1))
    inbox.claim(lease_seconds=0.05, max_attempts=3)
    time.sleep(0.1)
    reclaimed, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    assert reclaimed.sop_instance_uid == "1.2.3.1" and reclaimed.attempts == 2


def test_failures_retry_or_end_with_their_reason(inbox: InboxRepository) -> None:
    inbox.put(received(1))
    entry, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    assert inbox.fail(entry, "encoder_timeout: busy", retry_in_seconds=0)
    entry, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    assert inbox.fail(entry, "invalid_image: no pixel data", retry_in_seconds=None)
    final = inbox.entry_for("1.2.3.1")
    assert final.state == FAILED and final.reason == "invalid_image: no pixel data" and final.attempts == 2
    assert inbox.claim(lease_seconds=60, max_attempts=3) is None


def test_a_retry_waits_for_its_back_off(inbox: InboxRepository) -> None:
    inbox.put(received(1))
    entry, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    inbox.fail(entry, "overloaded: busy", retry_in_seconds=0.3)
    assert inbox.claim(lease_seconds=60, max_attempts=3) is None          # not yet: the same busy server
    assert inbox.waiting() == 1
    time.sleep(0.35)
    assert inbox.claim(lease_seconds=60, max_attempts=3)[0].attempts == 2


def test_an_instance_whose_worker_keeps_dying_fails_for_good(inbox: InboxRepository) -> None:
    inbox.put(received(1))
    for _ in range(2):
        inbox.claim(lease_seconds=0.05, max_attempts=2)            # and the worker dies: the lease runs out
        time.sleep(0.1)
    assert inbox.claim(lease_seconds=60, max_attempts=2) is None
    gave_up = inbox.entry_for("1.2.3.1")
    assert gave_up.state == FAILED and "gave up after 2 attempts" in gave_up.reason


def test_a_worker_that_lost_its_lease_cannot_overwrite_the_new_owner(inbox: InboxRepository) -> None:
    inbox.put(received(1))
    stale, _ = inbox.claim(lease_seconds=0.05, max_attempts=3)
    time.sleep(0.1)
    owner, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    assert not inbox.fail(stale, "encoder_timeout: late", retry_in_seconds=None)
    assert inbox.entry_for("1.2.3.1").state == "processing"
    inbox.complete(owner, label_set_version=1, model_id="m", classification={"decision": "normal"})
    assert inbox.entry_for("1.2.3.1").state == DONE


def test_a_resent_failed_instance_is_queued_again(inbox: InboxRepository) -> None:
    inbox.put(received(1))
    entry, _ = inbox.claim(lease_seconds=60, max_attempts=3)
    inbox.fail(entry, "overloaded: busy", retry_in_seconds=None)
    again, created = inbox.put(received(1, dicom=b"DICM fresh"))
    assert not created and again.state == QUEUED and again.attempts == 0 and again.reason is None
    assert inbox.claim(lease_seconds=60, max_attempts=3)[1] == b"DICM fresh"


KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys
    from app.storage.db import create_db_engine
    from app.storage.inbox import InboxRepository
    inbox = InboxRepository(create_db_engine(sys.argv[1]))
    inbox.claim(lease_seconds=3600, max_attempts=3)
    os.kill(os.getpid(), signal.SIGKILL)      # killed mid-classification, its lease still an hour long
""")


def test_a_killed_workers_instance_is_classified_once_after_restart(database_url: str) -> None:
    url = database_url
    inbox = InboxRepository(create_db_engine(url))
    inbox.put(received(1))
    killed = subprocess.run([sys.executable, "-c", KILLED_WORKER, url], capture_output=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    restarted = InboxRepository(create_db_engine(url))
    assert restarted.claim(lease_seconds=60, max_attempts=3) is None              # still leased to the dead process...
    assert restarted.release_leases() == 1                        # ...until start-up releases it
    entry, _ = restarted.claim(lease_seconds=60, max_attempts=3)
    assert entry.attempts == 2
    restarted.complete(entry, label_set_version=1, model_id="m", classification={"decision": "normal"})
    assert len(restarted.results()) == 1 and restarted.waiting() == 0


def test_a_replica_starting_up_takes_back_only_its_own_leases(database_url: str) -> None:
    """Two replicas on one database: B's restart must not hand A's in-flight instance to a second worker."""
    engine = create_db_engine(database_url)
    replica_a, replica_b = InboxRepository(engine, owner="a:8000"), InboxRepository(engine, owner="b:8000")
    replica_a.put(received(1))
    replica_a.put(received(2))
    held_by_a, _ = replica_a.claim(lease_seconds=3600, max_attempts=3)
    held_by_b, _ = replica_b.claim(lease_seconds=3600, max_attempts=3)
    assert {held_by_a.sop_instance_uid, held_by_b.sop_instance_uid} == {"1.2.3.1", "1.2.3.2"}

    assert replica_b.release_leases() == 1                      # B restarted: its own lease only
    again, _ = replica_b.claim(lease_seconds=60, max_attempts=3)
    assert again.sop_instance_uid == held_by_b.sop_instance_uid
    assert replica_b.claim(lease_seconds=60, max_attempts=3) is None    # A's is still A's
    assert replica_a.complete(held_by_a, label_set_version=1, model_id="m", classification={}) is not None


def test_workers_claiming_at_once_each_get_different_instances(database_url: str) -> None:
    """Four workers, each with its own engine (as replicas have), drain one queue at once: every instance goes to
    exactly one of them (SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL, the one writer lock on SQLite)."""
    InboxRepository(create_db_engine(database_url)).put(received(0))
    seed = InboxRepository(create_db_engine(database_url))
    for n in range(1, 24):
        seed.put(received(n))
    start = threading.Barrier(4)

    def drain(worker: int) -> list[str]:
        inbox = InboxRepository(create_db_engine(database_url, busy_timeout_ms=30_000), owner=f"w{worker}")
        start.wait()
        claimed = []
        while (leased := inbox.claim(lease_seconds=600, max_attempts=3)) is not None:
            claimed.append(leased[0].sop_instance_uid)
        return claimed

    with ThreadPoolExecutor(4) as pool:
        per_worker = list(pool.map(drain, range(4)))
    every = [uid for claimed in per_worker for uid in claimed]
    assert sorted(every) == sorted(f"1.2.3.{n}" for n in range(24))     # none twice, none left
