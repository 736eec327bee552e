"""Unit tests of compare.py (run by .ci/run: python3 -m unittest discover -s tests/autobahn)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class Compare(unittest.TestCase):
    def test_same_behaviour_passes(self):
        cases = {"1.1.1": "OK", "6.4.3": "NON-STRICT", "7.1.6": "INFORMATIONAL"}
        self.assertEqual(compare.compare(cases, dict(cases)), ([], []))

    def test_worse_behaviour_fails(self):
        problems, _ = compare.compare({"6.4.3": "INFORMATIONAL"}, {"6.4.3": "NON-STRICT"})
        self.assertEqual(len(problems), 1)
        self.assertIn("worse", problems[0])
        problems, _ = compare.compare({"1.1.1": "FAILED"}, {"1.1.1": "OK"})
        self.assertEqual(len(problems), 1)

    def test_unknown_behaviour_ranks_as_failed(self):
        problems, _ = compare.compare({"1.1.1": "WRONG CODE"}, {"1.1.1": "UNIMPLEMENTED"})
        self.assertEqual(len(problems), 1)

    def test_missing_case_fails(self):
        problems, _ = compare.compare({"1.1.1": "OK"}, {"1.1.1": "OK", "1.1.2": "OK"})
        self.assertEqual(problems, ["1.1.2: missing from the report (expected OK)"])

    def test_improvement_is_reported_not_failed(self):
        problems, improved = compare.compare({"6.4.3": "OK"}, {"6.4.3": "NON-STRICT"})
        self.assertEqual(problems, [])
        self.assertEqual(len(improved), 1)

    def test_new_case_must_be_acceptable(self):
        self.assertEqual(compare.compare({"9.9.9": "INFORMATIONAL"}, {}), ([], []))
        problems, _ = compare.compare({"9.9.9": "UNIMPLEMENTED"}, {})
        self.assertEqual(len(problems), 1)

    def test_groups_in_numeric_order(self):
        lines = compare.by_group({"10.1.1": "OK", "2.1": "OK", "2.2": "NON-STRICT", "9.1": "OK"})
        self.assertEqual(lines, ["group  2: OK=1, NON-STRICT=1", "group  9: OK=1", "group 10: OK=1"])

    def test_command_line_exit_status(self):
        with tempfile.TemporaryDirectory() as d:
            index = os.path.join(d, "index.json")
            expected = os.path.join(d, "expected.json")
            with open(index, "w") as f:
                json.dump({"ringhub": {"1.1.1": {"behavior": "OK"}, "1.1.2": {"behavior": "FAILED"}}}, f)

            def run(*args):
                return subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), *args],
                                      capture_output=True, text=True)

            self.assertEqual(run(index, expected, "--update").returncode, 0)
            with open(expected) as f:
                self.assertEqual(json.load(f), {"1.1.1": "OK", "1.1.2": "FAILED"})
            self.assertEqual(run(index, expected).returncode, 0)
            with open(expected, "w") as f:
                json.dump({"1.1.1": "OK", "1.1.2": "OK"}, f)
            r = run(index, expected)
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertIn("1.1.2: FAILED, worse than the expected OK", r.stdout)

    def test_checked_in_expectations_are_acceptable(self):
        # The bar: every case of groups 1-10 OK, NON-STRICT or INFORMATIONAL.
        with open(os.path.join(HERE, "expected.json")) as f:
            expected = json.load(f)
        self.assertGreaterEqual(len(expected), 300)
        bad = {c: b for c, b in expected.items() if compare.rank(b) < compare.ACCEPTABLE}
        self.assertEqual(bad, {})


if __name__ == "__main__":
    unittest.main()
