"""EventBridge schedule expressions: every example of its documentation parses, malformed ones are a 422
that names what is wrong, and the tick arithmetic (latest due, next) is right."""

from datetime import UTC, datetime, timedelta

import pytest

from nimbus.errors import InvalidRequest
from nimbus.triggers.expressions import parse, scheduled_event

T0 = datetime(2026, 1, 1, tzinfo=UTC)  # a Thursday

DOC_EXAMPLES = [  # EventBridge "Schedule expressions" (cron and rate examples)
    ("cron(15 10 * * ? *)", datetime(2026, 1, 1, 10, 15, tzinfo=UTC)),
    ("cron(0 18 ? * MON-FRI *)", datetime(2026, 1, 1, 18, 0, tzinfo=UTC)),
    ("cron(0 8 1 * ? *)", datetime(2026, 1, 1, 8, 0, tzinfo=UTC)),
    ("cron(0/10 * ? * MON-FRI *)", datetime(2026, 1, 1, 0, 10, tzinfo=UTC)),
    ("cron(0/5 8-17 ? * MON-FRI *)", datetime(2026, 1, 1, 8, 0, tzinfo=UTC)),
    ("cron(0 9 ? * 2#1 *)", datetime(2026, 1, 5, 9, 0, tzinfo=UTC)),  # first Monday
    ("cron(0 10 * * ? *)", datetime(2026, 1, 1, 10, 0, tzinfo=UTC)),
    ("cron(0 12 * * ? *)", datetime(2026, 1, 1, 12, 0, tzinfo=UTC)),
    ("cron(0 0 L * ? *)", datetime(2026, 1, 31, tzinfo=UTC)),
    ("cron(0 0 15W * ? *)", datetime(2026, 1, 15, tzinfo=UTC)),
    ("cron(0 0 ? * 6L *)", datetime(2026, 1, 30, tzinfo=UTC)),  # last Friday
    ("cron(30 2 ? * SUN 2027)", datetime(2027, 1, 3, 2, 30, tzinfo=UTC)),
    ("rate(1 minute)", T0 + timedelta(minutes=1)),
    ("rate(5 minutes)", T0 + timedelta(minutes=5)),
    ("rate(1 hour)", T0 + timedelta(hours=1)),
    ("rate(12 hours)", T0 + timedelta(hours=12)),
    ("rate(1 day)", T0 + timedelta(days=1)),
    ("rate(7 days)", T0 + timedelta(days=7)),
]


@pytest.mark.parametrize(("text", "first"), DOC_EXAMPLES)
def test_documented_examples_parse_and_fire_when_eventbridge_would(text, first):
    assert parse(text).first_after(T0) == first


MALFORMED = [
    ("cron(0 0 1 * ?)", "six fields"),
    ("cron(0 0 1 * ? * *)", "six fields"),
    ("cron(0 0 * * * *)", "day-of-month and day-of-week"),
    ("cron(0 0 1 * MON *)", "day-of-month and day-of-week"),
    ("cron(60 0 * * ? *)", "minutes field"),
    ("cron(0 24 * * ? *)", "hours field"),
    ("cron(0 0 32 * ? *)", "day-of-month field"),
    ("cron(0 0 1 13 ? *)", "month field"),
    ("cron(0 0 ? * 8 *)", "day-of-week field"),
    ("cron(0 0 1 * ? 2300)", "year field"),
    ("cron(0 0 1 * ? 1969)", "year field"),
    ("rate(1 minutes)", "singular"),
    ("rate(5 minute)", "singular"),
    ("rate(0 hours)", "positive"),
    ("rate(5 seconds)", "rate(value unit)"),
    ("rate(-1 days)", "rate(value unit)"),
    ("rate(5)", "rate(value unit)"),
    ("every 5 minutes", "neither"),
    ("", "neither"),
    ("cron(" + "1 " * 200 + ")", "at most"),
]


@pytest.mark.parametrize(("text", "says"), MALFORMED)
def test_malformed_expressions_are_refused_naming_what_is_wrong(text, says):
    with pytest.raises(InvalidRequest) as caught:
        parse(text)
    assert says in str(caught.value)


def test_missed_ticks_collapse_into_the_latest_due_one():
    rate = parse("rate(5 minutes)")
    assert rate.latest_due(T0, T0 + timedelta(minutes=23)) == T0 + timedelta(minutes=20)
    assert rate.latest_due(T0, T0) == T0
    nightly = parse("cron(0 3 * * ? *)")
    due = nightly.latest_due(datetime(2026, 1, 1, 3, tzinfo=UTC), datetime(2026, 1, 4, 12, tzinfo=UTC))
    assert due == datetime(2026, 1, 4, 3, tzinfo=UTC)
    assert nightly.next_after(due) == datetime(2026, 1, 5, 3, tzinfo=UTC)


def test_a_cron_of_past_years_has_no_next_time():
    assert parse("cron(0 0 1 1 ? 2025)").first_after(T0) is None


def test_scheduled_event_has_eventbridge_shape():
    event = scheduled_event(fire_time=T0, function_name="nightly", schedule_name="at-3", region="eu-west-1",
                            account_id="123456789012")
    assert event["detail-type"] == "Scheduled Event" and event["source"] == "aws.events"
    assert event["time"] == "2026-01-01T00:00:00Z" and event["detail"] == {} and event["version"] == "0"
    assert event["resources"] == ["arn:aws:events:eu-west-1:123456789012:rule/nightly-at-3"]
