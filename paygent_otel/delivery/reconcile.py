"""The conservation report, from the spools' journals (``paygent-otel reconcile`` prints it).

Per period, customer and kind, every record handed to the spool must be accounted for::

    recorded = delivered + duplicates + dead-lettered + pending + purged + refused

with records and quantities (audio minutes, characters, tokens). A ledger (the sandbox's)
can also be checked: what the spool says it delivered against what the ledger received.
The report says what no spool can see: usage lost before ``export()``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Final, Protocol

from paygent_otel._output import PERIODS, format_table
from paygent_otel.delivery.spool.journal import JournalRow

__all__ = [
    "BLIND_SPOTS",
    "COLUMNS",
    "ConservationRow",
    "LedgerCheck",
    "LedgerView",
    "Report",
    "check_against_ledger",
    "conservation_report",
    "report_from_journal",
]

COLUMNS: Final = ("delivered", "duplicate", "dead", "pending", "purged", "refused")
"""Where recorded usage can be, in the order the report shows them."""

BLIND_SPOTS: Final = (
    "usage lost before export() never reaches the spool, so no report can count it:",
    "  - a full BatchSpanProcessor queue drops spans (the SDK logs 'Queue is full'); size "
    "max_queue_size for your peak, or record usage on a dedicated provider",
    "  - a sampler that drops a trace drops its usage spans, unless the provider uses "
    "paygent_otel.UsageSampler, which keeps every span that carries usage",
    "  - span limits (max attributes per span) can cut usage attributes: such records reach "
    "the spool as invalid dead letters and are counted under 'dead' (see `spool dead "
    "--status invalid`)",
    "  - records refused because the spool file could not be opened at all are counted only "
    "by the process (paygent_otel.records{outcome=refused})",
)
"""What the report cannot see, printed under it."""

_TOLERANCE = 1e-9


class LedgerView(Protocol):
    """What the report reads of a ledger of received calls (the sandbox's ``Ledger``)."""

    @property
    def path(self) -> Path: ...

    def totals(
        self, by: Sequence[str] = ..., *, since: float | None = ..., until: float | None = ...
    ) -> list[dict[str, Any]]: ...

    def duplicate_count(
        self, key: str | None = ..., *, since: float | None = ..., until: float | None = ...
    ) -> int: ...


@dataclass
class _Amount:
    records: int = 0
    minutes: float = 0.0
    characters: int = 0
    tokens: int = 0

    def add(self, row: JournalRow | _Amount) -> None:
        self.records += row.records
        self.minutes += row.minutes
        self.characters += row.characters
        self.tokens += row.tokens

    def same(self, other: _Amount) -> bool:
        return (
            self.records == other.records
            and self.characters == other.characters
            and self.tokens == other.tokens
            and math.isclose(self.minutes, other.minutes, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE)
        )

    def describe(self, kind: str) -> str:
        """``240 (4 min)``, ``11 (12450 chars)``, ``10 (26995 tokens)``."""
        parts = []
        if self.minutes or kind == "stt":
            parts.append(f"{_number(self.minutes)} min")
        if self.characters or kind == "tts":
            parts.append(f"{self.characters} chars")
        if self.tokens or kind == "sts":
            parts.append(f"{self.tokens} tokens")
        if not parts or not (self.records or self.minutes or self.characters or self.tokens):
            return str(self.records)
        return f"{self.records} ({' + '.join(parts)})"


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


@dataclass
class ConservationRow:
    """One period, customer and kind: where its recorded usage is."""

    period: str
    customer: str
    kind: str
    recorded: _Amount = field(default_factory=_Amount)
    parts: dict[str, _Amount] = field(default_factory=lambda: {c: _Amount() for c in COLUMNS})

    @property
    def accounted(self) -> _Amount:
        total = _Amount()
        for part in self.parts.values():
            total.add(part)
        return total

    @property
    def balanced(self) -> bool:
        return self.recorded.same(self.accounted)

    def as_dict(self) -> dict[str, Any]:
        """Flat fields for JSON and CSV: ``<column>_records``, ``_minutes``, ..."""
        out: dict[str, Any] = {"period": self.period, "customer": self.customer, "kind": self.kind}
        accounted = self.accounted
        for name, amount in (("recorded", self.recorded), *self.parts.items()):
            for unit in ("records", "minutes", "characters", "tokens"):
                out[f"{name}_{unit}"] = getattr(amount, unit)
        out["difference_records"] = self.recorded.records - accounted.records
        out["difference_minutes"] = self.recorded.minutes - accounted.minutes
        out["difference_characters"] = self.recorded.characters - accounted.characters
        out["difference_tokens"] = self.recorded.tokens - accounted.tokens
        out["balanced"] = self.balanced
        return out


@dataclass
class LedgerCheck:
    """What the spools say they delivered against what a sandbox ledger received."""

    customer: str
    kind: str
    delivered: _Amount
    ledger: _Amount

    @property
    def same(self) -> bool:
        return self.delivered.same(self.ledger)


@dataclass
class Report:
    """The conservation report of one or more spools (and, optionally, a ledger check)."""

    spools: list[str]
    period: str
    rows: list[ConservationRow]
    ledger: str | None = None
    ledger_checks: list[LedgerCheck] = field(default_factory=list)
    ledger_duplicates: int = 0
    invalid_dead_letters: int | None = None
    """Dead letters of status ``invalid`` in the spools now (None: not read)."""

    @property
    def balanced(self) -> bool:
        """True when every row balances and the ledger (if any) agrees."""
        return all(r.balanced for r in self.rows) and all(c.same for c in self.ledger_checks)

    def totals(self) -> ConservationRow:
        """Every row added up."""
        total = ConservationRow("total", "", "")
        for row in self.rows:
            total.recorded.add(row.recorded)
            for name, amount in row.parts.items():
                total.parts[name].add(amount)
        return total

    def to_text(self) -> str:
        """The report as a person reads it."""
        lines = [
            f"conservation report of {', '.join(self.spools)} (by {self.period}, UTC "
            "hours of recording)",
            "recorded = delivered + duplicate + dead + pending + purged + refused",
            "",
        ]
        if not self.rows:
            lines.append("nothing recorded in this window")
        else:
            headers = ["period", "customer", "kind", "recorded", *COLUMNS, "check"]
            body = [
                [row.period, row.customer, row.kind, row.recorded.describe(row.kind)]
                + [row.parts[c].describe(row.kind) for c in COLUMNS]
                + ["ok" if row.balanced else "DIFFERENCE"]
                for row in self.rows
            ]
            lines.append(format_table(headers, body, numbers=range(3, 3 + 1 + len(COLUMNS))))
        if self.ledger is not None:
            lines += ["", f"delivered against the ledger {self.ledger}:"]
            if not self.ledger_checks:
                lines.append("nothing delivered and nothing in the ledger")
            else:
                lines.append(
                    format_table(
                        ["customer", "kind", "spool delivered", "ledger received", "check"],
                        [
                            [
                                c.customer,
                                c.kind,
                                c.delivered.describe(c.kind),
                                c.ledger.describe(c.kind),
                                "ok" if c.same else "DIFFERENCE",
                            ]
                            for c in self.ledger_checks
                        ],
                        numbers={2, 3},
                    )
                )
            lines.append(
                f"the ledger also acknowledged {self.ledger_duplicates} repeated requests "
                "(same idempotency key) without recording them again"
            )
        bad = sum(not r.balanced for r in self.rows) + sum(not c.same for c in self.ledger_checks)
        lines += [
            "",
            "BALANCED: every recorded record is accounted for"
            if not bad
            else f"DIFFERENCE in {bad} rows: usage unaccounted for (or counted twice)",
            "",
            *BLIND_SPOTS,
        ]
        if self.invalid_dead_letters is not None:
            lines.append(
                f"counted here: {self.invalid_dead_letters} invalid records in the dead letters "
                "now (usage whose attributes broke the convention, cut attributes included)"
            )
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON document."""
        return {
            "spools": self.spools,
            "period": self.period,
            "balanced": self.balanced,
            "rows": [r.as_dict() for r in self.rows],
            "ledger": self.ledger,
            "ledger_checks": [
                {
                    "customer": c.customer,
                    "kind": c.kind,
                    "delivered": vars(c.delivered),
                    "ledger": vars(c.ledger),
                    "same": c.same,
                }
                for c in self.ledger_checks
            ],
            "ledger_duplicates": self.ledger_duplicates,
            "cannot_see": list(BLIND_SPOTS),
            "invalid_dead_letters": self.invalid_dead_letters,
        }


def _journal_rows(
    spools: Iterable[Path], since: float | None, until: float | None
) -> tuple[list[JournalRow], int]:
    """The journal rows of every spool, and their invalid dead letters now."""
    from paygent_otel.delivery.spool import open_sqlite_view

    rows: list[JournalRow] = []
    invalid = 0
    for path in spools:
        if str(path).lower().startswith(("postgresql:", "postgres:")):
            raise ValueError(
                "the delivered-usage journal is kept by SQLite spools; a PostgreSQL spool "
                "keeps none yet, so it cannot be reconciled here"
            )
        if not path.is_file():
            raise FileNotFoundError(f"no spool at {path} (pass --spool PATH)")
        spool = open_sqlite_view(path)  # reconciling changes nothing in the spool
        try:
            rows += spool.journal(since, until)
            invalid += spool.dead_letter_counts().get("invalid", 0)
        finally:
            spool.close()
    return rows, invalid


def conservation_report(
    spools: Sequence[str | Path],
    *,
    period: str = "day",
    since: float | None = None,
    until: float | None = None,
    tz: tzinfo = UTC,
    ledger: LedgerView | None = None,
) -> Report:
    """The conservation report of ``spools`` over ``[since, until)`` (by hour of recording),
    grouped by ``period`` (``hour``, ``day``, ``month`` in ``tz``), checked against a
    sandbox ``ledger`` when given."""
    paths = [Path(s) for s in spools]
    journal, invalid = _journal_rows(paths, since, until)
    report = report_from_journal(journal, [str(p) for p in paths], period=period, tz=tz)
    report.invalid_dead_letters = invalid
    if ledger is not None:
        check_against_ledger(report, journal, ledger, since, until)
    return report


def report_from_journal(
    journal: Sequence[JournalRow], spools: list[str], *, period: str = "day", tz: tzinfo = UTC
) -> Report:
    """The report of journal rows (and pending counts) read from ``spools``."""
    rows: dict[tuple[str, str, str], ConservationRow] = {}
    for entry in journal:
        name = datetime.fromtimestamp(entry.period, tz).strftime(PERIODS[period])
        key = (name, entry.customer, entry.kind)
        row = rows.get(key) or rows.setdefault(key, ConservationRow(*key))
        if entry.outcome == "recorded":
            row.recorded.add(entry)
        elif entry.outcome in row.parts:
            row.parts[entry.outcome].add(entry)
    return Report(spools, period, [rows[k] for k in sorted(rows)])


def check_against_ledger(
    report: Report,
    journal: Sequence[JournalRow],
    ledger: LedgerView,
    since: float | None = None,
    until: float | None = None,
) -> None:
    """Add to ``report`` what the journal says was delivered against what ``ledger``
    received (from the first journal hour on)."""
    delivered: dict[tuple[str, str], _Amount] = defaultdict(_Amount)
    for entry in journal:
        if entry.outcome == "delivered":
            delivered[(entry.customer, entry.kind)].add(entry)
    first = min((e.period for e in journal), default=since)
    received: dict[tuple[str, str], _Amount] = defaultdict(_Amount)
    for group in ledger.totals(by=("customer_id", "kind"), since=first, until=until):
        received[(group["customer_id"], group["kind"])] = _Amount(
            group["calls"],
            group["audio_minutes"] + group["sts_minutes"],
            group["characters"],
            group["sts_tokens"],
        )
    report.ledger = str(ledger.path)
    report.ledger_duplicates = ledger.duplicate_count(since=first, until=until)
    report.ledger_checks = [
        LedgerCheck(customer, kind, delivered[(customer, kind)], received[(customer, kind)])
        for customer, kind in sorted(delivered.keys() | received.keys())
    ]
