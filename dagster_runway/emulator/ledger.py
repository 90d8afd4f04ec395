"""The ledger: what the emulator billed, per request and per input fingerprint."""

from __future__ import annotations

import hashlib
from datetime import datetime

from pydantic import BaseModel, Field


class LedgerEntry(BaseModel):
    """One accepted submit."""

    request_id: str = Field(description="The request the submit created.")
    account: str = Field(description="A short hash of the token that submitted (never the token).")
    fingerprint: str = Field(description="sha256 of the model id and the input, the image taken by identity.")
    duration: int = Field(description="Requested video length in seconds.")
    cost_usd: float = Field(description="What the submit costs now: 0 once refunded.")
    billed: bool = Field(
        description="Whether the submit stays charged: not once cancelled, nor once failed without bill_failed.",
    )
    state: str = Field(
        description="The request's state: in_queue, in_progress, succeeded, failed or cancelled."
    )
    expired: bool = Field(description="Whether the request is past its time to live.")
    submitted_at: datetime = Field(description="When the submit was accepted, on the emulator clock.")
    video_sha256: str | None = Field(default=None, description="sha256 of the rendered video, once rendered.")
    video_bytes: int | None = Field(default=None, description="Size of the rendered video, once rendered.")


class FingerprintTotal(BaseModel):
    """The submits of one input fingerprint."""

    submissions: int = Field(description="Accepted submits, refunded ones included.")
    billed_submissions: int = Field(description="Accepted submits that stay charged.")
    cost_usd: float = Field(description="Total charged, refunds deducted.")
    request_ids: list[str] = Field(description="The requests, in submission order.")


class Ledger(BaseModel):
    """Every accepted submit, with totals overall and per input fingerprint."""

    submissions: int = Field(description="Accepted submits, refunded ones included.")
    billed_submissions: int = Field(description="Accepted submits that stay charged (not refunded).")
    total_cost_usd: float = Field(description="Total charged, refunds deducted.")
    by_fingerprint: dict[str, FingerprintTotal] = Field(description="Totals per input fingerprint.")
    entries: list[LedgerEntry] = Field(description="Every accepted submit, in submission order.")

    @classmethod
    def of(cls, entries: list[LedgerEntry]) -> Ledger:
        by_fingerprint: dict[str, FingerprintTotal] = {}
        for entry in entries:
            total = by_fingerprint.setdefault(
                entry.fingerprint,
                FingerprintTotal(submissions=0, billed_submissions=0, cost_usd=0.0, request_ids=[]),
            )
            total.submissions += 1
            total.billed_submissions += entry.billed
            total.cost_usd = round(total.cost_usd + entry.cost_usd, 6)
            total.request_ids.append(entry.request_id)
        return cls(
            submissions=len(entries),
            billed_submissions=sum(entry.billed for entry in entries),
            total_cost_usd=round(sum(entry.cost_usd for entry in entries), 6),
            by_fingerprint=by_fingerprint,
            entries=entries,
        )


def account_id(token: str) -> str:
    """The short hash that stands for a token's account in the ledger and the logs."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]
