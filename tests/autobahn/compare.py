#!/usr/bin/env python3
"""Compare an Autobahn|Testsuite report with the expected behaviour of every case.

Usage: compare.py INDEX_JSON EXPECTED_JSON [--agent NAME] [--update]

INDEX_JSON is the fuzzingclient's index.json ({agent: {case: {"behavior": ...}}}); EXPECTED_JSON
maps case ids to behaviours ({"1.1.1": "OK", ...}). Behaviours rank
OK > NON-STRICT > INFORMATIONAL > UNIMPLEMENTED > FAILED (anything else ranks with FAILED).

Prints the counts by case group, the cases that got better than expected, and the problems; exits
1 when a case got worse than expected, an expected case is missing, or a case not in the
expectations is worse than INFORMATIONAL. --update rewrites EXPECTED_JSON from the report instead
(after a deliberate change; review the diff).
"""
import collections
import json
import sys

RANK = {"OK": 4, "NON-STRICT": 3, "INFORMATIONAL": 2, "UNIMPLEMENTED": 1, "FAILED": 0}
# A case outside the expectations passes if it is at least this good.
ACCEPTABLE = RANK["INFORMATIONAL"]


def rank(behavior):
    return RANK.get(behavior, 0)


def case_key(case_id):
    return [int(part) for part in case_id.split(".")]


def compare(actual, expected):
    """actual, expected: {case id: behaviour}. Returns (problems, improvements) as lists of text."""
    problems, improvements = [], []
    for case in sorted(set(expected) | set(actual), key=case_key):
        want, got = expected.get(case), actual.get(case)
        if got is None:
            problems.append(f"{case}: missing from the report (expected {want})")
        elif want is None:
            if rank(got) < ACCEPTABLE:
                problems.append(f"{case}: {got}, and the case is not in the expectations")
        elif rank(got) < rank(want):
            problems.append(f"{case}: {got}, worse than the expected {want}")
        elif rank(got) > rank(want):
            improvements.append(f"{case}: {got}, better than the expected {want}")
    return problems, improvements


def by_group(actual):
    """Lines 'group N: BEHAVIOUR=count, ...' in case order."""
    groups = collections.OrderedDict()
    for case in sorted(actual, key=case_key):
        groups.setdefault(case.split(".")[0], collections.Counter())[actual[case]] += 1
    lines = []
    for group, counts in groups.items():
        parts = ", ".join(f"{b}={n}" for b, n in sorted(counts.items(), key=lambda x: -rank(x[0])))
        lines.append(f"group {group:>2}: {parts}")
    return lines


def load_report(path, agent):
    with open(path) as f:
        index = json.load(f)
    if agent is None:
        if len(index) != 1:
            sys.exit(f"{path} holds agents {sorted(index)}: choose one with --agent")
        agent = next(iter(index))
    if agent not in index:
        sys.exit(f"{path} has no agent {agent!r} (it has {sorted(index)})")
    return {case: result["behavior"] for case, result in index[agent].items()}


def main(argv):
    args, agent, update = [], None, False
    it = iter(argv)
    for a in it:
        if a == "--agent":
            agent = next(it, None)
        elif a == "--update":
            update = True
        else:
            args.append(a)
    if len(args) != 2:
        sys.exit(__doc__)
    index_path, expected_path = args
    actual = load_report(index_path, agent)
    if update:
        with open(expected_path, "w") as f:
            f.write("{\n")
            cases = sorted(actual, key=case_key)
            for i, case in enumerate(cases):
                f.write(f'  "{case}": "{actual[case]}"' + ("," if i + 1 < len(cases) else "") + "\n")
            f.write("}\n")
        print(f"wrote {len(actual)} expectations to {expected_path}")
        return 0
    with open(expected_path) as f:
        expected = json.load(f)
    problems, improvements = compare(actual, expected)
    print(f"Autobahn: {len(actual)} cases in the report, {len(expected)} expected")
    for line in by_group(actual):
        print("  " + line)
    for line in improvements:
        print("  improved: " + line)
    for line in problems:
        print("  PROBLEM: " + line)
    if problems:
        print(f"{len(problems)} case(s) worse than expected or missing "
              f"(update {expected_path} with --update only after a deliberate change)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
