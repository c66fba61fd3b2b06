"""Reads `qsem --metrics` on stdin and checks it with a real parser of
Prometheus's text format (prometheus_client's), as node_exporter's textfile
collector would read it. Prints one line per sample, `NAME<TAB>LABELS<TAB>VALUE`
with the labels as JSON and the value as %g (so that escaped ids come back as they were), for
tests/history.rs to compare; exits non-zero, saying why, on anything wrong.
"""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

EXPECTED = {
    "qsem_runs": "counter",
    "qsem_wait_seconds": "histogram",
    "qsem_run_seconds": "histogram",
    "qsem_last_failure_timestamp_seconds": "gauge",
    "qsem_holders": "gauge",
    "qsem_waiting": "gauge",
}


def fail(why):
    print(f"prometheus_check: {why}", file=sys.stderr)
    sys.exit(1)


def check_histogram(family):
    """Buckets cumulative and ending at +Inf, which equals _count."""
    by_id = {}
    for s in family.samples:
        by_id.setdefault(s.labels["id"], []).append(s)
    for ident, samples in by_id.items():
        buckets = [s for s in samples if s.name.endswith("_bucket")]
        counts = [s.value for s in buckets]
        if counts != sorted(counts):
            fail(f"{family.name}{{id={ident!r}}}: buckets not cumulative: {counts}")
        if not buckets or buckets[-1].labels["le"] != "+Inf":
            fail(f"{family.name}{{id={ident!r}}}: no +Inf bucket last")
        count = [s.value for s in samples if s.name.endswith("_count")]
        if count != [counts[-1]]:
            fail(f"{family.name}{{id={ident!r}}}: _count {count} != +Inf bucket {counts[-1]}")


def main():
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser's own message says what is wrong
        fail(f"cannot parse: {e!r}")
    # Parsers since 0.4 name a counter's family without its _total.
    names = [f.name.removesuffix("_total") if f.type == "counter" else f.name for f in families]
    seen = dict(zip(names, (f.type for f in families)))
    if len(seen) != len(families):
        fail(f"a family appears twice: {[f.name for f in families]}")
    if seen != EXPECTED:
        fail(f"families {seen}, expected {EXPECTED}")
    for family in families:
        if not family.documentation:
            fail(f"{family.name} has no HELP")
        if family.type == "histogram":
            check_histogram(family)
        for s in family.samples:
            print(f"{s.name}\t{json.dumps(s.labels, sort_keys=True)}\t{float(s.value):g}")


main()
