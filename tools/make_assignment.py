"""
Write the student's copy of kivla: every exercise body blanked, the hidden tests gone.

    python tools/make_assignment.py DIR
    python tools/make_assignment.py --check-blank DIR/grades.xml   (CI: a fresh copy's grades)

Copies the repository's tracked files (`git ls-files`) into DIR, a new folder. In every Python file:
  - a body between "### BEGIN SOLUTION: exercise N, <title>" and "### END SOLUTION" becomes
    `raise NotImplementedError("Exercise N: <title> (docs/course.md)")` at the marker's indent;
  - a block between "### BEGIN HIDDEN TESTS" and "### END HIDDEN TESTS" is dropped (the tests that
    show a classic mistake fails an exercise: they hold near-answers).
Nothing of either remains, markers included (the same convention as nbgrader's). Grade with
`python -m pytest -q -k exercise` in DIR (`--junitxml=grades.xml`: one pass/fail per test).
`--check-blank` reads a fresh copy's `pytest -k exercise --junitxml` report and fails unless every
exercise test failed with its own NotImplementedError: the copy asks for every exercise, hides none.
Standard library only.
"""

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTION = re.compile(r"^(\s*)### BEGIN SOLUTION: exercise (\d+), (.+?)\s*$")
HIDDEN = re.compile(r"^\s*### BEGIN HIDDEN TESTS")


def blank(text, path="<text>"):
    """The student version of one Python file's text; -> (text, {exercise number: title})."""
    out, found, lines, i = [], {}, text.split("\n"), 0
    while i < len(lines):
        line, m = lines[i], SOLUTION.match(lines[i])
        if m or HIDDEN.match(line):
            end = "### END SOLUTION" if m else "### END HIDDEN TESTS"
            j = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == end), None)
            if j is None:
                raise SystemExit(f"error: {path}:{i + 1}: no '{end}' after this marker")
            if m:
                indent, n, title = m.group(1), int(m.group(2)), m.group(3)
                found[n] = title
                out.append(f'{indent}raise NotImplementedError("Exercise {n}: {title} '
                           '(docs/course.md)")')
            i = j + 1
            continue
        if line.strip().startswith(("### END SOLUTION", "### END HIDDEN", "### BEGIN")):
            raise SystemExit(f"error: {path}:{i + 1}: a marker out of place: {line.strip()!r}")
        out.append(line)
        i += 1
    return "\n".join(out), found


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"error: {ROOT} is not a git checkout (git ls-files lists what to copy)")
    return [p for p in out.stdout.decode().split("\0") if p]


def check_blank(report):
    """1 unless every test_exercise[N] of the junit report failed with its NotImplementedError."""
    try:
        cases = {c.get("name"): c for c in ET.parse(report).iter("testcase")}
    except (OSError, ET.ParseError) as e:
        raise SystemExit(f"error: {report} is not a readable junit report: {e}")
    numbers = sorted(int(n[14:-1]) for n in cases if n.startswith("test_exercise["))  # [N]
    bad = [n for n in cases if "exercise" in n and not n.startswith("test_exercise[")]
    for n in numbers:
        fail = cases[f"test_exercise[{n}]"].find("failure")
        text = "" if fail is None else fail.get("message", "") + (fail.text or "")
        ok = f"NotImplementedError: Exercise {n}:" in text
        print(f"student copy: exercise {n} " + ("fails with its own NotImplementedError" if ok else
                                                 "does NOT fail with its own NotImplementedError"))
        bad += [] if ok else [n]
    if bad or not numbers:
        print(f"error: the student copy is not blank: {bad or 'no exercise tests'}")
        return 1
    return 0


def main(argv):
    if len(argv) == 2 and argv[0] == "--check-blank":
        return check_blank(argv[1])
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    dest = os.path.abspath(argv[0])
    if os.path.exists(dest) and os.listdir(dest):
        raise SystemExit(f"error: {argv[0]} exists and is not empty: name a new folder")
    if dest == ROOT or dest.startswith(ROOT + os.sep):
        raise SystemExit(f"error: {argv[0]} is inside the repository: name a folder outside it")
    exercises = {}
    for rel in tracked_files():
        src, dst = os.path.join(ROOT, rel), os.path.join(dest, rel)
        if not os.path.isfile(src):
            continue  # deleted in the work tree, not yet in git
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel.endswith(".py") and rel != "tools/make_assignment.py":
            with open(src, encoding="utf-8") as f:
                text, found = blank(f.read(), rel)
            exercises.update(found)
            with open(dst, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            shutil.copy2(src, dst)
    names = ", ".join(f"{n} {t}" for n, t in sorted(exercises.items()))
    print(f"wrote {argv[0]}: {len(exercises)} exercises blanked ({names}); "
          f"grade with: cd {argv[0]} && python -m pytest -q -k exercise")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
