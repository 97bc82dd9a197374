"""
Write the student's copy of kivla: every exercise body blanked, the hidden tests gone.

    python tools/make_assignment.py DIR

Copies the repository's tracked files (`git ls-files`) into DIR, a new folder. In every Python file:
  - a body between "### BEGIN SOLUTION: exercise N, <title>" and "### END SOLUTION" becomes
    `raise NotImplementedError("Exercise N: <title> (docs/course.md)")` at the marker's indent;
  - a block between "### BEGIN HIDDEN TESTS" and "### END HIDDEN TESTS" is dropped (the tests that
    show a classic mistake fails an exercise: they hold near-answers).
Nothing of either remains, markers included (the same convention as nbgrader's). Grade with
`python -m pytest -q -k exercise` in DIR (`--junitxml=grades.xml`: one pass/fail per test).
Standard library only.
"""

import os
import re
import shutil
import subprocess
import sys

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


def main(argv):
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
