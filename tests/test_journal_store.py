"""The store check, and the writer nonce: a journal refuses a store that ignores conditional writes,
and recognises a create of its own that landed though its answer was lost."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError

from dagster_runway.journal import ClaimTaken, Journal, JournalStoreUnsafe, Owner

FP = "cd" + "1" * 62


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if request.param == "local":
        return str(tmp_path / "journal"), {}
    s3 = request.getfixturevalue("s3")
    return s3.url("journal"), s3.storage_options


def _claim(journal: Journal, fingerprint: str = FP, attempt: int = 1):
    return journal.claim(
        fingerprint, attempt, partition="a.png", owner=Owner.current(), estimate_usd=0.25, input={"seed": 7}
    )


def test_a_store_that_ignores_conditional_writes_is_refused_with_the_fix(old_s3) -> None:
    journal = Journal(old_s3.url(".runway"), old_s3.storage_options)
    for _ in range(2):  # a failure is not cached: the next run checks again
        with pytest.raises(JournalStoreUnsafe) as refused:
            journal.verify_store()
        message = str(refused.value)
        assert f"s3://{old_s3.bucket}/.runway" in message
        assert "ignores conditional writes (If-None-Match: *)" in message and "pay for it twice" in message
        assert "AWS S3" in message and "local disk" in message
        assert (
            "`journal`" in message and "`journal_storage_options`" in message and "another bucket" in message
        )
        assert "testing" not in message  # no credential
    assert not old_s3.fs.find(old_s3.path(".runway/probe"))  # the probe object is removed


def test_local_disk_and_a_store_with_conditional_writes_pass_once_per_process(
    where, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = where
    creates = []
    original = Journal._create_exclusive

    def counting(self: Journal, path: str, data: bytes) -> bool:
        creates.append(path)
        return original(self, path, data)

    monkeypatch.setattr(Journal, "_create_exclusive", counting)
    Journal(url, options).verify_store()
    Journal(url, options).verify_store()  # the same root and options: proven already
    assert len(creates) == 2 and creates[0] == creates[1] and "/probe/" in creates[0]
    journal = Journal(url, options)
    assert not journal._list(f"{journal.root}/probe")


def _claim_in_process(url: str, options: dict[str, Any], barrier: Any, results: Any) -> None:
    journal = Journal(url, options)
    barrier.wait()
    try:
        _claim(journal)
        results.put("won")
    except ClaimTaken:
        results.put("taken")


def test_without_the_check_two_processes_both_win_one_claim_on_such_a_store(old_s3) -> None:
    """Why the check exists: on a store that ignores If-None-Match, two hosts both "take" one attempt
    of one image, and both would pay for it."""
    url, options = old_s3.url(".runway"), old_s3.storage_options
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_claim_in_process, args=(url, options, barrier, results)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["won", "won"]
    with pytest.raises(JournalStoreUnsafe):
        Journal(url, options).verify_store()


def test_an_object_that_holds_our_exact_bytes_is_our_create(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal"))
    path = journal.claim_path(FP, 1)
    Path(path).parent.mkdir(parents=True)
    Path(path).write_bytes(b'{"ours":"nonce-1"}')  # a create of ours that landed before a retry
    assert journal._create_exclusive(path, b'{"ours":"nonce-1"}') is True
    assert journal._create_exclusive(path, b'{"ours":"nonce-2"}') is False  # another writer's


def test_a_claim_put_that_landed_but_whose_answer_was_lost_is_ours(
    s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every PUT reaches the server and then its connection closes before the answer: s3fs retries,
    the retry gets 412. The claim and its spend entry are still ours, counted once."""
    journal = Journal(s3.url(".runway"), s3.storage_options)
    journal.fs.connect()
    client = journal.fs.s3
    put_object, lost = client.put_object, []

    async def landed_then_lost(**kwargs: Any) -> Any:
        answer = await put_object(**kwargs)
        if kwargs["Key"] not in lost:
            lost.append(kwargs["Key"])
            raise ConnectionClosedError(endpoint_url=s3.endpoint_url)
        return answer

    landed_then_lost.__name__ = "put_object"  # s3fs looks the operation up by name
    monkeypatch.setattr(client, "put_object", landed_then_lost)
    claim = _claim(journal)
    assert any(key.endswith("0001.json") and "/claims/" in key for key in lost)  # the case happened
    assert any("/spend/" in key for key in lost)
    fresh = Journal(s3.url(".runway"), s3.storage_options)
    assert fresh.latest(FP) == claim
    assert fresh.spend_summary().entries == 1 and fresh.spent_usd() == 0.25
    with pytest.raises(ClaimTaken):  # and another writer is still refused
        _claim(fresh)


def test_a_store_that_grants_no_delete_still_passes_the_check(tmp_path, monkeypatch) -> None:
    """The probe object is removed best effort: the journal deletes nothing else, so a bucket policy
    without delete must not block every submit."""
    journal = Journal(str(tmp_path / "no-delete"))

    def refuse(path: str) -> None:
        raise PermissionError(f"AccessDenied: DeleteObject {path}")

    monkeypatch.setattr(journal.fs, "rm_file", refuse)
    journal.verify_store()
    assert list((tmp_path / "no-delete" / "probe").iterdir())  # the probe stayed, and nothing failed
