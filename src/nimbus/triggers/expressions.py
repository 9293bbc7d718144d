"""EventBridge schedule expressions: ``rate(value unit)`` and six-field ``cron(...)``, UTC.

The cron grammar (``?``, ``L``, ``W``, ``#``, day-of-week 1-7 = SUN-SAT, names, years 1970-2199) is
aws-croniter's, not ours: a cron engine is easy to get subtly wrong. This module only frames it (the
``rate``/``cron`` wrappers, errors that name the field) and answers the two questions the tick loop asks.
"""

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aws_croniter import AwsCroniter
from aws_croniter import exceptions as cron_errors

from nimbus.errors import InvalidRequest

EXPRESSION_MAX = 256  # EventBridge's limit on a ScheduleExpression
_RATE = re.compile(r"rate\(\s*(\d{1,9})\s+(minute|minutes|hour|hours|day|days)\s*\)")
_CRON = re.compile(r"cron\((.*)\)", re.DOTALL)
_UNITS = {"minute": 60, "hour": 3600, "day": 86400}
_FIELD_ERRORS = (  # most specific first: every one is an AwsCroniterExpressionError
    (cron_errors.AwsCroniterExpressionMinuteError, "minutes"),
    (cron_errors.AwsCroniterExpressionHourError, "hours"),
    (cron_errors.AwsCroniterExpressionDayOfMonthError, "day-of-month"),
    (cron_errors.AwsCroniterExpressionMonthError, "month"),
    (cron_errors.AwsCroniterExpressionDayOfWeekError, "day-of-week"),
    (cron_errors.AwsCroniterExpressionYearError, "year"),
)


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed schedule expression; ``text`` is what the user wrote, kept verbatim."""

    text: str
    period: timedelta | None = None
    """rate(): the interval; None for cron()."""
    cron: AwsCroniter | None = None

    def first_after(self, start: datetime) -> datetime | None:
        """The first fire time after ``start`` (a schedule's creation): rate() counts from it, as
        EventBridge does; cron() takes the next matching minute. None: the cron has no future match."""
        if self.period is not None:
            return start + self.period
        return self.next_after(start)

    def next_after(self, when: datetime) -> datetime | None:
        """The first fire time strictly after ``when``, or None when the cron's years are over."""
        if self.period is not None:
            return when + self.period
        assert self.cron is not None
        [found] = self.cron.get_next(when.astimezone(UTC))
        return found

    def latest_due(self, next_fire_at: datetime, now: datetime) -> datetime:
        """The latest fire time in ``[next_fire_at, now]`` (``next_fire_at <= now``, itself a fire time).

        Ticks missed while no node ran collapse into this one: a nightly job that missed three nights
        runs once, as today's, not three times back to back.
        """
        if self.period is not None:
            return next_fire_at + ((now - next_fire_at) // self.period) * self.period
        assert self.cron is not None
        [found] = self.cron.get_prev(now.astimezone(UTC), inclusive=True)
        return found if found is not None and found >= next_fire_at else next_fire_at


def parse(text: str) -> Expression:
    """Parse ``rate(...)`` or ``cron(...)``; ``InvalidRequest`` (422) naming what is wrong."""
    if not isinstance(text, str) or len(text) > EXPRESSION_MAX:
        raise InvalidRequest(f"a schedule expression is a string of at most {EXPRESSION_MAX} characters")
    text = text.strip()
    if text.startswith("rate("):
        return _parse_rate(text)
    match = _CRON.fullmatch(text)
    if match is None:
        raise InvalidRequest(f"{text!r} is neither rate(value unit) nor cron(minutes hours day-of-month month "
                             "day-of-week year)")
    fields = match.group(1).split()
    if len(fields) != 6:
        raise InvalidRequest(f"cron() takes six fields (minutes hours day-of-month month day-of-week year), "
                             f"not {len(fields)}: {text!r}")
    try:
        cron = AwsCroniter(" ".join(fields))
    except cron_errors.AwsCroniterExpressionError as exc:
        field = next((name for kind, name in _FIELD_ERRORS if isinstance(exc, kind)), None)
        where = (f"the {field} field is" if field else
                 "the day-of-month and day-of-week fields are" if "question mark" in str(exc) else "it is")
        raise InvalidRequest(f"cron expression {text!r}: {where} wrong: {exc}") from None
    except (ValueError, IndexError, KeyError) as exc:  # anything else the library trips on is still a bad input
        raise InvalidRequest(f"cron expression {text!r} is not valid: {exc}") from None
    return Expression(text, cron=cron)


def _parse_rate(text: str) -> Expression:
    match = _RATE.fullmatch(text)
    if match is None:
        raise InvalidRequest(f"{text!r}: a rate is rate(value unit), the unit minute(s), hour(s) or day(s)")
    value, unit = int(match.group(1)), match.group(2)
    if value < 1:
        raise InvalidRequest(f"{text!r}: the value of a rate must be a positive whole number")
    if (value == 1) != (not unit.endswith("s")):
        raise InvalidRequest(f"{text!r}: the unit is singular for a value of 1 and plural otherwise "
                             f"(rate(1 {unit.rstrip('s')}), rate({max(value, 2)} {unit.rstrip('s')}s))")
    period = timedelta(seconds=value * _UNITS[unit.rstrip("s")])
    if period > timedelta(days=36500):
        raise InvalidRequest(f"{text!r}: a rate longer than a hundred years never fires")
    return Expression(text, period=period)


def scheduled_event(*, fire_time: datetime, function_name: str, schedule_name: str, region: str,
                    account_id: str) -> dict:
    """The EventBridge "Scheduled Event" a target receives, for one fire time."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": account_id,
        "time": fire_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:events:{region}:{account_id}:rule/{function_name}-{schedule_name}"],
        "detail": {},
    }
